"""Colorfulness (Hasler and Suesstrunk, 2003): a cheap, differentiable, prompt-independent reward.

M = sqrt(std(rg)^2 + std(yb)^2) + 0.3 * sqrt(mean(rg)^2 + mean(yb)^2), rg = R - G, yb = (R + G)/2 - B, on the
0..255 pixel scale of the original metric. It serves tests and CPU runs of TailorPO-G where no learned reward
model can be downloaded.
"""

from __future__ import annotations

import torch

from tailorpo.rewards.base import TorchReward


def colorfulness(images: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """(N, 3, H, W) in [0, 1] -> (N,) colorfulness on the 0..255 scale."""
    r, g, b = (images * 255).unbind(dim=1)
    rg = (r - g).flatten(1)
    yb = (0.5 * (r + g) - b).flatten(1)
    std_term = torch.sqrt(rg.var(dim=1, unbiased=False) + yb.var(dim=1, unbiased=False) + eps)
    mean_term = torch.sqrt(rg.mean(dim=1) ** 2 + yb.mean(dim=1) ** 2 + eps)
    return std_term + 0.3 * mean_term


class Colorfulness(TorchReward):
    name = "colorfulness"

    def forward(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        return colorfulness(images)
