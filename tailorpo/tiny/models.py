"""Tiny Stable-Diffusion-shaped models: the real diffusers/transformers classes at toy size.

``tiny-sd`` / ``tiny-sdxl`` are random weights written once to a cache folder by ``make_tiny_model`` and then
loaded from that folder like any local model; ``tiny-shapes`` is trained by ``tailorpo.tiny.shapes_training``
and kept in the package.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from tailorpo.tiny.shapes import IMAGE_SIZE as SHAPES_RESOLUTION
from tailorpo.tiny.shapes import SHAPES_MODEL_DIR
from tailorpo.tiny.tokenizer import write_clip_tokenizer_files

TINY_MODELS = {"tiny-sd": False, "tiny-sdxl": True}  # built-in name -> sdxl
SHIPPED_MODELS = {"tiny-shapes": SHAPES_MODEL_DIR}  # built-in name -> trained weights kept in the package
TINY_RESOLUTION = 64  # pixels; the tiny VAE downsamples by 4, so latents are (4, 16, 16)


def tiny_model_cache_dir(name: str) -> Path:
    root = os.environ.get("TAILORPO_CACHE") or Path.home() / ".cache" / "tailorpo"
    return Path(root) / name


def make_tiny_model(directory: str | Path, seed: int = 0, sdxl: bool = False) -> Path:
    """Write a tiny Stable-Diffusion-shaped (or SDXL-shaped) pipeline, random weights and real classes, in
    diffusers format."""
    directory = Path(directory)
    with torch.random.fork_rng():  # the caller's RNG state (e.g. for LoRA init) stays untouched
        torch.manual_seed(seed)
        pipe = _tiny_sdxl_pipeline(directory) if sdxl else _tiny_pipeline(directory)
    pipe.save_pretrained(directory, safe_serialization=True)
    return directory


def _tiny_unet(
    sample_size: int = TINY_RESOLUTION // 4, block_out_channels: tuple[int, ...] = (32, 64), **blocks
) -> UNet2DConditionModel:
    """SD's UNet at toy size (by default two levels, 32/64 channels); ``blocks`` set the block types and
    conditioning."""
    return UNet2DConditionModel(
        sample_size=sample_size, in_channels=4, out_channels=4, block_out_channels=block_out_channels,
        layers_per_block=1, norm_num_groups=16, **blocks,
    )


def _tiny_pipeline(directory: Path) -> StableDiffusionPipeline:
    unet = _tiny_unet(
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=8,
    )
    return _tiny_sd_pipeline(directory, unet, _tiny_vae())


def _tiny_sd_pipeline(directory: Path, unet: UNet2DConditionModel, vae: AutoencoderKL) -> StableDiffusionPipeline:
    """SD v1.5's pipeline around a tiny UNet and VAE: the tiny CLIP text encoder, CLIP's tokenizer, SD's DDIM."""
    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=CLIPTextModel(_tiny_clip_config(hidden_size=32)),
        tokenizer=clip_tokenizer(directory),
        unet=unet,
        scheduler=sd_scheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def _tiny_sdxl_pipeline(directory: Path) -> StableDiffusionXLPipeline:
    """SDXL's layout at toy size: two CLIP text encoders whose penultimate states are concatenated for
    cross-attention (32 + 64 wide); the second one's pooled projection and six size/crop ids feed the UNet's
    "text_time" added embedding (6 * 8 + 32 inputs); the second tokenizer pads with "!" as SDXL's does."""
    clip_config = _tiny_clip_config(hidden_size=32)
    # SDXL's text_encoder_2 config: OpenCLIP bigG's gelu and token ids (eos_token_id=2 makes CLIP pool at the
    # argmax token id, i.e. at <|endoftext|>, as the real model does)
    clip_config_2 = _tiny_clip_config(
        hidden_size=64, projection_dim=32, hidden_act="gelu", bos_token_id=0, eos_token_id=2, pad_token_id=1
    )
    time_embed_dim = 8
    unet = _tiny_unet(
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 2),
        attention_head_dim=(4, 8),
        use_linear_projection=True,
        cross_attention_dim=clip_config.hidden_size + clip_config_2.hidden_size,
        addition_embed_type="text_time",
        addition_time_embed_dim=time_embed_dim,
        projection_class_embeddings_input_dim=6 * time_embed_dim + clip_config_2.projection_dim,
    )
    vae = _tiny_vae(scaling_factor=0.13025)  # SDXL VAE's latent scale
    text_encoder = CLIPTextModel(clip_config)
    text_encoder_2 = CLIPTextModelWithProjection(clip_config_2)
    return StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=clip_tokenizer(directory),
        tokenizer_2=clip_tokenizer(directory, subfolder="tokenizer_2", pad_token="!"),
        unet=unet,
        scheduler=sd_scheduler(),
        force_zeros_for_empty_prompt=True,  # SDXL base: the unconditional branch gets all-zero embeddings
    )


def tiny_shapes_pipeline(directory: Path) -> StableDiffusionPipeline:
    """The tiny-shapes model before training (``tailorpo/tiny/shapes_training.py`` trains it): tiny-sd's classes for
    32x32 images (latents (4, 8, 8)). The UNet has a third level (2x2) and, as SDXL's, no attention at the finest
    one: convolutions with zero padding are what tell the UNet where it is, and with attention at 8x8 (no
    positional encoding) it learned colors and shapes but placed them at random."""
    unet = _tiny_unet(
        sample_size=SHAPES_RESOLUTION // 4,
        block_out_channels=(32, 64, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=8,
    )
    # the VAE's scaling_factor is set from the trained latents
    return _tiny_sd_pipeline(directory, unet, _tiny_vae(sample_size=SHAPES_RESOLUTION))


def _tiny_vae(scaling_factor: float = 0.18215, sample_size: int = TINY_RESOLUTION) -> AutoencoderKL:
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        block_out_channels=(16, 32, 32),
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        latent_channels=4,
        layers_per_block=1,
        norm_num_groups=16,
        sample_size=sample_size,
        scaling_factor=scaling_factor,
    )


def _tiny_clip_config(hidden_size: int, **overrides: object) -> CLIPTextConfig:
    """CLIP's real vocabulary and context length at toy width; SD v1.5's token ids unless overridden."""
    settings: dict[str, object] = {
        "vocab_size": 49408,
        "hidden_size": hidden_size,
        "intermediate_size": 2 * hidden_size,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "max_position_embeddings": 77,
        "bos_token_id": 49406,
        "eos_token_id": 49407,
        "pad_token_id": 49407,
    }
    return CLIPTextConfig(**(settings | overrides))


def clip_tokenizer(
    directory: Path, subfolder: str = "tokenizer", pad_token: str = "<|endoftext|>"
) -> CLIPTokenizer:
    tokenizer_dir = directory / subfolder
    write_clip_tokenizer_files(tokenizer_dir)
    return CLIPTokenizer(
        str(tokenizer_dir / "vocab.json"), str(tokenizer_dir / "merges.txt"), model_max_length=77,
        pad_token=pad_token,
    )


def sd_scheduler() -> DDIMScheduler:
    """SD v1.5's (and SDXL's) scheduler configuration: scaled_linear 0.00085..0.012, leading spacing, offset 1,
    and no alpha_bar = 1 at the end, so the last DDIM step keeps a density."""
    return DDIMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        timestep_spacing="leading",
    )


def resolve_model_path(pretrained: str) -> str:
    """``tiny-sd`` / ``tiny-sdxl`` -> its cache folder (written once), ``tiny-shapes`` -> its folder in the
    package; anything else is a hub id or path, passed as is."""
    if pretrained in SHIPPED_MODELS:
        return str(SHIPPED_MODELS[pretrained])
    if pretrained not in TINY_MODELS:
        return pretrained
    path = tiny_model_cache_dir(pretrained)
    if not (path / "model_index.json").exists():
        make_tiny_model(path, sdxl=TINY_MODELS[pretrained])
    return str(path)
