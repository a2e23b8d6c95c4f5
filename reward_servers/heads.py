"""The score head that the LAION aesthetic predictor and ImageReward share."""

from __future__ import annotations

import torch
from torch import nn


class ScoreHead(nn.Module):
    """Linear 768-1024, Dropout .2, Linear 1024-128, Dropout .2, Linear 128-64, Dropout .1, Linear 64-16,
    Linear 16-1: affine in eval (no activations), keys ``layers.{0,2,4,6,7}`` as in both published
    checkpoints (improved-aesthetic-predictor ``simple_inference.py``; ImageReward ``ImageReward.py``)."""

    def __init__(self, input_size: int = 768):
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(input_size, 1024), nn.Dropout(0.2),
            nn.Linear(1024, 128), nn.Dropout(0.2),
            nn.Linear(128, 64), nn.Dropout(0.1),
            nn.Linear(64, 16),
            nn.Linear(16, 1),
        )

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.layers(features)
