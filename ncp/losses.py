"""Preference losses as pure functions of per-sample errors.

An "error" is the per-sample distance between a model's prediction and the truth: in latent space
mean((eps_pred - eps)^2), in perceptual space mean((f(x_{t'}^pred) - f(x_{t'}))^2). Each function
takes tensors of shape (B,) (one entry per pair) and returns unreduced losses (B,) and a dict of
detached per-pair metrics. Lower error = better fit, so rewards are -beta * error (relative to the
reference where there is one).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def implicit_accuracy(margin: torch.Tensor) -> torch.Tensor:
    """1 where the winner is preferred (margin > 0), 1/2 for ties, else 0."""
    return (margin > 0).float() + 0.5 * (margin == 0).float()


def dpo_loss(err_w, err_l, ref_err_w, ref_err_l, beta: float):
    """Diffusion-DPO / NCP-DPO (paper Eq. 14; Wallace et al. 2023 Eq. 14 with T folded into beta):

        loss = -log sigmoid(beta * ((ref_err_w - ref_err_l) - (err_w - err_l)))

    At initialisation (policy = reference) the margin is 0 and the loss is log 2.
    """
    margin = beta * ((ref_err_w - ref_err_l) - (err_w - err_l))
    metrics = {
        "implicit_acc": implicit_accuracy(margin),
        "reward_w": beta * (ref_err_w - err_w),
        "reward_l": beta * (ref_err_l - err_l),
    }
    return -F.logsigmoid(margin), {k: v.detach() for k, v in metrics.items()}


def cpo_loss(err_w, err_l, beta: float, cpo_lambda: float = 0.0):
    """Contrastive Preference Optimisation (paper Eq. 15), no reference model:

        loss = -log sigmoid(-beta * (err_w - err_l)) + lambda * err_w

    lambda = 0 is the authors' code (which omits the SFT term).
    """
    margin = -beta * (err_w - err_l)
    metrics = {"implicit_acc": implicit_accuracy(margin), "reward_w": -beta * err_w, "reward_l": -beta * err_l}
    return -F.logsigmoid(margin) + cpo_lambda * err_w, {k: v.detach() for k, v in metrics.items()}


def sft_loss(err_w):
    """Supervised fine-tuning on winners only: loss = err_w."""
    return err_w, {}
