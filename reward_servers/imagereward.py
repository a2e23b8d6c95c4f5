"""ImageReward (Xu et al., 2023; THUDM/ImageReward) rebuilt on transformers' BLIP classes.

PyPI's ``image-reward`` pins timm==0.6.13 and imports a ``clip`` module we do not have, so we rebuild the same
network and load the published ``ImageReward.pt`` state dict with a key rename and a strict key/shape check.
Sources checked (via the code search index):
- THUDM/ImageReward ``ImageReward/ImageReward.py``: ``score()`` tokenises with padding="max_length",
  truncation, max_length=35 and passes ``text_input.input_ids`` unchanged (the first token stays [CLS]; the
  [ENC] swap of BLIP's ITM head is *not* done), calls ``blip.text_encoder(..., encoder_hidden_states=
  image_embeds, encoder_attention_mask=ones)`` in its default bidirectional mode, takes
  ``last_hidden_state[:, 0]`` into ``MLP(768)`` = Linear 768-1024, Dropout .2, Linear 1024-128, Dropout .2,
  Linear 128-64, Dropout .1, Linear 64-16, Linear 16-1 (keys ``mlp.layers.{0,2,4,6,7}``), then
  ``(raw - 0.16717362830052426) / 1.0333394966054072``; preprocessing is CLIP's (bicubic 224, center crop).
- THUDM/ImageReward ``ImageReward/utils.py``: ``load`` reads a plain state dict (``torch.load``) into
  ``ImageReward``, so its keys are ``blip.*`` and ``mlp.*``; DonneyF/ImageReward
  ``ImageReward/models/BLIP/blip_pretrain.py`` (the packaged BLIP_Pretrain): ``blip`` holds ``visual_encoder``
  (ViT-L/16, 224), ``text_encoder`` (BertModel, add_pooling_layer=False) and the unused ``vision_proj`` /
  ``text_proj``; THUDM ``train/src/models/blip.py`` ``init_tokenizer``: bert-base-uncased + bos [DEC] +
  additional [ENC] (30524 ids).
- salesforce/BLIP ``models/vit.py``: fused qkv Linear with bias, pre-norm blocks, LayerNorm eps 1e-6, exact
  GELU, ``norm`` after the last block; THUDM ``train/src/models/med.py``: BERT embeddings without
  token types, ``position_ids`` as a persistent buffer, cross-attention keys/values from ``encoder_width``
  (1024) inputs, bidirectional self-attention unless ``is_decoder``; BLIP's med_config.json (utils.py fetches
  THUDM's copy from the hub, unreadable here; BLIP's, quoted in several reimplementations): 12 heads, eps
  1e-12, gelu, vocab 30524. A full-size fake checkpoint gave the same score as a plain-torch re-implementation
  of vit.py + med.py on the original keys (|diff| < 2e-7).
- huggingface/transformers ``models/blip/convert_blip_original_pytorch_to_hf.py`` ``rename_key`` (not
  shipped in the wheel): the BLIP -> transformers renames used in ``_VISION_RENAMES``.
Installed transformers 5.x: ``BlipAttention`` keeps the fused ``qkv`` with BLIP's (3, heads, head_dim) split;
``BlipTextLayer`` creates ``crossattention`` only when ``config.is_decoder``; ``BlipTextModel.forward`` picks
a causal mask only for its ``is_decoder`` *argument* (default False), so we pass ``is_decoder=False``.
"""

from __future__ import annotations

import re
import tempfile
from pathlib import Path

import torch
from torch import nn
from transformers import BertTokenizer, BlipTextConfig, BlipTextModel, BlipVisionConfig, BlipVisionModel

from reward_servers.heads import ScoreHead
from tailorpo.rewards.base import TorchReward
from tailorpo.rewards.preprocess import clip_preprocess
from tailorpo.rewards.weights import load_checked, read_checkpoint, resolve_file, seeded

SCORE_MEAN = 0.16717362830052426
SCORE_STD = 1.0333394966054072
MAX_LENGTH = 35
DEFAULT_WEIGHTS = "THUDM/ImageReward"
WEIGHTS_FILE = "ImageReward.pt"
DEFAULT_TOKENIZER = "bert-base-uncased"

# Checkpoint entries the score never reads: BLIP's contrastive projections (frozen during ImageReward training,
# train/src/ImageReward.py) and med.py's position_ids buffer (non-persistent in transformers).
_DROPPED = {
    "blip.vision_proj.weight",
    "blip.vision_proj.bias",
    "blip.text_proj.weight",
    "blip.text_proj.bias",
    "blip.text_encoder.embeddings.position_ids",
}
# transformers' convert_blip_original_pytorch_to_hf.py rename_key, in its order, for the visual encoder keys
# (text keys already use the BERT names BlipTextModel keeps).
_VISION_RENAMES = [
    (r"^visual_encoder", "vision_model.encoder"),
    (r"blocks", "layers"),
    (r"attn", "self_attn"),
    (r"norm1", "layer_norm1"),
    (r"norm2", "layer_norm2"),
    (r"encoder\.norm", "post_layernorm"),
    (r"encoder\.patch_embed\.proj", "embeddings.patch_embedding"),
    (r"encoder\.pos_embed", "embeddings.position_embedding"),
    (r"encoder\.cls_token", "embeddings.class_embedding"),
    (r"self_attn\.proj", "self_attn.projection"),
]

_TINY_WORDS = ["a", "an", "the", "of", "in", "on", "at", "with", "and", "or", "to", "by", "for", "from", "under", "over", "near", "photo", "painting", "picture", "image", "drawing", "portrait", "landscape", "city", "street", "house", "room", "forest", "mountain", "river", "sea", "beach", "sky", "sun", "moon", "night", "day", "cat", "dog", "horse", "bird", "fish", "tree", "flower", "car", "boat", "man", "woman", "child", "people", "robot", "dragon", "castle", "red", "blue", "green", "yellow", "black", "white", "orange", "purple", "small", "big", "old", "young", "beautiful", "detailed", "realistic", "cute", "happy", "dark", "bright", "is", "sitting", "standing", "running", "flying", "riding", "holding", "wearing", "hat"]  # noqa: E501


def _full_configs() -> tuple[BlipVisionConfig, BlipTextConfig]:
    """ImageReward's BLIP-L: ViT-L/16 at 224 (blip.py create_vit 'large') and med_config.json's BERT-base."""
    vision = BlipVisionConfig(
        hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
        image_size=224, patch_size=16, layer_norm_eps=1e-6, hidden_act="gelu",
    )
    text = BlipTextConfig(
        vocab_size=30524, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
        max_position_embeddings=512, encoder_hidden_size=1024, layer_norm_eps=1e-12, hidden_act="gelu",
        pad_token_id=0, is_decoder=True,  # is_decoder only makes the cross-attention layers exist
    )
    return vision, text


def _tiny_configs(tok: BertTokenizer) -> tuple[BlipVisionConfig, BlipTextConfig]:
    """Same classes, small widths; 224/16 keeps the real preprocessing path. Wider random inits than the
    defaults (vision 1e-10, text 0.02) so the tiny score visibly depends on the pixels and the prompt."""
    vision = BlipVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        image_size=224, patch_size=16, layer_norm_eps=1e-6, hidden_act="gelu", initializer_range=0.1,
    )
    text = BlipTextConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=64, encoder_hidden_size=32, layer_norm_eps=1e-12, hidden_act="gelu",
        pad_token_id=0, bos_token_id=tok.bos_token_id, eos_token_id=tok.sep_token_id, is_decoder=True,
        initializer_range=0.3,
    )
    return vision, text


class ImageRewardNet(nn.Module):
    """BLIP image encoder + image-grounded text encoder + MLP; attribute names match the converted keys."""

    def __init__(self, vision: BlipVisionConfig, text: BlipTextConfig):
        super().__init__()
        self.vision_model = BlipVisionModel(vision)
        self.text_encoder = BlipTextModel(text, add_pooling_layer=False)
        self.mlp = ScoreHead(text.hidden_size)  # default Linear init: std 1/769 would leave a tiny model flat

    def text_features(
        self, pixel_values: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> torch.Tensor:
        """The [CLS] feature of the text encoder cross-attending to all image tokens, bidirectionally."""
        image_embeds = self.vision_model(pixel_values=pixel_values).last_hidden_state
        image_atts = torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=image_embeds.device)
        out = self.text_encoder(
            input_ids=input_ids, attention_mask=attention_mask, encoder_hidden_states=image_embeds,
            encoder_attention_mask=image_atts, is_decoder=False,
        )
        return out.last_hidden_state[:, 0, :]

    def forward(self, pixel_values: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor):
        """Raw (unnormalised) reward, (N,)."""
        features = self.text_features(pixel_values, input_ids, attention_mask)
        return self.mlp(features.to(next(self.mlp.parameters()).dtype)).squeeze(-1)  # a float32 head: cast()


class ImageRewardModel(TorchReward):
    name = "imagereward"
    image_size = 224
    float32_parts = ("net.mlp",)

    def __init__(self, net: ImageRewardNet, tokenizer: BertTokenizer, model_id: str, device: str = "cpu"):
        self.net = net.to(device).eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.model_id = model_id
        self.device = torch.device(device)

    def tokenize(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        """ImageReward.score's tokenisation: [CLS] ... [SEP] [PAD]..., exactly MAX_LENGTH ids."""
        tokens = self.tokenizer(
            list(prompts), padding="max_length", truncation=True, max_length=MAX_LENGTH, return_tensors="pt"
        )
        return {key: tokens[key].to(self.device) for key in ("input_ids", "attention_mask")}

    def forward(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        dtype = next(self.net.parameters()).dtype
        pixels = clip_preprocess(images.to(self.device), self.image_size).to(dtype)
        raw = self.net(pixels, **self.tokenize(prompts))
        return (raw - SCORE_MEAN) / SCORE_STD


def convert_imagereward_state_dict(original: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``ImageReward.pt`` keys -> ``ImageRewardNet`` keys: drop ``blip.``, rename the ViT keys as transformers'
    BLIP conversion does, keep ``text_encoder.*`` and ``mlp.layers.*``, drop the entries the score never
    reads. Anything else passes through unchanged so the strict check reports it."""
    converted = {}
    for key, value in original.items():
        if key in _DROPPED:
            continue
        new = key.removeprefix("blip.")
        if new.startswith("visual_encoder"):
            for pattern, replacement in _VISION_RENAMES:
                new = re.sub(pattern, replacement, new)
        converted[new] = value
    return converted


def build_tokenizer(name_or_path: str) -> BertTokenizer:
    """BLIP's init_tokenizer: a BERT tokenizer plus bos [DEC] and additional special token [ENC]."""
    tokenizer = BertTokenizer.from_pretrained(name_or_path)
    tokenizer.add_special_tokens({"bos_token": "[DEC]"})
    tokenizer.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
    return tokenizer


def _tiny_tokenizer() -> BertTokenizer:
    """A few hundred lowercase words and single-letter wordpieces, so any ASCII prompt tokenises."""
    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)]
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *letters, *(f"##{c}" for c in letters)]
    vocab += [*"0123456789.,!?'-", *(w for w in _TINY_WORDS if w not in letters)]
    with tempfile.TemporaryDirectory() as directory:
        Path(directory, "vocab.txt").write_text("\n".join(dict.fromkeys(vocab)) + "\n")
        return build_tokenizer(directory)


def load(weights: str | None, tiny: bool, device: str = "cpu", tokenizer: str | None = None) -> ImageRewardModel:
    """The reward server's entry point. ``tiny`` builds a seeded random network with the same classes (for
    tests and CPU runs; ``weights``/``tokenizer`` are ignored); otherwise load ``ImageReward.pt`` strictly."""
    if tiny:
        tok = _tiny_tokenizer()
        net = seeded(lambda: ImageRewardNet(*_tiny_configs(tok)))
        return ImageRewardModel(net, tok, "tiny-imagereward", device)

    path = resolve_file(weights or DEFAULT_WEIGHTS, (WEIGHTS_FILE,))
    state = convert_imagereward_state_dict(read_checkpoint(path))
    with torch.device("meta"):  # shapes only: the real tensors come from the checkpoint (assign=True)
        net = ImageRewardNet(*_full_configs())
    load_checked(net, state, str(path), assign=True)
    embeddings = net.text_encoder.embeddings  # its non-persistent buffer is not in the checkpoint
    embeddings.position_ids = torch.arange(embeddings.position_ids.shape[-1]).expand(1, -1)
    tok = build_tokenizer(tokenizer or DEFAULT_TOKENIZER)
    if len(tok) != net.text_encoder.config.vocab_size:
        raise ValueError(
            f"tokenizer {tokenizer or DEFAULT_TOKENIZER!r} has {len(tok)} ids with [DEC]/[ENC]; ImageReward's "
            f"text encoder has {net.text_encoder.config.vocab_size} (bert-base-uncased + 2)"
        )
    return ImageRewardModel(net.float(), tok, weights or DEFAULT_WEIGHTS, device)
