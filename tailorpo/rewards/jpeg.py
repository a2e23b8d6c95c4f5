"""JPEG compressibility, DDPO's definition: minus the JPEG size in kB at quality 95. Not differentiable."""

from __future__ import annotations

import io

import torch
from PIL import Image

from tailorpo.rewards.base import RewardModel, RewardOutput


def to_uint8_hwc(images: torch.Tensor) -> torch.Tensor:
    """(N, 3, H, W) in [0, 1] -> (N, H, W, 3) uint8, rounding as PIL-based pipelines do."""
    return (images * 255).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu()


def jpeg_size_kb(image_hwc: torch.Tensor, quality: int = 95) -> float:
    buffer = io.BytesIO()
    Image.fromarray(image_hwc.numpy()).save(buffer, format="JPEG", quality=quality)
    return buffer.tell() / 1000


class JpegCompressibility(RewardModel):
    name = "jpeg"
    differentiable = False

    def __init__(self, quality: int = 95) -> None:
        self.quality = quality

    def _score(self, images: torch.Tensor, prompts: list[str], want_grad: bool) -> RewardOutput:
        sizes = [jpeg_size_kb(img, self.quality) for img in to_uint8_hwc(images)]
        return RewardOutput(-torch.tensor(sizes, dtype=torch.float32))
