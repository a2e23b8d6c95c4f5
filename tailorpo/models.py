"""Loading Stable Diffusion (v1.x and XL) pipelines, LoRA on the UNet via peft, and the tiny model factory.

Every model goes through ``load_pipeline``: a hub id (``runwayml/stable-diffusion-v1-5``,
``stabilityai/stable-diffusion-xl-base-1.0``), a local diffusers folder, or a built-in name ``tiny-sd`` /
``tiny-sdxl`` (first written to a cache folder by ``make_tiny_model`` and then loaded from that folder like any
local model), or ``tiny-shapes`` (trained by ``tailorpo/tiny_shapes.py``, kept in the package).
"""

from __future__ import annotations

import gzip
import json
import os
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    DiffusionPipeline,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict
from safetensors import SafetensorError, safe_open
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from tailorpo.shapes import IMAGE_SIZE as SHAPES_RESOLUTION
from tailorpo.shapes import SHAPES_MODEL_DIR

Pipeline = StableDiffusionPipeline | StableDiffusionXLPipeline
# model_index.json's _class_name -> the pipeline class load_pipeline builds
PIPELINE_CLASSES: dict[str, type[Pipeline]] = {
    "StableDiffusionPipeline": StableDiffusionPipeline,
    "StableDiffusionXLPipeline": StableDiffusionXLPipeline,
}
TINY_MODELS = {"tiny-sd": False, "tiny-sdxl": True}  # built-in name -> sdxl
SHIPPED_MODELS = {"tiny-shapes": SHAPES_MODEL_DIR}  # built-in name -> trained weights kept in the package
TINY_RESOLUTION = 64  # pixels; the tiny VAE downsamples by 4, so latents are (4, 16, 16)


def tiny_model_cache_dir(name: str) -> Path:
    root = os.environ.get("TAILORPO_CACHE") or Path.home() / ".cache" / "tailorpo"
    return Path(root) / name


def write_clip_tokenizer_files(directory: Path) -> None:
    """Write CLIP's vocab.json and merges.txt from the BPE file that open_clip_torch ships.

    CLIP's vocabulary is: the 256 byte symbols, the same with the end-of-word marker, one token per merge
    (49152 - 256 - 2 of them), then the two special tokens (49408 in all), which is the order of the
    hub's ``openai/clip-vit-*`` tokenizer files.
    """
    import open_clip

    bpe_path = Path(open_clip.__file__).parent / "bpe_simple_vocab_16e6.txt.gz"
    merges = gzip.open(bpe_path, "rt", encoding="utf-8").read().split("\n")[1 : 49152 - 256 - 2 + 1]
    from open_clip.tokenizer import bytes_to_unicode

    symbols = list(bytes_to_unicode().values())
    vocab_list = symbols + [s + "</w>" for s in symbols] + ["".join(m.split()) for m in merges]
    vocab_list += ["<|startoftext|>", "<|endoftext|>"]
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "vocab.json").write_text(json.dumps({tok: i for i, tok in enumerate(vocab_list)}))
    (directory / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")


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
        tokenizer=_tiny_tokenizer(directory),
        unet=unet,
        scheduler=_sd_scheduler(),
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
        tokenizer=_tiny_tokenizer(directory),
        tokenizer_2=_tiny_tokenizer(directory, subfolder="tokenizer_2", pad_token="!"),
        unet=unet,
        scheduler=_sd_scheduler(),
        force_zeros_for_empty_prompt=True,  # SDXL base: the unconditional branch gets all-zero embeddings
    )


def tiny_shapes_pipeline(directory: Path) -> StableDiffusionPipeline:
    """The tiny-shapes model before training (``tailorpo/tiny_shapes.py`` trains it): tiny-sd's classes for
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


def _tiny_tokenizer(
    directory: Path, subfolder: str = "tokenizer", pad_token: str = "<|endoftext|>"
) -> CLIPTokenizer:
    tokenizer_dir = directory / subfolder
    write_clip_tokenizer_files(tokenizer_dir)
    return CLIPTokenizer(
        str(tokenizer_dir / "vocab.json"), str(tokenizer_dir / "merges.txt"), model_max_length=77,
        pad_token=pad_token,
    )


def _sd_scheduler() -> DDIMScheduler:
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


def load_pipeline(
    pretrained: str, revision: str | None = None, dtype: torch.dtype = torch.float32, device: str = "cpu"
) -> Pipeline:
    """Load an SD v1.x or SDXL pipeline from a hub id or local folder, with a DDIM scheduler built from its own
    config. The pipeline class comes from the model's model_index.json, so both families share one route."""
    path = resolve_model_path(pretrained)
    try:
        class_name = DiffusionPipeline.load_config(path, revision=revision)["_class_name"]
        if class_name not in PIPELINE_CLASSES:
            raise ValueError(f"it is a {class_name}; supported: {', '.join(PIPELINE_CLASSES)}")
        pipeline_class = PIPELINE_CLASSES[class_name]
        # SD v1.x ships a safety checker that is not needed for training; SDXL has none
        no_checker = {"safety_checker": None, "requires_safety_checker": False}
        extra = no_checker if pipeline_class is StableDiffusionPipeline else {}
        pipe = pipeline_class.from_pretrained(path, revision=revision, dtype=dtype, **extra)
    except (OSError, ValueError) as err:
        raise RuntimeError(
            f"model.pretrained={pretrained!r}: could not load a Stable Diffusion (v1.x or XL) pipeline ({err}). "
            "Give a local diffusers folder, a hub id reachable from this machine, or "
            f"{' or '.join([*TINY_MODELS, *SHIPPED_MODELS])}."
        ) from err
    # DDIM without sample clipping or thresholding: the step whose log-probability ddim.py computes
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config, clip_sample=False, thresholding=False)
    if pipe.scheduler.config.prediction_type != "epsilon":
        raise ValueError(
            f"model.pretrained={pretrained!r} predicts {pipe.scheduler.config.prediction_type!r}; "
            "TailorPO's DDIM log-probabilities support epsilon-prediction models (SD v1.x, SDXL)"
        )
    pipe.set_progress_bar_config(disable=True)
    for component in pipe.components.values():  # VAE, UNet and the one or two text encoders
        if isinstance(component, torch.nn.Module):
            component.requires_grad_(False)
    return pipe.to(device)


def add_lora(unet: UNet2DConditionModel, rank: int, alpha: float, target_modules: list[str]) -> None:
    """Attach a trainable LoRA adapter (peft) to the UNet; the base weights stay frozen."""
    unet.add_adapter(
        LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights="gaussian", target_modules=target_modules)
    )
    for param in unet.parameters():
        if param.requires_grad:
            param.data = param.data.float()  # LoRA weights train in fp32 even when the base is bf16


def lora_parameters(unet: UNet2DConditionModel) -> list[torch.nn.Parameter]:
    return [p for p in unet.parameters() if p.requires_grad]


@contextmanager
def reference_model(unet: UNet2DConditionModel) -> Iterator[None]:
    """pi_ref: the same UNet with its LoRA adapter disabled. No second copy of the weights is kept."""
    unet.disable_adapters()
    try:
        yield
    finally:
        unet.enable_adapters()


def save_lora(unet: UNet2DConditionModel, directory: str | Path) -> Path:
    """Save the UNet LoRA so that ``StableDiffusionPipeline.load_lora_weights(directory)`` loads it."""
    # peft's own key names: diffusers' legacy conversion renames only attention layers, and a file that
    # mixes both namings loads partially.
    state = get_peft_model_state_dict(unet)
    # the adapter's LoraConfig goes into the file's metadata: without it load_lora_weights assumes alpha = rank
    metadata = unet.peft_config["default"].to_dict()
    StableDiffusionPipeline.save_lora_weights(
        directory, unet_lora_layers=state, safe_serialization=True, unet_lora_adapter_metadata=metadata
    )
    return Path(directory)


LORA_FILE = "pytorch_lora_weights.safetensors"  # the name save_lora writes and load_lora_weights looks for
UNET_PREFIX = "unet."  # diffusers' prefix of UNet keys (and of their metadata fields) in a LoRA file


class LoraLoadError(ValueError):
    """A LoRA folder that cannot be read or does not fit the model; the message names the file and a key."""


@dataclass
class SavedLora:
    """A UNet LoRA as ``save_lora`` writes it: peft's key names, and the adapter's LoraConfig fields (``r``,
    ``lora_alpha``, ``target_modules``, ...) when the file records them (None for files saved without)."""

    path: Path
    state: dict[str, torch.Tensor]
    lora_config: dict[str, Any] | None


def read_lora(directory: str | Path) -> SavedLora:
    """Read a saved LoRA without any model, so a wrong folder fails before a pipeline loads."""
    path = Path(directory) / LORA_FILE
    if not Path(directory).is_dir():
        raise LoraLoadError(f"LoRA folder {str(directory)!r} does not exist")
    if not path.is_file():
        raise LoraLoadError(f"{str(directory)!r} holds no {LORA_FILE}; give the lora/ folder `tailorpo train` writes")
    try:
        with safe_open(str(path), "pt") as f:
            metadata = f.metadata() or {}
            state = {key: f.get_tensor(key) for key in f.keys()}
    except (OSError, SafetensorError) as err:
        raise LoraLoadError(f"{path} is not a readable safetensors file ({err})") from None
    others = [key for key in state if not key.startswith(UNET_PREFIX)]
    if others:
        raise LoraLoadError(f"{path}: {len(others)} weights outside the UNet (e.g. {others[0]}); only UNet LoRAs "
                            "(as tailorpo train saves them) are supported")
    lora_config = None
    if "lora_adapter_metadata" in metadata:
        fields = json.loads(metadata["lora_adapter_metadata"])
        lora_config = {key.removeprefix(UNET_PREFIX): value for key, value in fields.items()}
    return SavedLora(path, {key.removeprefix(UNET_PREFIX): value for key, value in state.items()}, lora_config)


def lora_mismatches(expected: dict[str, torch.Size], found: dict[str, torch.Size]) -> list[str]:
    """What keeps a LoRA file (key -> shape) from filling the model's adapter exactly; empty if nothing."""
    missing = [key for key in expected if key not in found]
    unexpected = [key for key in found if key not in expected]
    reshaped = [f"{key} is {tuple(found[key])} in the file, {tuple(expected[key])} in the model"
                for key in expected if key in found and found[key] != expected[key]]
    problems = []
    if missing:
        problems.append(f"{len(missing)} of the model's LoRA weights are not in the file, e.g. {missing[0]}")
    if unexpected:
        problems.append(f"{len(unexpected)} weights of the file have no place in the model, e.g. {unexpected[0]}")
    if reshaped:
        problems.append(f"{len(reshaped)} weights differ in shape, e.g. {reshaped[0]}")
    return problems


def load_lora(unet: UNet2DConditionModel, saved: SavedLora) -> None:
    """Fill the UNet's adapter (from ``add_lora``) with a saved LoRA, strictly: a LoRA of another model or of
    another rank or target set is refused with what does not fit, instead of loading in part."""
    expected = {key: value.shape for key, value in get_peft_model_state_dict(unet).items()}
    problems = lora_mismatches(expected, {key: value.shape for key, value in saved.state.items()})
    if problems:
        raise LoraLoadError(f"the LoRA in {saved.path} does not fit this model: {'; '.join(problems)}. Was it "
                            "trained with another model.pretrained or lora section?")
    set_peft_model_state_dict(unet, saved.state)
