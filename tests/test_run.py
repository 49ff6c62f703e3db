"""A run's life: extending a finished run, refused resumes and reruns, stop signals, the GradScaler policy,
bf16 resume, and the command line's help and one-line errors. Tiny SD1.5, a few steps each."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ncp.errors import NcpError
from test_train import ROOT, _fresh_process_state, args, metrics, run_script  # noqa: F401 (autouse fixture)

COMMON = ["train.max_steps=6", "train.checkpoint_every=2", "train.grad_accum=2", "objective.beta=50000"]


def lora(out):
    return load_file(str(Path(out) / "pytorch_lora_weights.safetensors"))


def assert_same_run(a, b):
    """Same losses at every step and the same final LoRA, bit for bit."""
    ra, rb = metrics(a), metrics(b)
    assert [r["step"] for r in ra] == [r["step"] for r in rb]
    assert [r["loss"] for r in ra] == [r["loss"] for r in rb]
    assert len({r["loss"] for r in ra}) > 1  # the losses move, so equality means something
    la, lb = lora(a), lora(b)
    assert la.keys() == lb.keys() and all(torch.equal(la[k], lb[k]) for k in la)


@pytest.fixture(scope="module")
def straight(tiny_sd15, tmp_path_factory):
    """An uninterrupted 6-step run (2 micro-steps per step) that the stopped-and-resumed runs must equal."""
    from accelerate.state import AcceleratorState

    sys.path.insert(0, str(ROOT))
    AcceleratorState._reset_state(reset_partial_state=True)
    out = tmp_path_factory.mktemp("straight") / "run"
    run_script("dpo", args(tiny_sd15, out, *COMMON))
    return out


def test_finished_run_extends_and_changed_settings_are_refused(tiny_sd15, straight, tmp_path, caplog, monkeypatch):
    out = tmp_path / "run"
    with caplog.at_level("INFO", logger="ncp"):
        run_script("dpo", args(tiny_sd15, out, *COMMON, "train.max_steps=3", "train.resume_from=latest"))
    assert f"no checkpoint in {out / 'checkpoints'}: starting fresh" in caplog.text
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["checkpoint-00000002", "checkpoint-00000003"]
    for key in ("train.batch_size=4", "train.grad_accum=1", "objective.beta=100"):
        with pytest.raises(NcpError, match=rf"cannot resume .*checkpoint-00000003.*{key.split('=')[0]}"):
            run_script("dpo", args(tiny_sd15, out, *COMMON, key, "train.resume_from=latest"))
    import ncp.train

    real, _ = sigterm_at_call(monkeypatch, 1)  # extended to 6, stopped in step 4: the step-3 LoRA is not "final"
    with pytest.raises(SystemExit):
        run_script("dpo", args(tiny_sd15, out, *COMMON, "train.resume_from=latest"))
    assert not (out / "pytorch_lora_weights.safetensors").exists()
    assert (out / "pytorch_lora_weights.before-resume.safetensors").exists()
    monkeypatch.setattr(ncp.train, "compute_objective", real)
    run_script("dpo", args(tiny_sd15, out, *COMMON, "train.resume_from=latest"))  # max_steps 3 -> 6
    assert_same_run(straight, out)


def test_rerun_into_a_used_folder_is_refused_unless_overwrite(tiny_sd15, straight, tmp_path):
    with pytest.raises(NcpError, match=r"already holds a run.*train\.resume_from=latest.*train\.overwrite=true"):
        run_script("dpo", args(tiny_sd15, straight, "train.max_steps=1"))
    old = tmp_path / "old" / "checkpoints" / "checkpoint-00000002"  # written before save_state checkpoints
    old.mkdir(parents=True)
    (old / "training_state.pt").write_bytes(b"")
    with pytest.raises(NcpError, match="written by an earlier ncp.*train.overwrite=true"):
        run_script("dpo", args(tiny_sd15, old.parents[1], "train.resume_from=latest"))
    with pytest.raises(NcpError, match="no ncp_state.json there.*an earlier ncp's checkpoint"):
        run_script("dpo", args(tiny_sd15, tmp_path / "new", f"train.resume_from={old}"))
    with pytest.raises(NcpError, match="set one of them"):
        run_script("dpo", args(tiny_sd15, straight, "train.overwrite=true", "train.resume_from=latest"))
    out = tmp_path / "run"
    run_script("dpo", args(tiny_sd15, out, "train.max_steps=2"))
    assert list((out / "logs").rglob("events.out.tfevents.*"))  # train.report_to=tensorboard, the default
    (out / "stale.txt").write_text("from the first run")
    run_script("dpo", args(tiny_sd15, out, "train.max_steps=1", "train.overwrite=true", "train.report_to=none"))
    assert not (out / "stale.txt").exists() and not (out / "logs").exists()
    assert [r["step"] for r in metrics(out)] == [1]
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["checkpoint-00000001"]


def sigterm_at_call(monkeypatch, n: int):
    """SIGTERM to this process at the n-th micro-step's objective; returns the real objective and the calls."""
    import ncp.train

    real, calls = ncp.train.compute_objective, []

    def preempted(*a, **kw):
        calls.append(1)
        if len(calls) == n:
            os.kill(os.getpid(), signal.SIGTERM)
        return real(*a, **kw)

    monkeypatch.setattr(ncp.train, "compute_objective", preempted)
    return real, calls


def test_sigterm_saves_a_checkpoint_and_resuming_equals_a_straight_run(tiny_sd15, straight, tmp_path, monkeypatch,
                                                                        capsys):
    import ncp.train

    real, calls = sigterm_at_call(monkeypatch, 5)  # call 5 is the first of step 3's two micro-steps
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as stop:
        run_script("dpo", args(tiny_sd15, out, *COMMON))
    assert stop.value.code == 128 + signal.SIGTERM == 143
    assert len(calls) == 5  # stopped at the micro-step's end: an optimizer step can outlast the launcher's 30 s
    assert [r["step"] for r in metrics(out)] == [1, 2]
    ckpt = out / "checkpoints" / "checkpoint-00000002-micro001"
    assert (ckpt / "ncp_state.json").exists() and (ckpt / "partial_step_0.safetensors").exists()
    err = capsys.readouterr().err
    assert "stopped by SIGTERM at step 2 (micro-step 1 of step 3)" in err and "python train_ncp_dpo.py --config" in err
    assert err.strip().endswith("train.resume_from=latest")
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handler is gone after the run
    assert not (out / "pytorch_lora_weights.safetensors").exists()  # the final LoRA says "finished" to the tools

    monkeypatch.setattr(ncp.train, "compute_objective", real)
    run_script("dpo", args(tiny_sd15, out, *COMMON, "train.resume_from=latest"))
    assert_same_run(straight, out)


def test_a_stop_within_an_optimizer_step_resumes_its_accumulation(tiny_sd15, tmp_path, monkeypatch):
    """grad_accum=4, SIGTERM during step 2's second micro-step: the checkpoint holds the two micro-steps'
    gradients, and the resumed run equals an uninterrupted one bit for bit (same fp32 gradients restored, the
    same micro-batches and generator draws, the same summation order, one process: nothing is recomputed)."""
    import ncp.train

    common = ["train.max_steps=3", "train.checkpoint_every=100", "train.grad_accum=4", "objective.beta=50000"]
    run_script("dpo", args(tiny_sd15, tmp_path / "straight", *common))
    real, calls = sigterm_at_call(monkeypatch, 6)
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as stop:
        run_script("dpo", args(tiny_sd15, out, *common))
    assert stop.value.code == 143 and len(calls) == 6
    (ckpt,) = (out / "checkpoints").iterdir()
    assert ckpt.name == "checkpoint-00000001-micro002"
    state = json.loads((ckpt / "ncp_state.json").read_text())
    assert (state["step"], state["micro"], state["batches_seen"]) == (1, 2, 6)
    saved = load_file(str(ckpt / "partial_step_0.safetensors"))
    assert saved["micro.loss"].shape == (2,) and any(k.startswith("grad.") and v.abs().sum() > 0 for k, v in saved.items())
    monkeypatch.setattr(ncp.train, "compute_objective", real)
    run_script("dpo", args(tiny_sd15, out, *common, "train.resume_from=latest"))
    assert_same_run(tmp_path / "straight", out)


def test_fp16_on_cpu_and_a_missing_tracker_are_refused(tiny_sd15, tmp_path):
    from accelerate.state import AcceleratorState

    with pytest.raises(NcpError, match="fp16 needs a GPU"):  # accelerate has no fp16 autocast / GradScaler on CPU
        run_script("dpo", args(tiny_sd15, tmp_path / "fp16", "train.mixed_precision=fp16"))
    AcceleratorState._reset_state(reset_partial_state=True)
    from accelerate.tracking import get_available_trackers

    if "wandb" not in [str(t) for t in get_available_trackers()]:  # accelerate would drop the tracker silently
        with pytest.raises(NcpError, match="train.report_to=wandb: the wandb package is not installed"), \
                pytest.warns(UserWarning, match="no supported trackers"):  # accelerate's own notice
            run_script("dpo", args(tiny_sd15, tmp_path / "wandb", "train.report_to=wandb"))


def test_sigterm_to_a_training_process(tiny_sd15, tmp_path):
    """A real signal to a real process: the step finishes, a checkpoint is saved, exit code 143."""
    import time

    out, log = tmp_path / "run", tmp_path / "stderr.txt"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, str(ROOT / "train_ncp_dpo.py"), *args(tiny_sd15, out, "train.max_steps=100000")]
    with open(log, "w") as err:
        proc = subprocess.Popen(cmd, env=env, cwd=tmp_path, stderr=err, stdout=subprocess.DEVNULL)
        deadline = time.time() + 120
        while not ((out / "metrics.jsonl").exists() and len(metrics(out)) >= 2) and time.time() < deadline:
            time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=120) == 143
    step = metrics(out)[-1]["step"]
    assert (out / "checkpoints" / f"checkpoint-{step:08d}" / "ncp_state.json").exists()
    lines = log.read_text().strip().splitlines()
    assert lines[-2].startswith(f"stopped by SIGTERM at step {step}") and lines[-1].endswith("train.resume_from=latest")


BLOCKED_IN_CPP = """import sys, threading, torch, ncp.train
from ncp.errors import run_cli
real, calls = ncp.train.compute_objective, []
def blocked(*a, **kw):
    calls.append(1)
    if len(calls) > 2:  # the main thread waits inside C++ (as in a long kernel), where Python runs no signal handler
        done = torch.futures.Future()
        threading.Timer(60, done.set_result, (None,)).start()
        done.wait()
    return real(*a, **kw)
ncp.train.compute_objective = blocked
run_cli(lambda: ncp.train.main(sys.argv[1:], "dpo", "NCP-DPO"))
"""


def test_a_second_ctrl_c_quits_at_once(tiny_sd15, tmp_path):
    """Ctrl-C twice, the second 1.2 s after the first, while the main thread is inside one long C++ call: exit 130
    within seconds, no checkpoint written, the last complete one intact."""
    import time

    out, log, script = tmp_path / "run", tmp_path / "stderr.txt", tmp_path / "blocked.py"
    script.write_text(BLOCKED_IN_CPP)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, str(script), *args(tiny_sd15, out, "train.max_steps=100", "train.checkpoint_every=1")]
    ckpt = out / "checkpoints" / "checkpoint-00000002" / "ncp_state.json"
    with open(log, "w") as err:
        proc = subprocess.Popen(cmd, env=env, cwd=tmp_path, stderr=err, stdout=subprocess.DEVNULL)
        deadline = time.time() + 120
        while not ckpt.exists() and time.time() < deadline:
            time.sleep(0.2)
        time.sleep(1)  # into the third step's blocked call
        proc.send_signal(signal.SIGINT)
        time.sleep(1.2)
        proc.send_signal(signal.SIGINT)
        t0 = time.time()
        code = proc.wait(timeout=60)
    assert code == 130 and time.time() - t0 < 10, log.read_text()[-2000:]  # the blocked call lasts 60 s
    assert "second Ctrl-C: quitting now" in log.read_text()
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["checkpoint-00000001", "checkpoint-00000002"]
    assert json.loads(ckpt.read_text())["step"] == 2


def test_sigterm_to_a_two_process_job(tiny_sd15, tmp_path):
    """A cluster's SIGTERM reaches the launcher and both processes (torchrun forwards it once more): they
    agree to stop after the same step and write one checkpoint with both processes' generators."""
    import time

    out, log = tmp_path / "run", tmp_path / "stderr.txt"
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "-q", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           str(ROOT / "train_ncp_dpo.py"), *args(tiny_sd15, out, "train.max_steps=100000")]
    with open(log, "w") as err:
        proc = subprocess.Popen(cmd, env=env, cwd=tmp_path, stderr=err, stdout=subprocess.DEVNULL,
                                start_new_session=True)
        deadline = time.time() + 180
        while not ((out / "metrics.jsonl").exists() and len(metrics(out)) >= 2) and time.time() < deadline:
            time.sleep(0.2)
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=120)
    text = log.read_text()
    step = metrics(out)[-1]["step"]
    ckpt = out / "checkpoints" / f"checkpoint-{step:08d}"
    assert (ckpt / "ncp_state.json").exists(), text[-3000:]
    assert {p.name for p in ckpt.glob("generator_*")} == {"generator_0.safetensors", "generator_1.safetensors"}
    assert f"stopped by SIGTERM at step {step}" in text and "--num_processes 2" in text


class InfGrad(torch.autograd.Function):
    """Identity whose gradient is inf: a finite loss whose (scaled) gradients overflow."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, g):
        return g * float("inf")


@pytest.fixture
def cpu_grad_scaler(monkeypatch):
    """accelerate makes a GradScaler only off CPU; give the run a CPU one so its policy and state can be tested."""
    import ncp.train

    real, settings = ncp.train.make_accelerator, {"init_scale": 2.0**10}

    def make(tc):
        from accelerate.state import AcceleratorState

        AcceleratorState._reset_state(reset_partial_state=True)  # forget the previous run's patched precision
        acc = real(tc)
        acc.scaler = torch.amp.GradScaler("cpu", init_scale=settings["init_scale"], growth_interval=2)
        acc.native_amp, acc.state._mixed_precision = True, "fp16"  # accelerate's fp16 path: unscale before clipping
        return acc

    monkeypatch.setattr(ncp.train, "make_accelerator", make)
    return settings


def test_gradscaler_skips_are_not_bad_steps_and_a_nan_loss_is(tiny_sd15, tmp_path, monkeypatch, cpu_grad_scaler):
    import ncp.train

    real, calls = ncp.train.compute_objective, []

    def overflow_then_nan(*a, **kw):
        calls.append(1)
        loss, m = real(*a, **kw)
        if len(calls) == 2:
            loss = InfGrad.apply(loss)  # the GradScaler skips: not a step, the next batch redoes it
        if len(calls) == 4:
            loss = loss * float("nan")  # a bad step
        return loss, m

    out = tmp_path / "run"
    monkeypatch.setattr(ncp.train, "compute_objective", overflow_then_nan)
    run_script("dpo", args(tiny_sd15, out, "train.max_steps=4"))
    rows = metrics(out)
    assert len(calls) == 5 and [r["step"] for r in rows] == [1, 2, 3, 4]
    assert [r["scaler_skips"] for r in rows] == [0, 1, 1, 1]
    assert [r["skipped_steps"] for r in rows] == [0, 0, 1, 1]
    # halved by the skip (after step 1) and by the NaN step 3; growth needs 2 good steps in a row
    assert [r["loss_scale"] for r in rows] == [1024, 512, 256, 256]
    state = json.loads((out / "checkpoints" / "checkpoint-00000004" / "ncp_state.json").read_text())
    assert (state["batches_seen"], state["scaler_skips"], state["bad_steps"]) == (5, 1, 1)

    # an overflow the GradScaler cannot calibrate away (it skips at a scale below 1) is a bad step
    calls.clear()
    cpu_grad_scaler["init_scale"] = 0.5
    run_script("dpo", args(tiny_sd15, tmp_path / "low", "train.max_steps=2"))
    rows = metrics(tmp_path / "low")
    assert len(calls) == 2 and [(r["skipped_steps"], r["scaler_skips"]) for r in rows] == [(0, 0), (1, 1)]


def test_gradscaler_state_survives_a_resume(tiny_sd15, tmp_path, cpu_grad_scaler):
    common = ["train.max_steps=6", "objective.beta=50000"]
    run_script("dpo", args(tiny_sd15, tmp_path / "straight", *common))
    run_script("dpo", args(tiny_sd15, tmp_path / "resumed", *common, "train.max_steps=3"))
    assert (tmp_path / "resumed" / "checkpoints" / "checkpoint-00000003" / "scaler.pt").exists()
    run_script("dpo", args(tiny_sd15, tmp_path / "resumed", *common, "train.resume_from=latest"))
    assert_same_run(tmp_path / "straight", tmp_path / "resumed")
    assert metrics(tmp_path / "resumed")[-1]["loss_scale"] == 2.0**10 * 2**3  # grown every 2 steps, not reset


def test_bf16_resume_equals_a_straight_run(tiny_sd15, tmp_path):
    common = ["train.max_steps=4", "objective.beta=50000", "train.mixed_precision=bf16"]
    run_script("dpo", args(tiny_sd15, tmp_path / "straight", *common))
    run_script("dpo", args(tiny_sd15, tmp_path / "resumed", *common, "train.max_steps=2"))
    run_script("dpo", args(tiny_sd15, tmp_path / "resumed", *common, "train.resume_from=latest"))
    assert_same_run(tmp_path / "straight", tmp_path / "resumed")


def test_help_lists_every_key_and_print_config(capsys):
    from ncp.config import Config
    from ncp.train import parse_args

    with pytest.raises(SystemExit):
        parse_args(["--help"], "dpo", "NCP-DPO")
    out = capsys.readouterr().out
    assert all(f"{k}=" in out for k in Config().flat())
    assert "train.max_steps=1500  # optimizer steps" in out and "train.mixed_precision=no  # no | fp16 | bf16" in out
    with pytest.raises(SystemExit) as done:
        parse_args(["--print-config", "train.max_steps=7", "train.mixed_precision=no"], "dpo", "NCP-DPO")
    assert done.value.code == 0
    import yaml

    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["train"]["max_steps"] == 7 and printed["objective"]["loss"] == "dpo"


def test_run_cli_keeps_tracebacks_for_the_unexpected(capsys):
    from ncp.errors import run_cli

    def fail(error):
        def main():
            raise error
        return main

    with pytest.raises(SystemExit) as e:
        run_cli(fail(NcpError("data.path: no such file")))
    assert e.value.code == 2 and capsys.readouterr().err == "error: data.path: no such file\n"
    from_worker = NcpError('Caught NcpError in DataLoader worker process 0.\nOriginal Traceback (most recent call '
                           'last):\n  File "worker.py", line 1, in f\nncp.errors.NcpError: data: pair 3: bad image\n')
    with pytest.raises(SystemExit):
        run_cli(fail(from_worker))
    assert capsys.readouterr().err == "error: data: pair 3: bad image\n"
    with pytest.raises(SystemExit):
        run_cli(fail(NcpError("model.pretrained='x': cannot load (first line.\nsecond line.)")))
    assert capsys.readouterr().err == "error: model.pretrained='x': cannot load (first line. second line.)\n"
    with pytest.raises(SystemExit) as e:
        run_cli(fail(KeyboardInterrupt()))
    assert e.value.code == 130
    with pytest.raises(RuntimeError, match="a bug"):
        run_cli(fail(RuntimeError("a bug")))


def test_user_errors_are_one_line_through_the_launcher(tmp_path):
    """The README's launch command with a misspelled key: one `error:` line, no traceback."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    launch = [sys.executable, "-m", "accelerate.commands.launch", "-q", "--num_processes", "1", "--num_machines", "1",
              "--mixed_precision", "no", "--dynamo_backend", "no"]
    cmd = [str(ROOT / "train_ncp_dpo.py"), "--config", str(ROOT / "configs/tiny_sd15_ncp_dpo.yaml"), "train.max_stpes=3"]
    for prefix, code in ((launch, 1), ([sys.executable], 2)):  # accelerate's launcher turns any failure into 1
        proc = subprocess.run([*prefix, *cmd], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120)
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == code and len(lines) <= 3, proc.stderr
        assert lines[-1].startswith("error: command line: unknown key 'train.max_stpes'")
        assert "Traceback" not in proc.stderr
