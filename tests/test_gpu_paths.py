"""What the GPU-only paths rely on, checked on CPU: the process-group timeout that covers validation, TF32 off
inside f where its error needs real fp32, no per-micro-step host syncs in the loop's metrics, a step that keeps
every tensor on the models' device, and the GPU check's dry run."""

import pytest
import torch

from ncp.config import load_config


def test_the_accelerator_waits_process_timeout_s(tmp_path):
    from accelerate.state import AcceleratorState
    from accelerate.utils import InitProcessGroupKwargs

    from ncp.train import make_accelerator

    for overrides, seconds in (([], 1800), (["train.process_timeout_s=3600"], 3600)):
        AcceleratorState._reset_state(reset_partial_state=True)
        cfg = load_config(None, [f"train.output_dir={tmp_path}", "train.report_to=none", *overrides])
        acc = make_accelerator(cfg.train)
        assert isinstance(acc.init_handler, InitProcessGroupKwargs)  # what accelerate passes to init_process_group
        assert acc.init_handler.timeout.total_seconds() == seconds
    AcceleratorState._reset_state(reset_partial_state=True)


@pytest.mark.parametrize("error, dtype, off", [("difference", torch.float32, True), ("fp32", torch.bfloat16, True),
                                               ("difference", torch.bfloat16, False),
                                               ("linearized", torch.float32, False)])
def test_tf32_is_off_inside_f_and_restored_after(tiny_sd15, one_torch_thread, error, dtype, off):
    from ncp.conditioning import build_cond
    from ncp.encoder import PerceptualEncoder
    from ncp.models import load_models

    models = load_models(str(tiny_sd15), weight_dtype=dtype)
    f = PerceptualEncoder(models.unet, error=error)
    seen = []
    f.conv_in.register_forward_hook(
        lambda *_: seen.append((torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)))
    cond = build_cond(models, ["a red circle"])  # two rows: winner and loser
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True  # the U-Net's own setting
    try:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype != torch.float32):
            f(torch.randn(2, 4, 16, 16), torch.tensor([10, 500]), cond)
        after = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved
    assert seen == [(not off, not off)] and after == (True, True)


@pytest.mark.parametrize("arch", ["sd15", "sdxl", "sd3", "flux"])
def test_a_step_on_another_device_makes_no_host_tensor(tmp_path, one_torch_thread, monkeypatch, arch):
    """The training step's models, noise tables, conditioning and draws on the `meta` device, which refuses to mix
    with a host tensor as CUDA does (a 0-dim scalar excepted) and cannot be read back (`.item()` raises, as a host
    sync would cost): the objective's forward and backward, every loss and error mode. A table made on the host
    inside a step (the reverse step's noise mask once was) fails here, where a CPU run cannot see it."""
    import types

    from ncp.conditioning import build_cond
    from ncp.objective import compute_objective, randomness_for
    from ncp.tiny import build_tiny_pipeline
    from ncp.train import build_models

    real_autocast = torch.autocast  # the meta device has no autocast state: f's fp32 mode switches the CPU's instead
    monkeypatch.setattr(torch, "autocast", lambda device_type, *a, **k: real_autocast(
        "cpu" if device_type == "meta" else device_type, *a, **k))
    path = build_tiny_pipeline(tmp_path / arch, arch)
    meta = torch.device("meta")
    modes = [(loss, "perceptual", error) for error in ("difference", "linearized", "fp32") for loss in ("dpo", "cpo", "sft")]
    for loss, space, error in modes + [("dpo", "latent", "difference")]:
        cfg = load_config(f"configs/tiny_{arch}_ncp_{loss}.yaml",
                          [f"model.pretrained={path}", f"objective.space={space}", f"encoder.error={error}"])
        parts = build_models(cfg, types.SimpleNamespace(device=meta))
        parts.schedule = parts.schedule.to(meta)  # as ncp.train.train does
        assert next(parts.models.denoiser.parameters()).device == meta
        side = cfg.data.resolution // parts.models.vae_scale_factor
        x0 = torch.randn(4, parts.models.family.latent_channels(parts.models.denoiser), side, side, device=meta)
        cond = build_cond(parts.models, ["a red circle", "a blue square"], target_size=(cfg.data.resolution,) * 2)
        rnd = randomness_for(cfg.objective, parts.schedule, 2, x0.shape[1:], torch.Generator().manual_seed(0)).to(meta)
        loss_value, metrics = compute_objective(parts.models.unet, parts.encoder, parts.schedule, x0, cond, rnd,
                                                cfg.objective)
        loss_value.backward()
        assert loss_value.device == meta and all(v.device == meta for v in metrics.values()), (loss, space, error)
        assert all(p.grad is not None and p.grad.device == meta for p in parts.params), (loss, space, error)


def test_a_micro_steps_inputs_reach_a_gpu_without_a_sync(monkeypatch):
    """Batch, conditioning and draws go to a GPU from pinned memory with non_blocking copies (a blocking copy
    waits for the previous micro-step's backward); recorded here by standing in for the two calls, as this
    machine has no CUDA. Other devices: a plain copy, no pinning."""
    from ncp.conditioning import to_device
    from ncp.objective import Randomness

    calls = []
    monkeypatch.setattr(torch.Tensor, "is_pinned", lambda self, *a: getattr(self, "pinned", False))

    def pin_memory(self, *a):
        calls.append("pin")
        out = self.clone()
        out.pinned = True
        return out

    def to(self, *args, **kw):
        calls.append(("to", str(args[0]), kw.get("non_blocking", False), getattr(self, "pinned", False)))
        return self

    monkeypatch.setattr(torch.Tensor, "pin_memory", pin_memory)
    monkeypatch.setattr(torch.Tensor, "to", to)
    x = torch.zeros(2)
    to_device(x, "cuda:0")
    assert calls == ["pin", ("to", "cuda:0", True, True)]
    calls.clear()
    x.pinned = True  # the loader's batches are pinned already: no second host copy
    to_device(x, torch.device("cuda"))
    assert calls == [("to", "cuda", True, True)]
    calls.clear()
    to_device(torch.zeros(2), "meta")
    assert calls == [("to", "meta", False, False)]
    calls.clear()
    Randomness(*(torch.zeros(1) for _ in range(4))).to("cuda")
    assert calls == ["pin", ("to", "cuda", True, True)] * 4


def test_gpu_check_dry_run(tmp_path):
    """scripts/gpu_check.sh --dry-run, the stages that exercise the training loop: the bf16 resume comparison
    (bit for bit on CPU, losses varying, LoRA moved) and the host reads per micro-step (none: metrics are read
    once per optimizer step). The other stages' dry run: `bash scripts/gpu_check.sh --dry-run` (about 8 min here)."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, str(root / "benchmarks/gpu_check.py"), "--dry-run", "--stages", "resume",
                           "syncs", "--out", str(tmp_path)], capture_output=True, text=True, timeout=600)
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert proc.returncode == 0, (tmp_path / "gpu_check.md").read_text()[-3000:]
    resume, syncs = report["stages"]["resume"], report["stages"]["syncs"]
    assert resume["ok"] and all(resume["checks"].values()) and resume["loss_rel_diff"] == resume["lora_rel_diff"] == 0
    assert syncs["ok"] and syncs["per_micro_step"] == 0
    assert sum(v for k, v in syncs["windows"]["the optimizer step's micro-step"].items()) >= 1  # the counter counts
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gpu_check.json", "gpu_check.md"]


def test_a_stage_past_its_limit_is_killed_with_every_process_it_started(tmp_path, load_script):
    """...and what it printed is kept; it runs in the caller's session (a caller whose session ends takes it along)."""
    import os
    import sys
    import time
    from pathlib import Path

    check = load_script("benchmarks/gpu_check.py")
    pid_file = tmp_path / "grandchild"
    spawn = (f"import os, subprocess, time; p = subprocess.Popen(['sleep', '60']); "
             f"open({str(pid_file)!r}, 'w').write(str(p.pid)); print('session', os.getsid(0), flush=True); "
             "time.sleep(60)")
    t0 = time.perf_counter()
    done = check.run_group([sys.executable, "-c", spawn], dict(os.environ), limit=3)
    assert done.returncode is None and f"session {os.getsid(0)}" in done.stdout
    assert time.perf_counter() - t0 < 30
    # gone (or a zombie waiting for init), not left holding the device into the next stage
    assert not _running_after([Path(f"/proc/{int(pid_file.read_text())}")], 0.5)
    done = check.run_group([sys.executable, "-c", "print('ok')"], dict(os.environ), limit=30)
    assert done.returncode == 0 and done.stdout.strip() == "ok"


def test_gpu_check_stops_before_any_stage_when_a_package_does_not_import(tmp_path):
    """The report names the package and its error and records the versions, exit code 2, no stage run."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    (tmp_path / "site" / "peft").mkdir(parents=True)
    (tmp_path / "site" / "peft" / "__init__.py").write_text("raise ImportError('this peft is broken')\n")
    env = dict(os.environ, PYTHONPATH=str(tmp_path / "site"))
    proc = subprocess.run([sys.executable, str(root / "benchmarks/gpu_check.py"), "--dry-run", "--stages", "resume",
                           "--out", str(tmp_path / "out")], env=env, capture_output=True, text=True, timeout=300)
    report = json.loads((tmp_path / "out" / "gpu_check.json").read_text())
    assert proc.returncode == 2 and list(report["stages"]) == ["preflight"]
    assert "this peft is broken" in report["stages"]["preflight"]["error"]
    assert report["setup"]["packages"]["peft"].startswith("does not import")
    assert report["setup"]["packages"]["diffusers"][0].isdigit()


@pytest.mark.parametrize("how", ["SIGTERM", "SIGKILL"])
def test_gpu_check_on_sigterm_kills_the_running_stage_and_keeps_the_report(tmp_path, how):
    """SIGTERM: the check kills its stage and writes the report. SIGKILL (no handler runs): the stage's watchdog
    sees its parent gone and ends the stage's process group within seconds."""
    import json
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, str(root / "benchmarks/gpu_check.py"), "--dry-run", "--stages",
                             "resume", "--out", str(out)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline, stages = time.time() + 120, []
    while not stages and time.time() < deadline and proc.poll() is None:  # the stage starts after the import check
        time.sleep(0.2)
        stages = [p for p in Path("/proc").glob("[0-9]*") if f"--report-dir\0{out}" in _read(p / "cmdline")]
    assert stages, "the resume stage did not start"
    time.sleep(1)  # into the stage
    proc.send_signal(getattr(signal, how))
    stdout, _ = proc.communicate(timeout=60)
    if how == "SIGTERM":
        assert proc.returncode == 128 + signal.SIGTERM and "stopped by signal" in stdout
        report = json.loads((out / "gpu_check.json").read_text())
        assert "stopped by signal 15" in report["stages"]
    else:
        assert proc.returncode == -signal.SIGKILL
    assert not _running_after(stages, 10)


def test_a_stage_whose_check_is_killed_ends_with_its_children(tmp_path):
    """The stage's watchdog (gpu_check.die_with_parent): a silent stage, its own child beside it, and the check
    SIGKILLed (no handler, no broken pipe to end them): both are gone within seconds."""
    import os
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    pids = tmp_path / "pids"
    stage = (f"import os, subprocess, sys, threading, time; sys.path.insert(0, {str(root / 'benchmarks')!r}); "
             "import gpu_check; threading.Thread(target=gpu_check.die_with_parent, args=(os.getppid(),), "
             "daemon=True).start(); c = subprocess.Popen(['sleep', '120']); "
             f"open({str(pids)!r}, 'w').write(f'{{os.getpid()}} {{c.pid}}'); time.sleep(120)")
    check = (f"import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', {stage!r}], process_group=0, "
             "stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL); time.sleep(120)")
    parent = subprocess.Popen([sys.executable, "-c", check])
    for _ in range(200):
        if pids.exists() and len(pids.read_text().split()) == 2:
            break
        time.sleep(0.1)
    procs = [Path(f"/proc/{pid}") for pid in pids.read_text().split()]
    parent.send_signal(signal.SIGKILL)
    parent.wait()
    alive = _running_after(procs, 10)
    for p in alive:
        os.kill(int(p.name), signal.SIGKILL)
    assert not alive


def _running_after(procs, seconds: float) -> list:
    """Of the /proc/<pid> folders `procs`, those whose process still runs `seconds` from now (polled: an earlier
    end returns at once); a zombie waiting for init to reap it counts as ended."""
    import time

    deadline = time.time() + seconds
    while True:
        alive = [p for p in procs if _read(p / "stat").rsplit(")", 1)[-1].split()[:1] not in ([], ["Z"], ["X"])]
        if not alive or time.time() >= deadline:
            return alive
        time.sleep(0.1)


def _read(path) -> str:
    try:
        return path.read_text()
    except OSError:  # the process is gone
        return ""


def test_fidelity_judges_the_rows_training_would_compute(load_script):
    """bf16 rows all; fp16 per error the largest loss scale whose gradient is finite (a GradScaler backs off from an
    overflow), so an overflow at 2^16 is not a failure when 2^8 is finite."""
    check = load_script("benchmarks/gpu_check.py")
    nan = float("nan")
    rows = {f"float16 x{s:g} {e}": dict(precision="float16", scale=s, error=e, cos=c, norm_ratio=n)
            for e, s, c, n in (("linearized", 2.0**16, nan, nan), ("linearized", 2.0**8, 0.999, 1.0),
                               ("linearized", 1.0, 0.9, 0.5), ("fp32", 2.0**16, 0.995, 1.0), ("fp32", 2.0**8, 0.99, 1.0))}
    rows["bfloat16 linearized"] = dict(precision="bfloat16", scale=1.0, error="linearized", cos=0.999, norm_ratio=1.0)
    assert sorted(check.training_rows(rows)) == ["bfloat16 linearized", "float16 x256 linearized", "float16 x65536 fp32"]


def test_gpu_kit_keeps_the_cuda_13_libraries_of_bitsandbytes(tmp_path, load_script):
    import zipfile

    kit = load_script("scripts/gpu_kit.py")
    wheel = tmp_path / "bitsandbytes-0.0-py3-none-any.whl"
    names = ["bitsandbytes/__init__.py", "bitsandbytes/libbitsandbytes_cpu.so", "bitsandbytes/libbitsandbytes_cuda118.so",
             "bitsandbytes/libbitsandbytes_cuda128.so", "bitsandbytes/libbitsandbytes_cuda130.so"]
    with zipfile.ZipFile(wheel, "w") as z:
        for n in names:
            z.writestr(n, b"x" * 1000)
        z.writestr("bitsandbytes-0.0.dist-info/RECORD", "".join(f"{n},sha256=abc,1000\n" for n in names)
                   + "bitsandbytes-0.0.dist-info/RECORD,,\n")
    assert kit.slim_wheel(wheel) == 2000
    with zipfile.ZipFile(wheel) as z:
        kept = sorted(z.namelist())
        record = [line.split(",")[0] for line in z.read("bitsandbytes-0.0.dist-info/RECORD").decode().split()]
    left = [names[0], names[1], names[4]]
    assert kept == sorted(left + ["bitsandbytes-0.0.dist-info/RECORD"])
    assert record == left + ["bitsandbytes-0.0.dist-info/RECORD"]  # pip installs what RECORD lists
    assert kit.pinned(kit.ROOT / "requirements.txt", ["diffusers", "bitsandbytes"])[0].startswith("diffusers==")
