"""What the GPU-only paths rely on, checked on CPU: the process-group timeout that covers validation, TF32 off
inside f where its error needs real fp32, no per-micro-step host syncs in the loop's metrics, and the GPU
check's dry run."""

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
