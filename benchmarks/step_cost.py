"""Cost of one optimizer step of NCP-DPO/CPO/SFT against the latent-space baselines, side by side.

Every method trains the same U-Net + LoRA on the same latents, conditioning and randomness, with the
step training takes (objective forward, backward, grad clip, 8-bit AdamW step). Methods are
interleaved (round-robin over repeats, rotated start) and the median is reported, because step
times on a shared CPU vary by 10-15% from one run to the next. Beside each measured ratio to latent
DPO stands the ratio of FLOPs (torch.utils.flop_counter), in two forms:
  floor   from U (one U-Net forward) and E (one encoder forward), per pair, counting a backward with
          LoRA as one more forward (no weight gradients of the frozen base):
          latent DPO 6U, CPO 4U, SFT 2U; NCP adds 6E+2E (DPO), 4E+2E (CPO), 2E+1E (SFT).
          With encoder.error=linearized (--errors) each policy image costs a jvp (primal + tangent, 2E)
          and a backward through the tangent (E), each reference image a jvp (2E), and f(x_true) is not
          needed: 10E (DPO), 6E (CPO), 3E (SFT). encoder.error=fp32 has the difference's FLOPs, in fp32.
          (This counts one jvp per prediction; the default runs one primal for the policy's and the
          reference's tangents, one E less per image: 8E for DPO. The counted column measures it.)
  counted the FLOPs of one whole training step of that method, backward included.
It also times the toy data loader, to show that feeding a step costs a small fraction of the step.

    python benchmarks/step_cost.py --model tiny-sd15
    python benchmarks/step_cost.py --model sd15 --latent-size 32 --pairs 1 --steps 1 --warmup 1 --repeats 5
    python benchmarks/step_cost.py --model sd15 --latent-size 16 --errors difference linearized fp32   # per mode
    python benchmarks/step_cost.py --model sd3 --latent-size 16 --pairs 1 --steps 1 --repeats 3   # SD3.5 Medium MMDiT
    python benchmarks/step_cost.py --model flux --latent-size 16 --pairs 1 --steps 1 --dtype bf16  # FLUX.1 dev: a GPU
    python benchmarks/step_cost.py --model sd15 --latent-size 16 --fast --errors difference linearized  # fast path

--modes times one NCP-DPO step per way of computing the perceptual error, each in a child process of its own (the
peak is that process's, nothing left over from another mode), one after another: latent (latent DPO, the base),
difference (three f calls), difference-batched (one call of 3x the batch: encoder.batch_calls), linearized-math
(PyTorch's jvp through SDPA's math kernel, one per tangent), linearized-blockwise (ncp.attention's blockwise rule, one
jvp per tangent), linearized-vmap (blockwise, one primal for both tangents, the backward through the tangents) and
linearized (vmap's values keeping nothing, the gradient by f's own backward, recomputed: what
encoder.error=linearized runs).
--part errors times only the perceptual part (f's calls and the backward through them into a stand-in policy
prediction), the U-Net left out; --blocks K builds an SD3 transformer of K joint blocks (f = all K). Each mode's
steps are also split into forward, backward and the rest, with the process's user and system CPU time and its minor
page faults per step:

    python benchmarks/step_cost.py --model sd15 --latent-size 64 --modes latent difference linearized --warmup 1 --repeats 1
    python benchmarks/step_cost.py --model sd3 --blocks 2 --part errors --latent-size 64 --modes difference linearized

--fast times latent DPO and NCP-DPO (per --errors mode) under every combination of torch.compile on/off and
channels-last on/off, interleaved on the same U-Net, LoRA, data and randomness (the weights change memory format
between rounds; dynamo keeps one graph per format), and reports each against the plain path (both off). The
first step of each compiled combination (the compiling) is reported apart, never timed. Peak GB is the process's
peak during the method's steps; "+GB" is that peak above what was resident before (the step's own memory).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import ctypes
import json
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from a clean checkout
from ncp.hostmem import keep_host_memory  # noqa: E402

keep_host_memory()  # before torch loads, as the training scripts do: the steps timed here are theirs

import torch  # noqa: E402

from ncp.conditioning import build_cond  # noqa: E402
from ncp import families  # noqa: E402
from ncp.config import EncoderConfig, OptimConfig  # noqa: E402
from ncp.encoder import ERRORS  # noqa: E402
from ncp.fast import compile_stats, configure_inductor  # noqa: E402
from ncp.families.flux import SCHEDULER_CONFIGS as FLUX_SCHEDULER_CONFIGS  # noqa: E402
from ncp.families.sd3 import SCHEDULER_CONFIG as SD3_SCHEDULER_CONFIG  # noqa: E402
from ncp.models import add_lora  # noqa: E402
from ncp.objective import ObjectiveConfig, compute_objective, randomness_for  # noqa: E402
from ncp.tiny import SCHEDULER_CONFIG  # noqa: E402
from ncp.train import adamw8bit  # noqa: E402

# (name, loss, space); latent DPO first: every ratio is to it
METHODS = [("latent DPO", "dpo", "latent"), ("NCP-DPO", "dpo", "perceptual"),
           ("latent CPO", "cpo", "latent"), ("NCP-CPO", "cpo", "perceptual"),
           ("latent SFT", "sft", "latent"), ("NCP-SFT", "sft", "perceptual")]
# per pair, in units of one U-Net forward (U) and one encoder forward (E): see the module docstring
FLOOR = {("dpo", "latent"): (6, 0), ("dpo", "perceptual"): (6, 8), ("cpo", "latent"): (4, 0),
         ("cpo", "perceptual"): (4, 6), ("sft", "latent"): (2, 0), ("sft", "perceptual"): (2, 3)}
LINEARIZED_FLOOR_E = {"dpo": 10, "cpo": 6, "sft": 3}


def methods(errors=("difference",), losses=("dpo", "cpo", "sft")) -> list[tuple[str, str, str, str]]:
    """(name, loss, space, encoder.error): METHODS of `losses`, then each NCP method again per extra error mode."""
    kept = [(name, loss, space) for name, loss, space in METHODS if loss in losses]
    rows = [(name, loss, space, "difference") for name, loss, space in kept]
    rows += [(f"{name} {error}", loss, space, error) for error in errors if error != "difference"
             for name, loss, space in kept if space == "perceptual"]
    return rows

# --fast: (torch.compile, channels-last)
COMBOS = {"plain": (False, False), "channels-last": (False, True), "compile": (True, False), "compile+channels-last": (True, True)}

# runwayml/stable-diffusion-v1-5, unet/config.json (diffusers defaults for the keys not listed)
SD15_UNET = dict(
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=768, attention_head_dim=8, norm_num_groups=32, norm_eps=1e-5, act_fn="silu",
    downsample_padding=1, flip_sin_to_cos=True, freq_shift=0, mid_block_scale_factor=1,
)
# stabilityai/stable-diffusion-xl-base-1.0, unet/config.json
SDXL_UNET = dict(
    sample_size=128, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), cross_attention_dim=2048,
    use_linear_projection=True, addition_embed_type="text_time", addition_embed_type_num_heads=64,
    addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816, norm_num_groups=32, norm_eps=1e-5,
    act_fn="silu", downsample_padding=1, flip_sin_to_cos=True, freq_shift=0, upcast_attention=False,
)
# stabilityai/stable-diffusion-3.5-medium, transformer/config.json (2.5B parameters) and scheduler shift
SD35M_TRANSFORMER = dict(
    sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=24, attention_head_dim=64,
    num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536, pooled_projection_dim=2048,
    pos_embed_max_size=384, dual_attention_layers=tuple(range(13)), qk_norm="rms_norm",
)
# black-forest-labs/FLUX.1-dev, transformer/config.json (12B parameters: 19 double + 38 single blocks); schnell: no
# guidance embedding
FLUX1_TRANSFORMER = dict(
    patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128, num_attention_heads=24,
    joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True, axes_dims_rope=(16, 56, 56),
)
# the full-size models by name: (denoiser class, its config, scheduler class, its config), random weights
FULL_SIZE = {"sd15": ("UNet2DConditionModel", SD15_UNET, "DDPMScheduler", SCHEDULER_CONFIG),
             "sdxl": ("UNet2DConditionModel", SDXL_UNET, "DDPMScheduler", SCHEDULER_CONFIG),
             "sd3": ("SD3Transformer2DModel", SD35M_TRANSFORMER, "FlowMatchEulerDiscreteScheduler", SD3_SCHEDULER_CONFIG),
             "flux": ("FluxTransformer2DModel", FLUX1_TRANSFORMER, "FlowMatchEulerDiscreteScheduler",
                      FLUX_SCHEDULER_CONFIGS["dev"])}


# ---------------------------------------------------------------- the model, data and randomness
def build(model: str, latent_size: int, pairs: int, rank: int, device: str, dtype: torch.dtype,
          errors=("difference",), blocks: int | None = None, quantize: str = "none", checkpointing: bool = False):
    """(unet with LoRA, LoRA params, {error: encoder}, schedule, x0, cond) for `pairs` pairs on `device`.
    quantize (model.quantize): the frozen denoiser's linears in int8 / nf4 under the LoRA (QLoRA).
    checkpointing: the policy's gradient checkpointing (train.gradient_checkpointing, on in the paper configs)."""
    import diffusers

    family = families.get(model.removeprefix("tiny-"))
    torch.manual_seed(0)
    n = 2 * pairs  # [winners; losers]
    if model.startswith("tiny-"):
        from ncp.data.toy import toy_prompts
        from ncp.models import load_models
        from ncp.tiny import build_tiny_pipeline

        with tempfile.TemporaryDirectory() as tmp:
            path = build_tiny_pipeline(Path(tmp) / model, family.name)
            models = load_models(path, weight_dtype=dtype, device=device)
        unet, scheduler = models.unet, models.scheduler
        cond = build_cond(models, toy_prompts(pairs), target_size=(8 * latent_size,) * 2)
    else:
        denoiser_class, config, scheduler_class, scheduler_config = FULL_SIZE[model]
        if blocks is not None:  # a transformer of K blocks, all of them f
            if "num_layers" not in config:
                raise SystemExit(f"--blocks is for transformers, not --model {model}")
            config = dict(config, num_layers=blocks)
        with warnings.catch_warnings(), torch.device(device):  # built in place: FLUX.1 is 48 GB in fp32
            warnings.simplefilter("ignore")
            unet = getattr(diffusers, denoiser_class)(**config)
        unet.requires_grad_(False).eval().to(device, dtype)
        scheduler = getattr(diffusers, scheduler_class).from_config(scheduler_config)
        # random text: only its shape matters here
        cond = family.example_cond(unet, pairs, 8 * latent_size).repeat(2).to(device=device, dtype=dtype)
    if quantize != "none":
        from ncp.quantize import quantize_linears

        quantize_linears(unet, quantize, dtype)
    # before LoRA: f is the frozen base (U-Net: its down path; MMDiT: its first K joint blocks, default K)
    encoders = {e: family.encoder(unet, EncoderConfig(error=e, blocks=blocks)) for e in errors}
    params = add_lora(unet, rank)
    if checkpointing:
        unet.enable_gradient_checkpointing()
    unet.train()
    x0 = torch.randn(n, family.latent_channels(unet), latent_size, latent_size, device=device)
    # DDPM maths, or flow matching (the ODE step); its tables on the device, as training puts them (no copy per step)
    schedule = family.noise_process(scheduler, ObjectiveConfig()).to(device)
    return unet, params, encoders, schedule, x0, cond


def make_optimizer(params):
    """8-bit AdamW with the training defaults (ncp.config.OptimConfig), as ncp.train.build_optimizer builds it."""
    o = OptimConfig()
    optimizer = adamw8bit(params, lr=1e-6, betas=tuple(o.betas), weight_decay=o.weight_decay, eps=o.eps)
    return optimizer, type(optimizer).__name__


# ---------------------------------------------------------------- measuring
def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def reset_peak(device: str) -> None:
    """Start a fresh peak: CUDA allocator stats, or the kernel's RSS high-water mark (VmHWM, Linux >= 4.0)."""
    if device.startswith("cuda"):
        torch.cuda.empty_cache()  # else the reserved peak carries what earlier methods left cached
        torch.cuda.reset_peak_memory_stats()
        return
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)  # hand freed heap back, so the last method's peak does not linger
    except OSError:
        pass
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def status_gb(field: str) -> float:
    """A memory field of /proc/self/status (VmRSS: resident now, VmHWM: its peak), in GB."""
    return int(re.search(rf"{field}:\s+(\d+)", Path("/proc/self/status").read_text())[1]) / 2**20


def reserved_gb(device: str) -> float | None:
    """CUDA: the most the caching allocator held (what a card must have free, beside the CUDA context); else None."""
    return torch.cuda.max_memory_reserved() / 2**30 if device.startswith("cuda") else None


def peak_gb(device: str) -> float:
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2**30
    try:
        return status_gb("VmHWM")
    except (OSError, TypeError):
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def count_flops(fn, device="cpu") -> int:
    """FLOPs of fn() on `device`. On the CPU, SDPA runs its math path here because the fused CPU kernel is not in the
    counter's registry; on a GPU the counter knows the fused kernels, and the math path's score matrices would not
    fit at the paper configs' batch (16 x 8 heads x 4096^2 per layer at 512 px), so SDPA chooses as in training."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    math = sdpa_kernel([SDPBackend.MATH]) if torch.device(device).type == "cpu" else contextlib.nullcontext()
    with math, FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


@torch.no_grad()
def unit_flops(unet, encoder, schedule, x0, cond, rnd) -> tuple[int, int]:
    """FLOPs of one image through the denoiser (U) and through f (E)."""
    x, c = x0[:1], cond.index(slice(0, 1))
    t_model = schedule.model_timestep(rnd.t[:1])  # a flow model takes sigma * 1000
    denoise = families.of_denoiser(unet).denoise
    return (count_flops(lambda: denoise(unet, x, t_model, c), x.device),
            count_flops(lambda: encoder(x, t_model, c), x.device))


def loader_pairs_per_s(latent_size: int, pairs: int, batches: int = 8) -> float:
    """Pairs per second the toy loader (decode, transform, collate) yields in the main process."""
    from ncp.data.config import DataConfig
    from ncp.data.loader import build_dataloader

    cfg = DataConfig(source="toy", resolution=8 * latent_size, toy_num_pairs=pairs * (batches + 1))
    it = iter(build_dataloader(cfg, pairs, seed=0))
    next(it)  # first batch builds the toy pairs' bookkeeping
    t0 = time.perf_counter()
    for _ in range(batches):
        next(it)
    return pairs * batches / (time.perf_counter() - t0)


def run(model: str = "tiny-sd15", latent_size: int = 32, pairs: int = 1, steps: int = 2, warmup: int = 1,
        repeats: int = 5, rank: int | None = None, device: str | None = None, profile: bool = False,
        threads: int | None = None, errors=("difference",), dtype: str | None = None,
        losses=("dpo", "cpo", "sft"), quantize: str = "none", checkpointing: bool = False,
        count: bool = True) -> dict:
    """Measure every method of `losses` (dpo first: ratios are to latent DPO); returns {"rows": [...],
    "setup": {...}} (rows in `methods(errors, losses)` order).

    threads: torch CPU threads for the run (restored after). On a CPU shared with other jobs, 1 thread
    is far steadier: with 2 threads on 2 busy cores every op waits at an OpenMP barrier for a descheduled
    thread (measured here: a tiny U-Net forward 0.17 s with 1 thread, 3.6 s with 2).
    """
    with torch_threads(threads):
        return _run(model, latent_size, pairs, steps, warmup, repeats, rank, device, profile, errors, dtype, losses,
                    quantize, checkpointing, count)


@contextlib.contextmanager
def torch_threads(threads: int | None):
    """torch CPU threads for a measurement (None: leave them), restored after."""
    saved = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(saved)


def resolve(model: str, device: str | None, dtype: str | None, rank: int | None, errors):
    """The defaults of a measurement: cuda if there is one; fp16 there for real-size models, else fp32; LoRA rank 64
    (tiny models 8); the difference error first. Returns (device, torch dtype, rank, errors)."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = dtype or ("fp16" if device.startswith("cuda") and not model.startswith("tiny-") else "fp32")
    rank = rank or (8 if model.startswith("tiny-") else 64)
    return (device, {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[dtype], rank,
            ("difference", *[e for e in errors if e != "difference"]))


def flop_floor(loss: str, space: str, error: str, u_flops: int, e_flops: int) -> float:
    """The method's FLOPs per pair in units of latent DPO's (the module docstring's cost model)."""
    nu, ne = FLOOR[(loss, space)]
    ne = LINEARIZED_FLOOR_E[loss] if error == "linearized" and space == "perceptual" else ne
    return (nu * u_flops + ne * e_flops) / (6 * u_flops)


def _run(model, latent_size, pairs, steps, warmup, repeats, rank, device, profile, errors, dtype, losses,
         quantize="none", checkpointing=False, count=True) -> dict:
    device, dtype, rank, errors = resolve(model, device, dtype, rank, errors)
    unet, params, encoders, schedule, x0, cond = build(model, latent_size, pairs, rank, device, dtype, errors,
                                                       quantize=quantize, checkpointing=checkpointing)
    optimizer, opt_name = make_optimizer(params)
    spec = methods(errors, ("dpo", *[loss for loss in losses if loss != "dpo"]))
    cfgs = {name: (ObjectiveConfig(loss=loss, space=space, beta=1.0), encoders[error]) for name, loss, space, error in spec}

    def randomness(i: int, n: int = pairs):
        g = torch.Generator().manual_seed(i)
        return randomness_for(ObjectiveConfig(), schedule, n, x0.shape[1:], g).to(device)  # DDPM or flow t

    def amp():
        """Half-precision frozen weights run under autocast, as accelerate's mixed precision does in training."""
        return torch.autocast(torch.device(device).type, dtype=dtype, enabled=dtype != torch.float32)

    def step(name: str, rnd, x=x0, c=cond) -> float:
        optimizer.zero_grad(set_to_none=True)
        with amp():
            loss, _ = compute_objective(unet, cfgs[name][1], schedule, x, c, rnd, cfgs[name][0])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        return loss.item()

    # FLOPs: one image through the U-Net and through f, then one whole step of each method
    rnd0 = randomness(0)
    with amp():
        u_flops, e_flops = unit_flops(unet, encoders["difference"], schedule, x0, cond, rnd0)
    if not count:  # count=False: no whole-step count (its one-pair step runs without checkpointing: on FLUX.1 at
        counted = None  # 1024 px that alone exceeds an 80 GB card)
    elif checkpointing:  # the model's FLOPs, not the recomputation's (MFU's numerator): on one pair, x pairs
        one = torch.tensor([0, pairs], device=device)  # its winner and loser
        unet.disable_gradient_checkpointing()
        counted = {name: pairs * count_flops(lambda: step(name, randomness(0, 1), x0[one], cond.index(one)), device)
                   for name, *_ in spec}
        unet.enable_gradient_checkpointing()
    else:
        counted = {name: count_flops(lambda: step(name, rnd0), device) for name, *_ in spec}  # also the first warmup

    for i in range(warmup - (0 if checkpointing or not count else 1)):  # a one-pair count warms nothing up
        for name, *_ in spec:
            step(name, randomness(i + 1))
    times = {name: [] for name, *_ in spec}
    peaks = {name: 0.0 for name, *_ in spec}
    reserved = {name: 0.0 for name, *_ in spec}
    losses = {name: float("nan") for name, *_ in spec}
    for r in range(repeats):
        rnds = [randomness(1000 * r + s) for s in range(steps)]  # same t, eps, z for every method
        order = spec[r % len(spec):] + spec[:r % len(spec)]
        for name, *_ in order:
            reset_peak(device)
            sync(device)
            t0 = time.perf_counter()
            for rnd in rnds:
                losses[name] = step(name, rnd)
            sync(device)
            times[name].append((time.perf_counter() - t0) / steps)
            peaks[name] = max(peaks[name], peak_gb(device))
            reserved[name] = max(reserved[name], reserved_gb(device) or 0.0)

    step_s = {name: statistics.median(ts) for name, ts in times.items()}
    base = "latent DPO"
    rows = []
    for name, loss, space, error in spec:
        floor = flop_floor(loss, space, error, u_flops, e_flops)
        rows.append(dict(method=name, s_per_step=step_s[name], spread=[min(times[name]), max(times[name])],
                         ratio=step_s[name] / step_s[base], flop_floor=floor,
                         flop_counted=counted[name] / counted[base] if counted else None,
                         step_gflop=counted[name] / 1e9 if counted else None,
                         peak_gb=peaks[name], reserved_gb=reserved[name] or None, loss=losses[name]))
    loader = loader_pairs_per_s(latent_size, pairs)
    setup = dict(model=model, quantize=quantize, checkpointing=checkpointing, latent_size=latent_size, pairs=pairs,
                 steps=steps, warmup=warmup,
                 repeats=repeats, rank=rank, device=device, dtype=str(dtype).removeprefix("torch."), optimizer=opt_name,
                 threads=torch.get_num_threads(), torch=torch.__version__,
                 encoder_share=e_flops / u_flops, unet_gflop_per_image=u_flops / 1e9,
                 loader_pairs_per_s=loader, step_pairs_per_s=pairs / step_s["NCP-DPO"], errors=list(errors))
    result = dict(setup=setup, rows=rows)
    if profile:
        result["profile"] = {name: profile_step(lambda: step(name, rnd0)) for name in ("latent DPO", "NCP-DPO")}
    return result


# --modes: (encoder.error, how f's jvp runs (ncp.encoder.LINEARIZE), encoder.batch_calls); "latent" is latent DPO
MODES = {"latent": None, "difference": ("difference", "vmap", False), "difference-batched": ("difference", "vmap", True),
         "linearized-math": ("linearized", "math", False), "linearized-blockwise": ("linearized", "blockwise", False),
         "linearized-vmap": ("linearized", "vmap", False), "linearized": ("linearized", "vjp", False)}


def run_modes(model: str = "tiny-sd15", latent_size: int = 16, pairs: int = 1, warmup: int = 1, repeats: int = 1,
              modes=("latent", "difference", "linearized"), part: str = "step", blocks: int | None = None,
              rank: int | None = None, device: str | None = None, threads: int | None = None,
              dtype: str | None = None, checkpointing: bool = False) -> dict:
    """Each mode in a child process of its own, one after another (module docstring); rows in `modes` order."""
    rows = []
    for mode in modes:
        argv = [sys.executable, __file__, "--child-mode", mode, "--model", model, "--latent-size", str(latent_size),
                "--pairs", str(pairs), "--warmup", str(warmup), "--repeats", str(repeats), "--part", part]
        for flag, value in (("--blocks", blocks), ("--rank", rank), ("--device", device), ("--threads", threads),
                            ("--dtype", dtype)):
            if value is not None:
                argv += [flag, str(value)]
        argv += ["--checkpointing"] if checkpointing else []
        out = subprocess.run(argv, check=True, capture_output=True, text=True).stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))
        print(f"  {mode}: {rows[-1]['s_per_step']:.2f} s/step, peak {rows[-1]['peak_gb']:.2f} GB", file=sys.stderr)
    first = {r["mode"]: r for r in rows}
    for r in rows:
        for base in ("latent", "difference"):
            if base in first:
                r[f"time_vs_{base}"] = r["s_per_step"] / first[base]["s_per_step"]
                r[f"peak_vs_{base}"] = r["peak_gb"] / first[base]["peak_gb"]
                r[f"step_gb_vs_{base}"] = r["step_gb"] / first[base]["step_gb"]
    setup = dict(model=model, latent_size=latent_size, pairs=pairs, warmup=warmup, repeats=repeats, part=part,
                 blocks=blocks, checkpointing=checkpointing, **{k: rows[0][k] for k in ("rank", "device", "dtype", "threads", "torch")})
    return dict(setup=setup, rows=rows)


def child_mode(mode: str, model: str, latent_size: int, pairs: int, warmup: int, repeats: int, part: str,
               blocks: int | None, rank: int | None, device: str | None, threads: int | None, dtype: str | None,
               checkpointing: bool = False) -> dict:
    """One mode of `run_modes`, in this process: median step time, the process's peak and that peak above what was
    resident before the steps (the step's own memory)."""
    from ncp.losses import dpo_loss
    from ncp.objective import perceptual_errors

    with torch_threads(threads):
        device, torch_dtype, rank, _ = resolve(model, device, dtype, rank, ())
        error, path, batched = MODES[mode] or ("difference", "vmap", False)
        unet, params, encoders, schedule, x0, cond = build(model, latent_size, pairs, rank, device, torch_dtype,
                                                           (error,), blocks, checkpointing=checkpointing)
        encoder = encoders[error]
        encoder.linearize, encoder.batch_calls = path, batched
        optimizer, _ = make_optimizer(params)
        cfg = ObjectiveConfig(loss="dpo", space="latent" if mode == "latent" else "perceptual", beta=1.0)
        amp = torch.autocast(torch.device(device).type, dtype=torch_dtype, enabled=torch_dtype != torch.float32)

        phases = {}  # seconds of the timed steps' forward and backward (the rest: clip, optimizer, the loss's copy)

        def mark(phase: str, t0: float) -> float:
            sync(device)
            now = time.perf_counter()
            phases[phase] = phases.get(phase, 0.0) + now - t0
            return now

        def step(i: int) -> float:
            rnd = randomness_for(cfg, schedule, pairs, x0.shape[1:], torch.Generator().manual_seed(i)).to(device)
            t0 = time.perf_counter()
            if part == "errors":  # f's part alone: stand-in predictions near the truth, the policy's a leaf
                t, eps, z, tt = (x.repeat(2, *([1] * (x.dim() - 1))) for x in (rnd.t, rnd.eps, rnd.z, rnd.t_target))
                x_t = schedule.q_sample(x0, t, eps)
                eps = schedule.target(x0, eps)
                g = torch.Generator().manual_seed(i + 1)
                pol, ref = (eps + 0.1 * torch.randn(eps.shape, generator=g).to(eps.device) for _ in range(2))
                pol.requires_grad_()
                with amp:
                    errs = perceptual_errors(encoder, schedule, cfg, x_t, t, eps, z, tt, cond, x0, [pol, ref])
                    loss = dpo_loss(*errs[0].chunk(2), *errs[1].chunk(2), cfg.beta)[0].mean()
                t0 = mark("forward", t0)
                loss.backward()
                mark("backward", t0)
                return loss.item()
            optimizer.zero_grad(set_to_none=True)
            with amp:
                loss, _ = compute_objective(unet, encoder, schedule, x0, cond, rnd, cfg)
            t0 = mark("forward", t0)
            loss.backward()
            mark("backward", t0)
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            return loss.item()

        for i in range(warmup):
            step(i)
        phases.clear()
        reset_peak(device)
        resident = current_gb(device)
        times = []
        cpu0 = resource.getrusage(resource.RUSAGE_SELF)
        for r in range(repeats):
            sync(device)
            t0 = time.perf_counter()
            loss = step(1000 + r)
            sync(device)
            times.append(time.perf_counter() - t0)
        cpu = resource.getrusage(resource.RUSAGE_SELF)
        peak = peak_gb(device)
        per_step = {k: v / repeats for k, v in phases.items()}
        return dict(mode=mode, s_per_step=statistics.median(times), spread=[min(times), max(times)], peak_gb=peak,
                    reserved_gb=reserved_gb(device),
                    step_gb=peak - resident, loss=loss, mean_s=statistics.fmean(times), phases_s=per_step,  # means
                    user_s=(cpu.ru_utime - cpu0.ru_utime) / repeats, sys_s=(cpu.ru_stime - cpu0.ru_stime) / repeats,
                    page_faults=(cpu.ru_minflt - cpu0.ru_minflt) / repeats,
                    rank=rank, device=device,
                    dtype=str(torch_dtype).removeprefix("torch."), threads=torch.get_num_threads(), torch=torch.__version__)


def format_modes(result: dict) -> str:
    s = result["setup"]
    arch = f"transformer of {s['blocks']} joint blocks" if s["blocks"] else (
        "transformer" if s["model"].endswith("sd3") else "U-Net")
    what = "NCP-DPO step (objective, backward, clip, AdamW8bit)" if s["part"] == "step" else \
        "perceptual part only (f's calls + backward into the policy's prediction)"
    what += ", the policy's gradient checkpointing on" if s.get("checkpointing") else ""
    lines = [f"modes: {s['model']} {arch}, {s['latent_size']}x{s['latent_size']} latents, {s['pairs']} pair(s), {what}, "
             f"LoRA rank {s['rank']}, {s['device']} {s['dtype']} ({s['threads']} threads), {s['warmup']} warmup + "
             f"median of {s['repeats']}, one child process per mode",
             "",
             "| mode | s/step | time vs difference | time vs latent DPO | peak GB | +GB (step) | peak vs difference | +GB vs difference |",
             "|---|---|---|---|---|---|---|---|"]
    fmt = lambda r, k: f"{r[k]:.2f}x" if k in r else "-"  # noqa: E731
    for r in result["rows"]:
        lines.append(f"| {r['mode']} | {r['s_per_step']:.2f} | {fmt(r, 'time_vs_difference')} | {fmt(r, 'time_vs_latent')} | "
                     f"{r['peak_gb']:.2f} | {r['step_gb']:.2f} | {fmt(r, 'peak_vs_difference')} | "
                     f"{fmt(r, 'step_gb_vs_difference')} |")
    lines += ["", "Where a step's time goes (means over the timed steps; CPU seconds are all threads'):", "",
              "| mode | forward s | backward s | rest s | user CPU s | system CPU s | page faults |",
              "|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        f, b = r["phases_s"]["forward"], r["phases_s"]["backward"]
        lines.append(f"| {r['mode']} | {f:.2f} | {b:.2f} | {r['mean_s'] - f - b:.2f} | {r['user_s']:.2f} | "
                     f"{r['sys_s']:.2f} | {r['page_faults']:.0f} |")
    return "\n".join(lines)


def run_fast(model: str = "tiny-sd15", latent_size: int = 16, pairs: int = 1, steps: int = 1, repeats: int = 3,
             rank: int | None = None, device: str | None = None, threads: int | None = None, errors=("difference",),
             dtype: str | None = None, compile_mode: str = "default", combos=None,
             peak_tflops: float | None = None) -> dict:
    """Every (method, compile, channels-last) combination, interleaved; see the module docstring.
    combos: the (compile, channels_last) pairs to time (default all four; (False, False) must be one)."""
    with torch_threads(threads):
        device, torch_dtype, rank, errors = resolve(model, device, dtype, rank, errors)
        peak_flops = peak_tflops * 1e12 if peak_tflops else device_peak_flops(device, torch_dtype)
        unet, params, eager_f, schedule, x0, cond = build(model, latent_size, pairs, rank, device, torch_dtype, errors)
        optimizer, opt_name = make_optimizer(params)
        configure_inductor()
        # the same U-Net behind every combination: eager or compiled calls; f per error mode, eager or compiled
        # (a shallow copy shares f's modules, which are the U-Net's own; as train.compile, f's jvp stays eager)
        encoders = {(e, False): f for e, f in eager_f.items()}
        for e, f in eager_f.items():
            encoders[(e, True)] = copy.copy(f)
            if e != "linearized":
                encoders[(e, True)].compile(mode=compile_mode)
        nets = {False: unet, True: torch.compile(unet, mode=compile_mode)}
        spec = [("latent DPO", "latent", "difference")] + [
            (f"NCP-DPO {e}" if e != "difference" else "NCP-DPO", "perceptual", e) for e in errors]
        combos = combos or [(c, cl) for c in (False, True) for cl in (False, True)]
        amp = torch.autocast(torch.device(device).type, dtype=torch_dtype, enabled=torch_dtype != torch.float32)

        def set_format(channels_last: bool) -> None:
            fmt = torch.channels_last if channels_last else torch.contiguous_format
            unet.to(memory_format=fmt)

        def step(method, combo, rnd) -> float:
            name, space, error = method
            optimizer.zero_grad(set_to_none=True)
            with amp:
                loss, _ = compute_objective(nets[combo[0]], encoders[(error, combo[0])], schedule, x0, cond, rnd,
                                            ObjectiveConfig(loss="dpo", space=space, beta=1.0))
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            return loss.item()

        def randomness(i: int):
            g = torch.Generator().manual_seed(i)
            return randomness_for(ObjectiveConfig(), schedule, pairs, x0.shape[1:], g).to(device)  # DDPM or flow t

        rnd0 = randomness(0)
        with amp:
            u_flops, e_flops = unit_flops(unet, encoders[("difference", False)], schedule, x0, cond, rnd0)
        counted = {m[0]: count_flops(lambda: step(m, (False, False), rnd0), device) for m in spec}  # whole step, eager
        first = {}  # the first (compiling) step of every combination, untimed in the table
        for combo in combos:
            set_format(combo[1])
            for method in spec:
                sync(device)
                t0 = time.perf_counter()
                step(method, combo, rnd0)
                sync(device)
                first[(method[0], combo)] = time.perf_counter() - t0
        keys = [(m, c) for c in combos for m in spec]
        times = {(m[0], c): [] for m, c in keys}
        peaks = {(m[0], c): (0.0, 0.0) for m, c in keys}
        losses = {}
        for r in range(repeats):
            rnds = [randomness(1000 * r + s) for s in range(steps)]
            order = keys[r % len(keys):] + keys[:r % len(keys)]
            for method, combo in order:
                set_format(combo[1])
                reset_peak(device)
                resident = current_gb(device)
                sync(device)
                t0 = time.perf_counter()
                for rnd in rnds:
                    losses[(method[0], combo)] = step(method, combo, rnd)
                sync(device)
                key = (method[0], combo)
                times[key].append((time.perf_counter() - t0) / steps)
                peak = peak_gb(device)
                peaks[key] = max(peaks[key][0], peak), max(peaks[key][1], peak - resident)
        median = {k: statistics.median(v) for k, v in times.items()}
        rows = []
        for method, combo in keys:
            name, space, error = method
            key, plain = (name, combo), (name, (False, False))
            rows.append(dict(method=name, compile=combo[0], channels_last=combo[1], s_per_step=median[key],
                             spread=[min(times[key]), max(times[key])], ratio_to_plain=median[key] / median[plain],
                             ratio_to_latent_dpo=median[key] / median[("latent DPO", combo)],
                             flop_floor=flop_floor("dpo", space, error, u_flops, e_flops), first_step_s=first[key],
                             peak_gb=peaks[key][0], step_gb=peaks[key][1], loss=losses[key],
                             step_gflop=counted[name] / 1e9,
                             mfu=counted[name] / median[key] / peak_flops if peak_flops else None))
        setup = dict(model=model, latent_size=latent_size, pairs=pairs, steps=steps, repeats=repeats, rank=rank,
                     device=device, dtype=str(torch_dtype).removeprefix("torch."), optimizer=opt_name, threads=torch.get_num_threads(),
                     torch=torch.__version__, compile_mode=compile_mode, errors=list(errors), peak_tflops=(
                         peak_flops / 1e12 if peak_flops else None), **compile_stats())
        return dict(setup=setup, rows=rows)


# dense half-precision tensor-core peaks (vendor data sheets, SXM parts), for the MFU column
GPU_PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0}


def device_peak_flops(device: str, dtype: torch.dtype) -> float | None:
    """The GPU's fp16/bf16 peak FLOP/s when its name is in GPU_PEAK_TFLOPS (else None: pass --peak-tflops)."""
    if not device.startswith("cuda") or dtype not in (torch.float16, torch.bfloat16):
        return None
    name = torch.cuda.get_device_name(torch.device(device))
    return next((tf * 1e12 for key, tf in GPU_PEAK_TFLOPS.items() if key in name), None)


def current_gb(device: str) -> float:
    if device.startswith("cuda"):
        return torch.cuda.memory_allocated() / 2**30
    try:
        return status_gb("VmRSS")
    except (OSError, TypeError):
        return 0.0


def format_fast(result: dict) -> str:
    s = result["setup"]
    lines = [f"fast path: {s['model']} {families.get(s['model'].removeprefix('tiny-')).denoiser_kind}, {s['latent_size']}x{s['latent_size']} latents, {s['pairs']} pair(s)/step, "
             f"LoRA rank {s['rank']}, {s['optimizer']}, {s['device']} {s['dtype']} ({s['threads']} threads), "
             f"median of {s['repeats']} interleaved repeats x {s['steps']} step(s); torch.compile mode {s['compile_mode']}: "
             f"{s['compiles']} graphs ({s['recompiles']} recompilations), {s['compile_s']:.0f} s compiling",
             "",
             "| method | compile | channels-last | s/step | min-max | vs plain | vs latent DPO (same path) | FLOP floor | "
             "GFLOP/step | MFU | first step s | peak GB | +GB |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        mfu = "-" if r["mfu"] is None else f"{100 * r['mfu']:.1f}%"
        lines.append(f"| {r['method']} | {'on' if r['compile'] else 'off'} | {'on' if r['channels_last'] else 'off'} | "
                     f"{r['s_per_step']:.4f} | {r['spread'][0]:.4f}-{r['spread'][1]:.4f} | {r['ratio_to_plain']:.3f}x | "
                     f"{r['ratio_to_latent_dpo']:.3f}x | {r['flop_floor']:.3f}x | {r['step_gflop']:.1f} | {mfu} | "
                     f"{r['first_step_s']:.1f} | {r['peak_gb']:.2f} | {r['step_gb']:.2f} |")
    if s["peak_tflops"]:
        lines += ["", f"MFU = FLOPs counted per step (torch.utils.flop_counter, eager) / time / {s['peak_tflops']:.0f} TFLOP/s"]
    return "\n".join(lines)


def profile_step(fn, top: int = 15) -> str:
    """torch.profiler table of one step, ops sorted by self CPU time (where the time goes)."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with profile(activities=acts) as prof:
        fn()
    key = "self_cuda_time_total" if torch.cuda.is_available() else "self_cpu_time_total"
    return prof.key_averages().table(sort_by=key, row_limit=top)


def format_table(result: dict) -> str:
    s = result["setup"]
    lines = [f"step cost: {s['model']} {families.get(s['model'].removeprefix('tiny-')).denoiser_kind}, {s['latent_size']}x{s['latent_size']} latents, {s['pairs']} pair(s)/step, "
             f"LoRA rank {s['rank']}, {s['optimizer']}, {s['device']} {s['dtype']} ({s['threads']} threads), "
             f"median of {s['repeats']} interleaved repeats x {s['steps']} step(s)",
             f"encoder f = {100 * s['encoder_share']:.1f}% of a U-Net forward "
             f"({s['unet_gflop_per_image']:.2f} GFLOP per image)",
             "",
             "| method | s/step | min-max | ratio to latent DPO | FLOP floor | FLOPs counted | peak GB |",
             "|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        lines.append(f"| {r['method']} | {r['s_per_step']:.4f} | {r['spread'][0]:.4f}-{r['spread'][1]:.4f} | "
                     f"{r['ratio']:.3f}x | {r['flop_floor']:.3f}x | {r['flop_counted']:.3f}x | {r['peak_gb']:.2f} |")
    lines += ["", f"data loader: {s['loader_pairs_per_s']:.1f} pairs/s (toy images, main process) vs "
                  f"NCP-DPO training step: {s['step_pairs_per_s']:.2f} pairs/s "
                  f"(loader time = {100 * s['step_pairs_per_s'] / s['loader_pairs_per_s']:.1f}% of a step)"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=[*(f"tiny-{name}" for name in families.names()), *FULL_SIZE], default="tiny-sd15")
    p.add_argument("--latent-size", type=int, default=32, help="latent side (image side / 8)")
    p.add_argument("--pairs", type=int, default=1, help="preference pairs per step")
    p.add_argument("--steps", type=int, default=2, help="timed steps per method per repeat")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps per method (the first counts FLOPs)")
    p.add_argument("--repeats", type=int, default=5, help="interleaved rounds over the methods; median reported")
    p.add_argument("--rank", type=int, help="LoRA rank (default 64, tiny models 8)")
    p.add_argument("--device", help="default: cuda if available")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's); 1 is steadier on a shared CPU")
    p.add_argument("--profile", action="store_true", help="also print a torch.profiler table of latent DPO and NCP-DPO")
    p.add_argument("--errors", nargs="+", choices=list(ERRORS), default=["difference"],
                   help="encoder.error modes to time: each extra mode adds a row per NCP method")
    p.add_argument("--dtype", choices=["fp32", "fp16", "bf16"],
                   help="frozen weights + autocast, as train.mixed_precision (default fp16 on CUDA, fp32 on CPU)")
    p.add_argument("--fast", action="store_true",
                   help="latent DPO and NCP-DPO under every compile x channels-last combination (module docstring)")
    p.add_argument("--compile-mode", default="default", help="torch.compile mode for --fast (train.compile_mode)")
    p.add_argument("--combos", nargs="+", choices=list(COMBOS), help="--fast: the combinations to time (default all)")
    p.add_argument("--peak-tflops", type=float, help="--fast: the device's peak for the MFU column (known GPUs: "
                                                        "GPU_PEAK_TFLOPS in this file)")
    p.add_argument("--modes", nargs="+", choices=list(MODES),
                   help="one NCP-DPO step per perceptual-error mode, a child process each (module docstring)")
    p.add_argument("--part", choices=["step", "errors"], default="step", help="--modes: the whole step or f's part only")
    p.add_argument("--blocks", type=int, help="--model sd3: a transformer of this many joint blocks (f = all of them)")
    p.add_argument("--child-mode", choices=list(MODES), help=argparse.SUPPRESS)
    p.add_argument("--quantize", choices=["none", "int8", "nf4"], default="none",
                   help="model.quantize: the frozen denoiser in 8 / 4 bits under the LoRA (bitsandbytes)")
    p.add_argument("--checkpointing", action="store_true",
                   help="the policy's gradient checkpointing, as the paper configs train (train.gradient_checkpointing)")
    p.add_argument("--json", help="write the result here")
    a = p.parse_args(argv)
    if a.child_mode:
        print(json.dumps(child_mode(a.child_mode, a.model, a.latent_size, a.pairs, a.warmup, a.repeats, a.part,
                                    a.blocks, a.rank, a.device, a.threads, a.dtype, a.checkpointing)))
        return {}
    if a.modes:
        result = run_modes(a.model, a.latent_size, a.pairs, a.warmup, a.repeats, a.modes, a.part, a.blocks, a.rank,
                           a.device, a.threads, a.dtype, a.checkpointing)
        print(format_modes(result))
        if a.json:
            write_json(a.json, result)
        return result
    if a.warmup < (0 if a.modes or a.child_mode else 1) or a.steps < 1 or a.repeats < 1:
        p.error("--warmup, --steps and --repeats must be >= 1 (--modes: --warmup >= 0)")
    if a.fast:
        combos = [COMBOS[c] for c in ["plain", *[c for c in a.combos if c != "plain"]]] if a.combos else None
        result = run_fast(a.model, a.latent_size, a.pairs, a.steps, a.repeats, a.rank, a.device, a.threads, a.errors,
                          a.dtype, a.compile_mode, combos, a.peak_tflops)
        print(format_fast(result))
        if a.json:
            write_json(a.json, result)
        return result
    result = run(a.model, a.latent_size, a.pairs, a.steps, a.warmup, a.repeats, a.rank, a.device, a.profile, a.threads,
                 a.errors, a.dtype, quantize=a.quantize, checkpointing=a.checkpointing)
    print(format_table(result))
    for name, table in result.get("profile", {}).items():
        print(f"\nprofile of one {name} step\n{table}")
    if a.json:
        write_json(a.json, result)
    return result


def write_json(path: str, result: dict) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
