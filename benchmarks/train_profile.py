"""Where a training step's time goes: the real `train_ncp_{dpo,cpo,sft}.py` run in this process with timers around
each phase of Algorithm 1's loop, wall time and CPU time (user and system, all threads) per phase.

Phases (nested ones are also counted inside their parent): data (the loader's next batch), encode (VAE and text
encoders; nothing when training from the cache), objective (the forward pass: inside it the policy's and the
reference's denoiser calls and f's calls), backward, optimizer (clip, step, zero_grad, one host read), and
"rest of the step" (the loop's own work: tracking, logs, anything not inside a phase). A system time that is a large
share of a phase's wall time is the kernel's: page faults of freshly mapped memory (the allocator returning and
re-mapping large buffers every step) or thread scheduling.

    python benchmarks/train_profile.py --steps-from 3 -- --config configs/sd15_ncp_dpo.yaml model.pretrained=DIR ...
    python benchmarks/train_profile.py --loss dpo --json prof.json -- --config configs/tiny_sd15_ncp_dpo.yaml

Everything after `--` is the training script's own command line (keys as in the configs); the table is of steps
--steps-from on (step 1 holds the first-call costs).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import resource
import sys
import time
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from ncp.hostmem import keep_host_memory  # noqa: E402

keep_host_memory()  # before torch loads, as the training scripts do


class PhaseClock:
    """Wall, user and system seconds per phase and per optimizer step."""

    def __init__(self):
        self.steps: list[dict] = []
        self.current: dict = defaultdict(lambda: [0.0, 0.0, 0.0])
        self.step_start = self._now()

    @staticmethod
    def _now():
        ru = resource.getrusage(resource.RUSAGE_SELF)  # every thread of this process
        return time.perf_counter(), ru.ru_utime, ru.ru_stime

    @contextlib.contextmanager
    def phase(self, name: str):
        start = self._now()
        try:
            yield
        finally:
            for i, (a, b) in enumerate(zip(start, self._now())):
                self.current[name][i] += b - a

    def end_step(self):
        now = self._now()
        self.current["step"] = [b - a for a, b in zip(self.step_start, now)]
        self.steps.append(dict(self.current))
        self.current, self.step_start = defaultdict(lambda: [0.0, 0.0, 0.0]), now


def timed(clock: PhaseClock, name, fn):
    """fn, its calls counted as phase `name` (a callable name(args) picks the phase per call)."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with clock.phase(name(*args, **kwargs) if callable(name) else name):
            return fn(*args, **kwargs)
    return wrapper


@contextlib.contextmanager
def installed(clock: PhaseClock):
    """Timers around the loop's phases, by replacing the functions the loop calls (the loop itself is unchanged);
    the originals come back on exit."""
    import torch
    from accelerate import Accelerator

    import ncp.objective as objective
    import ncp.train as train
    from ncp.run import Run

    saved = [(train, "encode"), (train, "compute_objective"), (objective, "predict"), (objective, "perceptual_errors"),
             (Accelerator, "backward"), (Run, "step_optimizer"), (Run, "batches")]
    originals = [getattr(owner, name) for owner, name in saved]
    step_optimizer, batches = timed(clock, "optimizer", Run.step_optimizer), Run.batches

    def step_and_mark(self):
        done = step_optimizer(self)
        clock.end_step()
        return done

    def timed_batches(self, loader):
        it = batches(self, loader)
        while True:
            with clock.phase("data"):
                try:
                    batch = next(it)
                except StopIteration:
                    return
            yield batch

    train.encode = timed(clock, "encode (VAE, text)", train.encode)
    train.compute_objective = timed(clock, "objective forward", train.compute_objective)
    objective.predict = timed(clock, lambda *a, **k: "  denoiser, policy" if torch.is_grad_enabled()
                              else "  denoiser, reference", objective.predict)
    objective.perceptual_errors = timed(clock, "  f (perceptual errors)", objective.perceptual_errors)
    Accelerator.backward = timed(clock, "backward", Accelerator.backward)
    Run.step_optimizer, Run.batches = step_and_mark, timed_batches
    try:
        yield clock
    finally:
        for (owner, name), fn in zip(saved, originals):
            setattr(owner, name, fn)


ORDER = ["data", "encode (VAE, text)", "objective forward", "  denoiser, policy", "  denoiser, reference",
         "  f (perceptual errors)", "backward", "optimizer"]


def summarize(steps: list[dict], first: int) -> dict:
    """Mean wall / user / sys seconds per phase over steps first.. (1-based), 'rest of the step' by difference."""
    use = steps[first - 1:] or steps
    names = [n for n in ORDER if any(n in s for s in use)] + sorted({n for s in use for n in s} - set(ORDER) - {"step"})
    mean = {n: [sum(s.get(n, [0, 0, 0])[i] for s in use) / len(use) for i in range(3)] for n in names + ["step"]}
    top = [n for n in names if not n.startswith(" ")]
    mean["rest of the step"] = [mean["step"][i] - sum(mean[n][i] for n in top) for i in range(3)]
    return dict(steps=len(use), first=first, phases=mean)


def print_table(summary: dict) -> None:
    phases, step_wall = summary["phases"], summary["phases"]["step"][0]
    print(f"\nmean of steps {summary['first']}-{summary['first'] + summary['steps'] - 1}\n\n"
          "| phase | wall s | share of the step | user s | sys s |\n|---|---|---|---|---|")
    for name, (wall, user, sys_s) in phases.items():
        if name != "step":
            print(f"| {name} | {wall:.3f} | {wall / step_wall:.1%} | {user:.3f} | {sys_s:.3f} |")
    wall, user, sys_s = phases["step"]
    print(f"| **whole step** | {wall:.3f} | 100% | {user:.3f} | {sys_s:.3f} |")


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else argv
    ours, train_args = (argv[:argv.index("--")], argv[argv.index("--") + 1:]) if "--" in argv else (argv, [])
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--loss", default="dpo", choices=("dpo", "cpo", "sft"), help="which train_ncp_<loss>.py")
    p.add_argument("--steps-from", type=int, default=3, help="first step in the mean (1-based)")
    p.add_argument("--json", help="write the per-step phases and the summary here")
    a = p.parse_args(ours)
    from accelerate.state import AcceleratorState

    from ncp.train import main as train_main

    AcceleratorState._reset_state(reset_partial_state=True)  # accelerate keeps a singleton per process: start afresh
    with installed(PhaseClock()) as clock:
        run = train_main(train_args, loss=a.loss, description=__doc__)
    if run.step == 0:
        raise SystemExit("no optimizer step was taken")
    summary = summarize(clock.steps, a.steps_from)
    print_table(summary)
    if a.json:
        Path(a.json).write_text(json.dumps(dict(summary=summary, steps=clock.steps, argv=train_args), indent=1))
    return summary


if __name__ == "__main__":
    main()
