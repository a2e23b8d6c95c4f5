"""The tiny-shapes classifier network: image -> color, shape and position logits (the ``shapes`` reward's model).

It lives with the tiny models because ``tailorpo train-tiny-shapes`` trains it beside the tiny-shapes pipeline;
``reward_servers.shapes`` serves it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from tailorpo.prompts import SHAPE_COLORS, SHAPE_KINDS, SHAPE_POSITIONS

HEADS = (len(SHAPE_COLORS), len(SHAPE_KINDS), len(SHAPE_POSITIONS))


class ShapeClassifier(nn.Module):
    """32x32 image in [0, 1] -> logits of color, shape and position (N, 6 + 3 + 5). Strided convolutions and
    SiLU rather than max-pooling and ReLU, so d score / d pixels is smooth enough to guide by."""

    def __init__(self, width: int = 32):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, width, 3, padding=1), nn.SiLU(),
            nn.Conv2d(width, width, 3, stride=2, padding=1), nn.SiLU(),  # 16x16
            nn.Conv2d(width, 2 * width, 3, stride=2, padding=1), nn.SiLU(),  # 8x8
            nn.Conv2d(2 * width, 2 * width, 3, stride=2, padding=1), nn.SiLU(),  # 4x4
            nn.Flatten(),
            nn.Linear(2 * width * 16, 4 * width), nn.SiLU(),
            nn.Linear(4 * width, sum(HEADS)),
        )

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.features(images * 2 - 1)


def attribute_log_probs(logits: torch.Tensor, scenes: torch.Tensor) -> torch.Tensor:
    """(N, 6 + 3 + 5) logits, (N, 3) scenes -> (N, 3) log p of each scene attribute under its own softmax."""
    heads = logits.split(HEADS, dim=1)
    return torch.stack(
        [F.log_softmax(head, dim=1).gather(1, scenes[:, i : i + 1])[:, 0] for i, head in enumerate(heads)], dim=1
    )
