"""PickScore (Kirstain et al., 2023): a CLIP-H fine-tuned on Pick-a-Pic; score = exp(logit_scale) * cos(image, text).

Sources relied on (read through the code search index; no browsing): the PickScore README / the
``yuvalkirstain/PickScore_v1`` model card: ``AutoModel.from_pretrained("yuvalkirstain/PickScore_v1")`` (a
transformers CLIPModel), processor ``laion/CLIP-ViT-H-14-laion2B-s32B-b79K`` (padding, truncation,
max_length 77), embeddings divided by their norm, ``scores = model.logit_scale.exp() * (text_embs @
image_embs.T)``. The scale is the checkpoint's own logit_scale (about 100); some forks divide by 26 instead,
which changes the reward's scale, so we do not.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import CLIPModel, CLIPTokenizer

from tailorpo.rewards.base import TorchReward, upcast
from tailorpo.rewards.clip import clip_features, load_hf_clip, tiny_clip_config, tiny_clip_tokenizer
from tailorpo.rewards.preprocess import clip_preprocess
from tailorpo.rewards.weights import resolve_file, seeded

DEFAULT_WEIGHTS = "yuvalkirstain/PickScore_v1"
PROCESSOR_ID = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"
MAX_LENGTH = 77


class PickScoreReward(TorchReward):
    name = "pickscore"
    image_size = 224

    def __init__(self, model: CLIPModel, tokenizer: CLIPTokenizer, model_id: str, device: str = "cpu"):
        self.model = model.to(device).eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.model_id = model_id
        self.device = torch.device(device)

    def forward(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        pixels = clip_preprocess(images.to(self.device), self.image_size).to(self.model.dtype)
        tokens = self.tokenizer(
            list(prompts), padding=True, truncation=True, max_length=MAX_LENGTH, return_tensors="pt"
        )
        image = clip_features(self.model.get_image_features(pixel_values=pixels))
        text = clip_features(
            self.model.get_text_features(
                input_ids=tokens["input_ids"].to(self.device), attention_mask=tokens["attention_mask"].to(self.device)
            )
        )
        return upcast(self.model.logit_scale).exp() * F.cosine_similarity(upcast(image), upcast(text), dim=-1)


def load(weights: str | None, tiny: bool, device: str = "cpu", tokenizer: str = PROCESSOR_ID) -> PickScoreReward:
    """``tiny``: same classes, seeded random weights, CLIP BPE built locally (``weights`` and ``tokenizer``
    ignored). Otherwise a hub id or local folder in transformers format (default PickScore_v1), checked strictly,
    with the tokenizer of ``tokenizer``: a hub id or local folder (default laion/CLIP-ViT-H-14-laion2B-s32B-b79K,
    the one PickScore was trained with)."""
    if tiny:
        model = seeded(lambda: CLIPModel(tiny_clip_config(32)))
        return PickScoreReward(model, tiny_clip_tokenizer(), "tiny", device)
    source = weights or DEFAULT_WEIGHTS
    resolve_file(source, ("config.json",))  # first: a bad path fails before the tokenizer download
    return PickScoreReward(load_hf_clip(source, device), CLIPTokenizer.from_pretrained(tokenizer), source, device)
