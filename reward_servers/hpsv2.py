"""HPS v2 / v2.1 (Wu et al., 2023): open_clip ViT-H-14 fine-tuned on HPD v2; score = 100 * cos(image, text).

Sources relied on (read through the code search index; no browsing):
- tgxs002/HPSv2 ``hpsv2/img_score.py``: ``create_model_and_transforms('ViT-H-14', ...)``, ``checkpoint =
  torch.load(cp)``, ``model.load_state_dict(checkpoint['state_dict'])`` (strict), ``get_tokenizer('ViT-H-14')``,
  score = ``diagonal(image_features @ text_features.T)`` with the model's normalised features (a raw cosine);
  hub files ``xswu/HPSv2`` / ``HPS_v2_compressed.pt`` (v2.0) and ``HPS_v2.1_compressed.pt`` (v2.1), from
  ``hpsv2/utils.py`` ``hps_version_map``. v2.0 and v2.1 scores are not comparable.
- ``hpsv2/evaluation.py`` reports ``np.mean(...) * 100``: the x100 scale of HPSv2's benchmark table and of the
  TailorPO paper (SD v1.5 about 25.8 there), so this reward returns 100 * cos.
- HPS's ``preprocess_val`` resizes the longer side to 224 (bicubic) and pads to square with black
  (``ResizeMaxSize``, fill 0) before CLIP's normalisation; ``hps_preprocess`` does that on tensors. For square
  images it equals ``clip_preprocess``.
Upstream open_clip_torch builds the same ``ViT-H-14`` as HPS's vendored fork, so the checkpoint loads into it.
"""

from __future__ import annotations

from collections.abc import Callable

import open_clip
import torch
import torch.nn.functional as F

from tailorpo.rewards.base import TorchReward, upcast
from tailorpo.rewards.preprocess import normalize
from tailorpo.rewards.weights import check_state_dict, read_checkpoint, resolve_file, seeded

HUB_REPO = "xswu/HPSv2"
VERSION_FILES = {"v2.0": "HPS_v2_compressed.pt", "v2.1": "HPS_v2.1_compressed.pt"}
SCORE_SCALE = 100.0


def hps_preprocess(images: torch.Tensor, size: int = 224) -> torch.Tensor:
    """ResizeMaxSize(size, fill=0) + CLIP normalisation, differentiable: longer side to ``size``, then pad the
    shorter one symmetrically (left/top get the floor half) with zeros before normalising."""
    height, width = images.shape[-2:]
    scale = size / max(height, width)
    new_h, new_w = round(height * scale), round(width * scale)
    if (new_h, new_w) != (height, width):
        images = F.interpolate(images, size=(new_h, new_w), mode="bicubic", antialias=True, align_corners=False)
    pad_h, pad_w = size - new_h, size - new_w
    images = F.pad(images, (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2))
    return normalize(images)


class HPSv2Reward(TorchReward):
    name = "hpsv2"
    image_size = 224

    def __init__(
        self, model: open_clip.CLIP, tokenizer: Callable[[list[str]], torch.Tensor], model_id: str, device: str = "cpu"
    ):
        self.model = model.to(device).eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.model_id = model_id
        self.device = torch.device(device)

    def forward(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        dtype = next(self.model.parameters()).dtype
        pixels = hps_preprocess(images.to(self.device), self.image_size).to(dtype)
        image = upcast(self.model.encode_image(pixels))  # the cosine in float32 whatever the weights' dtype
        text = upcast(self.model.encode_text(self.tokenizer(list(prompts)).to(self.device)))
        return SCORE_SCALE * F.cosine_similarity(image, text, dim=-1)


def build_vit_h_14(device: str = "cpu") -> open_clip.CLIP:
    """The architecture HPS fine-tunes, without weights (``device='meta'`` allocates nothing)."""
    with torch.device(device):
        return open_clip.create_model("ViT-H-14", pretrained=None, device=device)


def checked_state_dict(checkpoint: dict, model: torch.nn.Module, source: str) -> dict[str, torch.Tensor]:
    """The checkpoint's ``state_dict`` entry (or the dict itself, for a bare state dict), checked strictly."""
    state = checkpoint.get("state_dict", checkpoint)
    check_state_dict(state, model.state_dict(), source)
    return state


def _tiny_model() -> open_clip.CLIP:
    """Same CLIP class as ViT-H-14 (no custom text tower), small widths, 224 px input."""
    vision = open_clip.model.CLIPVisionCfg(image_size=224, layers=2, width=32, head_width=16, patch_size=32)
    text = open_clip.model.CLIPTextCfg(context_length=77, vocab_size=49408, width=32, heads=2, layers=2)
    return open_clip.CLIP(embed_dim=32, vision_cfg=vision, text_cfg=text)


def load(weights: str | None, tiny: bool, device: str = "cpu") -> HPSv2Reward:
    """``tiny``: same classes, seeded random weights (``weights`` ignored). Otherwise ``weights`` is a local
    ``HPS_v2*.pt``, a folder or hub repo holding ``HPS_v2_compressed.pt``, or ``"v2.0"`` / ``"v2.1"`` for that
    file from xswu/HPSv2; None means v2.0 (the hpsv2 package's default)."""
    tokenizer = open_clip.get_tokenizer("ViT-H-14")  # open_clip's shipped BPE; no download
    if tiny:
        return HPSv2Reward(seeded(_tiny_model), tokenizer, "tiny", device)
    weights = weights or "v2.0"
    if weights in VERSION_FILES:
        path, model_id = resolve_file(HUB_REPO, (VERSION_FILES[weights],)), f"{HUB_REPO}/{VERSION_FILES[weights]}"
    else:
        path, model_id = resolve_file(weights, tuple(VERSION_FILES.values())), weights
    checkpoint = read_checkpoint(path)  # before building: a bad file fails without the 4 GB model
    model = build_vit_h_14(device)
    model.load_state_dict(checked_state_dict(checkpoint, model, str(path)), strict=True)
    return HPSv2Reward(model, tokenizer, model_id, device)
