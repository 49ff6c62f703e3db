"""FLUX.1 dev and schnell on tiny offline FLUX pipelines: conditioning, packing and ids as FluxPipeline builds them,
guidance, the flow step with the resolution shift, the encoder f, objectives in every error mode, LoRA in the
pipeline."""

import math

import pytest
import torch

from ncp.conditioning import build_cond, encode_prompts
from ncp.config import EncoderConfig
from ncp.encoder import ERRORS
from ncp.errors import NcpError
from ncp.families import flux
from ncp.flow import SHIFTS
from ncp.models import adapters_disabled, add_lora, load_models
from ncp.objective import ObjectiveConfig, compute_objective, perceptual_errors, randomness_for

PROMPTS = ["a red circle on a white background", "a blue square"]
LATENT = (16, 16, 16)  # 16 channels at 128 px (FLUX's 8x VAE); packed: 64 tokens of 64
RES = 128

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny models run fastest single-threaded (conftest)


@pytest.fixture(scope="module")
def tiny_flux(tmp_path_factory):
    from ncp.tiny import build_tiny_pipeline

    root = tmp_path_factory.mktemp("tiny")
    return {v: build_tiny_pipeline(root / f"flux-{v}", "flux", variant=v) for v in flux.VARIANTS}


def setup(path, rank=4, error="difference", blocks=2, dtype=torch.float32, step="ode", shift="none"):
    models = load_models(str(path), weight_dtype=dtype)
    encoder = models.family.encoder(models.denoiser, EncoderConfig(blocks=blocks, error=error))
    params = add_lora(models.unet, rank=rank)
    models.unet.train()
    schedule = models.family.noise_process(models.scheduler, ObjectiveConfig(flow_step=step, flow_shift=shift), RES)
    cond = build_cond(models, PROMPTS)
    x0 = torch.randn(4, *LATENT, generator=torch.Generator().manual_seed(0))
    rnd = randomness_for(ObjectiveConfig(), schedule, 2, LATENT, torch.Generator().manual_seed(1))
    return models, encoder, params, schedule, x0, cond, rnd


@pytest.mark.parametrize("variant", flux.VARIANTS)
def test_conditioning_packing_and_ids_match_the_pipeline(tiny_flux, variant):
    """encode_prompts = FluxPipeline.encode_prompt bit for bit (T5 512 tokens for dev, 256 for schnell), the packing
    and position ids are the pipeline's, and `denoise` on unpacked latents is the pipeline's transformer call."""
    from diffusers import FluxPipeline

    pipe = FluxPipeline.from_pretrained(tiny_flux[variant])
    models = load_models(str(tiny_flux[variant]))
    assert models.arch == "flux" and flux.variant(models.unet) == variant
    length = flux.T5_TOKENS[variant]
    with torch.no_grad():
        ref, pooled, txt_ids = pipe.encode_prompt(PROMPTS, None, device="cpu", max_sequence_length=length)
    ours = encode_prompts(models, PROMPTS)
    assert ours.encoder_hidden_states.shape == ref.shape == (2, length, 96)
    assert torch.equal(ours.encoder_hidden_states, ref) and torch.equal(ours.pooled_projections, pooled)
    assert torch.equal(flux.text_ids(length), txt_ids)
    with pytest.raises(NcpError, match="max_sequence_length"):
        flux.apply_settings(models.unet, max_length=513)

    x = torch.randn(2, 16, 16, 12)  # not square: rows and columns are not swapped
    packed = flux.pack_latents(x)
    assert torch.equal(packed, FluxPipeline._pack_latents(x, 2, 16, 16, 12))
    assert torch.equal(flux.unpack_latents(packed, 16, 12), x)
    assert torch.equal(flux.unpack_latents(packed, 16, 12), FluxPipeline._unpack_latents(packed, 32, 24, 2))
    assert torch.equal(flux.image_ids(16, 12), FluxPipeline._prepare_latent_image_ids(2, 8, 6, "cpu", torch.float32))

    x, ts = torch.randn(2, *LATENT), torch.tensor([900.0, 50.0])  # the flow process's timesteps, sigma * 1000
    g = torch.full([1], 3.5).expand(2) if variant == "dev" else None
    with torch.no_grad():
        ours_v = flux.denoise(models.unet, x, ts, ours)
        ref_v = pipe.transformer(hidden_states=pipe._pack_latents(x, 2, 16, 16, 16), timestep=ts / 1000, guidance=g,
                                 pooled_projections=pooled, encoder_hidden_states=ref, txt_ids=txt_ids,
                                 img_ids=pipe._prepare_latent_image_ids(2, 8, 8, "cpu", ref.dtype), return_dict=False)[0]
    assert torch.equal(ours_v, pipe._unpack_latents(ref_v, 16 * pipe.vae_scale_factor, 16 * pipe.vae_scale_factor,
                                                    pipe.vae_scale_factor))
    flux.apply_settings(models.unet, max_length=77)  # model.max_sequence_length
    assert encode_prompts(models, PROMPTS).encoder_hidden_states.shape[1] == 77


def test_guidance_is_dev_only(tiny_flux):
    """dev takes guidance 3.5 by default and the value changes the velocity and f; schnell refuses one."""
    dev, schnell = load_models(str(tiny_flux["dev"])), load_models(str(tiny_flux["schnell"]))
    assert flux.settings(dev.unet) == flux.Settings(3.5, 512)
    assert flux.settings(schnell.unet) == flux.Settings(None, 256)
    with pytest.raises(NcpError, match="schnell has no guidance"):
        flux.apply_settings(schnell.unet, guidance_scale=3.5)
    cond, x, ts = encode_prompts(dev, PROMPTS[:1]), torch.randn(1, *LATENT), torch.tensor([500.0])
    with torch.no_grad():
        v, f = flux.denoise(dev.unet, x, ts, cond), flux.FluxPerceptualEncoder(dev.unet, 2)(x, ts, cond)
        flux.apply_settings(dev.unet, guidance_scale=1.0)
        assert not torch.equal(flux.denoise(dev.unet, x, ts, cond), v)
        assert not torch.equal(flux.FluxPerceptualEncoder(dev.unet, 2)(x, ts, cond), f)


def test_sampling_encodes_prompts_at_the_trained_t5_length(tiny_flux):
    """Images are sampled with the T5 length the transformer trains at (FluxPipeline's call would take 512 tokens
    for every variant): schnell's 256, dev's 512, a run's model.max_sequence_length where it set one."""
    from ncp.generate import load_pipeline, render

    seen = []
    for variant, length in (("schnell", 256), ("dev", 512)):
        pipe = load_pipeline(str(tiny_flux[variant]))
        encode = pipe.encode_prompt
        pipe.encode_prompt = lambda *a, **k: seen.append(k["max_sequence_length"]) or encode(*a, **k)
        render(pipe, PROMPTS[:1], [0], steps=1, guidance=3.5, resolution=32)
        assert seen[-1] == length
    flux.apply_settings(pipe.transformer, max_length=64)  # as a run's configure leaves its transformer
    render(pipe, PROMPTS[:1], [0], steps=1, guidance=3.5, resolution=32)
    assert seen == [256, 512, 64]


def test_vae_latents_are_shifted_and_scaled(tiny_flux):
    """FLUX's VAE: latents = (mean - shift_factor) * scaling_factor, as FluxPipeline decodes latents / scale + shift."""
    from ncp.models import to_latents

    vae = load_models(str(tiny_flux["dev"])).vae
    mean = torch.randn(1, *LATENT)
    assert torch.equal(to_latents(vae, mean), (mean - 0.1159) * 0.3611)


@pytest.mark.parametrize("shift", SHIFTS)
def test_flow_step_matches_the_scheduler_per_sample(tiny_flux, shift):
    """none: the scheduler's unshifted training sigmas (diffusers' FLUX training scripts) and the transformer's
    timestep = timestep / 1000 = sigma; resolution: the pipeline's mu for 16x16 latents (64 tokens) on top. The
    reverse step to the next sigma equals FlowMatchEulerDiscreteScheduler.step with the shift in use."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    path = tiny_flux["dev"]
    scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(path, subfolder="scheduler")
    assert scheduler.config.use_dynamic_shifting
    schedule = flux.schedule(scheduler, shift=shift, resolution=RES)
    n = schedule.num_timesteps
    base = torch.linspace(1, 1 / n, n, dtype=torch.float64)
    mu = flux.mu(scheduler, RES)
    assert mu == pytest.approx(0.5 + (64 - 256) * 0.65 / 3840)  # calculate_shift below its base length
    expected = base if shift == "none" else math.exp(mu) / (math.exp(mu) + (1 / base - 1))
    assert torch.allclose(schedule.sigmas[:-1], expected, atol=1e-6) and schedule.sigmas[-1] == 0
    t = torch.tensor([0, 1, 500, n - 2, n - 1])
    assert torch.allclose(schedule.model_timestep(t), 1000 * schedule.sigmas[t].float())  # denoise passes it / 1000
    g = torch.Generator().manual_seed(0)
    x0, eps, v = (torch.randn(5, *LATENT, generator=g) for _ in range(3))
    x_t = schedule.q_sample(x0, t, eps)
    ours = schedule.step(x_t, t, v)
    for i in range(5):
        sch = FlowMatchEulerDiscreteScheduler.from_pretrained(path, subfolder="scheduler")
        if shift == "none":  # the loaded training sigmas, with the terminal 0 set_timesteps would append
            sch.sigmas = torch.cat([sch.sigmas, torch.zeros(1)])
        else:  # the pipeline's shift of the same sigmas
            sch.set_timesteps(sigmas=sch.sigmas.numpy(), mu=mu)
        ts = sch.timesteps[t[i]]
        assert ts == schedule.model_timestep(t[i:i + 1])
        ref = sch.step(v[i:i + 1], ts, x_t[i:i + 1]).prev_sample
        assert torch.equal(ours[i:i + 1], ref), int(t[i])
    schnell = FlowMatchEulerDiscreteScheduler.from_pretrained(tiny_flux["schnell"], subfolder="scheduler")
    assert torch.equal(flux.schedule(schnell).sigmas, flux.schedule(scheduler).sigmas)  # shift 1 = unshifted
    with pytest.raises(NcpError, match="use_dynamic_shifting"):
        flux.schedule(schnell, shift="resolution", resolution=RES)


def test_encoder_is_the_embedders_and_first_k_double_blocks(tiny_flux):
    """f holds x/time/guidance/text embedders, the rope and K double blocks (no single block, no norm_out / proj_out),
    shares the transformer's modules (no parameters of its own), and returns block K's image tokens."""
    models = load_models(str(tiny_flux["dev"]))
    tr = models.unet
    encoder = flux.FluxPerceptualEncoder(tr, blocks=2)
    assert list(encoder.parameters()) == []  # shared: the transformer's own modules, unregistered
    assert encoder.transformer_blocks[0] is tr.transformer_blocks[0] and len(encoder.transformer_blocks) == 2
    assert not hasattr(encoder, "single_transformer_blocks") and not hasattr(encoder, "proj_out")
    copied = flux.FluxPerceptualEncoder(tr, blocks=2, share=False)
    names = {n.split(".")[0] for n, _ in copied.named_parameters()}
    assert names == {"x_embedder", "time_text_embed", "context_embedder", "transformer_blocks"}
    assert not any(n.startswith(("transformer_blocks.2", "transformer_blocks.3")) for n, _ in copied.named_parameters())
    captured = {}
    tr.transformer_blocks[1].register_forward_hook(lambda m, i, o: captured.update(h=o[1]))
    cond = encode_prompts(models, PROMPTS)
    x, sigma = torch.randn(2, *LATENT), torch.tensor([900.0, 40.0])
    with torch.no_grad():
        flux.denoise(tr, x, sigma, cond)
        assert torch.equal(encoder(x, sigma, cond), captured["h"])
        assert torch.equal(copied(x, sigma, cond), captured["h"])
        assert encoder(x, sigma, cond).shape == (2, 64, 32)
        assert flux.FluxPerceptualEncoder(tr, blocks=2, pool=True)(x, sigma, cond).shape == (2, 32)
    assert flux.default_blocks(tr) == 2  # 16/57 of the tiny model's 8 blocks
    with pytest.raises(NcpError, match="encoder.blocks"):
        flux.FluxPerceptualEncoder(tr, blocks=5)
    add_lora(tr, rank=4)
    with pytest.raises(NcpError, match="before adding LoRA"):
        flux.FluxPerceptualEncoder(tr)


@pytest.mark.parametrize("variant", flux.VARIANTS)
@pytest.mark.parametrize("precision", ["no", "bf16"])
@pytest.mark.parametrize("error", ERRORS)
def test_dpo_is_log2_at_initialisation(tiny_flux, variant, error, precision):
    """At initialisation (LoRA B = 0) policy = reference: loss log 2 in both spaces, in every error mode."""
    dtype = {"no": torch.float32, "bf16": torch.bfloat16}[precision]
    models, encoder, _, schedule, x0, cond, rnd = setup(tiny_flux[variant], error=error, dtype=dtype)
    for space in ("perceptual", "latent"):
        cfg = ObjectiveConfig(loss="dpo", space=space, beta=2500.0)
        with torch.autocast("cpu", dtype=dtype, enabled=precision != "no"):
            loss, metrics = compute_objective(models.unet, encoder, schedule, x0, cond.to(dtype=dtype), rnd, cfg)
        assert abs(loss.item() - math.log(2)) < 1e-6, space
        assert torch.equal(metrics["implicit_acc"], torch.full((2,), 0.5))
        assert torch.equal(metrics["err_w"], metrics["ref_err_w"]) and (metrics["err_w"] > 0).all()


def test_latent_error_is_the_velocity_error_at_sigma(tiny_flux):
    """err = mean((v_pred - (eps - x0))^2) with v_pred = the transformer at timestep sigma, guidance 3.5."""
    models, encoder, _, schedule, x0, cond, rnd = setup(tiny_flux["dev"])
    _, m = compute_objective(models.unet, encoder, schedule, x0, cond, rnd, ObjectiveConfig(loss="cpo", space="latent"))
    t, eps = rnd.t.repeat(2), rnd.eps.repeat(2, 1, 1, 1)
    sigma = schedule.sigmas[t].float().view(-1, 1, 1, 1)
    x_t = (1 - sigma) * x0 + sigma * eps
    with torch.no_grad():
        v = models.unet(hidden_states=flux.pack_latents(x_t), timestep=schedule.model_timestep(t) / 1000,
                        guidance=torch.full((4,), 3.5), pooled_projections=cond.pooled_projections,
                        encoder_hidden_states=cond.encoder_hidden_states, txt_ids=torch.zeros(512, 3),
                        img_ids=flux.image_ids(16, 16)).sample
    v = flux.unpack_latents(v, 16, 16)
    assert torch.allclose(torch.cat([m["err_w"], m["err_l"]]), ((v - (eps - x0)) ** 2).mean(dim=(1, 2, 3)), rtol=1e-5)


@pytest.mark.parametrize("loss,space", [("dpo", "perceptual"), ("sft", "latent")])  # every loss: the script tests
def test_gradients_reach_only_lora(tiny_flux, loss, space):
    """LoRA sits on both attention streams and both feed-forwards (and the single blocks' q, k, v); only it gets
    gradients, f's (shared) weights none."""
    models, encoder, params, schedule, x0, cond, rnd = setup(tiny_flux["dev"])
    names = {p: n for n, p in models.unet.named_parameters()}
    lora = {n.split(".lora")[0] for n in names.values() if "lora" in n}
    assert {n.split("transformer_blocks.0.")[1] for n in lora if n.startswith("transformer_blocks.0.")} == {
        t for t in flux.TARGETS}
    assert {n.split("single_transformer_blocks.0.")[1] for n in lora if n.startswith("single_transformer_blocks.0.")} \
        == {"attn.to_q", "attn.to_k", "attn.to_v"}
    opt = torch.optim.AdamW(params, lr=1e-3)

    def backward():
        opt.zero_grad(set_to_none=True)
        value, _ = compute_objective(models.unet, encoder, schedule, x0, cond, rnd, ObjectiveConfig(loss=loss, space=space))
        value.backward()

    backward()
    assert all(p.grad is None for p in models.unet.parameters() if not p.requires_grad)
    for p in params:  # B = 0 at initialisation: only the B matrices get a gradient
        assert (p.grad.abs().sum() > 0) == ("lora_B" in names[p]), names[p]
    opt.step()
    backward()
    assert all(p.grad.abs().sum() > 0 for p in params)
    assert all(p.grad is None for p in models.unet.parameters() if not p.requires_grad)


def test_linearized_is_the_first_order_difference_in_float64(tiny_flux):
    """J_f(x_true) delta with delta = step_coef (v_hat - v) formed in float64 matches f(x_pol) - f(x_true) to
    first order, for the resolution-shifted schedule and the SDE step (the ODE step's delta has the same form)."""
    models, _, params, schedule, x0, cond, rnd = setup(tiny_flux["dev"], step="sde", shift="resolution")
    with torch.no_grad():
        for i, p in enumerate(params):
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(i)))
    models.unet.double()
    x0, cond = x0.double(), cond.to(dtype=torch.float64)
    t, eps, z, tt = (x.repeat(2, *([1] * (x.dim() - 1))) for x in (rnd.t, rnd.eps, rnd.z, rnd.t_target))
    eps, z = eps.double(), z.double()
    with torch.no_grad():
        x_t, v = schedule.q_sample(x0, t, eps), schedule.velocity(x0, eps)
        v_pol = flux.denoise(models.unet, x_t, schedule.model_timestep(t), cond)
        with adapters_disabled(models.unet):
            v_ref = flux.denoise(models.unet, x_t, schedule.model_timestep(t), cond)
        hats = [v + 0.1 * (v_pol - v), v + 0.1 * (v_ref - v)]
        base = load_models(str(tiny_flux["dev"]), weight_dtype=torch.float64).unet  # f: the LoRA-free base in float64
        errs = {e: perceptual_errors(flux.FluxPerceptualEncoder(base, blocks=2, error=e), schedule, ObjectiveConfig(),
                                     x_t, t, v, z, tt, cond, x0, hats) for e in ("difference", "linearized")}
    for d, lin in zip(errs["difference"], errs["linearized"]):
        assert ((lin - d).abs() / d).max() < 1e-2
    assert not torch.equal(errs["difference"][0], errs["difference"][1])


def test_settings_of_another_family_are_refused(tiny_flux, tiny_sd15, tmp_path):
    """model.guidance on schnell, a FLUX-only key on SD1.5, a T5 length a latent cache does not hold: one clear
    error each, not a silently ignored setting."""
    from ncp.config import Config

    cfg = Config()
    cfg.model.guidance = 2.0
    with pytest.raises(NcpError, match="model.guidance=2.0 applies to flux models only; this is sd15"):
        (sd15 := load_models(str(tiny_sd15))).family.configure(sd15, cfg)
    schnell = load_models(str(tiny_flux["schnell"]))
    with pytest.raises(NcpError, match="schnell has no guidance embedding"):
        schnell.family.configure(schnell, cfg)
    cfg.model.guidance, cfg.model.max_sequence_length = None, 128
    schnell.family.configure(schnell, cfg)
    assert flux.settings(schnell.denoiser) == flux.Settings(None, 128)
    from safetensors.torch import save_file

    save_file({"prompt_embeds": torch.zeros(1, 256, 96)}, str(tmp_path / "prompts-00000.safetensors"))
    cfg.data.cache_dir = str(tmp_path)  # a cache built at schnell's default 256 tokens
    with pytest.raises(NcpError, match="holds T5 embeddings of 256 tokens but model.max_sequence_length is 128"):
        schnell.family.configure(schnell, cfg)
    from ncp.data.cache import main as build_cache

    with pytest.raises(SystemExit, match="model.max_sequence_length=64 applies to flux models only; this is sd15"):
        build_cache(["--model", str(tiny_sd15), "--out", str(tmp_path / "sd15-cache"), "--toy-num-pairs", "4",
                     "--max-sequence-length", "64"])


# ---------------------------------------------------------------- the scripts, resume, LoRA in the pipeline, tools
def script_args(model, out, loss, variant="dev", *extra):
    from pathlib import Path

    config = "tiny_flux_schnell_ncp_dpo" if variant == "schnell" else f"tiny_flux_ncp_{loss}"
    return ["--config", str(Path(__file__).resolve().parents[1] / f"configs/{config}.yaml"), f"model.pretrained={model}",
            f"train.output_dir={out}", "train.batch_size=2", "data.toy_num_pairs=16", "train.validation_steps=2",
            "lora.rank=4", "train.report_to=none", *extra]


@pytest.mark.parametrize("variant", flux.VARIANTS)
@pytest.mark.parametrize("loss", ["dpo", "cpo", "sft"])
def test_scripts_train_flux_lora_only(tiny_flux, tmp_path, run_script, loss, variant):
    """Every script trains the LoRA only on dev (guidance 3.5) and schnell (no guidance); DPO starts at log 2."""
    from accelerate.utils import set_seed

    from ncp.config import load_config
    from ncp.metrics import read_metrics

    out = tmp_path / "run"
    run = run_script(loss, script_args(tiny_flux[variant], out, loss, variant, "train.max_steps=2",
                                       "optim.optimizer=adamw", "optim.lr=1e-3"))
    rows = read_metrics(out)
    assert [r["step"] for r in rows] == [1, 2] and all(math.isfinite(r["loss"]) for r in rows)
    if loss == "dpo":
        assert rows[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert run.parts.arch == "flux" and type(run.parts.encoder).__name__ == "FluxPerceptualEncoder"
    assert flux.settings(run.parts.models.denoiser).guidance == (3.5 if variant == "dev" else None)
    fresh = load_models(str(tiny_flux[variant]))
    set_seed(0)
    add_lora(fresh.unet, rank=4)
    before, after = dict(fresh.unet.named_parameters()), dict(run.parts.models.unet.named_parameters())
    lora = [n for n in after if "lora" in n]
    assert lora and all(not torch.equal(before[n], after[n]) for n in lora)
    assert all(torch.equal(before[n], p) for n, p in after.items() if "lora" not in n)
    assert load_config(str(out / "config.yaml")).model.arch == "flux"
    assert list((out / "validation").glob("step-*.png"))


def test_flux_resume_gives_the_same_losses_and_lora(tiny_flux, tmp_path, run_script):
    """A run stopped after step 2 (checkpoint) and resumed to step 4 equals a straight 4-step run, with the
    resolution shift (4 image tokens at 32 px), logit-normal timesteps and the stochastic reverse step (every random
    draw is restored)."""
    from safetensors.torch import load_file

    from ncp.metrics import read_metrics

    common = ["train.checkpoint_every=2", "objective.timesteps=logit_normal", "objective.flow_step=sde",
              "objective.flow_shift=resolution", "optim.lr=1e-3", "train.validate_every=100"]
    path = tiny_flux["dev"]
    run_script("dpo", script_args(path, tmp_path / "straight", "dpo", "dev", "train.max_steps=4", *common))
    run_script("dpo", script_args(path, tmp_path / "resumed", "dpo", "dev", "train.max_steps=2", *common))
    run_script("dpo", script_args(path, tmp_path / "resumed", "dpo", "dev", "train.max_steps=4", *common,
                                  "train.resume_from=latest"))
    a, b = read_metrics(tmp_path / "straight"), read_metrics(tmp_path / "resumed")
    assert [r["step"] for r in b] == [1, 2, 3, 4]
    assert [r["loss"] for r in a] == [r["loss"] for r in b] and len({r["loss"] for r in a}) > 1
    la, lb = (load_file(str(tmp_path / d / "pytorch_lora_weights.safetensors")) for d in ("straight", "resumed"))
    assert la.keys() == lb.keys() and all(torch.equal(la[k], lb[k]) for k in la)


def test_flux_run_in_the_pipeline_generate_curves_card(tiny_flux, tmp_path, run_script):
    """A trained run's LoRA (transformer_lora_layers) loads with FluxPipeline.load_lora_weights, reproduces the trained
    transformer and changes the images; unload_lora_weights restores the base images exactly. ncp.generate renders
    base and LoRA, the reward curves score a FLUX pipeline, the model card names it."""
    from diffusers import FluxPipeline

    from ncp.curves import score_lora
    from ncp.evaluate import make_scorer
    from ncp.generate import generate
    from ncp.hub import build_model_card

    out = tmp_path / "run"
    run = run_script("dpo", script_args(tiny_flux["dev"], out, "dpo", "dev", "train.max_steps=2", "optim.lr=0.01",
                                        "optim.optimizer=adamw"))
    pipe = FluxPipeline.from_pretrained(tiny_flux["dev"])

    def image():
        return pipe("a red circle", num_inference_steps=2, height=32, width=32,
                    generator=torch.Generator().manual_seed(0), output_type="np").images

    base = image()
    pipe.load_lora_weights(out)
    x, ts = torch.randn(2, *LATENT), torch.tensor([700.0, 30.0])
    cond = build_cond(run.parts.models, PROMPTS).index(slice(0, 2))
    with torch.no_grad():
        trained = flux.denoise(run.parts.models.unet, x, ts, cond)
        loaded = flux.denoise(pipe.transformer, x, ts, cond)
    assert torch.allclose(trained, loaded, atol=1e-5)
    tuned = image()
    pipe.unload_lora_weights()
    assert not (base == tuned).all()
    assert (image() == base).all()
    pipe.load_lora_weights(out)
    rows = generate(str(tiny_flux["dev"]), [str(out)], ["a red circle", "a blue square"], tmp_path / "gen", seeds=[0],
                    steps=2, resolution=32, guidance=3.5, device="cpu")
    assert {r["model"] for r in rows} == {"base", "run"} and len(rows) == 4
    assert all((tmp_path / "gen" / r["path"]).is_file() for r in rows)
    reward = score_lora(pipe, ["a red circle on a white background"], [0], make_scorer("toy"), steps=2, guidance=3.5,
                        resolution=32)
    assert 0.0 <= reward <= 1.0 and not pipe.transformer.training
    card = str(build_model_card(out))
    assert "FluxPipeline" in card and "flux" in card and "transformer encoder" in card


def test_flux_latent_cache_matches_pixels(tiny_flux, tmp_path, run_script):
    """The cache stores FLUX latents ((mean - shift) * scale, unpacked) and T5 / pooled CLIP embeddings as encode()
    computes them, at the run's T5 length (the tiny config's 64): a cached run sees the errors a pixel run sees. A
    cache at the variant's default length is refused by that run."""
    from ncp.data.cache import main as build_cache
    from ncp.metrics import read_metrics

    cache = tmp_path / "cache"
    build_cache(["--model", str(tiny_flux["schnell"]), "--out", str(cache), "--toy-num-pairs", "16",
                 "--max-sequence-length", "64"])
    common = ["train.max_steps=1", "optim.optimizer=adamw", "train.validate_every=100"]
    run_script("dpo", script_args(tiny_flux["schnell"], tmp_path / "pixels", "dpo", "schnell", *common))
    run_script("dpo", script_args(tiny_flux["schnell"], tmp_path / "cached", "dpo", "schnell", *common,
                                  f"data.cache_dir={cache}"))
    a, b = read_metrics(tmp_path / "pixels"), read_metrics(tmp_path / "cached")
    assert a[0]["err_w"] == pytest.approx(b[0]["err_w"], rel=1e-4)
    default = tmp_path / "cache-256"
    build_cache(["--model", str(tiny_flux["schnell"]), "--out", str(default), "--toy-num-pairs", "16"])
    with pytest.raises(NcpError, match="holds T5 embeddings of 256 tokens but model.max_sequence_length is 64"):
        run_script("dpo", script_args(tiny_flux["schnell"], tmp_path / "refused", "dpo", "schnell", *common,
                                      f"data.cache_dir={default}"))


def test_toy_alignment_smoke_on_a_flux_base(tmp_path, load_script):
    """benchmarks/toy_alignment.py --arch flux: its own pretrained tiny FLUX.1 dev base, NCP-DPO at the config's K
    (2) and at K = 1, latent DPO; every run trains flux with the K it names."""
    from pathlib import Path

    from ncp.config import load_config

    toy = load_script("benchmarks/toy_alignment.py")
    out = tmp_path / "toy"
    result = toy.main(["--smoke", "--arch", "flux", "--workers", "1", "--out", str(out),
                       "--methods", "NCP-DPO", "latent DPO", "NCP-DPO K=1"])
    assert load_models(str(out / "base")).family.name == "flux"
    runs = {r["method"]: load_config(str(Path(r["run_dir"]) / "config.yaml")) for r in result["runs"]}
    assert {m: (c.model.arch, c.encoder.blocks) for m, c in runs.items() if m != "latent DPO"} == {
        "NCP-DPO": ("flux", 2), "NCP-DPO K=1": ("flux", 1)}
    assert set(result["setup"]["beta_scale"]) == {"perceptual", "perceptual K=1", "latent"}
    # the toy's T5 length (configs/tiny_flux_*.yaml) in pretraining, training and scoring alike
    assert {c.model.max_sequence_length for c in runs.values()} == {64}
    assert result["base"]["model"] == {"guidance": None, "max_sequence_length": 64}
    from ncp.conditioning import encode_prompts
    from ncp.generate import load_pipeline, sampling_kwargs
    from ncp.toy_base import configured

    pipe = load_pipeline(str(out / "base"))
    assert sampling_kwargs(pipe) == {"max_sequence_length": 512}  # the variant's, until configured
    assert sampling_kwargs(configured(pipe, "flux")) == {"max_sequence_length": 64}
    models = configured(load_models(str(out / "base")), "flux")
    assert encode_prompts(models, ["a red circle on a white background"]).encoder_hidden_states.shape[1] == 64
