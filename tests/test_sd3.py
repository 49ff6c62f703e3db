"""SD3 / SD3.5 (MMDiT, flow matching) on a tiny offline SD3 pipeline: conditioning, flow maths, encoder,
objectives, LoRA, generation."""

import math

import pytest
import torch

from ncp.conditioning import build_cond, encode_prompts
from ncp.encoder import ERRORS, LINEARIZE
from ncp.encoder_dit import DiTPerceptualEncoder
from ncp.errors import NcpError
from ncp.flow import FlowSchedule, sample_timesteps
from ncp.models import add_lora, adapters_disabled, load_models
from ncp.objective import ObjectiveConfig, compute_objective, perceptual_errors, randomness_for

PROMPTS = ["a red circle on a white background", "a blue square"]
LATENT = (16, 16, 16)


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny models run fastest single-threaded (conftest)


@pytest.fixture(scope="module")
def tiny_sd3(tmp_path_factory):
    from ncp.tiny import build_tiny_pipeline

    return build_tiny_pipeline(tmp_path_factory.mktemp("tiny") / "sd3", "sd3")


def setup(path, rank=4, error="difference", blocks=2, dtype=torch.float32, step="ode"):
    models = load_models(str(path), weight_dtype=dtype)
    encoder = DiTPerceptualEncoder(models.unet, blocks=blocks, error=error)
    params = add_lora(models.unet, rank=rank)
    models.unet.train()
    schedule = FlowSchedule.from_scheduler(models.scheduler, step)
    cond = build_cond(models, PROMPTS, target_size=(32, 32))
    x0 = torch.randn(4, *LATENT, generator=torch.Generator().manual_seed(0))
    rnd = randomness_for(ObjectiveConfig(), schedule, 2, LATENT, torch.Generator().manual_seed(1))
    return models, encoder, params, schedule, x0, cond, rnd


@pytest.mark.parametrize("t5", [True, False])
def test_loading_and_conditioning_match_the_pipeline(tiny_sd3, t5):
    """With T5, and without it as the pipeline allows (text_encoder_3=None: zeros in its place)."""
    from diffusers import StableDiffusion3Pipeline

    path = tiny_sd3
    models = load_models(str(path), text_encoder_3=t5)
    assert models.arch == "sd3" and type(models.unet).__name__ == "SD3Transformer2DModel"
    assert (models.text_encoders[2] is None) == (not t5)
    pipe = StableDiffusion3Pipeline.from_pretrained(path, **({} if t5 else dict(text_encoder_3=None, tokenizer_3=None)))
    assert (pipe.text_encoder_3 is None) == (not t5)
    with torch.no_grad():  # as the pipeline's __call__ runs it (SDPA picks another CPU kernel with grad on)
        ref, _, pooled, _ = pipe.encode_prompt(PROMPTS, None, None, device="cpu", do_classifier_free_guidance=False)
    ours = encode_prompts(models, PROMPTS)
    assert ours.encoder_hidden_states.shape == ref.shape == (2, 77 + 256, 96)
    assert torch.equal(ours.encoder_hidden_states, ref) and torch.equal(ours.pooled_projections, pooled)
    if not t5:
        assert not ours.encoder_hidden_states[:, 77:].any()  # the pipeline's zeros in T5's place
    # the conditioning drives the transformer as the pipeline's kwargs do
    cond = build_cond(models, PROMPTS, target_size=(32, 32))
    assert cond.time_ids is None and cond.encoder_hidden_states.shape[0] == 4
    x, ts = torch.randn(4, *LATENT), torch.tensor([1000.0, 500.0, 20.0, 3.0])
    ours_out = models.unet(x, timestep=ts, **cond.unet_kwargs()).sample
    ref_out = pipe.transformer(hidden_states=x, timestep=ts, encoder_hidden_states=ref.repeat(2, 1, 1),
                               pooled_projections=pooled.repeat(2, 1)).sample
    assert torch.equal(ours_out, ref_out)


def test_wrong_arch_is_a_clear_error(tiny_sd3):
    with pytest.raises(NcpError, match="sd3"):
        load_models(str(tiny_sd3), arch="sdxl")


def test_flow_step_matches_the_scheduler_per_sample(tiny_sd3):
    """x_t = (1 - sigma) x0 + sigma eps with the scheduler's own (shifted) sigmas, target v = eps - x0, and the
    reverse step to the next sigma of the training discretisation equal to FlowMatchEulerDiscreteScheduler.step."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(tiny_sd3, subfolder="scheduler")
    assert scheduler.config.shift == 3.0
    schedule = FlowSchedule.from_scheduler(scheduler)
    n = schedule.num_timesteps
    t = torch.tensor([0, 1, 500, n - 2, n - 1])
    g = torch.Generator().manual_seed(0)
    x0, eps, v = (torch.randn(5, *LATENT, generator=g) for _ in range(3))
    x_t = schedule.q_sample(x0, t, eps)
    timesteps = schedule.model_timestep(t)
    ref_q = scheduler.scale_noise(x0, timesteps, eps)  # the scheduler's forward process, looked up by timestep
    assert torch.allclose(x_t, ref_q, atol=1e-6)
    assert torch.equal(schedule.velocity(x0, eps), eps - x0)
    ours = schedule.step(x_t, t, v)
    for i in range(5):
        sch = FlowMatchEulerDiscreteScheduler.from_pretrained(tiny_sd3, subfolder="scheduler")
        sch.sigmas = torch.cat([sch.sigmas, torch.zeros(1)])  # the terminal sigma 0, as set_timesteps appends it
        ref = sch.step(v[i:i + 1], timesteps[i:i + 1], x_t[i:i + 1]).prev_sample
        assert torch.equal(ours[i:i + 1], ref), int(t[i])
    # the last step lands on the clean sample when v is the true velocity
    assert torch.allclose(schedule.step(x_t[4:], t[4:], (eps - x0)[4:]), x0[4:], atol=1e-5)
    assert schedule.model_timestep(torch.tensor([n])).item() == 0.0
    # the step is affine in v: two predictions' points differ by (sigma' - sigma) (v1 - v2), exactly in float64
    other = torch.randn(5, *LATENT, generator=g).double()
    gap = schedule.step(x_t.double(), t, other) - schedule.step(x_t.double(), t, v.double())
    coef = (schedule.sigmas[t + 1] - schedule.sigmas[t]).view(-1, 1, 1, 1)
    assert torch.allclose(schedule.step_v_coef(t), coef.flatten())
    assert torch.allclose(gap, coef * (other - v.double()), rtol=1e-6, atol=1e-9)


def test_sde_step_is_the_posterior_and_shares_z(tiny_sd3):
    """sde: x_t' = (1 - s') x0_hat + sqrt(s'^2 - c^2) eps_hat + c z. With the true v it is q(x_t' | x0) sampled
    with noise sqrt(s'^2 - c^2)/s' eps + c/s' z (unit variance); at the last step c = 0 and it is the ODE step."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    schedule = FlowSchedule.from_scheduler(
        FlowMatchEulerDiscreteScheduler.from_pretrained(tiny_sd3, subfolder="scheduler"), "sde")
    ode = FlowSchedule(schedule.sigmas, schedule.timesteps)
    n = schedule.num_timesteps
    t = torch.tensor([0, 300, 900, n - 1])
    g = torch.Generator().manual_seed(0)
    x0, eps, z, v = (torch.randn(4, *LATENT, generator=g).double() for _ in range(4))
    x_t = schedule.q_sample(x0, t, eps)
    s_next = schedule.sigmas[t + 1].view(-1, 1, 1, 1)
    _, _, c, _ = schedule._coefs(t)
    c = c.view(-1, 1, 1, 1)
    expected = (1 - s_next) * x0 + (s_next ** 2 - c ** 2).sqrt() * eps + c * z
    assert torch.allclose(schedule.step(x_t, t, eps - x0, z), expected, atol=1e-10)
    assert c[-1].item() == 0 and (c[:-1] > 0).all()
    assert torch.allclose(schedule.step(x_t[3:], t[3:], v[3:], z[3:]), ode.step(x_t[3:], t[3:], v[3:]), atol=1e-12)
    gap = schedule.step(x_t, t, v, z) - schedule.step(x_t, t, eps - x0, z)  # affine in v, z cancels
    assert torch.allclose(gap, schedule.step_v_coef(t).view(-1, 1, 1, 1) * (v - (eps - x0)), atol=1e-10)


def test_logit_normal_timesteps_concentrate_in_the_middle():
    g = torch.Generator().manual_seed(0)
    uniform = sample_timesteps(20000, 1000, g)
    logit = sample_timesteps(20000, 1000, g, "logit_normal", 0.0, 1.0)
    assert uniform.min() >= 0 and uniform.max() <= 999 and logit.min() >= 0 and logit.max() <= 999
    middle = lambda t: ((t >= 250) & (t < 750)).float().mean().item()  # noqa: E731
    # P(|n| < logit(0.75) = 1.0986) = 0.728 for n ~ N(0, 1); uniform: 0.5
    assert abs(middle(logit) - 0.728) < 0.02 and abs(middle(uniform) - 0.5) < 0.02


def test_encoder_is_the_first_k_blocks_of_the_base_transformer(tiny_sd3):
    models = load_models(str(tiny_sd3))
    tr = models.unet
    encoder = DiTPerceptualEncoder(tr, blocks=2, share=False)  # a copy: what it holds is its own
    names = {n.split(".")[0] for n, _ in encoder.named_parameters()}
    assert names == {"pos_embed", "time_text_embed", "context_embedder", "transformer_blocks"}
    assert len(encoder.transformer_blocks) == 2 and len(tr.transformer_blocks) == 4  # no block after K is kept
    assert not any(n.startswith(("norm_out", "proj_out", "transformer_blocks.2", "transformer_blocks.3"))
                   for n, _ in encoder.named_parameters())
    captured = {}
    tr.transformer_blocks[1].register_forward_hook(lambda m, i, o: captured.update(h=o[1]))
    cond = build_cond(models, PROMPTS, target_size=(32, 32)).index(slice(0, 2))
    x, ts = torch.randn(2, *LATENT), torch.tensor([900.0, 40.0])
    tr(x, timestep=ts, **cond.unet_kwargs())
    assert torch.allclose(encoder(x, ts, cond), captured["h"], atol=1e-6)
    assert DiTPerceptualEncoder(tr, blocks=2, pool=True)(x, ts, cond).shape == (2, 32)
    assert len(DiTPerceptualEncoder(tr).transformer_blocks) == 1  # default: a quarter of 4 blocks
    with pytest.raises(NcpError, match="encoder.blocks"):
        DiTPerceptualEncoder(tr, blocks=5)
    add_lora(tr, rank=4)
    with pytest.raises(NcpError, match="before adding LoRA"):
        DiTPerceptualEncoder(tr)


@pytest.mark.parametrize("precision", ["no", "bf16"])
@pytest.mark.parametrize("error", ERRORS)
def test_dpo_is_log2_at_initialisation_in_both_spaces(tiny_sd3, error, precision):
    dtype = {"no": torch.float32, "bf16": torch.bfloat16}[precision]
    models, encoder, _, schedule, x0, cond, rnd = setup(tiny_sd3, error=error, dtype=dtype)
    for space in ("perceptual", "latent"):
        cfg = ObjectiveConfig(loss="dpo", space=space, beta=2500.0)
        with torch.autocast("cpu", dtype=dtype, enabled=precision != "no"):
            loss, metrics = compute_objective(models.unet, encoder, schedule, x0, cond.to(dtype=dtype), rnd, cfg)
        assert abs(loss.item() - math.log(2)) < 1e-6, space
        assert torch.equal(metrics["implicit_acc"], torch.full((2,), 0.5))
        assert torch.equal(metrics["err_w"], metrics["ref_err_w"]) and (metrics["err_w"] > 0).all()


def test_latent_error_is_the_velocity_error(tiny_sd3):
    """Diffusion-DPO for flow matching: err = mean((v_pred - (eps - x0))^2), v_pred = transformer(x_t, sigma * 1000)."""
    models, encoder, _, schedule, x0, cond, rnd = setup(tiny_sd3)
    _, m = compute_objective(models.unet, encoder, schedule, x0, cond, rnd, ObjectiveConfig(loss="cpo", space="latent"))
    t, eps = rnd.t.repeat(2), rnd.eps.repeat(2, 1, 1, 1)
    sigma = schedule.sigmas[t].float().view(-1, 1, 1, 1)
    x_t = (1 - sigma) * x0 + sigma * eps
    with torch.no_grad():
        v = models.unet(x_t, timestep=sigma.flatten() * 1000, **cond.unet_kwargs()).sample
    err = ((v - (eps - x0)) ** 2).mean(dim=(1, 2, 3))
    assert torch.allclose(torch.cat([m["err_w"], m["err_l"]]), err, rtol=1e-5)


@pytest.mark.parametrize("space", ["perceptual", "latent"])
def test_gradients_reach_only_lora(tiny_sd3, space):
    models, encoder, params, schedule, x0, cond, rnd = setup(tiny_sd3)
    names = {p: n for n, p in models.unet.named_parameters()}
    assert {n.split(".lora")[0].split(".")[-1] for n in names.values() if "lora" in n} == {
        "to_q", "to_k", "to_v", "0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"}  # both streams
    # the last block's context queries feed nothing (context_pre_only): no LoRA there, it could never learn
    assert not any(n.startswith("transformer_blocks.3.attn.add_q_proj") and "lora" in n for n in names.values())
    cfg = ObjectiveConfig(loss="dpo", space=space, beta=2500.0)
    opt = torch.optim.AdamW(params, lr=1e-3)

    def backward():
        opt.zero_grad(set_to_none=True)
        loss, _ = compute_objective(models.unet, encoder, schedule, x0, cond, rnd, cfg)
        loss.backward()

    backward()
    assert all(p.grad is None for p in encoder.parameters())
    assert all(p.grad is None for p in models.unet.parameters() if not p.requires_grad)
    for p in params:  # B = 0 at initialisation: only the B matrices get a gradient
        assert (p.grad.abs().sum() > 0) == ("lora_B" in names[p]), names[p]
    opt.step()
    backward()
    assert all(p.grad.abs().sum() > 0 for p in params)


def float64_predictions(path, step="ode"):
    """A tiny SD3 whose LoRA is moved off zero, in float64, with its float64 base transformer (for f), and the
    pair's x_t, velocity target and the policy's / reference's velocities (no gradient)."""
    models, _, params, schedule, x0, cond, rnd = setup(path, step=step)
    with torch.no_grad():
        for i, p in enumerate(params):
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(i)))
    models.unet.double()
    base = load_models(str(path), weight_dtype=torch.float64).unet
    x0, cond = x0.double(), cond.to(dtype=torch.float64)
    t, eps, z, tt = (x.repeat(2, *([1] * (x.dim() - 1))) for x in (rnd.t, rnd.eps, rnd.z, rnd.t_target))
    eps, z = eps.double(), z.double()
    with torch.no_grad():
        x_t = schedule.q_sample(x0, t, eps)
        v = schedule.velocity(x0, eps)
        v_pol = models.unet(x_t, timestep=schedule.model_timestep(t), **cond.unet_kwargs()).sample
        with adapters_disabled(models.unet):
            v_ref = models.unet(x_t, timestep=schedule.model_timestep(t), **cond.unet_kwargs()).sample
    return base, schedule, x0, cond, (x_t, t, v, z, tt), (v_pol, v_ref)


@pytest.mark.parametrize("step", ["ode", "sde"])
def test_linearized_is_the_first_order_difference_in_float64(tiny_sd3, step):
    """J_f(x_true) delta with delta = coef (v_hat - v) matches f(x_pol) - f(x_true) to first order (float64)."""
    base, schedule, x0, cond, (x_t, t, v, z, tt), (v_pol, v_ref) = float64_predictions(tiny_sd3, step)
    cfg = ObjectiveConfig(loss="dpo")
    errs = {e: perceptual_errors(DiTPerceptualEncoder(base, blocks=2, error=e), schedule, cfg, x_t, t, v, z, tt, cond,
                                 x0, [v + 0.1 * (v_pol - v), v + 0.1 * (v_ref - v)]) for e in ("difference", "linearized")}
    for d, l in zip(errs["difference"], errs["linearized"]):
        assert ((l - d).abs() / d).max() < 1e-2
    assert not torch.equal(errs["difference"][0], errs["difference"][1])


def test_uniform_target_is_refused_for_flow(tiny_sd3):
    models, encoder, _, schedule, x0, cond, rnd = setup(tiny_sd3)
    with pytest.raises(NcpError, match="target=uniform"):
        compute_objective(models.unet, encoder, schedule, x0, cond, rnd, ObjectiveConfig(target="uniform"))


# ---------------------------------------------------------------- the scripts, resume, LoRA in the pipeline, tools
def script_args(model, out, loss, *extra):
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    return ["--config", str(root / f"configs/tiny_sd3_ncp_{loss}.yaml"), f"model.pretrained={model}",
            f"train.output_dir={out}", "train.batch_size=2", "data.toy_num_pairs=16", "train.validation_steps=2",
            "lora.rank=4", "train.report_to=none", *extra]


@pytest.mark.parametrize("loss", ["dpo", "cpo", "sft"])
def test_scripts_train_sd3_lora_only(tiny_sd3, tmp_path, run_script, loss):
    from accelerate.utils import set_seed

    from ncp.config import load_config
    from ncp.metrics import read_metrics

    out = tmp_path / "run"
    run = run_script(loss, script_args(tiny_sd3, out, loss, "train.max_steps=3", "optim.optimizer=adamw",
                                       "optim.lr=1e-3"))
    rows = read_metrics(out)
    assert [r["step"] for r in rows] == [1, 2, 3] and all(math.isfinite(r["loss"]) for r in rows)
    if loss == "dpo":
        assert rows[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert run.parts.arch == "sd3" and type(run.parts.encoder).__name__ == "DiTPerceptualEncoder"
    fresh = load_models(str(tiny_sd3))
    set_seed(0)
    add_lora(fresh.unet, rank=4)
    before, after = dict(fresh.unet.named_parameters()), dict(run.parts.models.unet.named_parameters())
    lora = [n for n in after if "lora" in n]
    assert lora and all(not torch.equal(before[n], after[n]) for n in lora)
    assert all(torch.equal(before[n], p) for n, p in after.items() if "lora" not in n)
    assert load_config(str(out / "config.yaml")).model.arch == "sd3"
    assert list((out / "validation").glob("step-*.png"))


def test_sd3_resume_gives_the_same_losses_and_lora(tiny_sd3, tmp_path, run_script):
    """A run stopped after step 2 (checkpoint) and resumed to step 4 equals a straight 4-step run, with the
    logit-normal timestep density and the stochastic reverse step (every random draw is restored)."""
    from safetensors.torch import load_file

    from ncp.metrics import read_metrics

    common = ["train.checkpoint_every=2", "objective.timesteps=logit_normal", "objective.flow_step=sde",
              "optim.lr=1e-3"]
    run_script("dpo", script_args(tiny_sd3, tmp_path / "straight", "dpo", "train.max_steps=4", *common))
    run_script("dpo", script_args(tiny_sd3, tmp_path / "resumed", "dpo", "train.max_steps=2", *common))
    run_script("dpo", script_args(tiny_sd3, tmp_path / "resumed", "dpo", "train.max_steps=4", *common,
                                  "train.resume_from=latest"))
    a, b = read_metrics(tmp_path / "straight"), read_metrics(tmp_path / "resumed")
    assert [r["step"] for r in b] == [1, 2, 3, 4]
    assert [r["loss"] for r in a] == [r["loss"] for r in b] and len({r["loss"] for r in a}) > 1
    la, lb = (load_file(str(tmp_path / d / "pytorch_lora_weights.safetensors")) for d in ("straight", "resumed"))
    assert la.keys() == lb.keys() and all(torch.equal(la[k], lb[k]) for k in la)


def test_sd3_lora_loads_into_the_pipeline_changes_images_and_unloads(tiny_sd3, tmp_path, run_script):
    """The saved LoRA loads with StableDiffusion3Pipeline.load_lora_weights, reproduces the trained transformer,
    changes the images, and unload_lora_weights restores the base; ncp.generate renders base and LoRA."""
    import json

    from diffusers import StableDiffusion3Pipeline

    from ncp.generate import generate

    out = tmp_path / "run"
    run = run_script("dpo", script_args(tiny_sd3, out, "dpo", "train.max_steps=2", "optim.lr=0.01",
                                        "optim.optimizer=adamw"))
    pipe = StableDiffusion3Pipeline.from_pretrained(tiny_sd3)

    def image():
        return pipe("a red circle", num_inference_steps=2, height=32, width=32,
                    generator=torch.Generator().manual_seed(0), output_type="np").images

    base = image()
    pipe.load_lora_weights(out)
    x, ts = torch.randn(2, *LATENT), torch.tensor([700.0, 30.0])
    cond = build_cond(run.parts.models, PROMPTS, target_size=(32, 32)).index(slice(0, 2))
    with torch.no_grad():
        trained = run.parts.models.unet(x, timestep=ts, **cond.unet_kwargs()).sample
        loaded = pipe.transformer(x, timestep=ts, **cond.unet_kwargs()).sample
    assert torch.allclose(trained, loaded, atol=1e-5)
    tuned = image()
    pipe.unload_lora_weights()
    assert not (base == tuned).all()
    assert (image() == base).all()
    rows = generate(str(tiny_sd3), [str(out)], ["a red circle", "a blue square"], tmp_path / "gen", seeds=[0],
                    steps=2, resolution=32, guidance=4.5, device="cpu")
    assert {r["model"] for r in rows} == {"base", "run"} and len(rows) == 4
    assert all((tmp_path / "gen" / r["path"]).is_file() for r in rows)
    assert len((tmp_path / "gen" / "index.jsonl").read_text().splitlines()) == 4
    assert json.loads((tmp_path / "gen" / "index.jsonl").read_text().splitlines()[-1])["lora"] == str(out)
    # reward curves score an SD3 pipeline (its denoiser is pipe.transformer); the model card names SD3's pipeline
    from ncp.curves import score_lora
    from ncp.evaluate import make_scorer
    from ncp.hub import build_model_card

    reward = score_lora(pipe, ["a red circle on a white background"], [0], make_scorer("toy"), steps=2, guidance=1.0, resolution=32)
    assert 0.0 <= reward <= 1.0 and not pipe.transformer.training
    card = str(build_model_card(out))
    assert "StableDiffusion3Pipeline" in card and "stable-diffusion-3" in card and "transformer encoder" in card


def test_sd3_latent_cache_matches_pixels(tiny_sd3, tmp_path, run_script):
    """The cache stores SD3 latents ((mean - shift) * scale) and pooled projections as encode() computes them."""
    from ncp.data.cache import main as build_cache
    from ncp.metrics import read_metrics

    cache = tmp_path / "cache"
    build_cache(["--model", str(tiny_sd3), "--out", str(cache), "--toy-num-pairs", "16"])
    common = ["train.max_steps=1", "optim.optimizer=adamw"]
    run_script("dpo", script_args(tiny_sd3, tmp_path / "pixels", "dpo", *common))
    run_script("dpo", script_args(tiny_sd3, tmp_path / "cached", "dpo", *common, f"data.cache_dir={cache}"))
    a, b = read_metrics(tmp_path / "pixels"), read_metrics(tmp_path / "cached")
    assert a[0]["err_w"] == pytest.approx(b[0]["err_w"], rel=1e-4)


def test_toy_alignment_sd3_smoke(tmp_path, load_script):
    """The SD3 variant of the toy benchmark runs end to end: its own base (the tiny SD3 pipeline with a trained
    VAE shift and scale), flow-form objectives, and a K row at NCP-DPO's setting with its own beta scale."""
    from pathlib import Path

    toy = load_script("benchmarks/toy_alignment.py")
    out = tmp_path / "toy"
    result = toy.main(["--smoke", "--arch", "sd3", "--workers", "1", "--out", str(out),
                       "--methods", "NCP-DPO", "latent DPO", "NCP-DPO K=2"])
    assert (out / "base" / "transformer").is_dir() and not (out / "base" / "unet").exists()
    vae = load_models(str(out / "base")).vae.config
    assert vae.shift_factor != 0.0609 and vae.scaling_factor != 1.5305  # fitted to the toy latents
    chosen = result["chosen"]
    assert chosen["NCP-DPO K=2"]["lr"] == chosen["NCP-DPO"]["lr"]
    assert chosen["NCP-DPO K=2"]["beta_mult"] == chosen["NCP-DPO"]["beta_mult"]
    assert set(result["setup"]["beta_scale"]) == {"perceptual", "perceptual K=2", "latent"}
    runs = {r["method"]: r for r in result["runs"]}
    assert runs["NCP-DPO K=2"]["beta"] == pytest.approx(
        result["setup"]["beta_scale"]["perceptual K=2"] * chosen["NCP-DPO"]["beta_mult"])
    from ncp.config import load_config

    cfg = load_config(str(Path(runs["NCP-DPO K=2"]["run_dir"]) / "config.yaml"))
    assert cfg.model.arch == "sd3" and cfg.encoder.blocks == 2
    for m in ("NCP-DPO", "latent DPO", "NCP-DPO K=2"):
        final = result["summary"]["methods"][m]["final"]
        assert final["gain_low"] <= final["gain"] <= final["gain_high"]
    assert [c["loss"] for c in result["summary"]["comparisons"]] == ["DPO"]


def test_encoder_shares_the_transformers_modules_and_stays_the_base(tiny_sd3):
    """f runs the transformer's own first K blocks (no copy: the same storage) with the LoRA off, so it gives the
    copying encoder's features even with a trained LoRA and under gradient checkpointing; gradients flow through
    its activations, never into its weights; a cast of f alone is refused; fp32 in a bf16 run keeps a copy."""
    models = load_models(str(tiny_sd3))
    tr = models.unet
    shared, copied = DiTPerceptualEncoder(tr, blocks=2), DiTPerceptualEncoder(tr, blocks=2, share=False)
    assert not list(shared.parameters())  # holds nothing of its own
    ptrs = lambda enc: [p.data_ptr() for name in ("pos_embed", "time_text_embed", "context_embedder",  # noqa: E731
                                                  "transformer_blocks") for p in getattr(enc, name).parameters()]
    base_ptrs = {p.data_ptr() for p in tr.parameters()}
    assert ptrs(shared) and set(ptrs(shared)) <= base_ptrs and not set(ptrs(copied)) & base_ptrs
    cond = build_cond(models, PROMPTS, target_size=(32, 32)).index(slice(0, 2))
    x, ts = torch.randn(2, *LATENT), torch.tensor([900.0, 40.0])
    before = shared(x, ts, cond)
    assert torch.equal(before, copied(x, ts, cond))
    params = add_lora(tr, rank=4)
    with torch.no_grad():
        for p in params:
            p.normal_()  # a trained LoRA (B != 0): the policy moves, f does not
    tr.enable_gradient_checkpointing()
    tr.train()
    x_grad = x.clone().requires_grad_(True)
    after = shared(x_grad, ts, cond)
    assert torch.equal(after, before)
    after.square().sum().backward()
    assert x_grad.grad.abs().sum() > 0 and all(p.grad is None for p in tr.parameters())
    assert tr.gradient_checkpointing  # switched back on after f
    with pytest.raises(NcpError, match="runs the transformer's own weights"):
        shared.to(torch.bfloat16)
    half = load_models(str(tiny_sd3), weight_dtype=torch.bfloat16).unet
    copy32 = DiTPerceptualEncoder(half, blocks=2, error="fp32")
    assert copy32.dtype == torch.float32 and copy32.transformer_blocks[0] is not half.transformer_blocks[0]


def test_bf16_linearized_error_stays_close_where_the_difference_drowns(tiny_sd3):
    """As for the U-Net (docs/precision.md): with f in bf16, the linearized error stays within a few %
    of float64 while the difference of two rounded features is off by more than half its size; that is why
    configs/sd3_ncp_dpo.yaml (bf16) takes encoder.error=auto = linearized."""
    base, schedule, x0, cond, (x_t, t, v, z, tt), (v_pol, v_ref) = float64_predictions(tiny_sd3)
    cfg = ObjectiveConfig(loss="dpo")
    with torch.no_grad():
        hats = [v + 0.3 * (v_pol - v), v + 0.3 * (v_ref - v)]  # a policy 30% of a random model's error off
        exact = torch.stack(perceptual_errors(DiTPerceptualEncoder(base, blocks=2), schedule, cfg, x_t, t, v, z, tt,
                                              cond, x0, hats))
        rel = {}
        for error in ("difference", "linearized"):
            encoder = DiTPerceptualEncoder(base, blocks=2, error=error, share=False).to(torch.bfloat16)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                half = torch.stack(perceptual_errors(encoder, schedule, cfg, x_t.float(), t, v.float(), z.float(), tt,
                                                     cond.to(dtype=torch.bfloat16), x0.float(), [h.float() for h in hats]))
            rel[error] = (half.double() - exact).abs() / exact
    assert rel["linearized"].max() < 5e-2, rel
    assert rel["difference"].median() > 0.5, rel


@pytest.mark.parametrize("precision", ["no", "bf16"])
@pytest.mark.parametrize("error", ["difference", "linearized"])
def test_policy_equal_to_reference_is_log2_at_batch_sizes_1_2_3(tiny_sd3, error, precision):
    """The policy's and the reference's errors come from calls of the same shape (linearized: one jvp with both
    tangents): bitwise equal at any batch size."""
    dtype = {"no": torch.float32, "bf16": torch.bfloat16}[precision]
    models, encoder, _, schedule, _, _, _ = setup(tiny_sd3, error=error, dtype=dtype)
    cfg = ObjectiveConfig(loss="dpo", beta=2500.0)
    for pairs in (1, 2, 3):
        cond = build_cond(models, PROMPTS[:1] * pairs, target_size=(32, 32)).to(dtype=dtype)
        x0 = torch.randn(2 * pairs, *LATENT, generator=torch.Generator().manual_seed(pairs))
        rnd = randomness_for(cfg, schedule, pairs, LATENT, torch.Generator().manual_seed(pairs))
        with torch.autocast("cpu", dtype=dtype, enabled=precision != "no"):
            loss, metrics = compute_objective(models.unet, encoder, schedule, x0, cond, rnd, cfg)
        assert abs(loss.item() - math.log(2)) < 1e-6, pairs
        assert torch.equal(metrics["implicit_acc"], torch.full((pairs,), 0.5)), pairs
        assert torch.equal(metrics["err_w"], metrics["ref_err_w"]) and (metrics["err_w"] > 0).all()


def test_linearize_paths_give_the_math_kernels_errors_and_gradient(tiny_sd3, monkeypatch):
    """SD3's joint attention: f's jvp with one primal for both tangents (vmap) and with blockwise attention over
    uneven query blocks gives the errors and the LoRA gradient of PyTorch's math-kernel jvp (float64)."""
    from ncp import attention

    monkeypatch.setattr(attention, "BLOCK_ELEMENTS", 30000)
    models, _, params, schedule, x0, cond, rnd = setup(tiny_sd3)
    with torch.no_grad():
        for i, p in enumerate(params):
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(i)))
    models.unet.double()
    base = load_models(str(tiny_sd3), weight_dtype=torch.float64).unet
    encoder = DiTPerceptualEncoder(base, blocks=2, error="linearized")
    x0, cond, cfg = x0.double(), cond.to(dtype=torch.float64), ObjectiveConfig(loss="dpo")
    t, eps, z, tt = (x.repeat(2, *([1] * (x.dim() - 1))) for x in (rnd.t, rnd.eps, rnd.z, rnd.t_target))
    eps, z = eps.double(), z.double()
    x_t = schedule.q_sample(x0, t, eps)
    v = schedule.velocity(x0, eps)
    results = {}
    for path in LINEARIZE:
        encoder.linearize = path
        v_pol = models.unet(x_t, timestep=schedule.model_timestep(t), **cond.unet_kwargs()).sample
        with torch.no_grad(), adapters_disabled(models.unet):
            v_ref = models.unet(x_t, timestep=schedule.model_timestep(t), **cond.unet_kwargs()).sample
        errs = perceptual_errors(encoder, schedule, cfg, x_t, t, v, z, tt, cond, x0, [v_pol, v_ref])
        grad = torch.autograd.grad(errs[0].sum(), params)
        results[path] = torch.stack(errs).detach(), torch.cat([g.flatten() for g in grad])
    err_m, grad_m = results["math"]
    assert grad_m.norm() > 0 and not torch.equal(err_m[0], err_m[1])
    for path in LINEARIZE[:-1]:
        err, grad = results[path]
        assert torch.allclose(err, err_m, rtol=1e-10, atol=0), path
        assert torch.allclose(grad, grad_m, rtol=1e-9, atol=1e-12 * grad_m.abs().max()), path
