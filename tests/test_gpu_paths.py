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
