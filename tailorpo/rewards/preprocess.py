"""Reward models' image preprocessing written as differentiable tensor ops, so d score / d pixels exists.

The originals resize the shorter side (bicubic), center-crop and normalise with CLIP's mean and std; PIL
does it on uint8 images, we do it on float tensors in [0, 1] with antialiasing, which matches to within
the uint8 rounding the originals add.
"""

from __future__ import annotations

import torch

from tailorpo.rewards.images import resize_and_center_crop

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def normalize(images: torch.Tensor, mean: tuple[float, ...] = CLIP_MEAN, std: tuple[float, ...] = CLIP_STD):
    mean_t = torch.tensor(mean, device=images.device, dtype=images.dtype).view(1, -1, 1, 1)
    std_t = torch.tensor(std, device=images.device, dtype=images.dtype).view(1, -1, 1, 1)
    return (images - mean_t) / std_t


def clip_preprocess(images: torch.Tensor, size: int = 224) -> torch.Tensor:
    """CLIP's transform (resize bicubic, center crop, normalise) on [0, 1] tensors."""
    return normalize(resize_and_center_crop(images, size))
