"""One training objective for a batch of preference pairs (Algorithm 1, lines 5-18, errata applied).

Randomness is an argument (`Randomness`), so the same latents, conditioning and randomness always
give the same loss. Cost, per pair: one policy U-Net forward with gradient on winner and loser; for
DPO one reference forward with the LoRA switched off and no gradient; in perceptual space encoder
calls without gradient on the true and the reference x_{t'} and one with gradient on the policy's,
all of the same batch size (`perceptual_errors`; `encoder.error=linearized` replaces each difference
by a forward-mode derivative). CPO and SFT skip the reference entirely; SFT uses winners only.

Flow-matching models (SD3, `ncp.flow.FlowSchedule`): the same objective with the velocity v = eps - x0 in
place of eps (Diffusion-DPO's latent error becomes ||v_pred - v||^2), the Euler (or posterior) step to the
next sigma in place of the DDPM step to t-1, and the transformer's timestep sigma * 1000 in place of t.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .conditioning import Cond, to_device
from .diffusion import Schedule, mean_flat, prev_t
from .errors import NcpError
from . import families
from .flow import SHIFTS, STEPS, TIMESTEPS, sample_timesteps
from .losses import cpo_loss, dpo_loss, sft_loss
from .models import adapters_disabled

LOSSES = ("dpo", "cpo", "sft")
SPACES = ("perceptual", "latent")
TARGETS = ("prev", "uniform")


@dataclass
class ObjectiveConfig:
    loss: str = "dpo"  # dpo | cpo | sft: set by the training script
    space: str = "perceptual"  # perceptual = NCP (the paper); latent = Diffusion-DPO-style baseline
    beta: float = 2500.0  # authors' launch scripts (T folded into beta, no 0.5 factor)
    cpo_lambda: float = 0.0  # weight of Eq. 15's SFT term; 0 reproduces the authors' code
    target: str = "prev"  # prev = evaluate f at t-1 (paper); uniform = re-noise at a random t' (Lin & Yang)
    timesteps: str = "uniform"  # uniform | logit_normal (SD3's training density over the schedule's indices)
    logit_mean: float = 0.0  # logit_normal: mean of the normal before the sigmoid (SD3 paper: 0)
    logit_std: float = 1.0  # logit_normal: its std (SD3 paper: 1)
    flow_shift: str = "none"  # flux: none = the scheduler's unshifted training sigmas (diffusers' FLUX scripts) | resolution = the pipeline's resolution-dependent shift
    flow_step: str = "ode"  # sd3 reverse step to the next sigma: ode (the scheduler's Euler step) | sde (posterior, noise z)

    def validate(self, prefix: str = "objective") -> None:
        for key, value, allowed in [("loss", self.loss, LOSSES), ("space", self.space, SPACES), ("target", self.target, TARGETS),
                                    ("timesteps", self.timesteps, TIMESTEPS), ("flow_step", self.flow_step, STEPS),
                                    ("flow_shift", self.flow_shift, SHIFTS)]:
            if value not in allowed:
                raise NcpError(f"{prefix}.{key} must be one of {allowed}, got {value!r}")
        if self.beta <= 0:
            raise NcpError(f"{prefix}.beta must be > 0, got {self.beta}")
        if self.logit_std <= 0:
            raise NcpError(f"{prefix}.logit_std must be > 0, got {self.logit_std}")
        if self.cpo_lambda < 0:
            raise NcpError(f"{prefix}.cpo_lambda must be >= 0, got {self.cpo_lambda}")
        if self.space == "latent" and self.target != "prev":
            raise NcpError(f"{prefix}.target={self.target!r} only applies to objective.space=perceptual")


@dataclass
class Randomness:
    """Per-pair draws (B rows), shared by winner and loser (Algorithm 1 lines 5, 7, 10)."""
    t: torch.Tensor  # (B,) long in [0, T)
    eps: torch.Tensor  # (B, C, h, w) forward noise
    z: torch.Tensor  # (B, C, h, w) reverse-step noise, shared by policy, reference and truth
    t_target: torch.Tensor  # (B,) long: timestep f is evaluated at (t-1, or uniform for target="uniform"; flow: t+1)

    def to(self, device) -> "Randomness":
        """Copies that do not wait for the device (`to_device`): a micro-step's draws cost no sync."""
        return Randomness(*(to_device(x, device) for x in (self.t, self.eps, self.z, self.t_target)))


def sample_randomness(num_pairs: int, latent_shape, num_timesteps: int, generator: torch.Generator,
                      target: str = "prev", timesteps: str = "uniform", logit_mean: float = 0.0, logit_std: float = 1.0,
                      next_t=prev_t) -> Randomness:
    """Draw t ~ U{0..T-1} (or SD3's logit-normal, `ncp.flow.sample_timesteps`), eps, z ~ N(0, I) on the
    generator's device (CPU: reproducible anywhere). next_t: the noise process's t' (DDPM t - 1, flow t + 1)."""
    t = sample_timesteps(num_pairs, num_timesteps, generator, timesteps, logit_mean, logit_std)
    eps = torch.randn((num_pairs, *latent_shape), generator=generator)
    z = torch.randn((num_pairs, *latent_shape), generator=generator)
    if target == "uniform":
        t_target = torch.randint(0, num_timesteps, (num_pairs,), generator=generator)
    else:
        t_target = next_t(t)
    return Randomness(t, eps, z, t_target)


def randomness_for(cfg: ObjectiveConfig, schedule, num_pairs: int, latent_shape, generator: torch.Generator) -> Randomness:
    """`sample_randomness` with the objective's timestep density and the noise process's t'."""
    return sample_randomness(num_pairs, latent_shape, schedule.num_timesteps, generator, cfg.target, cfg.timesteps,
                             cfg.logit_mean, cfg.logit_std, next_t=schedule.next_t)


def predict(unet, schedule, x_t: torch.Tensor, t: torch.Tensor, cond: Cond, denoise=None) -> torch.Tensor:
    """The denoiser's output (the process's target: eps, or v for a flow model) at index t, at least fp32.
    denoise: the family's call (`ncp.families.Family.denoise`); None = that of the denoiser's family."""
    denoise = denoise or (families.of_denoiser(unet) or families.Family).denoise
    return _wide(denoise(unet, x_t, schedule.model_timestep(t), cond))


def _x_target(schedule: Schedule, cfg: ObjectiveConfig, x_t, t, eps_j, z, t_target, x0=None):
    """The point f sees for one prediction eps_j (eps, or v for a flow model): the process's reverse step to
    next_t(t) (default), or Lin & Yang's re-noising of the predicted x0 with the predicted noise at t_target."""
    if cfg.target == "prev":
        return schedule.step(x_t, t, eps_j, z)
    return schedule.renoise(x_t, t, eps_j, t_target, x0)


def perceptual_errors(encoder, schedule: Schedule, cfg: ObjectiveConfig, x_t, t, eps, z, t_target, cond, x0,
                      eps_hats: list[torch.Tensor]) -> list[torch.Tensor]:
    """mean((f(x_{t'}(eps_hat)) - f(x_{t'}(eps)))^2) (N,) for each noise prediction, computed as
    `encoder.error` says (ncp.encoder.PerceptualEncoder):

    difference / fp32: f(x_hat) - f(x_true), f(x_true) evaluated once;
    linearized: J_f(x_true) delta with delta = x_{t-1}(eps_hat) - x_{t-1}(eps) = coef_t * (eps_hat - eps)
      (the DDPM step is affine in the noise) formed in fp32 or wider, never as a difference of two rounded
      points; delta is divided by its per-sample rms (J is linear, the scale comes back in fp32) so a
      half-precision tangent neither underflows nor loses digits. Only for target "prev": re-noising at a
      fresh t' moves the point by the whole prediction error, no small step to linearize.
      Flow (SD3): eps / eps_hats are velocities, delta = (sigma_t' - sigma_t) (v_hat - v) for the ODE step.

    Every prediction gets its own encoder call of the same batch size in the same grad mode (or, with
    `encoder.batch_calls`, one call of all three points; linearized: one jvp with both tangents): with
    policy = reference the errors are then bitwise equal (loss log 2, accuracy 1/2 at any batch size).
    Gradients reach eps_hat (the policy's) only through f's activations, never f's weights."""
    x_true = _x_target(schedule, cfg, x_t, t, eps, z, t_target, x0=x0).detach()
    t_target = schedule.model_timestep(t_target)  # f takes what the denoiser takes
    if encoder.error != "linearized":
        points = [_x_target(schedule, cfg, x_t, t, e, z, t_target) for e in eps_hats]
        if getattr(encoder, "batch_calls", False):  # one call, [policy; reference; true]: policy and reference at the rows they take alone
            n = len(points) + 1
            *feats, f_true = _wide(encoder(torch.cat(points + [x_true]), t_target.repeat(n), cond.repeat(n))).chunk(n)
        else:
            f_true = _wide(encoder(x_true, t_target, cond))
            feats = [_wide(encoder(x, t_target, cond)) for x in points]
        return [mean_flat((f - f_true) ** 2) for f in feats]
    if cfg.target != "prev":
        raise NcpError("encoder.error=linearized needs objective.target=prev (the one-step DDPM target)")
    tangents, scales = [], []
    for e in eps_hats:
        e = _wide(e)
        coef = schedule.step_coef(t)
        coef = coef.to(e.dtype).view(-1, *([1] * (e.dim() - 1)))
        delta = coef * (e - eps.to(e.dtype))
        rms = mean_flat(delta.detach() ** 2).sqrt().clamp(min=torch.finfo(e.dtype).tiny)
        tangents.append(delta / rms.view_as(coef))
        scales.append(rms ** 2)
    # one primal f(x_true) for every tangent (the policy's and the reference's in the same call)
    return [s * mean_flat(_wide(j) ** 2) for s, j in zip(scales, encoder.jvp(x_true, t_target, cond, tangents))]


def _wide(x: torch.Tensor) -> torch.Tensor:
    """fp32, or float64 where it already is: errors are formed at least in fp32."""
    return x if x.dtype == torch.float64 else x.float()


def compute_objective(unet, encoder, schedule: Schedule, x0: torch.Tensor, cond: Cond, rnd: Randomness,
                      cfg: ObjectiveConfig, denoise=None):
    """Loss (scalar, mean over pairs) and detached metrics for B pairs.

    x0: (2B, C, h, w) latents [winners; losers]; cond: 2B rows. For SFT only the winners are used.
    schedule: the noise process (DDPM `Schedule`: eps-prediction, or `FlowSchedule`: v-prediction); denoise: the
    family's denoiser call (default: `Family.denoise` of the denoiser's family).
    Metrics are per-pair tensors: err_w, err_l, ref_err_w, ref_err_l, implicit_acc, reward_w, reward_l.
    """
    num_pairs = rnd.t.shape[0]
    if cfg.loss == "sft":
        x0, cond = x0[:num_pairs], cond.index(slice(0, num_pairs))
        reps = 1
    else:
        reps = 2
    t, eps, z, t_target = (x.repeat(reps, *([1] * (x.dim() - 1))) for x in (rnd.t, rnd.eps, rnd.z, rnd.t_target))
    eps, z = eps.to(x0.dtype), z.to(x0.dtype)
    x_t = schedule.q_sample(x0, t, eps)
    eps = schedule.target(x0, eps)  # a flow model predicts v = eps - x0: it stands where eps stands below

    eps_pred = predict(unet, schedule, x_t, t, cond, denoise)
    eps_ref = None
    if cfg.loss == "dpo":
        with torch.no_grad(), adapters_disabled(unet):
            eps_ref = predict(unet, schedule, x_t, t, cond, denoise)

    if cfg.space == "latent":
        err = mean_flat((eps_pred - eps) ** 2)
        ref_err = None if eps_ref is None else mean_flat((eps_ref - eps) ** 2)
    else:
        if encoder is None:
            raise NcpError("objective.space=perceptual needs a perceptual encoder")
        eps_hats = [eps_pred] if eps_ref is None else [eps_pred, eps_ref]
        err, *ref = perceptual_errors(encoder, schedule, cfg, x_t, t, eps, z, t_target, cond, x0, eps_hats)
        ref_err = ref[0] if ref else None

    if cfg.loss == "sft":
        losses, metrics = sft_loss(err)
        metrics["err_w"] = err.detach()
        return losses.mean(), metrics
    err_w, err_l = err.chunk(2)
    metrics = {"err_w": err_w.detach(), "err_l": err_l.detach()}
    if cfg.loss == "dpo":
        ref_err_w, ref_err_l = ref_err.chunk(2)
        losses, m = dpo_loss(err_w, err_l, ref_err_w, ref_err_l, cfg.beta)
        metrics.update(ref_err_w=ref_err_w.detach(), ref_err_l=ref_err_l.detach())
    else:
        losses, m = cpo_loss(err_w, err_l, cfg.beta, cfg.cpo_lambda)
    metrics.update(m)
    return losses.mean(), metrics
