"""The published SD v1.5 and SDXL architectures with random weights, written as a local diffusers folder.

No model hub is reachable where this framework is tested, but memory, dtype and speed at real size depend only
on the architecture: these folders load through ``load_pipeline`` like a downloaded model, so every phase can be
measured (``benchmarks/memory.py``) and exercised at 512 px (or a reduced resolution) without the weights.
The configs are those of ``runwayml/stable-diffusion-v1-5`` and ``stabilityai/stable-diffusion-xl-base-1.0``
(UNet, VAE, CLIP text encoders); the tokenizers are CLIP's real BPE vocabulary.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import torch
from diffusers import AutoencoderKL, StableDiffusionPipeline, StableDiffusionXLPipeline, UNet2DConditionModel
from transformers import CLIPConfig, CLIPModel, CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from tailorpo.tiny.models import clip_tokenizer, sd_scheduler

FullSize = Literal["sd15", "sdxl"]
FULL_SIZES: tuple[FullSize, ...] = ("sd15", "sdxl")

# CLIP ViT-L/14's text tower (SD v1.5's only text encoder, SDXL's first)
CLIP_L = {"vocab_size": 49408, "hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
          "num_attention_heads": 12, "max_position_embeddings": 77, "hidden_act": "quick_gelu",
          "projection_dim": 768, "bos_token_id": 0, "eos_token_id": 2, "pad_token_id": 1}
# OpenCLIP ViT-bigG/14's text tower (SDXL's second text encoder, with its projection)
CLIP_BIG_G = CLIP_L | {"hidden_size": 1280, "intermediate_size": 5120, "num_hidden_layers": 32,
                       "num_attention_heads": 20, "hidden_act": "gelu", "projection_dim": 1280}
# CLIP ViT-L/14's image tower at 224 px (openai/clip-vit-large-patch14: the aesthetic reward's CLIP)
CLIP_L_VISION = {"hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24, "num_attention_heads": 16,
                 "image_size": 224, "patch_size": 14, "hidden_act": "quick_gelu", "projection_dim": 768}


def clip_vit_l14() -> CLIPModel:
    """openai/clip-vit-large-patch14 with random weights (427.6M parameters): the aesthetic reward at real size."""
    return CLIPModel(CLIPConfig(text_config=CLIP_L, vision_config=CLIP_L_VISION, projection_dim=768))


def sd_vae(scaling_factor: float, sample_size: int) -> AutoencoderKL:
    """SD's KL-f8 autoencoder (83.7M parameters; SDXL's has the same shape and another latent scale)."""
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, norm_num_groups=32,
        block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4, sample_size=sample_size, scaling_factor=scaling_factor,
    )


def sd15_pipeline(directory: Path) -> StableDiffusionPipeline:
    """SD v1.5: UNet 859.5M, VAE 83.7M, CLIP-L text 123.1M parameters."""
    unet = UNet2DConditionModel(
        sample_size=64, cross_attention_dim=768, attention_head_dim=8, layers_per_block=2,
        block_out_channels=(320, 640, 1280, 1280),
    )  # the class's default block types are SD v1.x's
    return StableDiffusionPipeline(
        vae=sd_vae(0.18215, 512), text_encoder=CLIPTextModel(CLIPTextConfig(**CLIP_L)),
        tokenizer=clip_tokenizer(directory), unet=unet, scheduler=sd_scheduler(), safety_checker=None,
        feature_extractor=None, requires_safety_checker=False,
    )


def sdxl_pipeline(directory: Path) -> StableDiffusionXLPipeline:
    """SDXL base 1.0: UNet 2.57B, VAE 83.7M, CLIP-L 123.1M and OpenCLIP bigG 694.7M parameters."""
    unet = UNet2DConditionModel(
        sample_size=128, layers_per_block=2, block_out_channels=(320, 640, 1280),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), use_linear_projection=True,
        cross_attention_dim=2048, addition_embed_type="text_time", addition_embed_type_num_heads=64,
        addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816,
    )
    return StableDiffusionXLPipeline(
        vae=sd_vae(0.13025, 1024), text_encoder=CLIPTextModel(CLIPTextConfig(**CLIP_L)),
        text_encoder_2=CLIPTextModelWithProjection(CLIPTextConfig(**CLIP_BIG_G)),
        tokenizer=clip_tokenizer(directory), tokenizer_2=clip_tokenizer(directory, "tokenizer_2", pad_token="!"),
        unet=unet, scheduler=sd_scheduler(), force_zeros_for_empty_prompt=True,
    )


def make_full_size_model(directory: str | Path, kind: FullSize, seed: int = 0,
                         dtype: torch.dtype = torch.float32) -> Path:
    """Write the published architecture ``kind`` with random weights (``dtype`` on disk: float16 halves the
    folder, 2.1 GB for SD v1.5 and 6.9 GB for SDXL; it loads in any ``model.dtype``)."""
    directory = Path(directory)
    build = {"sd15": sd15_pipeline, "sdxl": sdxl_pipeline}[kind]
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        pipe = build(directory)
    if dtype != torch.float32:
        pipe.to(dtype)
    pipe.save_pretrained(directory, safe_serialization=True)
    return directory
