"""DDIM step with eta, its Gaussian log-probability, and the predicted clean sample.

Pure tensor functions. Symbols follow the TailorPO paper (Eq. 2) and Song et al. (DDIM, Eq. 12):

    x0_hat(x_t)   = (x_t - sqrt(1 - a_t) * eps) / sqrt(a_t)                       (a_t = alpha_bar_t)
    sigma_t       = eta * sqrt((1 - a_prev) / (1 - a_t)) * sqrt(1 - a_t / a_prev)
    mu_theta(x_t) = sqrt(a_prev) * x0_hat + sqrt(1 - a_prev - sigma_t^2) * eps
    x_{t-1}       = mu_theta(x_t) + sigma_t * z,   z ~ N(0, I)

The step agrees with ``diffusers.DDIMScheduler.step(eta=eta, variance_noise=z)`` for epsilon-prediction models
with ``clip_sample=False`` and no thresholding (SD v1.5 and SDXL), which tests check.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch

LogProbReduction = Literal["sum", "mean"]


@dataclass
class DDIMStep:
    prev_sample: torch.Tensor  # x_{t-1}, (B, C, H, W)
    mean: torch.Tensor  # mu_theta(x_t)
    std: float  # sigma_t
    pred_original_sample: torch.Tensor  # x0_hat(x_t)
    log_prob: torch.Tensor  # log pi(x_{t-1} | x_t, c), (B,)


def predict_x0(sample: torch.Tensor, eps: torch.Tensor, alpha_prod_t: float) -> torch.Tensor:
    """x0_hat(x_t) = (x_t - sqrt(1 - a_t) eps) / sqrt(a_t): the posterior mean E[x_0 | x_t] (paper Eq. 2, 12)."""
    return (sample - math.sqrt(1.0 - alpha_prod_t) * eps) / math.sqrt(alpha_prod_t)


def ddim_sigma(alpha_prod_t: float, alpha_prod_prev: float, eta: float) -> float:
    """sigma_t = eta * sqrt((1 - a_prev)/(1 - a_t)) * sqrt(1 - a_t/a_prev)."""
    variance = (1.0 - alpha_prod_prev) / (1.0 - alpha_prod_t) * (1.0 - alpha_prod_t / alpha_prod_prev)
    return eta * math.sqrt(max(variance, 0.0))


def gaussian_log_prob(
    x: torch.Tensor, mean: torch.Tensor, std: float, reduction: LogProbReduction = "mean"
) -> torch.Tensor:
    """log N(x; mean, std^2 I) per sample, (B,).

    ``sum`` is the exact density over all d latent dimensions (TailorPO Eq. 17). ``mean`` divides by d, the
    scale D3PO's and ddpo-pytorch's code use and to which their beta and ratio clip were tuned.
    """
    if reduction not in ("sum", "mean"):
        raise ValueError(f"reduction must be 'sum' or 'mean', got {reduction!r}")
    log_density = -((x - mean) ** 2) / (2 * std**2) - math.log(std) - 0.5 * math.log(2 * math.pi)
    dims = tuple(range(1, x.ndim))
    return log_density.sum(dim=dims) if reduction == "sum" else log_density.mean(dim=dims)


def ddim_mean(
    eps: torch.Tensor, sample: torch.Tensor, alpha_prod_t: float, alpha_prod_prev: float, eta: float = 1.0
) -> tuple[torch.Tensor, float, torch.Tensor]:
    """(mu_theta(x_t), sigma_t, x0_hat(x_t)): the Gaussian pi(x_{t-1} | x_t, c) that every child of x_t shares."""
    x0_hat = predict_x0(sample, eps, alpha_prod_t)
    sigma = ddim_sigma(alpha_prod_t, alpha_prod_prev, eta)
    direction = math.sqrt(max(1.0 - alpha_prod_prev - sigma**2, 0.0)) * eps  # "direction pointing to x_t"
    return math.sqrt(alpha_prod_prev) * x0_hat + direction, sigma, x0_hat


def ddim_step(
    eps: torch.Tensor,
    sample: torch.Tensor,
    alpha_prod_t: float,
    alpha_prod_prev: float,
    eta: float = 1.0,
    noise: torch.Tensor | None = None,
    prev_sample: torch.Tensor | None = None,
    reduction: LogProbReduction = "mean",
) -> DDIMStep:
    """One DDIM step x_t -> x_{t-1} with log pi(x_{t-1} | x_t, c).

    Give ``prev_sample`` to score a known x_{t-1} (training), else ``noise`` z draws it. ``eps`` is the
    (guided) noise prediction at (x_t, t). Needs sigma_t > 0 for a density.
    """
    if eta <= 0:
        raise ValueError("eta must be > 0 for a stochastic policy with a log-probability (use eta=1.0)")
    mean, sigma, x0_hat = ddim_mean(eps, sample, alpha_prod_t, alpha_prod_prev, eta)
    if prev_sample is None:
        if noise is None:
            raise ValueError("give the noise z that draws x_{t-1}, or prev_sample to score a known one")
        prev_sample = mean + sigma * noise
    log_prob = gaussian_log_prob(prev_sample, mean, sigma, reduction)
    return DDIMStep(prev_sample, mean, sigma, x0_hat, log_prob)
