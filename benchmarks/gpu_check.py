"""The GPU check: what the CPU tests cannot cover, in one run of at most 8 minutes on one H100 or H200, into ONE
markdown and ONE JSON file (benchmarks/gpu/gpu_check.md / .json, or --out). Every stage asserts what would make it
pass vacuously.

  resume      fp16 training stopped halfway and resumed equals a straight run (losses, loss scale, LoRA), on a
              model whose fp16 features are normal numbers; the losses vary and the LoRA moved
  cost-sd15   benchmarks/step_cost.py for latent DPO and NCP-DPO per encoder.error at the paper configs' per-GPU
  cost-sdxl   batch, precision and gradient checkpointing (SD1.5 16 pairs at 512 px, fp16; SDXL 2 pairs at 1024 px,
  cost-sd3    fp16; SD3.5 Medium 2 pairs at 1024 px, bf16), random weights from the architectures' configs: s/step,
              peak memory, MFU
  fidelity    cosine between the LoRA gradient in half precision (fp16 with a GradScaler-like loss scale; bf16) and
              in fp32, at the config's beta and loss normalisation (mean over the batch, / grad_accum)
  syncs       host-device synchronisations of one optimizer step of the training loop
              (torch.cuda.set_sync_debug_mode("warn")), per micro-step
  precision   benchmarks/precision.py --device cuda on the SD1.5 architecture
  fast        step_cost.py --fast at 512 px: compile x channels-last, MFU
  cost-flux   FLUX.1 (12B, random weights) at 1024 px, 1 pair, bf16, NCP-DPO with the linearized error and gradient
              checkpointing: s/step and peak memory with the frozen transformer in bf16 and in nf4 (model.quantize),
              each measured on its own (an out-of-memory in one is reported, the other still runs); the tiny FLUX loaded
              through diffusers' / transformers' bitsandbytes configs (load_models(quantize=nf4)) on the GPU
  toy         benchmarks/toy_alignment.py --device cuda: the larger toy (64 px, a 4x wider U-Net; base, grid and
              test on the GPU), sized for 10 minutes: passes when it finishes within them and the best method
              gains over the base. Not in the default stages (it does not fit the 8 minutes):
              bash scripts/gpu_check.sh --stages toy --budget-s 520   (a run of its own: the toy's json and table
              and its log are copied into --out)

Before any stage, the report is written with the device and the versions of the packages ncp imports; a package
that does not import stops the check there (exit code 2), before any stage spends GPU time. Stages run in that
order, each in its own process group (a crash or an out-of-memory stays in its stage; a stage past its time limit is
killed with every process it started, and the end of its output is kept in the report), all under one deadline
(--budget-s): a stage the deadline cuts off is reported as not run. The report is written again after every stage,
so a run stopped from outside keeps what its finished stages measured; SIGTERM, SIGINT or SIGHUP kills the running
stage, writes the report and exits. A stage ends with the check however the check ends (a watchdog in the stage
kills its process group when the check is gone), so a killed check leaves nothing holding the GPU.
--dry-run runs every stage on CPU with tiny models and sizes (bf16 for the half precision; compile left out).

    bash scripts/gpu_check.sh                       # on the GPU machine
    bash scripts/gpu_check.sh --dry-run             # CPU, a few minutes: the code runs
    python benchmarks/gpu_check.py --dry-run --stages resume syncs --out /tmp/check
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

# stage: (seconds it may take on the GPU, in the dry run)
STAGES = {"resume": (100, 200), "cost-sd15": (60, 60), "cost-sdxl": (75, 60), "cost-sd3": (75, 60),
          "fidelity": (60, 60), "syncs": (60, 90), "precision": (60, 60), "fast": (150, 90),
          "cost-flux": (240, 90), "toy": (520, 150)}  # toy: with the kit's install, within a 600 s command
DEFAULT_STAGES = [name for name in STAGES if name != "toy"]  # the toy's 10 minutes are a run of their own
BUDGET_S = 480
# paper configs (configs/*_ncp_dpo.yaml): per-GPU pairs, latent side, beta, grad_accum, mixed precision; all of
# them train with gradient checkpointing
PAPER = {"sd15": (16, 64, 2500, 8, "fp16"), "sdxl": (2, 128, 2500, 64, "fp16"), "sd3": (2, 128, 2500, 64, "bf16")}
FP16_MIN_NORMAL = 6.1e-5
MIN_COS = 0.99  # as benchmarks/precision.py's rule


# ---------------------------------------------------------------- stages
def stage_resume(dry: bool) -> dict:
    """Straight run vs the same run stopped at half its steps and resumed: equal within `tol`, or on the GPU within
    10x the difference between two straight runs where that is larger (its kernels need not repeat bit for bit)."""
    from safetensors.torch import load_file

    from ncp.metrics import read_metrics
    from ncp.tiny import build_tiny_pipeline

    precision, steps, tol = ("bf16", 4, 0.0) if dry else ("fp16", 16, 1e-4)  # CPU: bit for bit; GPU: cuDNN's
    work = Path(tempfile.mkdtemp(prefix="gpu-check-resume-"))
    model = build_tiny_pipeline(work / "tiny-sd15", "sd15")
    scale = feature_scale(model, "cpu" if dry else "cuda", torch.bfloat16 if dry else torch.float16)
    if scale["median_abs"] < 100 * FP16_MIN_NORMAL or scale["subnormal_share"] > 0.01:
        return dict(ok=False, feature_scale=scale, summary=f"f's features are too small for fp16 ({scale}): the "
                                                          "resume comparison would hold vacuously")
    env = dict(child_env(), CUBLAS_WORKSPACE_CONFIG=":4096:8")
    common = [sys.executable, str(ROOT / "train_ncp_dpo.py"), "--config", str(ROOT / "configs/tiny_sd15_ncp_dpo.yaml"),
              f"model.pretrained={model}", f"train.mixed_precision={precision}", "train.grad_accum=2",
              "train.batch_size=2", "data.toy_num_pairs=32", "train.checkpoint_every=1000", "train.validate_every=0",
              "train.validation_prompts=[]", "train.report_to=none", "objective.beta=5000"]
    runs = ((work / "straight", [f"train.max_steps={steps}"]), (work / "resumed", [f"train.max_steps={steps // 2}"]),
            (work / "resumed", [f"train.max_steps={steps}", "train.resume_from=latest"]))
    if not dry:  # the GPU's own run-to-run difference (atomics in attention and convolution backward)
        runs += ((work / "again", [f"train.max_steps={steps}"]),)
    for out, extra in runs:
        proc = subprocess.run([*common, f"train.output_dir={out}", *extra], env=env, cwd=work,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        if proc.returncode:
            raise RuntimeError(f"training failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    a, b = read_metrics(work / "straight"), read_metrics(work / "resumed")
    loss_diff, lora_diff = run_difference(work / "straight", work / "resumed")
    floor = (0.0, 0.0) if dry else run_difference(work / "straight", work / "again")
    tol_loss, tol_lora = (max(tol, 10 * f) for f in floor)  # resumed within 10x of two straight runs' difference
    la = load_file(str(work / "straight" / "pytorch_lora_weights.safetensors"))
    moved = max(la[k].abs().max().item() for k in la if ".lora.up." in k)  # B (up) starts at zero (lora.init)
    losses = [r["loss"] for r in a]
    scaler_same = all(x.get(k) == y.get(k) for x, y in zip(a, b) for k in ("loss_scale", "scaler_skips"))
    checks = {"same steps": [r["step"] for r in a] == [r["step"] for r in b] == list(range(1, steps + 1)),
              f"losses within {tol_loss:.3g}": loss_diff <= tol_loss, f"LoRA within {tol_lora:.3g}": lora_diff <= tol_lora,
              "loss scale and skips equal": scaler_same, "losses vary": max(losses) - min(losses) > 1e-6,
              "LoRA moved": moved > 0, "losses finite": all(math.isfinite(x) for x in losses)}
    return dict(ok=all(checks.values()), checks=checks, precision=precision, steps=steps, loss_rel_diff=loss_diff,
                lora_rel_diff=lora_diff, run_to_run=dict(loss=floor[0], lora=floor[1]), lora_b_max=moved,
                losses=losses, feature_scale=scale, loss_scale=a[-1].get("loss_scale"),
                scaler_skips=a[-1].get("scaler_skips"),
                summary=f"{precision}, {steps} steps, stopped at {steps // 2}: max relative difference loss "
                        f"{loss_diff:.3g}, LoRA {lora_diff:.3g} (two straight runs: {floor[0]:.3g}, {floor[1]:.3g}); "
                        f"losses {min(losses):.4f}..{max(losses):.4f}; LoRA-B max {moved:.3g}; "
                        + ", ".join(f"{k}: {'yes' if v else 'NO'}" for k, v in checks.items()))


def run_difference(one: Path, other: Path) -> tuple[float, float]:
    """Largest relative difference of two runs' per-step losses and of their final LoRAs (per tensor, to its max)."""
    from safetensors.torch import load_file

    from ncp.metrics import read_metrics

    a, b = read_metrics(one), read_metrics(other)
    la, lb = (load_file(str(run / "pytorch_lora_weights.safetensors")) for run in (one, other))
    loss = max(abs(x["loss"] - y["loss"]) / max(abs(x["loss"]), 1e-12) for x, y in zip(a, b))
    lora = max(((la[k] - lb[k]).abs().max() / la[k].abs().max().clamp_min(1e-12)).item() for k in la)
    return loss, lora


def feature_scale(model: Path, device: str, dtype: torch.dtype) -> dict:
    """Median |f(x_t)| and the share of f's features below fp16's smallest normal number, in `dtype`."""
    from ncp.conditioning import build_cond
    from ncp.encoder import PerceptualEncoder
    from ncp.models import load_models

    models = load_models(str(model), weight_dtype=dtype, device=device)
    f = PerceptualEncoder(models.unet)
    cond = build_cond(models, ["a red circle on a white background"] * 2)
    size = models.unet.config.sample_size
    with torch.no_grad(), torch.autocast(torch.device(device).type, dtype=dtype):
        h = f(torch.randn(4, 4, size, size, device=device), torch.tensor([10, 300, 600, 900], device=device), cond)
    h = h.float().abs()
    return dict(median_abs=h.median().item(), subnormal_share=(h < FP16_MIN_NORMAL).float().mean().item())


def stage_cost(model: str, dry: bool) -> dict:
    """step_cost.py at the config's per-GPU batch, latent DPO and NCP-DPO per error mode: time, peak, MFU."""
    import step_cost

    from ncp.encoder import ERRORS

    pairs, latent, _, _, precision = PAPER[model]
    # the config's batch, precision and gradient checkpointing (the dry run: checkpointing on the tiny model too)
    kw = dict(model=f"tiny-{model}", latent_size=8, pairs=1, device="cpu", dtype="fp32", threads=1) if dry else \
        dict(model=model, latent_size=latent, pairs=pairs, device="cuda", dtype=precision)
    r = step_cost.run(steps=1, warmup=1, repeats=2, errors=ERRORS, losses=("dpo",), checkpointing=True, **kw)
    peak = step_cost.device_peak_flops(kw["device"], torch.float16)  # fp16 and bf16 peaks are the same
    for row in r["rows"]:
        row["mfu"] = row["step_gflop"] * 1e9 / row["s_per_step"] / peak if peak else None
    lines = [f"{kw['model']}, {kw['latent_size'] * 8} px, {kw['pairs']} pair(s) per GPU, {r['setup']['dtype']}, "
             f"{r['setup']['device']}", "", "| method | s/step | GFLOP/step | MFU | peak GB allocated | reserved |",
             "|---|---|---|---|---|---|"]
    lines += [f"| {row['method']} | {row['s_per_step']:.3f} | {row['step_gflop']:.1f} | {percent(row['mfu'])} | "
              f"{row['peak_gb']:.2f} | {gb(row['reserved_gb'])} |" for row in r["rows"]]
    ok = all(math.isfinite(row["loss"]) for row in r["rows"])
    return dict(ok=ok, result=r, summary="\n".join(lines))


def percent(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def gb(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}"


def gradient_fidelity(model: str, latent_size: int, pairs: int, accum: int, beta: float, halves, device: str,
                      errors, scales=(2.0**16, 2.0**8, 1.0)) -> dict:
    """Cosine between the LoRA gradient of one micro-step in each half precision of `halves` and in fp32, per
    encoder.error, at the config's beta and normalisation (the loss is the batch mean; accelerate divides it by
    grad_accum before backward). fp16 multiplies the loss by a GradScaler-like scale (each of `scales`; 2^16 is
    the GradScaler's initial one) and unscales after: below fp16's normal range gradients lose bits or vanish.
    Same weights, LoRA, data and draws in every precision."""
    from step_cost import build

    from ncp.objective import ObjectiveConfig, compute_objective, randomness_for

    cfg = ObjectiveConfig(loss="dpo", space="perceptual", beta=beta)
    grads = {}  # (precision, scale, error) -> flat gradient
    for dtype in (torch.float32, *halves):
        unet, params, encoders, schedule, x0, cond = build(model, latent_size, pairs, 8 if "tiny" in model else 64,
                                                           device, dtype, errors)
        gen = torch.Generator().manual_seed(1)
        with torch.no_grad():  # a policy some distance from the reference (B starts at zero)
            for p in params:
                p.add_(1e-3 * torch.randn(p.shape, generator=gen).to(p.device))
        rnd = randomness_for(cfg, schedule, pairs, x0.shape[1:], torch.Generator().manual_seed(2)).to(device)
        name = str(dtype).removeprefix("torch.")
        for error in errors:
            with torch.autocast(torch.device(device).type, dtype=dtype, enabled=dtype != torch.float32):
                loss, _ = compute_objective(unet, encoders[error], schedule, x0, cond, rnd, cfg)
            for scale in scales if dtype == torch.float16 else (1.0,):
                for p in params:
                    p.grad = None
                (loss / accum * scale).backward(retain_graph=True)
                grads[(name, scale, error)] = torch.cat([p.grad.flatten().double() / scale for p in params])
        del unet, params, encoders, loss
    out = {}
    for (name, scale, error), g in grads.items():
        if name != "float32":
            g32 = grads[("float32", 1.0, error)]
            out[f"{name}{f' x{scale:g}' if name == 'float16' else ''} {error}"] = dict(
                precision=name, scale=scale, error=error, cos=torch.nn.functional.cosine_similarity(g32, g, dim=0).item(),
                norm_ratio=(g.norm() / g32.norm()).item(), zero_share=(g == 0).double().mean().item())
    return out


def stage_fidelity(dry: bool) -> dict:
    from ncp.encoder import ERRORS

    pairs, latent, beta, accum, _ = PAPER["sd15"]
    if dry:  # fp16 on CPU kernels: accelerate refuses fp16 training there, but the arithmetic is fp16's
        rows = gradient_fidelity("tiny-sd15", 8, pairs, accum, beta, (torch.float16, torch.bfloat16), "cpu", ERRORS)
    else:  # fewer pairs than the config's 16, with its normalisation (1 / 16 / accum): fp32 beside fp16 must fit
        rows = gradient_fidelity("sd15", latent, 4, accum * 4, beta, (torch.float16, torch.bfloat16), "cuda", ERRORS)
    lines = [f"beta {beta}, loss / (batch {pairs} x grad_accum {accum}), "
             f"{'tiny-sd15 CPU' if dry else 'SD1.5 architecture 512 px cuda'}", "",
             "| precision (fp16: loss scale) | encoder.error | cos vs fp32 | norm ratio | zero share |",
             "|---|---|---|---|---|"]
    lines += [f"| {name.rsplit(' ', 1)[0]} | {r['error']} | {r['cos']:.5f} | {r['norm_ratio']:.4f} | {r['zero_share']:.3g} |"
              for name, r in rows.items()]
    low = [name for name in training_rows(rows) if not rows[name]["cos"] >= MIN_COS
           and not (rows[name]["error"] == "difference" and rows[name]["precision"] != "float32")]
    lines += ["", f"below cos {MIN_COS} at the training scale, for the errors auto picks in half precision "
                  f"(linearized, fp32): {', '.join(low) if low else 'none'}"]
    return dict(ok=not low, rows=rows, summary="\n".join(lines))


def training_rows(rows: dict) -> list[str]:
    """The rows that training would compute: every bf16 row, and per error the fp16 row at the largest loss scale
    whose gradient is finite (a GradScaler starts at 2^16 and halves it after an overflow)."""
    chosen = [name for name, r in rows.items() if r["precision"] != "float16"]
    for error in {r["error"] for r in rows.values()}:
        fp16 = [name for name, r in rows.items() if r["precision"] == "float16" and r["error"] == error]
        finite = [name for name in fp16 if math.isfinite(rows[name]["norm_ratio"])]
        chosen.append(max(finite or fp16, key=lambda name: rows[name]["scale"]))
    return chosen


@contextlib.contextmanager
def micro_step_window(first: int, count: int, enter, leave):
    """Call enter() as the training loop takes micro-batch `first` (1-based) and leave() as it takes batch
    first + count, i.e. around micro-steps first..first+count-1, all of their work included."""
    import ncp.run

    real = ncp.run.Run.batches

    def batches(self, loader):
        for i, batch in enumerate(real(self, loader), start=1):
            if i == first:
                enter()
            if i == first + count:
                leave()
            yield batch
        if first <= i < first + count:
            leave()

    ncp.run.Run.batches = batches
    try:
        yield
    finally:
        ncp.run.Run.batches = real


HOST_READS = ("item", "tolist", "__float__", "__int__", "__bool__")


@contextlib.contextmanager
def counting_host_reads(counts: dict):
    """Count Tensor.item / tolist / float() / int() / bool() calls (each a device sync on a GPU) into counts."""
    real = {name: getattr(torch.Tensor, name) for name in HOST_READS}

    def counted(name):
        def call(self, *a, **kw):
            if counts.get("on"):
                counts[name] = counts.get(name, 0) + 1
            return real[name](self, *a, **kw)
        return call

    for name in HOST_READS:
        setattr(torch.Tensor, name, counted(name))
    try:
        yield
    finally:
        for name, fn in real.items():
            setattr(torch.Tensor, name, fn)


def stage_syncs(dry: bool, accum: int = 4) -> dict:
    """One optimizer step (step 2: micro-steps accum+1..2 accum) of the real training loop; on CUDA every
    synchronising call is a warning of torch.cuda.set_sync_debug_mode("warn"), on CPU the host reads of tensors
    are counted. Also counted apart: the last micro-step (the optimizer step's own syncs) vs the others."""
    import ncp.train
    from accelerate.state import AcceleratorState

    from ncp.tiny import build_tiny_pipeline

    work = Path(tempfile.mkdtemp(prefix="gpu-check-syncs-"))
    model = build_tiny_pipeline(work / "tiny-sd15", "sd15")
    argv = ["--config", str(ROOT / "configs/tiny_sd15_ncp_dpo.yaml"), f"model.pretrained={model}",
            f"train.output_dir={work / 'run'}", f"train.grad_accum={accum}", "train.max_steps=3",
            "train.checkpoint_every=1000", "train.validation_prompts=[]", "train.report_to=none", "train.batch_size=2",
            "data.toy_num_pairs=32", f"train.mixed_precision={'no' if dry else 'fp16'}"]
    windows = {}

    def run_window(first: int, count: int) -> dict:
        AcceleratorState._reset_state(reset_partial_state=True)
        counts: dict = {}
        if dry:
            with counting_host_reads(counts), micro_step_window(first, count, lambda: counts.update(on=True),
                                                                 lambda: counts.update(on=False)):
                ncp.train.main(argv + ["train.overwrite=true"], "dpo", "NCP-DPO")
            counts.pop("on", None)
            return counts
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            with micro_step_window(first, count, lambda: torch.cuda.set_sync_debug_mode("warn"),
                                   lambda: torch.cuda.set_sync_debug_mode("default")):
                ncp.train.main(argv + ["train.overwrite=true"], "dpo", "NCP-DPO")
        # where each sync was called from (the message alone is the same for every one)
        syncs = [f"{w.filename}:{w.lineno}: {str(w.message).splitlines()[0]}" for w in seen
                 if "synchroniz" in str(w.message).lower()]
        return {"syncs": len(syncs), "first": sorted(set(syncs))[:5]}

    windows["micro-steps without the optimizer step"] = run_window(accum + 1, accum - 1)
    windows["the optimizer step's micro-step"] = run_window(2 * accum, 1)
    per_micro = sum(v for k, v in windows["micro-steps without the optimizer step"].items() if k != "first")
    kind = "host reads of tensors (CPU)" if dry else "CUDA synchronisations"
    lines = [f"tiny SD1.5, grad_accum {accum}, {'fp32 CPU' if dry else 'fp16 cuda'}: {kind}", "",
             "| window | count |", "|---|---|"]
    lines += [f"| {k} | {json.dumps(v)} |" for k, v in windows.items()]
    return dict(ok=per_micro == 0 if dry else None, windows=windows, per_micro_step=per_micro / (accum - 1),
                summary="\n".join(lines))


def stage_precision(dry: bool) -> dict:
    out = Path(tempfile.mkdtemp(prefix="gpu-check-precision-"))
    args = ["--model", "sd15", "--out", str(out)] + (["--smoke", "--threads", "1"] if dry else
                                                     ["--device", "cuda", "--pairs-per-bucket", "8"])
    subprocess.run([sys.executable, str(ROOT / "benchmarks/precision.py"), *args], check=True,
                   stdout=subprocess.DEVNULL, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    saved = json.loads((out / "precision.json").read_text())
    return dict(ok=True, result=saved, summary=(out / "precision.md").read_text().strip())


def stage_fast(dry: bool) -> dict:
    import step_cost

    from ncp.encoder import ERRORS

    if dry:  # compiling on CPU takes minutes: the dry run times the eager paths only
        kw = dict(model="tiny-sd15", latent_size=8, device="cpu", dtype="fp32", threads=1,
                  combos=[(False, False), (False, True)])
    else:
        kw = dict(model="sd15", latent_size=64, device="cuda", dtype="fp16",
                  combos=[(False, False), (False, True), (True, False)])
    r = step_cost.run_fast(pairs=1, steps=2, repeats=2, errors=ERRORS[:2], **kw)
    return dict(ok=all(math.isfinite(row["loss"]) for row in r["rows"]), result=r, summary=step_cost.format_fast(r))


def stage_cost_flux(dry: bool) -> dict:
    """FLUX.1 at 1024 px, bf16 and nf4 under the LoRA: step time and peak memory (1 pair: 2 images); a quantized
    load of the tiny FLUX through the real loaders (dry run: the CPU refusal)."""
    import gc

    import step_cost

    from ncp.errors import NcpError
    from ncp.models import load_models
    from ncp.tiny import build_tiny_pipeline

    kw = dict(model="tiny-flux", latent_size=8, device="cpu", dtype="fp32", threads=1) if dry else \
        dict(model="flux", latent_size=128, device="cuda", dtype="bf16")
    rows, lines, failed = {}, [], {}
    for quantize in ("none", "nf4"):
        try:
            r = step_cost.run(pairs=1, steps=1, warmup=1, repeats=1, errors=("linearized",), losses=("dpo",),
                              quantize=quantize, checkpointing=True, count=False, **kw)
        except Exception as e:  # an out-of-memory, or nf4's bitsandbytes: reported, the other row kept
            failed[quantize] = f"{type(e).__name__}: {str(e)[:300]}"
            lines.append(f"| {quantize} | NCP-DPO | failed: {failed[quantize]} | |")
        else:
            rows[quantize] = r["rows"]
            lines += [f"| {quantize} | {row['method']} | {row['s_per_step']:.3f} | {row['peak_gb']:.2f} |"
                      for row in r["rows"]]
        r = None
        gc.collect()
        if not dry:
            torch.cuda.empty_cache()
    path = build_tiny_pipeline(Path(tempfile.mkdtemp(prefix="gpu-check-flux-")) / "flux", "flux")
    try:
        models = load_models(str(path), quantize="nf4", weight_dtype=torch.bfloat16, device=kw["device"])
        kinds = {type(m).__name__ for part in (models.denoiser, models.text_encoders[1]) for m in part.modules()}
        loaded = "Linear4bit" in kinds
        load = f"tiny FLUX loaded with model.quantize=nf4: {'Linear4bit layers' if loaded else 'NO Linear4bit'}"
    except NcpError as e:  # CPU: refused before loading
        loaded, load = dry and "needs a CUDA device" in str(e), f"model.quantize=nf4 on {kw['device']}: {e}"
    ok = loaded and not failed and all(math.isfinite(row["loss"]) for r in rows.values() for row in r)
    summary = "\n".join([f"{kw['model']}, {kw['latent_size'] * 8} px, 1 pair, {kw['dtype']}, {kw['device']}, "
                         "gradient checkpointing", "",
                         "| model.quantize | method | s/step | peak GB |", "|---|---|---|---|", *lines, "", load])
    return dict(ok=ok, rows=rows, failed=failed, summary=summary)


def stage_toy(dry: bool, out: Path | None = None, report_dir: Path | None = None) -> dict:
    """The toy benchmark's larger toy on the GPU (dry run: the same path on the CPU at the smoke size, 48 px, twice
    the width, NCP-DPO alone). Its JSON and table stay in `out`; its log, JSON and table are copied into
    `report_dir` (the report's folder) as toy.log, toy_alignment.json and toy_table.md, the log as it is written."""
    out = out or Path(tempfile.mkdtemp(prefix="gpu-check-toy-"))
    args = (["--smoke", "--resolution", "48", "--width", "2", "--methods", "NCP-DPO", "--workers", "1"] if dry
            else ["--device", "cuda"])
    log = (report_dir or out) / "toy.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    with open(log, "w") as f:
        subprocess.run([sys.executable, "-u", str(ROOT / "benchmarks/toy_alignment.py"), *args, "--out", str(out)],
                       check=True, stdout=f, stderr=subprocess.STDOUT, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    minutes = (time.perf_counter() - t0) / 60
    if report_dir:
        for name, copy in (("toy_alignment.json", "toy_alignment.json"), ("table.md", "toy_table.md")):
            (report_dir / copy).write_bytes((out / name).read_bytes())
    saved = json.loads((out / "toy_alignment.json").read_text())
    gains = {m: r["final"]["gain"] for m, r in saved["summary"]["methods"].items()}
    best = max(gains, key=gains.get)
    ok = None if dry else minutes <= 10 and gains[best] > 0  # the dry run's 2 smoke steps need not gain
    head = (f"{saved['setup']['resolution']} px, denoiser x{saved['setup']['width']}, {minutes:.1f} min (budget 10 on "
            f"one GPU); best {best} {gains[best]:+.4f} over the base's {saved['base_test_reward']:.4f}")
    return dict(ok=ok, minutes=minutes, gains=gains, out=str(out),
                summary=head + "\n\n" + (out / "table.md").read_text().strip())


def run_stage(name: str, dry: bool, report_dir: Path | None = None) -> dict:
    if name == "cost-flux":
        return stage_cost_flux(dry)
    if name.startswith("cost-"):
        return stage_cost(name.removeprefix("cost-"), dry)
    if name == "toy":
        return stage_toy(dry, report_dir=report_dir)
    return {"resume": stage_resume, "fidelity": stage_fidelity, "syncs": stage_syncs, "precision": stage_precision,
            "fast": stage_fast}[name](dry)


# what a stage imports beyond torch; on the GPU machine they come from the kit (scripts/gpu_kit.py)
PACKAGES = ("diffusers", "transformers", "peft", "accelerate", "huggingface_hub", "safetensors", "bitsandbytes")


_IMPORTS = """import importlib, json, traceback
out = {}
for name in %r:
    try:
        out[name] = getattr(importlib.import_module(name), "__version__", "?")
    except BaseException:
        out[name] = "does not import: " + traceback.format_exc(limit=2)[-1500:]
print(json.dumps(out))"""


OPTIONAL = ("bitsandbytes",)  # only cost-flux's nf4 row needs it (training falls back to torch's AdamW)


def preflight(timeout: float = 180) -> tuple[dict, str | None]:
    """The versions of PACKAGES as a stage's process imports them, and what the first that fails to import said
    (None: all but OPTIONAL import)."""
    done = run_group([sys.executable, "-c", _IMPORTS % (PACKAGES,)], child_env(), timeout)
    lines = (done.stdout or "").strip().splitlines()
    try:
        versions = json.loads(lines[-1]) if done.returncode == 0 and lines else None
    except json.JSONDecodeError:
        versions = None
    if versions is None:
        why = f"not done in {timeout:.0f} s" if done.returncode is None else f"exit code {done.returncode}"
        return {}, f"importing {', '.join(PACKAGES)} failed ({why}):\n```\n{(done.stdout + done.stderr)[-2000:]}\n```"
    bad = [f"{name}: {v}" for name, v in versions.items() if v.startswith("does not import") and name not in OPTIONAL]
    return {k: v.splitlines()[0] for k, v in versions.items()}, ("\n```\n" + bad[0] + "\n```") if bad else None


# ---------------------------------------------------------------- the driver
def write_report(out: Path, stem: str, setup: dict, results: dict) -> tuple[Path, Path]:
    verdict = {True: "pass", False: "FAIL", None: "measured"}
    lines = [f"# GPU check{' (dry run, CPU)' if setup['dry_run'] else ''}", "",
             f"{setup['device']}, torch {setup['torch']}, {setup['date']}, {setup['seconds']:.0f} s of a "
             f"{setup['budget_s']} s budget", "", "| stage | result | seconds |", "|---|---|---|"]
    lines += [f"| {name} | {r.get('status') or verdict[r.get('ok')]} | {r.get('seconds', 0):.0f} |"
              for name, r in results.items()]
    for name, r in results.items():
        lines += ["", f"## {name}", "", r.get("summary") or r.get("error") or r.get("status", "")]
    out.mkdir(parents=True, exist_ok=True)
    md, js = out / f"{stem}.md", out / f"{stem}.json"
    for path, text in ((md, "\n".join(lines) + "\n"), (js, json.dumps(dict(setup=setup, stages=results), indent=1,
                                                                          default=str))):
        part = path.with_suffix(path.suffix + ".part")  # whole or not at all, whenever the check is stopped
        part.write_text(text)
        os.replace(part, path)
    return md, js


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dry-run", action="store_true", help="every stage on CPU with tiny models and sizes")
    p.add_argument("--stages", nargs="+", choices=list(STAGES), default=DEFAULT_STAGES,
                   help=f"default: all but toy ({' '.join(DEFAULT_STAGES)})")
    p.add_argument("--out", help="folder of gpu_check.md / .json (default benchmarks/gpu; dry run outputs/gpu-check-dry)")
    p.add_argument("--budget-s", type=int, default=BUDGET_S, help="deadline for all stages")
    p.add_argument("--one", help=argparse.SUPPRESS)  # internal: run one stage in this process, JSON to --out
    p.add_argument("--report-dir", help=argparse.SUPPRESS)  # internal: the report's folder, for a stage's own files
    a = p.parse_args(argv)
    if a.one:
        threading.Thread(target=die_with_parent, args=(os.getppid(),), daemon=True).start()
        t0 = time.perf_counter()
        result = run_stage(a.one, a.dry_run, Path(a.report_dir) if a.report_dir else None)
        result["seconds"] = time.perf_counter() - t0
        Path(a.out).write_text(json.dumps(result, default=str))
        return 0
    if not a.dry_run and not torch.cuda.is_available():
        p.error("no CUDA device: run it on the GPU machine, or --dry-run here")
    out = Path(a.out or ("outputs/gpu-check-dry" if a.dry_run else ROOT / "benchmarks/gpu")).resolve()
    t_start, results = time.perf_counter(), {}
    setup = dict(dry_run=a.dry_run, stages=a.stages, budget_s=a.budget_s, torch=torch.__version__,
                 python=sys.version.split()[0], cuda=torch.version.cuda,
                 device=torch.cuda.get_device_name() if torch.cuda.is_available() and not a.dry_run else "CPU")

    def report():
        return write_report(out, "gpu_check", dict(setup, seconds=time.perf_counter() - t_start,
                                                   date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())), results)

    setup["packages"], error = preflight()
    print(f"{setup['device']}, torch {setup['torch']} (CUDA {setup['cuda']}), python {setup['python']}; "
          + ", ".join(f"{k} {v}" for k, v in setup["packages"].items()), flush=True)
    if error:
        results["preflight"] = dict(ok=False, status="a package does not import", error=error)
        md, js = report()
        print(f"{error}\nwrote {md} and {js}", flush=True)
        return 2
    report()

    def stop(signum, frame):  # a caller's SIGTERM / Ctrl-C / hangup: no stage left running, what was measured kept
        for sig in STOP_SIGNALS:  # once: a second signal must not interrupt the report
            signal.signal(sig, signal.SIG_IGN)
        kill_running()
        results[f"stopped by signal {signum}"] = dict(ok=False, status="the check was stopped here")
        print(f"stopped by signal {signum}; wrote {' and '.join(map(str, report()))}", flush=True)
        raise SystemExit(128 + signum)

    for sig in STOP_SIGNALS:
        signal.signal(sig, stop)
    for name in a.stages:
        left = a.budget_s - (time.perf_counter() - t_start)
        limit = min(STAGES[name][1 if a.dry_run else 0] * (3 if a.dry_run else 1), left)
        if limit < 10:
            results[name] = dict(ok=False, status="not run: the deadline was reached")
        else:
            results[name] = run_child(name, limit, a.dry_run, out)
            print(f"{name}: {results[name].get('status') or results[name].get('ok')} "
                  f"({results[name]['seconds']:.0f} s)", flush=True)
        md, js = report()
    print(f"wrote {md} and {js}")
    return 0 if all(r.get("ok") is not False for r in results.values()) else 1


def child_env() -> dict:
    """A subprocess's environment: offline, the project importable, and the caller's PYTHONPATH kept after it (on
    the GPU machine it holds the packages carried there: scripts/gpu_kit.py, installed by scripts/gpu_check.sh)."""
    path = os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])
    return {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": path}


def run_child(name: str, limit: float, dry: bool, report_dir: Path) -> dict:
    """One stage in its own process, within `limit` seconds: its result, or why there is none (with the end of
    what it printed)."""
    fd, part = tempfile.mkstemp(suffix=f"-{name}.json")
    os.close(fd)
    cmd = [sys.executable, __file__, "--one", name, "--out", part, "--report-dir", str(report_dir)] + (
        ["--dry-run"] if dry else [])
    env = child_env()
    if dry:
        env["OMP_NUM_THREADS"] = "1"
    t0 = time.perf_counter()
    done = run_group(cmd, env, limit)
    if done.returncode is None:
        tail = ((done.stdout or "") + (done.stderr or ""))[-3000:]
        result = dict(ok=False, status=f"not finished in {limit:.0f} s", error="```\n" + tail + "\n```")
    elif done.returncode:
        result = dict(ok=False, status="crashed", error="```\n" + (done.stderr or done.stdout)[-3000:] + "\n```")
    else:
        result = json.loads(Path(part).read_text())
    Path(part).unlink(missing_ok=True)
    result["seconds"] = time.perf_counter() - t0
    return result


_RUNNING: list[subprocess.Popen] = []  # the stage process running now (run_group), for a signal to kill
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


def die_with_parent(parent: int) -> None:
    """A stage's watchdog: once the check that started it is gone (killed, even by SIGKILL), end the stage's
    process group, its training runs and workers with it."""
    while os.getppid() == parent:
        time.sleep(1)
    os.killpg(0, signal.SIGKILL)


def kill_running() -> None:
    for proc in _RUNNING:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)


def run_group(cmd: list[str], env: dict, limit: float) -> subprocess.CompletedProcess:
    """cmd in a process group of its own, in the caller's session (a session of its own would outlive a caller whose
    session is ended: a machine's job runner, for one; the stage's watchdog covers a caller killed alone);
    past `limit` seconds the whole group is killed, and the result's returncode is None, with what it had printed:
    a stage's own subprocesses (training runs, the toy's workers) must not hold the GPU into the next stage."""
    proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, process_group=0)
    _RUNNING.append(proc)
    try:
        stdout, stderr = proc.communicate(timeout=limit)
        returncode = proc.returncode
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
        returncode = None
    finally:
        _RUNNING.remove(proc)
    return subprocess.CompletedProcess(cmd, returncode, stdout, stderr)


if __name__ == "__main__":
    raise SystemExit(main())
