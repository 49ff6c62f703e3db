"""One training objective for a batch of preference pairs (Algorithm 1, lines 5-18, errata applied).

Randomness is an argument (`Randomness`), so the same latents, conditioning and randomness always
give the same loss. Cost, per pair: one policy U-Net forward with gradient on winner and loser; for
DPO one reference forward with the LoRA switched off and no gradient; in perceptual space one
no-grad encoder call on the true and reference x_{t'} together and one encoder call with gradient
on the policy's x_{t'}. CPO and SFT skip the reference entirely; SFT uses winners only.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .conditioning import Cond
from .diffusion import Schedule, mean_flat, prev_t
from .errors import NcpError
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

    def validate(self, prefix: str = "objective") -> None:
        for key, value, allowed in [("loss", self.loss, LOSSES), ("space", self.space, SPACES), ("target", self.target, TARGETS)]:
            if value not in allowed:
                raise NcpError(f"{prefix}.{key} must be one of {allowed}, got {value!r}")
        if self.beta <= 0:
            raise NcpError(f"{prefix}.beta must be > 0, got {self.beta}")
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
    t_target: torch.Tensor  # (B,) long: timestep f is evaluated at (t-1, or uniform for target="uniform")

    def to(self, device) -> "Randomness":
        return Randomness(*(x.to(device) for x in (self.t, self.eps, self.z, self.t_target)))


def sample_randomness(num_pairs: int, latent_shape, num_timesteps: int, generator: torch.Generator,
                      target: str = "prev") -> Randomness:
    """Draw t ~ U{0..T-1}, eps, z ~ N(0, I) on the generator's device (CPU: reproducible anywhere)."""
    t = torch.randint(0, num_timesteps, (num_pairs,), generator=generator)
    eps = torch.randn((num_pairs, *latent_shape), generator=generator)
    z = torch.randn((num_pairs, *latent_shape), generator=generator)
    if target == "uniform":
        t_target = torch.randint(0, num_timesteps, (num_pairs,), generator=generator)
    else:
        t_target = prev_t(t)
    return Randomness(t, eps, z, t_target)


def _x_target(schedule: Schedule, cfg: ObjectiveConfig, x_t, t, eps_j, z, t_target, x0=None):
    """The point f sees for one noise prediction eps_j: the DDPM step to t-1 (default), or
    Lin & Yang's re-noising of the predicted x0 with the predicted noise at t_target."""
    if cfg.target == "prev":
        return schedule.ddpm_step(x_t, t, eps_j, z)
    if x0 is None:
        x0 = schedule.predict_x0(x_t, t, eps_j)
    return schedule.q_sample(x0, t_target, eps_j)


def compute_objective(unet, encoder, schedule: Schedule, x0: torch.Tensor, cond: Cond, rnd: Randomness,
                      cfg: ObjectiveConfig):
    """Loss (scalar, mean over pairs) and detached metrics for B pairs.

    x0: (2B, C, h, w) latents [winners; losers]; cond: 2B rows. For SFT only the winners are used.
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

    kwargs = cond.unet_kwargs()
    eps_pred = unet(x_t, t, **kwargs).sample.float()
    eps_ref = None
    if cfg.loss == "dpo":
        with torch.no_grad(), adapters_disabled(unet):
            eps_ref = unet(x_t, t, **kwargs).sample.float()

    if cfg.space == "latent":
        err = mean_flat((eps_pred - eps) ** 2)
        ref_err = None if eps_ref is None else mean_flat((eps_ref - eps) ** 2)
    else:
        if encoder is None:
            raise NcpError("objective.space=perceptual needs a perceptual encoder")
        x_pol = _x_target(schedule, cfg, x_t, t, eps_pred, z, t_target)
        with torch.no_grad():
            x_true = _x_target(schedule, cfg, x_t, t, eps, z, t_target, x0=x0)
            if eps_ref is None:
                f_true = encoder(x_true, t_target, cond).float()
            else:
                x_ref = _x_target(schedule, cfg, x_t, t, eps_ref, z, t_target)
                f_both = encoder(torch.cat([x_true, x_ref]), t_target.repeat(2), cond.cat(cond)).float()
                f_true, f_ref = f_both.chunk(2)
        f_pol = encoder(x_pol, t_target, cond).float()
        err = mean_flat((f_pol - f_true) ** 2)
        ref_err = None if eps_ref is None else mean_flat((f_ref - f_true) ** 2)

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
