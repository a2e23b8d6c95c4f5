"""transformers CLIP helpers shared by the CLIP-based rewards (aesthetic, pickscore): feature extraction across
transformers versions, the strict checkpoint load, and the tiny seeded-test configuration."""

from __future__ import annotations

import tempfile
from collections.abc import Mapping
from pathlib import Path

import torch
from transformers import CLIPConfig, CLIPModel, CLIPTokenizer

from tailorpo.rewards.weights import check_state_dict, read_checkpoint, resolve_file
from tailorpo.tiny.tokenizer import write_clip_tokenizer_files


def clip_features(output: torch.Tensor | object) -> torch.Tensor:
    """``CLIPModel.get_{image,text}_features``: a tensor in transformers 4.x; in 5.x (installed: 5.24) an output
    object whose ``pooler_output`` holds the *projected* embedding (the method overwrites it with the
    projection). Anything else is an API change we must not guess about."""
    if isinstance(output, torch.Tensor):
        return output
    pooled = getattr(output, "pooler_output", None)
    if not isinstance(pooled, torch.Tensor):
        raise TypeError(f"unexpected CLIP features output {type(output).__name__}")
    return pooled


def checked_clip_state_dict(state: Mapping[str, torch.Tensor], model: CLIPModel, source: str) -> dict:
    """``state`` checked strictly against ``model``. Checkpoints saved by transformers < 4.31 (PickScore_v1,
    openai/clip-vit-large-patch14) still carry the ``embeddings.position_ids`` buffers, an arange that is
    non-persistent now, so those keys alone are dropped first."""
    state = {k: v for k, v in state.items() if not k.endswith("embeddings.position_ids")}
    check_state_dict(state, model.state_dict(), source)
    return state


def load_hf_clip(source: str, device: str) -> CLIPModel:
    """A transformers CLIPModel from a hub id or a folder in its format (config.json + one weights file)."""
    weights = resolve_file(source, ("model.safetensors", "pytorch_model.bin"))
    config = CLIPConfig.from_pretrained(str(resolve_file(source, ("config.json",)).parent))
    state = read_checkpoint(weights)
    with torch.device(device):
        model = CLIPModel(config)
    model.load_state_dict(checked_clip_state_dict(state, model, str(weights)), strict=True)
    return model.eval().requires_grad_(False)


def tiny_clip_tokenizer() -> CLIPTokenizer:
    """CLIP's real BPE (from open_clip's shipped file), so the tiny models tokenise like the real ones."""
    with tempfile.TemporaryDirectory() as name:
        directory = Path(name)
        write_clip_tokenizer_files(directory)
        return CLIPTokenizer(str(directory / "vocab.json"), str(directory / "merges.txt"), model_max_length=77)


def tiny_clip_config(projection_dim: int) -> CLIPConfig:
    """Small widths, but 224 px input so the real preprocessing path runs."""
    small = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)
    return CLIPConfig(
        text_config=dict(small, vocab_size=49408, max_position_embeddings=77, eos_token_id=49407),
        vision_config=dict(small, image_size=224, patch_size=32),
        projection_dim=projection_dim,
    )
