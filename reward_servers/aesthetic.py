"""LAION's improved aesthetic predictor, as DDPO and D3PO use it: an MLP on the L2-normalised CLIP ViT-L/14 image
embedding. The prompt is ignored.

Sources relied on (read through the code search index; no browsing):
- christophschuhmann/improved-aesthetic-predictor ``simple_inference.py``: ``MLP(768)`` = ``layers`` Sequential
  Linear 768-1024, Dropout .2, Linear 1024-128, Dropout .2, Linear 128-64, Dropout .1, Linear 64-16, Linear 16-1
  (no activations; keys ``layers.{0,2,4,6,7}``), a plain state dict read with ``torch.load``; the input is
  ``normalized(clip_model.encode_image(preprocess(image)))`` (L2 norm) from ``clip.load("ViT-L/14")``.
- huggingface/trl's DDPO aesthetic scorer: the same MLP from hub repo ``trl-lib/ddpo-aesthetic-predictor``
  file ``aesthetic-model.pth``, on transformers' ``openai/clip-vit-large-patch14`` ``get_image_features``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import CLIPModel

from reward_servers.heads import ScoreHead
from tailorpo.rewards.base import TorchReward, upcast
from tailorpo.rewards.clip import clip_features, load_hf_clip, tiny_clip_config
from tailorpo.rewards.preprocess import clip_preprocess
from tailorpo.rewards.weights import load_checked, read_checkpoint, resolve_file, seeded

CLIP_ID = "openai/clip-vit-large-patch14"
DEFAULT_WEIGHTS = "trl-lib/ddpo-aesthetic-predictor"
HEAD_FILES = ("aesthetic-model.pth", "sac+logos+ava1-l14-linearMSE.pth")


class AestheticReward(TorchReward):
    name = "aesthetic"
    image_size = 224
    float32_parts = ("mlp",)

    def __init__(self, clip: CLIPModel, mlp: ScoreHead, model_id: str, device: str = "cpu"):
        self.clip = clip.to(device).eval().requires_grad_(False)
        self.mlp = mlp.to(device).eval().requires_grad_(False)
        self.model_id = model_id
        self.device = torch.device(device)

    def forward(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        pixels = clip_preprocess(images.to(self.device), self.image_size).to(self.clip.dtype)
        embedding = clip_features(self.clip.get_image_features(pixel_values=pixels))
        return self.mlp(F.normalize(upcast(embedding), dim=-1)).squeeze(-1)


def load_head(weights: str) -> ScoreHead:
    """The MLP from a .pth / .safetensors file, a folder, or a hub repo (``aesthetic-model.pth``)."""
    path = resolve_file(weights, HEAD_FILES)
    return load_checked(ScoreHead(768), read_checkpoint(path), str(path))


def load(weights: str | None, tiny: bool, device: str = "cpu", clip: str = CLIP_ID) -> AestheticReward:
    """``tiny``: same classes, seeded random weights (``weights`` and ``clip`` ignored). Otherwise the MLP from
    ``weights`` (default: trl-lib's hub copy of sac+logos+ava1-l14-linearMSE.pth) on the CLIP ViT-L/14 of
    ``clip``: a hub id or a local folder in transformers' format (default openai/clip-vit-large-patch14)."""
    if tiny:
        clip_model, mlp = seeded(lambda: (CLIPModel(tiny_clip_config(768)), ScoreHead(768)))
        return AestheticReward(clip_model, mlp, "tiny", device)
    mlp = load_head(weights or DEFAULT_WEIGHTS)  # first: a bad path fails before the 1.7 GB CLIP loads
    return AestheticReward(load_hf_clip(clip, device), mlp, weights or DEFAULT_WEIGHTS, device)
