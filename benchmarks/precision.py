"""Precision of the perceptual error: how much rounding in f moves the per-sample errors, the sign of the
DPO margin and the LoRA gradient, for each way of computing the error (`encoder.error`) and each
precision of f, bucketed by timestep.

The truth is f in float64 with the exact difference f(x_pol) - f(x_true). The U-Net runs once, in fp32,
and its noise predictions (policy and reference) are the exact inputs of every row, so a row measures
f's rounding alone; the LoRA gradient of every row goes back through that same U-Net graph.
Rows: f in float64 / fp32 / fp16 / bf16 x {difference, linearized}. Training's `encoder.error=fp32` under
fp16/bf16 mixed precision is the (fp32, difference) row. Half precision runs as in training: frozen
weights cast to it, under autocast (CPU autocast stands in for the GPU dtypes; `--device cuda` runs real
kernels), and fp16 gradients with a loss scale as the GradScaler finds one (`lora_gradient`).

Per t bucket (0-99, 100-499, 500-999) and row:
  err   median over samples of |err - err_64| / err_64, policy (pol) and reference (ref) errors;
  flip  share of pairs whose DPO margin has the other sign than in float64;
  cos   cosine between the LoRA gradient of the bucket's mean DPO loss and the float64 one.
beta per bucket = 1 / median |err_w - err_l| of the truth (beta only weights pairs in the gradient).

Models:
  toy   the toy benchmark's pretrained tiny base (benchmarks/toy_alignment.py; trained here if --base is
        missing), its LoRA trained --train-steps DPO steps in fp32 on toy pairs (a policy a realistic
        distance from the reference), evaluated on other toy pairs;
  sd15  the SD1.5 U-Net architecture with random weights, 32x32 latents, random latents and text, its
        LoRA-B random and scaled so the policy is --distance away from the reference:
        rms(eps_pol - eps_ref) / rms(eps_ref - eps) (default: the trained toy policy's distance).

    python benchmarks/precision.py --model toy sd15 --threads 1 --out outputs/precision   # ~30 min (+7 for the toy base)
    python benchmarks/precision.py --smoke --out /tmp/precision-smoke           # seconds: the code runs
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ncp.diffusion import Schedule, prev_t  # noqa: E402
from ncp.encoder import PerceptualEncoder  # noqa: E402
from ncp.losses import dpo_loss  # noqa: E402
from ncp.models import adapters_disabled, add_lora  # noqa: E402
from ncp.objective import ObjectiveConfig, Randomness, compute_objective, perceptual_errors  # noqa: E402

BUCKETS = [(0, 99), (100, 499), (500, 999)]
DTYPES = {"float64": torch.float64, "fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
ERRORS = ("difference", "linearized")
# the decision rule of the precision issue: median relative error within 5% in every bucket, cosine >= 0.99
MAX_REL_ERR, MIN_COS = 0.05, 0.99


# ---------------------------------------------------------------- the models, data and policies
def toy_model(base: str, out: Path, pairs_per_bucket: int, train_steps: int, log=print):
    """Tiny toy base (pretrained unless --base random), LoRA trained by DPO; eval latents and conditioning."""
    from ncp.conditioning import build_cond
    from ncp.data.config import DataConfig
    from ncp.data.loader import build_dataloader
    from ncp.models import load_models
    from ncp.tiny import build_tiny_pipeline

    if base == "random":
        path = build_tiny_pipeline(out / "tiny-random", "sd15")
    else:
        path = Path(base)
        if not (path / "model_index.json").exists():
            path = pretrain_toy_base(path.parent, log)
    models = load_models(str(path))
    base_unet = copy.deepcopy(models.unet)
    torch.manual_seed(0)  # the LoRA's random A matrices: the same policy on every run
    params = add_lora(models.unet, rank=8)
    models.unet.train()
    schedule = Schedule.from_scheduler(models.scheduler)

    def pairs(seed: int, n: int):
        loader = build_dataloader(DataConfig(source="toy", toy_num_pairs=n, toy_seed=seed, resolution=32), n, seed=0)
        batch = next(iter(loader))
        with torch.no_grad():
            x0 = models.vae.encode(batch["pixel_values"]).latent_dist.mean * models.vae.config.scaling_factor
        return x0, build_cond(models, batch["prompts"], target_size=(32, 32))

    # a policy after some DPO steps on training pairs (toy seed 0), beta = 1 / median |err_w - err_l| of the base
    x_train, c_train = pairs(0, 64)
    encoder = PerceptualEncoder(base_unet)
    g = torch.Generator().manual_seed(0)
    opt = torch.optim.AdamW(params, lr=1e-3, eps=1e-12)
    cfg = None
    for _ in range(train_steps):
        idx = torch.randint(0, 64, (8,), generator=g)
        idx = torch.cat([idx, 64 + idx])
        x0, cond, rnd = x_train[idx], c_train.index(idx), random_draws(8, x_train.shape[1:], g, (0, 999))
        if cfg is None:
            with torch.no_grad():
                m = compute_objective(models.unet, encoder, schedule, x0, cond, rnd, ObjectiveConfig(loss="cpo"))[1]
            cfg = ObjectiveConfig(loss="dpo", beta=1 / max((m["err_w"] - m["err_l"]).abs().median().item(), 1e-30))
        loss, _ = compute_objective(models.unet, encoder, schedule, x0, cond, rnd, cfg)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    beta = cfg.beta if cfg else float("nan")
    n = 3 * pairs_per_bucket
    x0, cond = pairs(1, n)  # evaluation pairs: another toy stream
    return dict(unet=models.unet, base=base_unet, params=params, schedule=schedule, x0=x0, cond=cond,
                note=f"toy base {path}, LoRA rank 8 after {train_steps} fp32 DPO steps (lr 1e-3, beta {beta:.3g})")


def sd15_model(latent_size: int, pairs_per_bucket: int, distance: float, smoke: bool, device: str = "cpu"):
    """SD1.5 U-Net architecture (tiny SD1.5 for --smoke), random weights, on `device`; LoRA-B scaled to `distance`
    (measured there: 2 x 3 x pairs_per_bucket U-Net forwards)."""
    from diffusers import DDPMScheduler, UNet2DConditionModel

    from ncp.conditioning import Cond
    from ncp.tiny import SCHEDULER_CONFIG

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from step_cost import SD15_UNET

    torch.manual_seed(0)
    config = dict(SD15_UNET)
    if smoke:
        config.update(block_out_channels=(32, 64), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                      up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
                      attention_head_dim=4, norm_num_groups=8, layers_per_block=1)
    unet = UNet2DConditionModel(**config).requires_grad_(False).eval().to(device)
    base_unet = copy.deepcopy(unet)
    params = add_lora(unet, rank=4 if smoke else 64)
    unet.train()
    n = 3 * pairs_per_bucket
    x0 = torch.randn(2 * n, 4, latent_size, latent_size)
    cond = Cond(torch.randn(n, 77, unet.config.cross_attention_dim)).repeat(2)
    schedule = Schedule.from_scheduler(DDPMScheduler.from_config(SCHEDULER_CONFIG))
    names = [name for name, p in unet.named_parameters() if p.requires_grad]
    # LoRA-B ~ N(0, 1), then one linear rescale: eps_pol - eps_ref is linear in B to first order
    rnd = random_draws(n, x0.shape[1:], torch.Generator().manual_seed(99), (0, 999))
    with torch.no_grad():
        for name, p in zip(names, params):
            if "lora_B" in name:
                p.normal_()
        measured = policy_distance(unet, schedule, x0.to(device), cond.to(device), rnd.to(device))
        for name, p in zip(names, params):
            if "lora_B" in name:
                p.mul_(distance / measured)
    return dict(unet=unet, base=base_unet, params=params, schedule=schedule, x0=x0, cond=cond,
                note=f"SD1.5 architecture, random weights, {latent_size}x{latent_size} latents, LoRA-B random "
                     f"at distance {distance:.3g} (measured {measured:.3g} before rescaling)")


def random_draws(num_pairs: int, shape, g: torch.Generator, bucket: tuple[int, int]):
    """t uniform in the bucket, eps and z ~ N(0, I), f evaluated at t-1 (objective.target=prev)."""
    t = torch.randint(bucket[0], bucket[1] + 1, (num_pairs,), generator=g)
    return Randomness(t, torch.randn((num_pairs, *shape), generator=g), torch.randn((num_pairs, *shape), generator=g),
                      prev_t(t))


def predictions(unet, schedule, x0, cond, rnd):
    """x_t and friends for [winners; losers], the policy's eps (with graph) and the reference's."""
    t, eps, z, t_target = (x.repeat(2, *([1] * (x.dim() - 1))) for x in (rnd.t, rnd.eps, rnd.z, rnd.t_target))
    x_t = schedule.q_sample(x0, t, eps)
    eps_pol = unet(x_t, t, **cond.unet_kwargs()).sample
    with torch.no_grad(), adapters_disabled(unet):
        eps_ref = unet(x_t, t, **cond.unet_kwargs()).sample
    return (x_t, t, eps, z, t_target), eps_pol, eps_ref


def rms(x: torch.Tensor) -> float:
    return x.double().pow(2).mean().sqrt().item()


def policy_distance(unet, schedule, x0, cond, rnd) -> float:
    """rms(eps_pol - eps_ref) / rms(eps_ref - eps): how far the LoRA moves the prediction, relative to its error."""
    (_, _, eps, _, _), eps_pol, eps_ref = predictions(unet, schedule, x0, cond, rnd)
    return rms(eps_pol - eps_ref) / rms(eps_ref - eps)


# ---------------------------------------------------------------- one bucket, every row
def measure(model: dict, pairs_per_bucket: int, device: str, seed: int = 0) -> dict:
    """{bucket: {row: metrics}} plus the truth's implicit accuracy and the policy's distance."""
    unet, schedule, params = model["unet"], model["schedule"], model["params"]
    unet.to(device)
    g = torch.Generator().manual_seed(seed)
    out, truths, distances, t0 = {}, [], [], time.perf_counter()
    for b, bucket in enumerate(BUCKETS):
        sl = slice(b * pairs_per_bucket, (b + 1) * pairs_per_bucket)
        n_all = model["x0"].shape[0] // 2
        idx = torch.cat([torch.arange(n_all)[sl], n_all + torch.arange(n_all)[sl]])
        x0, cond = model["x0"][idx].to(device), model["cond"].index(idx).to(device)
        rnd = random_draws(pairs_per_bucket, x0.shape[1:], g, bucket).to(device)
        (x_t, t, eps, z, t_target), eps_pol, eps_ref = predictions(unet, schedule, x0, cond, rnd)
        distances.append(rms(eps_pol - eps_ref) / rms(eps_ref - eps))
        rows, truth = {}, None
        for dtype_name in DTYPES:
            for error in ERRORS:
                r = row(model["base"], schedule, (x_t, t, eps, z, t_target, x0, cond), eps_pol, eps_ref, params,
                        dtype_name, error, device, truth)
                if truth is None:
                    truth = r.pop("_truth")
                rows[f"{dtype_name} {error}"] = r
        truths.append(truth["margin"])
        out[f"{bucket[0]}-{bucket[1]}"] = rows
        print(f"  t {bucket[0]}-{bucket[1]} done ({time.perf_counter() - t0:.0f} s)", flush=True)
        del eps_pol
    margins = torch.cat(truths)
    return dict(buckets=out, implicit_acc_float64=((margins > 0).float() + 0.5 * (margins == 0).float()).mean().item(),
                distance=statistics.mean(distances))


def row(base_unet, schedule, inputs, eps_pol, eps_ref, params, dtype_name, error, device, truth) -> dict:
    """Errors, margins and LoRA gradient with f in `dtype_name`, computed as `error`; compared to `truth`
    (None: this row is the truth, float64 difference, and is returned under "_truth" as well)."""
    dtype = DTYPES[dtype_name]
    half = dtype in (torch.float16, torch.bfloat16)
    wide = torch.float64 if dtype == torch.float64 else torch.float32  # what training feeds f: fp32 latents
    encoder = PerceptualEncoder(base_unet, error=error, share=False).to(device, dtype)  # f alone in dtype
    x_t, t, eps, z, t_target, x0, cond = inputs
    cast = [x.to(wide) for x in (x_t, eps, z, x0)]
    hats = [eps_pol.to(wide), eps_ref.to(wide)]
    with torch.autocast(torch.device(device).type, dtype=dtype, enabled=half):
        err, ref_err = perceptual_errors(encoder, schedule, ObjectiveConfig(), cast[0], t, cast[1], cast[2], t_target,
                                         cond.to(dtype=dtype), cast[3], hats)
    err_w, err_l = err.double().chunk(2)
    ref_w, ref_l = ref_err.double().chunk(2)
    if truth is None:
        beta = 1 / max((err_w - err_l).abs().median().item(), 1e-300)
    else:
        beta = truth["beta"]
    margin = (ref_w - ref_l) - (err_w - err_l)
    loss = dpo_loss(err.chunk(2)[0], err.chunk(2)[1], ref_err.chunk(2)[0], ref_err.chunk(2)[1], beta)[0].mean()
    grad, scale = lora_gradient(loss, params, fp16=dtype == torch.float16)
    this = dict(err=err.detach().double(), ref_err=ref_err.detach().double(), margin=margin.detach(), grad=grad,
                beta=beta)
    ref = this if truth is None else truth
    rel = lambda a, b: ((a - b).abs() / b).median().item()  # noqa: E731
    result = dict(err=rel(this["err"], ref["err"]), ref_err=rel(this["ref_err"], ref["ref_err"]),
                  flip=(torch.sign(this["margin"]) != torch.sign(ref["margin"])).double().mean().item(),
                  cos=F.cosine_similarity(this["grad"], ref["grad"], dim=0).item(),
                  finite=bool(torch.isfinite(grad).all()), loss_scale=scale)
    if truth is None:
        result["_truth"] = this
    return result


def lora_gradient(loss, params, fp16: bool):
    """d loss / d LoRA (flat, float64). fp16 backward runs with a loss scale as training's GradScaler: it
    starts at 2^16 and backs off while gradients overflow; here the first power 2^(16 - 4k) that stays finite."""
    for exponent in range(16, -40, -4) if fp16 else [0]:
        scale = 2.0 ** exponent
        grads = torch.autograd.grad(loss * scale, params, retain_graph=True, allow_unused=True)
        grad = torch.cat([(g if g is not None else torch.zeros_like(p)).flatten().double() for g, p in zip(grads, params)])
        if torch.isfinite(grad).all():
            break
    return grad / scale, scale


# ---------------------------------------------------------------- the toy base
def pretrain_toy_base(out: Path, log=print) -> Path:
    """The toy benchmark's base (its EMA pretraining and stopping rule, benchmarks/toy_alignment.py) in out/base."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import toy_alignment as toy

    toy.pretrain_base(out, toy.FULL, toy.split_captions()["val"], toy.base_check_seeds(toy.FULL), log=log)
    return out / "base"


# ---------------------------------------------------------------- output
def passes(bucket_rows: dict, row_name: str) -> bool:
    rows = [b[row_name] for b in bucket_rows.values()]
    return all(max(r["err"], r["ref_err"]) <= MAX_REL_ERR and r["cos"] >= MIN_COS and r["finite"] for r in rows)


def decision(results: dict) -> dict:
    """Which `encoder.error` meets the rule at each `train.mixed_precision`, on every model measured."""
    rows_for = {"no": {"difference": "fp32 difference", "linearized": "fp32 linearized", "fp32": "fp32 difference"},
                "fp16": {"difference": "fp16 difference", "linearized": "fp16 linearized", "fp32": "fp32 difference"},
                "bf16": {"difference": "bf16 difference", "linearized": "bf16 linearized", "fp32": "fp32 difference"}}
    return {mp: {mode: all(passes(r["buckets"], name) for r in results.values()) for mode, name in modes.items()}
            for mp, modes in rows_for.items()}


def format_tables(results: dict) -> str:
    lines = []
    for name, r in results.items():
        lines += [f"### {name}: {r['note']}",
                  f"policy distance {r['distance']:.3g}, implicit accuracy in float64 {r['implicit_acc_float64']:.2f}, "
                  f"{r['pairs_per_bucket']} pairs per bucket, {r['seconds']:.0f} s", "",
                  "| f | error | " + " | ".join(f"t {b}: err pol / ref, flip, cos" for b in r["buckets"]) + " |",
                  "|---|---|" + "---|" * len(r["buckets"])]
        for row_name in next(iter(r["buckets"].values())):
            cells = [f"{c['err']:.2g} / {c['ref_err']:.2g}, {c['flip']:.2f}, {c['cos']:.4f}" + ("" if c["finite"] else " (inf)")
                     for c in (b[row_name] for b in r["buckets"].values())]
            dtype_name, error = row_name.split()
            lines.append(f"| {dtype_name} | {error} | " + " | ".join(cells) + " |")
        lines.append("")
    d = decision(results)
    lines += [f"meets the rule (median err <= {MAX_REL_ERR:.0%} in every bucket, cos >= {MIN_COS}) on "
              f"{' and '.join(results)}:", "", "| train.mixed_precision | difference | linearized | fp32 |", "|---|---|---|---|"]
    for mp, modes in d.items():
        lines.append(f"| {mp} | " + " | ".join("yes" if modes[m] else "no" for m in ("difference", "linearized", "fp32")) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", nargs="+", choices=["toy", "sd15"], default=["toy", "sd15"])
    p.add_argument("--base", default="outputs/toy-v2/base",
                   help="toy base pipeline folder (pretrained here if missing); 'random' = untrained tiny SD1.5")
    p.add_argument("--train-steps", type=int, default=10,
                   help="fp32 DPO steps of the toy policy's LoRA (10: implicit accuracy about 0.6 on the eval pairs)")
    p.add_argument("--pairs-per-bucket", type=int, nargs="+", default=None,
                   help="pairs per t bucket, one number or one per model (default toy 32, sd15 3)")
    p.add_argument("--latent-size", type=int, default=32, help="sd15 latent side")
    p.add_argument("--distance", type=float, help="sd15 policy distance (default: the toy policy's, else 0.05)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    p.add_argument("--out", default="outputs/precision")
    p.add_argument("--smoke", action="store_true", help="random tiny models, 1 pair per bucket: the code runs")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    if torch.device(a.device).type == "cuda":  # the fp32 rows in fp32 (cuDNN's convolutions default to TF32 there)
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    defaults = {"toy": 1 if a.smoke else 32, "sd15": 1 if a.smoke else 3}
    per_bucket = {m: defaults[m] for m in a.model}
    if a.pairs_per_bucket:
        counts = a.pairs_per_bucket * len(a.model) if len(a.pairs_per_bucket) == 1 else a.pairs_per_bucket
        per_bucket = dict(zip(a.model, counts))
    results, distance = {}, a.distance
    for name in a.model:
        t0 = time.perf_counter()
        n = per_bucket[name]
        if name == "toy":
            model = toy_model("random" if a.smoke else a.base, out, n, 2 if a.smoke else a.train_steps)
        else:
            d = distance or results.get("toy", {}).get("distance") or 0.05
            model = sd15_model(8 if a.smoke else a.latent_size, n, d, a.smoke, a.device)
        r = measure(model, n, a.device)
        r.update(note=model["note"], pairs_per_bucket=n, seconds=time.perf_counter() - t0)
        results[name] = r
        print(f"{name}: {time.perf_counter() - t0:.0f} s", flush=True)
    text = format_tables(results)
    print(text)
    saved = dict(setup=dict(vars(a), torch=torch.__version__), results=results, decision=decision(results))
    (out / "precision.json").write_text(json.dumps(saved, indent=2))
    (out / "precision.md").write_text(text + "\n")
    if not all(math.isfinite(c["cos"]) or not c["finite"] for r in results.values() for b in r["buckets"].values()
               for c in b.values()):
        raise SystemExit("non-finite figure")
    return saved


if __name__ == "__main__":
    main()
