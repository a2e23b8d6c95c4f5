"""Loading Stable Diffusion (v1.x and XL) pipelines: a hub id, a local diffusers folder, or a tiny built-in name.

Every model goes through ``load_pipeline``: a hub id (``runwayml/stable-diffusion-v1-5``,
``stabilityai/stable-diffusion-xl-base-1.0``), a local diffusers folder, or a built-in name (``tiny-sd``,
``tiny-sdxl``, ``tiny-shapes``; see ``tailorpo.tiny.models``).
"""

from __future__ import annotations

import torch
from diffusers import DDIMScheduler, DiffusionPipeline, StableDiffusionPipeline, StableDiffusionXLPipeline

from tailorpo.tiny.models import SHIPPED_MODELS, TINY_MODELS, resolve_model_path

Pipeline = StableDiffusionPipeline | StableDiffusionXLPipeline
# model_index.json's _class_name -> the pipeline class load_pipeline builds
PIPELINE_CLASSES: dict[str, type[Pipeline]] = {
    "StableDiffusionPipeline": StableDiffusionPipeline,
    "StableDiffusionXLPipeline": StableDiffusionXLPipeline,
}


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
    if dtype == torch.float16 and pipe.vae.config.get("force_upcast", False):
        pipe.vae.to(torch.float32)  # SDXL's VAE overflows in fp16; diffusers upcasts it for decoding alike
    return pipe.to(device)
