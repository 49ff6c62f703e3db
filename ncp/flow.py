"""Flow-matching maths (SD3 / SD3.5: rectified flow) from the scheduler's own sigmas, batched over per-sample
timestep indices. The analogue of `ncp.diffusion.Schedule` for DDPM models.

Notation (Esser et al. 2024, SD3): x_t = (1 - sigma_t) x0 + sigma_t eps, the model predicts the velocity
v = eps - x0. The training discretisation is `FlowMatchEulerDiscreteScheduler`'s N sigmas (shift applied,
sigma_0 ~ 1 down to sigma_{N-1} ~ shift / N) with a terminal sigma_N = 0; t is an index into it, and the
analogue of DDPM's t -> t-1 is t -> t+1, the next (smaller) sigma. The transformer takes sigma * 1000.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from .diffusion import _gather
from .errors import NcpError

STEPS = ("ode", "sde")
SHIFTS = ("none", "resolution")  # flux's training sigmas: as loaded, or through the pipeline's resolution shift
TIMESTEPS = ("uniform", "logit_normal")


@dataclass
class FlowSchedule:
    """The flow-matching noise process, with `ncp.diffusion.Schedule`'s interface (v stands where eps stands)."""
    sigmas: torch.Tensor  # (N + 1,) float64: the scheduler's N sigmas, then the terminal 0
    timesteps: torch.Tensor  # (N + 1,) float32: what the transformer takes (the scheduler's sigma * N), then 0
    stochastic: bool = False  # reverse step: "ode" (the scheduler's Euler step) or "sde" (posterior, noise z)
    training_density = "logit_normal"  # SD3's density over the indices (Esser et al. 2024)

    @classmethod
    def from_scheduler(cls, scheduler, step: str = "ode") -> "FlowSchedule":
        """From a `FlowMatchEulerDiscreteScheduler` as loaded (its training sigmas, before any set_timesteps)."""
        if getattr(scheduler.config, "use_dynamic_shifting", False):
            raise ValueError("flow schedules with use_dynamic_shifting (resolution-dependent shift) are not supported")
        if step not in STEPS:
            raise ValueError(f"the flow reverse step must be one of {STEPS}, got {step!r}")
        zero = torch.zeros(1)
        return cls(torch.cat([scheduler.sigmas.float(), zero]).double(),
                   torch.cat([scheduler.timesteps.float(), zero]), step == "sde")

    @classmethod
    def from_sigmas(cls, sigmas: torch.Tensor, timesteps: torch.Tensor, step: str = "ode") -> "FlowSchedule":
        """From N training sigmas and the N timesteps the model takes at them (a terminal 0 is appended to both):
        for schedules the scheduler does not hold as loaded (FLUX's resolution shift) or models whose timestep
        input is sigma itself (FLUX: the pipeline passes t / 1000)."""
        if step not in STEPS:
            raise ValueError(f"the flow reverse step must be one of {STEPS}, got {step!r}")
        zero = torch.zeros(1)
        return cls(torch.cat([sigmas.float(), zero]).double(), torch.cat([timesteps.float(), zero]), step == "sde")

    @property
    def num_timesteps(self) -> int:
        """Indices t that training draws from: 0 .. N-1 (N = the scheduler's num_train_timesteps)."""
        return len(self.sigmas) - 1

    def to(self, device) -> "FlowSchedule":
        """The tables on `device`: indexed by a t there, they need no copy from the host per call."""
        return replace(self, sigmas=self.sigmas.to(device), timesteps=self.timesteps.to(device))

    def _sigma(self, t: torch.Tensor) -> torch.Tensor:
        return self.sigmas[t.to(self.sigmas.device)]

    def next_t(self, t: torch.Tensor) -> torch.Tensor:
        """t' = t + 1: the next, smaller sigma of the training discretisation (N: sigma = 0, the clean image)."""
        return t + 1

    def model_timestep(self, t: torch.Tensor) -> torch.Tensor:
        """The transformer's timestep input for index t: sigma_t * 1000, float32, as the pipeline passes it."""
        return self.timesteps.to(t.device)[t]

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """x_t = (1 - sigma_t) x0 + sigma_t eps  (the straight path from data to noise)."""
        sigma = _gather(self.sigmas, t, x0)
        return (1 - sigma) * x0 + sigma * eps

    @staticmethod
    def target(x0: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """The regression target v = d x_t / d sigma = eps - x0."""
        return eps - x0

    def _coefs(self, t: torch.Tensor):
        """(sigma_t, sigma_t', c, a_v) per sample, float64: c is the std of the reverse step's noise
        (0 for the ODE step) and a_v = d x_t' / d v_hat."""
        s, s_next = self._sigma(t), self._sigma(t + 1)
        if not self.stochastic:
            return s, s_next, torch.zeros_like(s), s_next - s
        # posterior q(x_t' | x_t, x0) of the Gaussian path alpha = 1 - sigma (DDIM with eta = 1, Song et al. 2021):
        # c^2 = sigma_t'^2 (1 - (alpha_t sigma_t')^2 / (alpha_t' sigma_t)^2), the mean alpha_t' x0 + sqrt(sigma_t'^2 - c^2) eps
        a, a_next = 1 - s, 1 - s_next
        c2 = s_next ** 2 * (1 - ((a * s_next) / (a_next * s)) ** 2)
        c = c2.clamp(min=0).sqrt()
        return s, s_next, c, -a_next * s + (s_next ** 2 - c ** 2).clamp(min=0).sqrt() * a

    def step_coef(self, t: torch.Tensor) -> torch.Tensor:
        """d x_t' / d v_hat of `step` (it is affine in v_hat), per sample (N,), float64: sigma_t' - sigma_t for
        the ODE step. Two reverse steps from the same x_t and z differ by exactly this times v_hat - v."""
        return self._coefs(t)[3].to(t.device)

    def step(self, x_t: torch.Tensor, t: torch.Tensor, v: torch.Tensor, z: torch.Tensor | None = None) -> torch.Tensor:
        """One reverse step sigma_t -> sigma_t' (t' = t + 1), per sample.

        ode: x_t' = x_t + (sigma_t' - sigma_t) v, `FlowMatchEulerDiscreteScheduler.step` (deterministic).
        sde: x0_hat = x_t - sigma_t v, eps_hat = x_t + (1 - sigma_t) v, then
             x_t' = (1 - sigma_t') x0_hat + sqrt(sigma_t'^2 - c^2) eps_hat + c z, the posterior step with the
             reverse-step noise z shared by policy, reference and truth (as DDPM's); c = 0 at sigma_t' = 0.
        """
        if not self.stochastic:
            dt = (self._sigma(t + 1).float() - self._sigma(t).float()).to(x_t.device)
            return x_t + dt.to(x_t.dtype).view(-1, *([1] * (x_t.dim() - 1))) * v
        s, s_next, c, _ = (x.to(x_t.device, x_t.dtype).view(-1, *([1] * (x_t.dim() - 1))) for x in self._coefs(t))
        x0_hat, eps_hat = x_t - s * v, x_t + (1 - s) * v
        return (1 - s_next) * x0_hat + (s_next ** 2 - c ** 2).clamp(min=0).sqrt() * eps_hat + c * z

    def renoise(self, x_t, t, v, t_target, x0=None):
        raise NcpError("objective.target=uniform is for DDPM models; flow-matching runs use target=prev")

    velocity, step_v_coef = target, step_coef  # the flow names, as tests call them


def sample_timesteps(num_pairs: int, num_timesteps: int, generator: torch.Generator, sampling: str = "uniform",
                     logit_mean: float = 0.0, logit_std: float = 1.0) -> torch.Tensor:
    """Indices t (B,) long in [0, N): uniform, or SD3's logit-normal density (u = sigmoid(n), n ~ N(mean, std),
    t = floor(u N); diffusers `compute_density_for_timestep_sampling`, train_dreambooth_lora_sd3.py)."""
    if sampling == "uniform":
        return torch.randint(0, num_timesteps, (num_pairs,), generator=generator)
    u = torch.sigmoid(logit_mean + logit_std * torch.randn((num_pairs,), generator=generator))
    return (u * num_timesteps).long().clamp(max=num_timesteps - 1)
