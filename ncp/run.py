"""One training run's bookkeeping: its folder, resume point, optimizer-step policy, logs, checkpoints and stops.

`Run.open` guards the folder and finds the resume point before any model loads; `Run.start` restores the
accelerate state (or writes the resolved config of a fresh run); the loop in `ncp.train.train` then calls
`stop_within_step`, `step_optimizer`, `log`, `checkpoint` and `finish`. SIGINT / SIGTERM make the run stop at the
next micro-step with a checkpoint (the gradients accumulated so far included) and the command that resumes it.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import shutil
import signal
import sys
import threading
import time
from pathlib import Path

import torch

from .checkpoint import (checkpoint_dirs, checkpoint_position, find_checkpoint, load_partial_step, read_state,
                         register_state_hooks, save_checkpoint, shared_folder)
from .config import Config, changed_keys, save_config
from .data.loader import endless_batches
from .errors import NcpError
from .fast import compile_stats, recompile_reasons
from .metrics import METRICS_FILE, read_metrics, write_metrics
from .models import LORA_FILE, save_lora

log = logging.getLogger("ncp")
RUN_FILES = ("config.yaml", METRICS_FILE, LORA_FILE, "checkpoints")  # any of these: the folder holds a run


class Run:
    def __init__(self, cfg: Config, acc, resume: Path | None, resume_command: str | None):
        self.cfg, self.acc, self.out = cfg, acc, Path(cfg.train.output_dir)
        self.resume_path, self.resume_command = resume, resume_command
        self.step = 0  # optimizer steps done (a step the GradScaler skipped is not one)
        self.batches_seen = 0  # micro-batches consumed: the data position
        self.bad_steps = self.bad_in_a_row = self.scaler_skips = 0
        self._compiles_seen = self._recompiles_seen = 0
        self.signal_seen: int | None = None  # set by the handler at any time
        self.stop_signal: int | None = None  # the same, agreed by all processes at a micro-step's end
        self.shared = True  # one train.output_dir seen by every machine (else each machine writes its own copy)
        self._flag_group = None  # a CPU (gloo) group for the stop flag: agreeing needs no device sync
        self.max_steps = cfg.train.max_steps
        self._micro: list[dict] = []
        self.record: dict = {}

    # -- before the models load ------------------------------------------------------------------------
    @classmethod
    def open(cls, cfg: Config, acc, resume_command: str | None = None) -> "Run":
        """Refuse a new run into a used folder, clear it with train.overwrite, find the checkpoint to resume and
        check that it was written with the same run-defining settings. Cheap: runs before the models load."""
        tc, out = cfg.train, Path(cfg.train.output_dir)
        shared = shared_folder(acc, out)
        acc.project_configuration.save_on_each_node = not shared  # accelerate's optimizer / scheduler files
        if tc.overwrite and (acc.is_main_process if shared else acc.is_local_main_process) and out.exists():
            log.info("train.overwrite=true: clearing %s", out)
            shutil.rmtree(out)
        acc.wait_for_everyone()
        resume = find_checkpoint(tc.output_dir, tc.resume_from)
        if acc.num_processes > 1:  # node-local folders: every machine must hold the same checkpoint
            state = read_state(resume) if resume else {"step": -1}
            found = acc.gather(torch.tensor([[state["step"], state.get("micro", 0)]], device=acc.device))
            if not (found == found[0]).all():
                raise NcpError(f"train.output_dir={out}: the machines hold different checkpoints to resume "
                               f"(this one: {resume}); copy the newest checkpoint folder to every machine")
        if tc.resume_from == "latest" and resume is None:
            log.info("no checkpoint in %s: starting fresh", out / "checkpoints")
        if tc.resume_from is None:
            used = [name for name in RUN_FILES if (out / name).exists()]
            if used:
                raise NcpError(f"train.output_dir={out} already holds a run ({', '.join(used)}): continue it with "
                               f"train.resume_from=latest, or replace it with train.overwrite=true (deletes the folder)")
        if resume is not None:
            saved = read_state(resume)["fingerprint"]
            changed = changed_keys(saved, cfg.fingerprint(acc.num_processes))
            if changed:
                raise NcpError(f"cannot resume {resume}: settings that define the run changed ({'; '.join(changed)}). "
                               f"Set them back, or start a new run in another train.output_dir")
        run = cls(cfg, acc, resume, resume_command)
        run.shared = shared
        return run

    # -- after the models load ---------------------------------------------------------------------------
    def set_length(self, batches_per_epoch: int) -> int:
        """Optimizer steps of the run: train.max_steps, or train.max_epochs passes over this process's batches."""
        tc = self.cfg.train
        if tc.max_epochs is not None:
            self.max_steps = math.ceil(tc.max_epochs * batches_per_epoch / tc.grad_accum)
        return self.max_steps

    def start(self, parts, optimizer, lr_scheduler, generator: torch.Generator) -> None:
        """Restore the checkpoint's accelerate state and counters, or write the resolved config; open the logs.
        `parts` is ncp.train.Parts with the prepared U-Net."""
        self.parts, self.optimizer, self.lr_scheduler, self.generator = parts, optimizer, lr_scheduler, generator
        tc, acc = self.cfg.train, self.acc
        register_state_hooks(acc, parts.arch, generator, self.shared)
        if acc.num_processes > 1 and torch.distributed.get_backend() != "gloo":
            self._flag_group = torch.distributed.new_group(backend="gloo")
        if self.resume_path is not None:
            acc.load_state(str(self.resume_path))  # also accelerate's micro-step count: accumulation resumes in place
            state = read_state(self.resume_path)
            self.step, self.batches_seen = state["step"], state["batches_seen"]
            self.bad_steps, self.scaler_skips = state["bad_steps"], state["scaler_skips"]
            if state.get("micro"):
                self._micro = load_partial_step(self.resume_path, acc.process_index, parts.params, acc.device)
            log.info("resumed from %s at step %d%s", self.resume_path, self.step,
                     f", micro-step {state['micro']} of {tc.grad_accum}" if state.get("micro") else "")
        if acc.is_main_process:
            self.out.mkdir(parents=True, exist_ok=True)
            save_config(self.cfg, self.out / "config.yaml")  # resolved: the architecture is detected by now
            self._truncate_metrics()
        if tc.report_to != "none":
            acc.init_trackers("ncp", config={k: str(v) for k, v in self.cfg.flat().items()})
        from tqdm.auto import tqdm

        self.progress = tqdm(total=self.max_steps, initial=self.step, disable=not acc.is_main_process,
                             desc=f"{'NCP' if self.cfg.objective.space == 'perceptual' else 'latent'} {self.cfg.objective.loss}")
        if self.done:
            log.info("the run is at step %d of train.max_steps=%d: nothing to train (raise max_steps to extend it)",
                     self.step, self.max_steps)
        self._t0 = time.perf_counter()

    def _truncate_metrics(self) -> None:
        """Drop lines logged after the resume point: they will be logged again (all of them on a fresh start)."""
        if (self.out / METRICS_FILE).exists():
            write_metrics(self.out, [r for r in read_metrics(self.out) if r["step"] <= self.step])

    # -- the loop ----------------------------------------------------------------------------------------
    @property
    def done(self) -> bool:
        return self.stop_signal is not None or self.step >= self.max_steps

    def due(self, every: int) -> bool:
        return bool(every) and self.step % every == 0

    def batches(self, loader):
        """Micro-batches from the run's data position on, until the run is done."""
        batches = endless_batches(loader, start=self.batches_seen)
        while not self.done:
            self.batches_seen += 1
            yield next(batches)

    def track(self, loss: torch.Tensor, metrics: dict) -> None:
        """Keep this micro-step's loss and metrics; the optimizer step logs their mean."""
        self._micro.append({"loss": loss.detach().float(), **{k: v.detach().float().mean() for k, v in metrics.items()}})

    def stop_within_step(self) -> bool:
        """Between micro-steps of one optimizer step: on an agreed stop signal, checkpoint with the gradients
        accumulated so far (an optimizer step of 8-64 micro-steps outlasts the 30 s launchers allow after SIGTERM)."""
        self._agree_on_stop()
        if self.stop_signal is not None:
            self.checkpoint()
        return self.stop_signal is not None

    def step_optimizer(self) -> bool:
        """Algorithm 1, line 19: clip and step the LoRA. Returns False when the fp16 GradScaler skipped the step.

        A non-finite loss (or, without a GradScaler, non-finite gradients) is a bad step: no update, counted,
        and train.max_bad_steps in a row stop the run after a checkpoint. A step the GradScaler skips because
        the scaled gradients overflowed is its normal calibration: not a bad step and not an optimizer step (the
        run takes the next batch); logged with the new scale. Skips at a scale below 1 are real overflows: bad.
        """
        acc, scaler = self.acc, self.acc.scaler
        grad_norm = acc.clip_grad_norm_(self.parts.params, self.cfg.optim.max_grad_norm)  # unscales fp16 grads first
        keys = list(self._micro[0])
        means = torch.stack([torch.stack([m[k] for m in self._micro]).mean() for k in keys])
        means = acc.gather_for_metrics(means).view(-1, len(keys)).mean(0)  # every process's micro-step means
        # one read from the device per optimizer step: the metrics and the gradient norm together
        *values, grad_norm = torch.cat([means, torch.as_tensor(grad_norm).float().reshape(1).to(means.device)]).tolist()
        means = dict(zip(keys, values))
        self._micro = []
        bad = not math.isfinite(means["loss"]) or (scaler is None and not math.isfinite(grad_norm))
        if bad:
            self.optimizer.zero_grad(set_to_none=True)
        if not bad or scaler is not None:
            self.optimizer.step()  # with a GradScaler always: it closes its unscale/update cycle, skipping inf grads
        self.optimizer.zero_grad(set_to_none=True)
        if not bad and self.optimizer.step_was_skipped:
            self.scaler_skips += 1
            if scaler.get_scale() >= 0.5:  # halved from >= 1
                log.info("GradScaler skipped a step (inf/NaN in the fp16-scaled gradients); scale now %g, %d skips so far",
                         scaler.get_scale(), self.scaler_skips)
                self._agree_on_stop()
                return False
            bad = True
        if bad:
            self.bad_steps += 1
            self.bad_in_a_row += 1
            log.warning("step %d: non-finite loss or gradient (loss %s, grad norm %s), step skipped",
                        self.step + 1, means["loss"], grad_norm)
        else:
            self.lr_scheduler.step()
            self.bad_in_a_row = 0
        self.step += 1
        elapsed, self._t0 = time.perf_counter() - self._t0, time.perf_counter()
        effective_batch = self.cfg.train.batch_size * self.cfg.train.grad_accum * acc.num_processes
        self.record = {"step": self.step, **means, "lr": self.lr_scheduler.get_last_lr()[0], "grad_norm": grad_norm,
                       "skipped_steps": self.bad_steps, "samples_per_s": effective_batch / elapsed}
        if scaler is not None:
            self.record.update(loss_scale=scaler.get_scale(), scaler_skips=self.scaler_skips)
        if self.cfg.train.compile:
            self._note_compiles()
        if self.bad_in_a_row >= self.cfg.train.max_bad_steps:
            path = self.checkpoint()
            raise NcpError(f"{self.bad_in_a_row} non-finite steps in a row (train.max_bad_steps="
                           f"{self.cfg.train.max_bad_steps}); stopped, state saved in {path}. Lower optim.lr or use bf16 / fp32.")
        self._agree_on_stop()
        return True

    def _note_compiles(self) -> None:
        """torch.compile's graphs, recompilations and compile seconds so far go into the step's record and, at the
        first step and whenever a step compiled again, into the log with dynamo's reason (recompiling costs speed)."""
        stats = compile_stats()
        self.record.update(stats)
        if self.step == 1 or stats["compiles"] > self._compiles_seen:
            reasons = recompile_reasons()[self._recompiles_seen:]
            log.info("torch.compile: %d graphs, %d recompilations, %.1f s compiling so far (step %d)%s",
                     stats["compiles"], stats["recompiles"], stats["compile_s"], self.step,
                     f"; recompiled because: {'; '.join(reasons)}" if reasons else "")
        self._compiles_seen, self._recompiles_seen = stats["compiles"], stats["recompiles"]

    def log(self) -> None:
        """The step's record to metrics.jsonl and the trackers (every train.log_every steps and the last), and the bar."""
        r = self.record
        self.progress.update(1)
        self.progress.set_postfix(loss=f"{r['loss']:.4f}", acc=f"{r.get('implicit_acc', float('nan')):.2f}")
        if self.step % self.cfg.train.log_every and not self.done:
            return
        self.acc.log({f"train/{k}": v for k, v in r.items() if k != "step"}, step=self.step)
        if self.acc.is_main_process:
            write_metrics(self.out, [r], append=True)

    def checkpoint(self) -> Path:
        """Between optimizer steps, or within one: then also each process's accumulated LoRA gradients and
        micro-step metrics (ncp.checkpoint.save_partial_step)."""
        state = {"step": self.step, "micro": len(self._micro), "batches_seen": self.batches_seen,
                 "bad_steps": self.bad_steps, "scaler_skips": self.scaler_skips,
                 "fingerprint": self.cfg.fingerprint(self.acc.num_processes)}
        partial = (self.parts.params, self._micro) if self._micro else None
        return save_checkpoint(self.acc, self.out, state, self.cfg.train.keep_checkpoints, self.shared, partial)

    @property
    def saved_here(self) -> bool:
        """The newest checkpoint is of the current position."""
        found = checkpoint_dirs(self.out)
        return bool(found) and checkpoint_position(found[-1]) == (self.step, len(self._micro))

    # -- stopping ----------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def stop_on_signals(self):
        """SIGINT / SIGTERM: stop at the end of the current micro-step (the loop checkpoints and `finish` exits
        with 128 + the signal). A repeated SIGTERM is ignored, because launchers forward the one a cluster sends
        to the whole job (torchrun then allows 30 s before SIGKILL). A second Ctrl-C quits at once (`_quit_watch`)."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}

        def handler(signum, frame):
            if self.signal_seen is None:
                log.warning("%s: stopping at the end of this micro-step with a checkpoint%s",
                            signal.Signals(signum).name, " (Ctrl-C again to quit now)" if signum == signal.SIGINT else "")
            self.signal_seen = self.signal_seen or signum

        for s in previous:
            signal.signal(s, handler)
        try:
            with _quit_watch():
                yield
        finally:
            for s, h in previous.items():
                signal.signal(s, h)

    def _agree_on_stop(self) -> None:
        """Stop at a micro-step's end, all processes together (they checkpoint together). The flag travels on a
        CPU group, so asking every micro-step costs no device synchronisation."""
        self.stop_signal = self.signal_seen
        if self.acc.num_processes > 1:
            flag = torch.tensor([self.signal_seen or 0])  # the default group is gloo, or _flag_group is
            torch.distributed.all_reduce(flag, torch.distributed.ReduceOp.MAX, group=self._flag_group)
            self.stop_signal = int(flag.item()) or None

    def finish(self) -> Path:
        """Final checkpoint and LoRA (diffusers format), then the optional Hub upload; after a stop signal, the
        checkpoint only (the final LoRA means a finished run to generate, sweeps, reproduce and the Hub upload),
        the command that resumes and exit 128 + signal (130 for Ctrl-C, 143 for SIGTERM)."""
        acc = self.acc
        self.progress.close()
        if not self.saved_here:
            self.checkpoint()  # the last step's state, so resume_from=latest with a larger max_steps extends the run
        if acc.is_main_process and self.stop_signal is None:
            save_lora(acc.unwrap_model(self.parts.unet), self.out, self.parts.arch)
        elif acc.is_main_process and (self.out / LORA_FILE).exists():  # an earlier finish's, of a run extended since
            os.replace(self.out / LORA_FILE, self.out / LORA_FILE.replace(".safetensors", ".before-resume.safetensors"))
        acc.wait_for_everyone()
        acc.end_training()
        if self.stop_signal is not None:
            if acc.is_main_process:
                within = f" (micro-step {len(self._micro)} of step {self.step + 1})" if self._micro else ""
                print(f"stopped by {signal.Signals(self.stop_signal).name} at step {self.step}{within}, checkpoint "
                      f"saved in {checkpoint_dirs(self.out)[-1]}. Resume with:\n  "
                      f"{self.resume_command or 'train.resume_from=latest'}"
                      + ("\n(on every machine, each with its own --machine_rank)" if "--machine_rank" in
                         (self.resume_command or "") else ""), file=sys.stderr, flush=True)
            raise SystemExit(128 + self.stop_signal)
        hub = self.cfg.hub
        if acc.is_main_process and hub.repo_id:
            from .hub import push_to_hub

            log.info("uploaded to %s", push_to_hub(str(self.out), hub.repo_id, hub.private, license=hub.license))
        log.info("final LoRA: %s", self.out / LORA_FILE)
        return self.out / LORA_FILE


QUIT_AFTER_S = 1.0  # a second SIGINT this soon is the launcher forwarding the first (torchrun does), not a person


@contextlib.contextmanager
def _quit_watch():
    """A second Ctrl-C exits at once with 130, without a checkpoint (the last complete one stays: they are
    renamed into place). Python runs signal handlers only between bytecodes, so a handler would wait for the
    running forward/backward; the C-level handler writes each signal's number to a wakeup pipe, and a thread
    reading it can exit while the main thread is still inside a kernel."""
    read, write = os.pipe()
    os.set_blocking(write, False)
    old = signal.set_wakeup_fd(write, warn_on_full_buffer=False)

    def watch():
        first = None
        while data := os.read(read, 64):
            for signum in data:
                if signum != signal.SIGINT:
                    continue
                now = time.monotonic()
                if first is not None and now - first >= QUIT_AFTER_S:
                    os.write(2, b"second Ctrl-C: quitting now, without a checkpoint\n")
                    os._exit(128 + signal.SIGINT)
                first = first if first is not None else now
        os.close(read)

    threading.Thread(target=watch, name="ncp-quit-watch", daemon=True).start()
    try:
        yield
    finally:
        signal.set_wakeup_fd(old)
        os.close(write)  # the thread reads EOF and ends
