"""DDPM maths from the scheduler's own `alphas_cumprod` / `betas`, batched over per-sample timesteps.

Notation (Ho et al. 2020): abar_t = prod_{s<=t} alpha_s, alpha_t = 1 - beta_t.
The paper's Eq. 12 / Algorithm 1 write alpha_t where abar_t is meant; this follows Eq. 2.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch



def mean_flat(x: torch.Tensor) -> torch.Tensor:
    """Mean over all non-batch dimensions: (N, ...) -> (N,)."""
    return x.mean(dim=tuple(range(1, x.dim())))


def _gather(coef: torch.Tensor, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """coef[t] shaped (N, 1, 1, 1) to broadcast against x, in x's dtype."""
    return coef.to(t.device)[t].to(x.dtype).view(-1, *([1] * (x.dim() - 1)))


def prev_t(t: torch.Tensor) -> torch.Tensor:
    """t' = t - 1, clamped at 0 (method notes: the authors' code)."""
    return (t - 1).clamp(min=0)


@dataclass
class Schedule:
    """The DDPM noise process. It shares its interface with `ncp.flow.FlowSchedule`, so the objective never asks
    which one it has: `num_timesteps`, `next_t`, `q_sample`, `target` (what the denoiser predicts),
    `model_timestep`, `step` (the reverse step t -> next_t(t)), `step_coef` (d step / d prediction),
    `renoise` (objective.target=uniform) and `training_density` (how the base model drew t)."""
    alphas_cumprod: torch.Tensor  # (T,) float64
    betas: torch.Tensor  # (T,)
    training_density = "uniform"  # t ~ U{0..T-1}, as DDPM models are trained

    @classmethod
    def from_scheduler(cls, scheduler) -> "Schedule":
        if scheduler.config.get("prediction_type", "epsilon") != "epsilon":
            raise ValueError(f"only epsilon-prediction models are supported, got {scheduler.config.prediction_type}")
        return cls(scheduler.alphas_cumprod.double(), scheduler.betas.double())

    @property
    def num_timesteps(self) -> int:
        return len(self.betas)

    def next_t(self, t: torch.Tensor) -> torch.Tensor:
        """The timestep f is evaluated at: t - 1 (clamped at 0), where the reverse step lands."""
        return prev_t(t)

    @staticmethod
    def target(x0: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """What the denoiser predicts: the noise eps (epsilon-prediction)."""
        return eps

    @staticmethod
    def model_timestep(t: torch.Tensor) -> torch.Tensor:
        """The denoiser's (and f's) timestep input: the DDPM index itself."""
        return t

    def to(self, device) -> "Schedule":
        """The tables on `device`: indexed by a t there, they need no copy from the host per call."""
        return Schedule(self.alphas_cumprod.to(device), self.betas.to(device))

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps  (q(x_t | x_0), Eq. 2)."""
        abar = self.alphas_cumprod
        return _gather(abar.sqrt(), t, x0) * x0 + _gather((1 - abar).sqrt(), t, x0) * eps

    def predict_x0(self, x_t: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """x0 = (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t)."""
        abar = self.alphas_cumprod
        return (x_t - _gather((1 - abar).sqrt(), t, x_t) * eps) / _gather(abar.sqrt(), t, x_t)

    def _step_tables(self):
        """abar_t, abar_{t-1} (abar_{-1} = 1) and beta_t = 1 - abar_t / abar_{t-1}, each (T,)."""
        abar = self.alphas_cumprod
        abar_prev = torch.cat([abar.new_ones(1), abar[:-1]])
        return abar, abar_prev, 1 - abar / abar_prev

    def step_coef(self, t: torch.Tensor) -> torch.Tensor:
        """d x_{t-1} / d eps_hat of `ddpm_step` (it is linear in eps_hat), per sample (N,), float64:

            -beta_t / (sqrt(alpha_t) sqrt(1 - abar_t)),

        so two reverse steps from the same x_t and z differ by exactly this times the noise difference."""
        abar, _, beta = self._step_tables()
        return (-beta / ((1 - beta).sqrt() * (1 - abar).sqrt())).to(t.device)[t]

    def step(self, x_t: torch.Tensor, t: torch.Tensor, eps: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """One reverse step t -> t-1 of the DDPM posterior q(x_{t-1} | x_t, x0_hat), per sample.

        mean = sqrt(abar_{t-1}) beta_t / (1 - abar_t) x0_hat + sqrt(alpha_t) (1 - abar_{t-1}) / (1 - abar_t) x_t,
        variance "fixed_small" = (1 - abar_{t-1}) / (1 - abar_t) beta_t, and no noise where t = 0 (abar_{-1} = 1).
        Matches `DDPMScheduler.step` with clip_sample=False (no x0 clipping: latents are not in [-1, 1]).
        """
        abar, abar_prev, beta = self._step_tables()
        x0_coef = abar_prev.sqrt() * beta / (1 - abar)
        xt_coef = (1 - beta).sqrt() * (1 - abar_prev) / (1 - abar)
        std = ((1 - abar_prev) / (1 - abar) * beta).clamp(min=1e-20).sqrt() * (torch.arange(len(abar), device=abar.device) > 0)
        x0_hat = self.predict_x0(x_t, t, eps)
        return _gather(x0_coef, t, x_t) * x0_hat + _gather(xt_coef, t, x_t) * x_t + _gather(std, t, x_t) * z

    def renoise(self, x_t: torch.Tensor, t: torch.Tensor, eps: torch.Tensor, t_target: torch.Tensor,
                x0: torch.Tensor | None = None) -> torch.Tensor:
        """Lin & Yang's target: the predicted x0 (or the given true x0) re-noised with the predicted noise at t_target."""
        if x0 is None:
            x0 = self.predict_x0(x_t, t, eps)
        return self.q_sample(x0, t_target, eps)

    ddpm_step, ddpm_step_eps_coef = step, step_coef  # the DDPM names, as tests and benchmarks call them
