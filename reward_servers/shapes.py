"""The tiny-shapes prompt-match reward: how well an image shows its caption ("a red circle on the left"), by a
small CNN trained on ``tailorpo.shapes``' images by the same script as the tiny-shapes model
(``tailorpo train-tiny-shapes``, ``tailorpo/tiny_shapes.py``).

score = log p(color | image) + log p(shape | image) + log p(position | image) for the prompt's three
attributes: 0 when the classifier is sure the image matches, log(1/90) = -4.5 at chance, differentiable in
the pixels (TailorPO-G's guidance). A prompt outside the caption grammar is bad input, not a low score.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from reward_servers.checkpoints import load_checked, read_checkpoint, resolve_file, seeded
from tailorpo.prompts import SHAPE_COLORS, SHAPE_KINDS, SHAPE_POSITIONS
from tailorpo.rewards.base import RewardInputError, TorchReward
from tailorpo.rewards.images import resize_and_center_crop
from tailorpo.shapes import IMAGE_SIZE, SHAPES_MODEL_DIR, scenes_of

DEFAULT_WEIGHTS = str(SHAPES_MODEL_DIR)
WEIGHT_FILES = ("classifier/model.safetensors", "model.safetensors")  # in a tiny-shapes folder, or alone
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


class ShapeMatchReward(TorchReward):
    name = "shapes"
    image_size = IMAGE_SIZE

    def __init__(self, classifier: ShapeClassifier, model_id: str, device: str = "cpu"):
        self.classifier = classifier.to(device).eval().requires_grad_(False)
        self.model_id = model_id
        self.device = torch.device(device)

    def check_prompts(self, prompts: list[str]) -> None:
        try:
            scenes_of(prompts)
        except KeyError as err:
            raise RewardInputError(err.args[0]) from None

    def forward(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        pixels = resize_and_center_crop(images.to(self.device), self.image_size)
        scenes = scenes_of(prompts).to(self.device)
        return attribute_log_probs(self.classifier(pixels), scenes).sum(dim=1)


def load_classifier(weights: str) -> ShapeClassifier:
    """The classifier from its safetensors file, or a folder holding ``classifier/model.safetensors``."""
    path = resolve_file(weights, WEIGHT_FILES)
    return load_checked(ShapeClassifier(), read_checkpoint(path), str(path))


def load(weights: str | None, tiny: bool, device: str = "cpu") -> ShapeMatchReward:
    """``tiny``: seeded random weights (``weights`` ignored). Otherwise ``weights`` (default: the classifier
    shipped with the tiny-shapes model in ``tailorpo/assets/tiny-shapes``)."""
    if tiny:
        return ShapeMatchReward(seeded(ShapeClassifier), "tiny", device)
    source = weights or DEFAULT_WEIGHTS
    return ShapeMatchReward(load_classifier(source), source, device)
