"""TailorPO-G: gradient guidance of the step-wise reward (paper Eqs. 13-14, after Guo et al. 2024).

    r_high = r_t(c, x) + delta          (delta held constant)
    x^+    = x - eta_t * grad_x (r_high - r_t(c, x))^2      raises the reward
    x^-    = x + eta_t * grad_x (r_high - r_t(c, x))^2      lowers it (used to check guidance, Table 1)

Since grad_x (r_high - r)^2 = -2 (r_high - r) grad_x r = -2 delta grad_x r, x^+ = x + 2 eta_t delta grad_x r.
r_t(c, x) = r(c, decode(x0_hat(x))) is differentiated through x0_hat (the UNet at the next timestep), the VAE
decoder and the reward model.
"""

from __future__ import annotations

import math
from typing import Callable

import torch


def cosine_eta_schedule(branch_steps: list[int], eta_min: float = 0.1, eta_max: float = 0.2) -> dict[int, float]:
    """eta_t per fine-tuned step k on a cosine ramp: eta_min at the largest k (noisiest), eta_max at the
    smallest k (closest to the image), as the paper assigns larger coefficients to smaller t."""
    ordered = sorted(branch_steps, reverse=True)
    if len(ordered) == 1:
        return {ordered[0]: eta_max}
    return {
        k: eta_min + (eta_max - eta_min) * (1 - math.cos(math.pi * i / (len(ordered) - 1))) / 2
        for i, k in enumerate(ordered)
    }


def guidance_gradient(
    x: torch.Tensor, step_reward: Callable[[torch.Tensor], torch.Tensor], delta: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """grad_x (r_high - r_t(c, x))^2 with r_high = r_t(c, x) + delta held constant; also returns r_t(c, x)."""
    x = x.detach().requires_grad_(True)
    with torch.enable_grad():
        reward = step_reward(x)  # (B,)
        r_high = reward.detach() + delta
        objective = ((r_high - reward) ** 2).sum()
        (grad,) = torch.autograd.grad(objective, x)
    return grad, reward.detach()


def guide(
    x: torch.Tensor,
    step_reward: Callable[[torch.Tensor], torch.Tensor],
    eta: float,
    delta: float = 0.5,
    increase: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """x^+ (increase=True) or x^- per Eq. 14; returns the moved sample and r_t(c, x) before the move."""
    grad, reward = guidance_gradient(x, step_reward, delta)
    sign = -1.0 if increase else 1.0
    return x.detach() + sign * eta * grad, reward
