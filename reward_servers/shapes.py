"""The tiny-shapes prompt-match reward: how well an image shows its caption ("a red circle on the left"), by a
small CNN trained on ``tailorpo.tiny.shapes``' images by the same script as the tiny-shapes model
(``tailorpo train-tiny-shapes``, ``tailorpo/tiny/shapes_training.py``).

score = log p(color | image) + log p(shape | image) + log p(position | image) for the prompt's three
attributes: 0 when the classifier is sure the image matches, log(1/90) = -4.5 at chance, differentiable in
the pixels (TailorPO-G's guidance). A prompt outside the caption grammar is bad input, not a low score.
"""

from __future__ import annotations

import torch

from tailorpo.rewards.base import RewardInputError, TorchReward, upcast
from tailorpo.rewards.images import resize_and_center_crop
from tailorpo.rewards.weights import load_checked, read_checkpoint, resolve_file, seeded
from tailorpo.tiny.shape_classifier import ShapeClassifier, attribute_log_probs
from tailorpo.tiny.shapes import IMAGE_SIZE, SHAPES_MODEL_DIR, scenes_of

DEFAULT_WEIGHTS = str(SHAPES_MODEL_DIR)
WEIGHT_FILES = ("classifier/model.safetensors", "model.safetensors")  # in a tiny-shapes folder, or alone
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
        dtype = next(self.classifier.parameters()).dtype
        pixels = resize_and_center_crop(images.to(self.device), self.image_size).to(dtype)
        scenes = scenes_of(prompts).to(self.device)
        return attribute_log_probs(upcast(self.classifier(pixels)), scenes).sum(dim=1)


def load_classifier(weights: str) -> ShapeClassifier:
    """The classifier from its safetensors file, or a folder holding ``classifier/model.safetensors``."""
    path = resolve_file(weights, WEIGHT_FILES)
    return load_checked(ShapeClassifier(), read_checkpoint(path), str(path))


def load(weights: str | None, tiny: bool, device: str = "cpu") -> ShapeMatchReward:
    """``tiny``: seeded random weights (``weights`` ignored). Otherwise ``weights`` (default: the classifier
    shipped with the tiny-shapes model in ``tailorpo/tiny/assets/tiny-shapes``)."""
    if tiny:
        return ShapeMatchReward(seeded(ShapeClassifier), "tiny", device)
    source = weights or DEFAULT_WEIGHTS
    return ShapeMatchReward(load_classifier(source), source, device)
