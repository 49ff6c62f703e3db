"""The NCP objectives on real (tiny) diffusers U-Nets: maths, losses, gradients, determinism."""

import math

import pytest
import torch

from ncp.conditioning import build_cond, encode_prompts
from ncp.diffusion import Schedule
from ncp.encoder import ERRORS, LINEARIZE, PerceptualEncoder
from ncp.errors import NcpError
from ncp.losses import cpo_loss, dpo_loss, sft_loss
from ncp.models import add_lora, adapters_disabled, load_models
from ncp.objective import ObjectiveConfig, compute_objective, perceptual_errors, sample_randomness

PROMPTS = ["a red circle on a white background", "a blue square"]


def setup(path, features="last", rank=4, error="difference"):
    models = load_models(str(path))
    encoder = PerceptualEncoder(models.unet, features=features, error=error)
    params = add_lora(models.unet, rank=rank)
    models.unet.train()
    torch.manual_seed(0)
    x0 = torch.randn(4, 4, 16, 16)
    cond = build_cond(models, PROMPTS, original_size=torch.tensor([[32, 32], [40, 48]] * 2),
                      crop_top_left=torch.tensor([[0, 0], [4, 8]] * 2), target_size=(32, 32))
    rnd = sample_randomness(2, (4, 16, 16), 1000, torch.Generator().manual_seed(1))
    return models, encoder, params, x0, cond, rnd


@pytest.mark.parametrize("precision", ["no", "bf16"])
@pytest.mark.parametrize("error", ERRORS)
@pytest.mark.parametrize("arch", ["sd15", "sdxl"])
def test_policy_equal_to_reference_is_log2_at_any_batch_size(tiny_paths, arch, error, precision):
    """Every encoder call of a step has the same batch size and grad mode, so with policy = reference
    (LoRA B = 0) the policy's and the reference's errors are bitwise equal: exactly log 2 and 1/2.
    bf16 runs the authors' SD1.5 features (down + mid + every state), fp32 the last down block."""
    dtype = {"no": torch.float32, "bf16": torch.bfloat16}[precision]
    models = load_models(str(tiny_paths[arch]), weight_dtype=dtype)
    encoder = PerceptualEncoder(models.unet, features="last" if precision == "no" else "multiscale", error=error)
    add_lora(models.unet, rank=4)
    models.unet.train()
    schedule, cfg = Schedule.from_scheduler(models.scheduler), ObjectiveConfig(loss="dpo", beta=2500.0)
    for pairs in (1, 2, 3):
        cond = build_cond(models, PROMPTS[:1] * pairs, target_size=(32, 32))
        x0 = torch.randn(2 * pairs, 4, 16, 16, generator=torch.Generator().manual_seed(pairs))
        rnd = sample_randomness(pairs, (4, 16, 16), 1000, torch.Generator().manual_seed(pairs))
        with torch.autocast("cpu", dtype=dtype, enabled=precision != "no"):
            loss, metrics = compute_objective(models.unet, encoder, schedule, x0, cond, rnd, cfg)
        assert abs(loss.item() - math.log(2)) < 1e-6, pairs
        assert torch.equal(metrics["implicit_acc"], torch.full((pairs,), 0.5)), pairs
        assert torch.equal(metrics["err_w"], metrics["ref_err_w"]) and (metrics["err_w"] > 0).all()


@pytest.mark.parametrize("arch", ["sd15", "sdxl"])
@pytest.mark.parametrize("space", ["perceptual", "latent"])
def test_dpo_is_log2_at_initialisation(tiny_paths, arch, space):
    models, encoder, _, x0, cond, rnd = setup(tiny_paths[arch])
    # gaussian init makes LoRA-A random but LoRA-B zero: the policy equals the reference exactly
    cfg = ObjectiveConfig(loss="dpo", space=space, beta=2500.0)
    loss, metrics = compute_objective(models.unet, encoder, Schedule.from_scheduler(models.scheduler), x0, cond, rnd, cfg)
    assert abs(loss.item() - math.log(2)) < 1e-6
    assert torch.equal(metrics["implicit_acc"], torch.full((2,), 0.5))
    assert (metrics["err_w"] > 0).all()


def test_losses_against_hand_values():
    err_w, err_l = torch.tensor([0.10, 0.30]), torch.tensor([0.20, 0.30])
    ref_w, ref_l = torch.tensor([0.15, 0.30]), torch.tensor([0.15, 0.20])
    loss, m = dpo_loss(err_w, err_l, ref_w, ref_l, beta=10.0)
    # pair 0: margin = 10 * ((0.15 - 0.15) - (0.10 - 0.20)) = 1 -> -log sigmoid(1) = 0.3132617
    # pair 1: margin = 10 * ((0.30 - 0.20) - (0.30 - 0.30)) = 1 -> same
    assert torch.allclose(loss, torch.tensor([0.3132617, 0.3132617]), atol=1e-6)
    assert torch.allclose(m["reward_w"], torch.tensor([0.5, 0.0]))
    assert torch.allclose(m["reward_l"], torch.tensor([-0.5, -1.0]))
    assert torch.equal(m["implicit_acc"], torch.tensor([1.0, 1.0]))

    loss, m = cpo_loss(err_w, err_l, beta=10.0, cpo_lambda=0.0)
    # pair 0: margin = -10 * (0.1 - 0.2) = 1 -> 0.3132617; pair 1: margin 0 -> log 2, a tie counts 1/2
    assert torch.allclose(loss, torch.tensor([0.3132617, math.log(2)]), atol=1e-6)
    assert torch.equal(m["implicit_acc"], torch.tensor([1.0, 0.5]))
    # lambda = 0 is the authors' form: -logsigmoid(-beta * (err_w - err_l))
    assert torch.allclose(loss, -torch.nn.functional.logsigmoid(-10.0 * (err_w - err_l)))
    loss2, _ = cpo_loss(err_w, err_l, beta=10.0, cpo_lambda=2.0)
    assert torch.allclose(loss2 - loss, 2.0 * err_w)
    loss, _ = sft_loss(err_w)
    assert torch.equal(loss, err_w)


def test_ddpm_step_matches_scheduler_per_sample(tiny_sd15):
    from diffusers import DDPMScheduler

    scheduler = DDPMScheduler.from_pretrained(tiny_sd15, subfolder="scheduler")
    assert scheduler.config.clip_sample is False
    schedule = Schedule.from_scheduler(scheduler)
    g = torch.Generator().manual_seed(0)
    t = torch.tensor([0, 1, 500, 999])
    x_t, eps = (torch.randn(4, 4, 8, 8, generator=g) for _ in range(2))
    # the scheduler draws its variance noise from a generator: use the same draws as z
    z = torch.cat([torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(i)) for i in range(4)])
    ours = schedule.ddpm_step(x_t, t, eps, z)
    for i in range(4):
        gen = torch.Generator().manual_seed(i)
        ref = scheduler.step(eps[i : i + 1], int(t[i]), x_t[i : i + 1], generator=gen).prev_sample
        assert torch.allclose(ours[i : i + 1], ref, atol=1e-5), int(t[i])
    # no noise at t = 0: z does not matter there
    assert torch.equal(schedule.ddpm_step(x_t, t, eps, torch.zeros_like(z))[0], ours[0])
    # the step is affine in the noise: two predictions' points differ by -beta_t / (sqrt(alpha_t) sqrt(1 - abar_t))
    # times the noise difference (what encoder.error=linearized differentiates along)
    other = torch.randn(4, 4, 8, 8, generator=g).double()
    gap = schedule.ddpm_step(x_t.double(), t, other, z.double()) - schedule.ddpm_step(x_t.double(), t, eps.double(), z.double())
    abar, beta = schedule.alphas_cumprod[t], schedule.betas[t]
    coef = -beta / ((1 - beta).sqrt() * (1 - abar).sqrt())
    # the scheduler keeps betas and their cumprod in fp32: 1 - abar_t / abar_{t-1} is beta_t to 3e-5
    assert torch.allclose(schedule.ddpm_step_eps_coef(t), coef, rtol=1e-4)
    exact = schedule.ddpm_step_eps_coef(t).view(-1, 1, 1, 1) * (other - eps.double())
    assert torch.allclose(gap, exact, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("space", ["perceptual", "latent"])
def test_gradients_reach_only_lora(tiny_sd15, space):
    models, encoder, params, x0, cond, rnd = setup(tiny_sd15)
    schedule = Schedule.from_scheduler(models.scheduler)
    cfg = ObjectiveConfig(loss="dpo", space=space, beta=2500.0)
    opt = torch.optim.AdamW(params, lr=1e-3)
    names = {p: n for n, p in models.unet.named_parameters()}

    def backward():
        opt.zero_grad(set_to_none=True)
        loss, _ = compute_objective(models.unet, encoder, schedule, x0, cond, rnd, cfg)
        loss.backward()

    backward()
    assert all(p.grad is None for p in encoder.parameters())
    assert all(p.grad is None for p in models.unet.parameters() if not p.requires_grad)
    # at initialisation B = 0, so only the B (up) matrices get a gradient; in perceptual space it can only
    # have come through f
    for p in params:
        assert (p.grad.abs().sum() > 0) == ("lora_B" in names[p]), names[p]
    opt.step()
    backward()
    assert all(p.grad.abs().sum() > 0 for p in params)


def test_perceptual_error_gradient_flows_through_encoder(tiny_sd15):
    models, encoder, params, x0, cond, rnd = setup(tiny_sd15)
    x = torch.randn(2, 4, 16, 16, requires_grad=True)
    encoder(x, torch.tensor([10, 20]), cond.index(slice(0, 2))).pow(2).mean().backward()
    assert x.grad.abs().sum() > 0


@pytest.mark.parametrize("error", ERRORS)
@pytest.mark.parametrize("loss_name", ["dpo", "cpo", "sft"])
def test_same_randomness_same_loss_and_checkpointing_same_gradients(tiny_sd15, loss_name, error):
    models, encoder, params, x0, cond, rnd = setup(tiny_sd15, error=error)
    with torch.no_grad():
        for p in params:
            p.add_(0.01 * torch.randn_like(p))  # move away from B = 0 so all paths matter
    schedule = Schedule.from_scheduler(models.scheduler)
    cfg = ObjectiveConfig(loss=loss_name, space="perceptual", beta=2500.0, cpo_lambda=0.5)

    def grads():
        for p in params:
            p.grad = None
        loss, _ = compute_objective(models.unet, encoder, schedule, x0, cond, rnd, cfg)
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in params]

    loss1, g1 = grads()
    loss2, g2 = grads()
    assert torch.equal(loss1, loss2)
    models.unet.enable_gradient_checkpointing()
    loss3, g3 = grads()
    assert torch.allclose(loss1, loss3, atol=1e-6)
    for a, b in zip(g1, g3):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("arch", ["sd15", "sdxl"])
def test_encoder_is_the_down_path_of_the_base_unet(tiny_paths, arch):
    models = load_models(str(tiny_paths[arch]))
    encoder = PerceptualEncoder(models.unet)
    assert encoder.down_blocks is models.unet.down_blocks  # the base's own modules: no second copy of the weights
    assert not list(encoder.parameters()) and not hasattr(encoder, "up_blocks") and not hasattr(encoder, "mid_block")
    captured = {}
    models.unet.down_blocks[-1].register_forward_hook(lambda m, i, o: captured.update(h=o[0]))
    cond = build_cond(models, PROMPTS, target_size=(32, 32)).index(slice(0, 2))
    x, t = torch.randn(2, 4, 16, 16), torch.tensor([3, 700])
    models.unet(x, t, **cond.unet_kwargs())
    before = encoder(x, t, cond)
    assert torch.allclose(before, captured["h"], atol=1e-6)
    # options: mid block, multiscale, pooling
    mid = PerceptualEncoder(models.unet, features="multiscale", pool=True)
    assert mid.mid_block is models.unet.mid_block
    assert mid(x, t, cond).dim() == 2
    # f is the base before LoRA: with a trained LoRA (B != 0) in the shared modules, f does not change,
    # not even under gradient checkpointing (a checkpointed block would recompute with the LoRA on)
    with pytest.raises(NcpError, match="before adding LoRA"):
        add_lora(models.unet, rank=4)
        PerceptualEncoder(models.unet)
    with torch.no_grad():
        for n, p in models.unet.named_parameters():
            if "lora_B" in n:
                p.normal_()
    models.unet.enable_gradient_checkpointing()
    models.unet.train()
    x_grad = x.clone().requires_grad_(True)
    after = encoder(x_grad, t, cond)
    assert torch.equal(after, before) and not any(p.grad is not None for p in models.unet.parameters())
    after.square().sum().backward()
    assert x_grad.grad.abs().sum() > 0 and all(p.grad is None for p in models.unet.parameters())
    assert models.unet.down_blocks[0].gradient_checkpointing  # switched back on after f
    # encoder.error=fp32 in a half-precision run keeps its own fp32 copy of the down path
    half = load_models(str(tiny_paths[arch]), weight_dtype=torch.bfloat16)
    copy32 = PerceptualEncoder(half.unet, error="fp32")
    assert copy32.down_blocks is not half.unet.down_blocks and copy32.dtype == torch.float32
    with pytest.raises(NcpError, match="runs the U-Net's own weights"):
        encoder.to(torch.bfloat16)  # a cast of a shared f alone would silently do nothing
    assert not any(n.startswith(("up_blocks", "mid_block", "conv_out")) for n, _ in copy32.named_parameters())


def test_adapters_disabled_is_the_reference_and_restores_on_error(tiny_sd15):
    models, _, params, x0, cond, _ = setup(tiny_sd15)
    with torch.no_grad():
        for p in params:
            p.add_(0.1 * torch.randn_like(p))
    unet, t, kw = models.unet, torch.tensor([5, 5, 5, 5]), cond.unet_kwargs()
    policy = unet(x0, t, **kw).sample
    with pytest.raises(RuntimeError):
        with adapters_disabled(unet):
            reference = unet(x0, t, **kw).sample
            raise RuntimeError("boom")
    assert not torch.allclose(policy, reference)
    assert torch.equal(unet(x0, t, **kw).sample, policy)


@pytest.mark.parametrize("arch", ["sd15", "sdxl"])
def test_conditioning_matches_pipeline(tiny_paths, arch):
    from ncp.models import pipeline_class

    pipe = pipeline_class(arch).from_pretrained(tiny_paths[arch])
    models = load_models(str(tiny_paths[arch]))
    ours = encode_prompts(models, PROMPTS)
    if arch == "sd15":
        ref, _ = pipe.encode_prompt(PROMPTS, "cpu", 1, False)
        assert torch.allclose(ours.encoder_hidden_states, ref)
    else:
        ref, _, pooled, _ = pipe.encode_prompt(PROMPTS, device="cpu", do_classifier_free_guidance=False)
        assert torch.allclose(ours.encoder_hidden_states, ref)
        assert torch.allclose(ours.text_embeds, pooled)
        time_ids = pipe._get_add_time_ids((40, 48), (4, 8), (32, 32), torch.float32, 32)
        cond = build_cond(models, PROMPTS, original_size=torch.tensor([[40, 48]] * 4),
                          crop_top_left=torch.tensor([[4, 8]] * 4), target_size=(32, 32))
        assert torch.equal(cond.time_ids, time_ids.repeat(4, 1))


def test_wrong_arch_is_a_clear_error(tiny_sd15):
    with pytest.raises(NcpError, match="sd15"):
        load_models(str(tiny_sd15), arch="sdxl")


def test_fp32_encoder_removes_half_precision_rounding(tiny_sd15):
    """With bf16 frozen weights, the fp32 encoder's error matches the all-fp32 one; the bf16 copy's does not."""
    models = load_models(str(tiny_sd15))
    schedule = Schedule.from_scheduler(models.scheduler)
    cond = build_cond(models, PROMPTS * 2, target_size=(32, 32)).index(slice(0, 4))
    torch.manual_seed(0)
    x0, eps, z = torch.randn(4, 4, 16, 16), torch.randn(4, 4, 16, 16), torch.randn(4, 4, 16, 16)
    t = torch.tensor([50, 300, 600, 900])
    x_t = schedule.q_sample(x0, t, eps)
    x_pol = schedule.ddpm_step(x_t, t, eps + 0.1 * torch.randn_like(eps), z)  # a policy 10% off
    x_true = schedule.ddpm_step(x_t, t, eps, z)

    def err(encoder, c):
        return ((encoder(x_pol, t - 1, c).float() - encoder(x_true, t - 1, c).float()) ** 2).mean(dim=(1, 2, 3))

    exact = err(PerceptualEncoder(models.unet), cond)
    models.unet.to(torch.bfloat16)
    half_cond = cond.to(dtype=torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fp32 = err(PerceptualEncoder(models.unet, error="fp32"), half_cond)
        half = err(PerceptualEncoder(models.unet), half_cond)
    assert torch.allclose(fp32, exact, rtol=0.05)  # only the bf16 base weights differ
    assert ((half - exact).abs() / exact).min() > 1.0


def test_uniform_target_renoises_at_a_fresh_timestep(tiny_sd15):
    """Lin & Yang's target: the true point is x0 re-noised with the true eps at t_target; the policy's is
    its own predicted x0 re-noised with its predicted eps. Still log 2 at initialisation."""
    from ncp.objective import _x_target

    models, encoder, _, x0, cond, _ = setup(tiny_sd15)
    schedule = Schedule.from_scheduler(models.scheduler)
    rnd = sample_randomness(2, (4, 16, 16), 1000, torch.Generator().manual_seed(3), target="uniform")
    assert not torch.equal(rnd.t_target, (rnd.t - 1).clamp(min=0))
    cfg = ObjectiveConfig(loss="dpo", space="perceptual", target="uniform")
    loss, _ = compute_objective(models.unet, encoder, schedule, x0, cond, rnd, cfg)
    assert abs(loss.item() - math.log(2)) < 1e-6
    t, eps, tt = rnd.t.repeat(2), rnd.eps.repeat(2, 1, 1, 1), rnd.t_target.repeat(2)
    x_t = schedule.q_sample(x0, t, eps)
    truth = _x_target(schedule, cfg, x_t, t, eps, None, tt, x0=x0)
    assert torch.allclose(truth, schedule.q_sample(x0, tt, eps))
    # with the true noise as the "prediction", the predicted x0 is x0 itself
    assert torch.allclose(_x_target(schedule, cfg, x_t, t, eps, None, tt), truth, atol=1e-4)


def float64_policy(path):
    """A tiny model with its LoRA moved off zero (policy != reference), in float64, and the float64 base
    U-Net to copy encoders from."""
    models, _, params, x0, cond, rnd = setup(path)
    with torch.no_grad():
        for i, p in enumerate(params):
            p.add_(0.02 * torch.randn(p.shape, generator=torch.Generator().manual_seed(i)))
    models.unet.double()
    base = load_models(str(path), weight_dtype=torch.float64).unet
    return models, base, x0.double(), cond.to(dtype=torch.float64), rnd


def predictions(models, schedule, x0, cond, rnd, closeness=1.0):
    """(x_t, t, eps, z, t_target) for [winners; losers] and the policy's and the reference's noise
    predictions, each moved to eps + closeness * (prediction - eps): a random tiny U-Net is off by about
    |eps| itself, a trained one by a fraction of it. The policy's keeps its graph to the LoRA."""
    t, eps, z, t_target = (x.repeat(2, *([1] * (x.dim() - 1))) for x in (rnd.t, rnd.eps, rnd.z, rnd.t_target))
    eps, z = eps.to(x0.dtype), z.to(x0.dtype)
    x_t = schedule.q_sample(x0, t, eps)
    eps_pol = models.unet(x_t, t, **cond.unet_kwargs()).sample
    with torch.no_grad(), adapters_disabled(models.unet):
        eps_ref = models.unet(x_t, t, **cond.unet_kwargs()).sample
    return (x_t, t, eps, z, t_target), [eps + closeness * (e - eps) for e in (eps_pol, eps_ref)]


@pytest.mark.parametrize("arch", ["sd15", "sdxl"])
def test_linearized_is_the_first_order_difference_in_float64(tiny_paths, arch):
    """J_f(x_true) delta = f(x_pol) - f(x_true) + O(|delta|^2). In float64, for a U-Net 30% off in eps
    (precision-facts' sigma = 0.3), the per-sample errors, the DPO loss and its LoRA gradient agree to 1%
    with float64 autograd of the exact difference; at 3% off, to 0.1% (the gap is first order)."""
    models, base, x0, cond, rnd = float64_policy(tiny_paths[arch])
    schedule = Schedule.from_scheduler(models.scheduler)
    params = [p for p in models.unet.parameters() if p.requires_grad]
    cfg = ObjectiveConfig(loss="dpo", beta=1e6)

    def run(error, closeness):
        (x_t, t, eps, z, t_target), eps_hats = predictions(models, schedule, x0, cond, rnd, closeness)
        errs = perceptual_errors(PerceptualEncoder(base, error=error), schedule, cfg, x_t, t, eps, z, t_target,
                                 cond, x0, eps_hats)
        loss = dpo_loss(*errs[0].chunk(2), *errs[1].chunk(2), beta=cfg.beta)[0].mean()
        grad = torch.cat([g.flatten() for g in torch.autograd.grad(loss, params)])
        return torch.stack(errs).detach(), loss.detach(), grad

    for closeness, tol in ((0.3, 1e-2), (0.03, 1e-3)):
        (err_d, loss_d, g_d), (err_l, loss_l, g_l) = run("difference", closeness), run("linearized", closeness)
        assert not torch.equal(err_d[0], err_d[1])  # the policy is off the reference
        assert ((err_l - err_d).abs() / err_d).max() < tol, closeness
        assert (loss_l - loss_d).abs() / loss_d < tol
        assert (g_l - g_d).norm() / g_d.norm() < tol, closeness


def test_bf16_linearized_error_stays_close_where_the_difference_drowns(tiny_sd15):
    """Only f's precision varies (the noise predictions are float64 for all): a bf16 copy of f gives
    linearized errors within 2% of float64 (benchmarks/precision.py measures about 0.1-1% on these
    models), while its difference of two rounded features is off by more than half its own size."""
    models, base, x0, cond, rnd = float64_policy(tiny_sd15)
    schedule, cfg = Schedule.from_scheduler(models.scheduler), ObjectiveConfig(loss="dpo")
    with torch.no_grad():
        (x_t, t, eps, z, t_target), (eps_pol, eps_ref) = predictions(models, schedule, x0, cond, rnd)
        args = (schedule, cfg, x_t, t, eps, z, t_target, cond, x0, [eps_pol, eps_ref])
        exact = torch.stack(perceptual_errors(PerceptualEncoder(base), *args))
        half = {}
        for error in ("difference", "linearized"):
            encoder = PerceptualEncoder(base, error=error, share=False).to(torch.bfloat16)  # f alone in bf16
            with torch.autocast("cpu", dtype=torch.bfloat16):
                half[error] = torch.stack(perceptual_errors(encoder, schedule, cfg, x_t.float(), t, eps.float(), z.float(),
                                                            t_target, cond.to(dtype=torch.bfloat16), x0.float(),
                                                            [eps_pol.float(), eps_ref.float()]))
    rel = {e: (h.double() - exact).abs() / exact for e, h in half.items()}
    assert rel["linearized"].max() < 2e-2, rel
    assert rel["difference"].min() > 0.5, rel


@pytest.mark.parametrize("arch", ["sd15", "sdxl"])
def test_linearize_paths_give_the_math_kernels_errors_and_gradient(tiny_paths, arch, monkeypatch):
    """f's jvp with one primal for both tangents (vmap; vjp: the same values, the gradient by f's own backward,
    recomputed) and with blockwise attention, in blocks that split the queries unevenly, gives the errors and the
    LoRA gradient of PyTorch's math-kernel jvp (float64)."""
    from ncp import attention

    monkeypatch.setattr(attention, "BLOCK_ELEMENTS", 30000)  # blocks of a few queries, the last one short
    models, base, x0, cond, rnd = float64_policy(tiny_paths[arch])
    schedule, cfg = Schedule.from_scheduler(models.scheduler), ObjectiveConfig(loss="dpo")
    params = [p for p in models.unet.parameters() if p.requires_grad]
    encoder = PerceptualEncoder(base, error="linearized")
    results = {}
    for path in LINEARIZE:
        encoder.linearize = path
        (x_t, t, eps, z, t_target), eps_hats = predictions(models, schedule, x0, cond, rnd, 0.3)
        errs = perceptual_errors(encoder, schedule, cfg, x_t, t, eps, z, t_target, cond, x0, eps_hats)
        grad = torch.autograd.grad(errs[0].sum(), params)
        results[path] = torch.stack(errs).detach(), torch.cat([g.flatten() for g in grad])
    err_m, grad_m = results["math"]
    assert grad_m.norm() > 0
    for path in LINEARIZE[:-1]:
        err, grad = results[path]
        assert torch.allclose(err, err_m, rtol=1e-10, atol=0), path
        assert torch.allclose(grad, grad_m, rtol=1e-9, atol=1e-12 * grad_m.abs().max()), path


@pytest.mark.parametrize("precision", ["no", "bf16"])
def test_batched_calls_give_the_separate_calls_errors_gradient_and_log2(tiny_sd15, precision):
    """encoder.batch_calls: f on the true, the policy's and the reference's points in one call of 3x the batch
    gives the errors and LoRA gradient of three calls, and log 2 / accuracy 1/2 at 1, 2, 3 pairs with
    policy = reference (both in the same call)."""
    dtype = {"no": torch.float32, "bf16": torch.bfloat16}[precision]
    models = load_models(str(tiny_sd15), weight_dtype=dtype)
    encoder = PerceptualEncoder(models.unet, features="multiscale")
    params = add_lora(models.unet, rank=4)
    models.unet.train()
    schedule, cfg = Schedule.from_scheduler(models.scheduler), ObjectiveConfig(loss="dpo", beta=2500.0)
    amp = lambda: torch.autocast("cpu", dtype=dtype, enabled=precision != "no")  # noqa: E731
    for pairs in (1, 2, 3):
        cond = build_cond(models, PROMPTS[:1] * pairs, target_size=(32, 32))
        x0 = torch.randn(2 * pairs, 4, 16, 16, generator=torch.Generator().manual_seed(pairs))
        rnd = sample_randomness(pairs, (4, 16, 16), 1000, torch.Generator().manual_seed(pairs))
        encoder.batch_calls = True
        with amp():
            loss, metrics = compute_objective(models.unet, encoder, schedule, x0, cond, rnd, cfg)
        assert abs(loss.item() - math.log(2)) < 1e-6, pairs
        assert torch.equal(metrics["implicit_acc"], torch.full((pairs,), 0.5)), pairs
        assert torch.equal(metrics["err_w"], metrics["ref_err_w"]) and (metrics["err_w"] > 0).all()
    with torch.no_grad():
        for i, p in enumerate(params):
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(i)).to(p.dtype))
    results = {}
    for batched in (False, True):
        encoder.batch_calls = batched
        with amp():
            loss, metrics = compute_objective(models.unet, encoder, schedule, x0, cond, rnd, cfg)
        grad = torch.cat([g.flatten() for g in torch.autograd.grad(loss, params)])
        results[batched] = torch.cat([metrics["err_w"], metrics["ref_err_w"]]), grad
    (err_s, grad_s), (err_b, grad_b) = results[False], results[True]
    assert not torch.equal(err_s[:3], err_s[3:])  # the policy is off the reference
    tol = 1e-5 if precision == "no" else 2e-2
    assert torch.allclose(err_b, err_s, rtol=tol, atol=0)
    # the gradient goes through beta * (err - ref_err): the cancellation makes its rounding ~100x the errors'
    assert (grad_b - grad_s).norm() <= 100 * tol * grad_s.norm()
