"""TailorPO-G: gradient guidance of the step-wise reward (paper Eqs. 13-14, after Guo et al. 2024).

    r_high = r_t(c, x) + delta          (delta held constant)
    x^+    = x - eta_t * grad_x (r_high - r_t(c, x))^2      raises the reward
    x^-    = x + eta_t * grad_x (r_high - r_t(c, x))^2      lowers it (used to check guidance, Table 1)

Since grad_x (r_high - r)^2 = -2 (r_high - r) grad_x r = -2 delta grad_x r, x^+ = x + 2 eta_t delta grad_x r.
r_t(c, x) = r(c, decode(x0_hat(x))) is differentiated through x0_hat (the UNet at the next timestep), the VAE
decoder and the reward model.

In reward units the push 2 eta_t delta |grad_x r| scales with the reward: the same eta_t overshoots a reward
of large range and does nothing for a small one. ``guide_in_sigma_units`` instead moves each sample by a fixed
fraction f of the step's DDIM noise std sigma_t along grad_x r (per-dimension RMS f sigma_t), which depends
on the sampler alone, not on the reward's scale (ours: the paper's eta_t is in reward units).
"""

from __future__ import annotations

import math
from collections.abc import Callable

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


def rms_normalized(grad: torch.Tensor) -> torch.Tensor:
    """grad / rms(grad) per sample (rms over all non-batch dims), so each row has per-dimension RMS 1; a zero
    gradient stays zero (no direction to move in)."""
    rms = grad.flatten(1).pow(2).mean(dim=1).sqrt().view(-1, *([1] * (grad.ndim - 1)))
    return torch.where(rms > 0, grad / rms.clamp_min(torch.finfo(grad.dtype).tiny), torch.zeros_like(grad))


def guide_in_sigma_units(
    x: torch.Tensor,
    step_reward: Callable[[torch.Tensor], torch.Tensor],
    sigma: float,
    fraction: float,
    increase: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """x +/- f sigma_t grad r / rms(grad r): Eq. 14's direction with a step whose per-dimension RMS is exactly
    ``fraction`` * sigma_t, whatever the reward's scale (the paper's eta_t would need retuning per reward).
    Returns the moved sample and r_t(c, x) before the move, as ``guide``."""
    grad, reward = guidance_gradient(x, step_reward, delta=1.0)  # = -2 grad r: delta only scales it
    sign = -1.0 if increase else 1.0
    return x.detach() + sign * fraction * sigma * rms_normalized(grad), reward
