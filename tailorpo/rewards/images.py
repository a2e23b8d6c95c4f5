"""Differentiable image resizing shared by reward clients (send the server's native size) and servers."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def resize_and_center_crop(images: torch.Tensor, size: int, mode: str = "bicubic") -> torch.Tensor:
    """(N, 3, H, W) -> (N, 3, size, size): shorter side to ``size`` (antialiased), then a center crop, as
    the reward models' own transforms do. The identity when the images already have that size."""
    height, width = images.shape[-2:]
    if (height, width) == (size, size):
        return images
    scale = size / min(height, width)
    new_h, new_w = max(size, round(height * scale)), max(size, round(width * scale))
    resized = F.interpolate(images, size=(new_h, new_w), mode=mode, antialias=True, align_corners=False)
    top, left = (new_h - size) // 2, (new_w - size) // 2
    return resized[..., top : top + size, left : left + size]
