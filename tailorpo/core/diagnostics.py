"""Per-step diagnostics of a step-wise preference run: how far the LoRA moves the policy's DDIM mean, whether it
moves it up the step reward, and how often the DPO ratio clamp cuts a pair's gradient.

Pure functions on tensors; the learner applies them per fine-tuned step to what its DPO forward passes already
computed, so they cost no UNet call (the reward gradient for ``row_cosine`` is the caller's, and optional).
"""

from __future__ import annotations

import torch

from tailorpo.core.objectives import log_ratio_bounds


def mean_shift_in_sigma(mean: torch.Tensor, ref_mean: torch.Tensor, sigma: float) -> torch.Tensor:
    """(B,) RMS over the non-batch dims of (mu_theta(x_t) - mu_ref(x_t)) / sigma_t: the adapter's move of the
    DDIM mean in units of the step's own noise. Sibling children lie about sqrt(2) apart in these units, so a
    shift far below 1 leaves the step's samples, and its preference pairs, nearly as the base model draws them."""
    return ((mean - ref_mean) / sigma).flatten(1).pow(2).mean(dim=1).sqrt()


def row_cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(B,) cosine between row i of ``a`` and row i of ``b`` (each flattened), 0 where either row is zero (a fresh
    LoRA has no direction). In float64, so that tiny shifts after a first small update do not underflow."""
    a, b = a.flatten(1).double(), b.flatten(1).double()
    norms = a.norm(dim=1) * b.norm(dim=1)
    return torch.where(norms > 0, (a * b).sum(dim=1) / norms, torch.zeros_like(norms))


def clamp_fraction(log_ratio_w: torch.Tensor, log_ratio_l: torch.Tensor, ratio_clip: float | None) -> float:
    """Share of pairs with the ratio pi/pi_ref of the winner or of the loser (given as logs) outside
    [1 - c, 1 + c], where ``objectives.dpo_logits`` clamps it and that side passes no gradient (D3PO's clamp,
    Yang et al., arXiv 2311.13231); 0 without a clip. A share near 1 means the clip, not the loss, sets the step."""
    if ratio_clip is None:
        return 0.0
    low, high = log_ratio_bounds(ratio_clip)
    clamped = [(r < low) | (r > high) for r in (log_ratio_w, log_ratio_l)]
    return float((clamped[0] | clamped[1]).float().mean())
