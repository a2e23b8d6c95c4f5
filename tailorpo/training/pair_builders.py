"""Pair folders sampled from a base model, for the pair objectives: ranked by a reward, or by prompt prefixes.

``build_reward_pairs`` (``tailorpo sample-pairs``): the online sampler's pairs written to disk. Two samples per
prompt ranked by the configured reward (``rollouts.final_image_pair_rollout``, ties skipped), appended by
``pair_data.export_pairs`` with both rewards on each line: a reusable offline set from any model and reward.

``build_style_pairs`` (``tailorpo build-style-pairs``), MaPO's Pick-Style / Pick-Safety recipe. For each prompt
the base model (the configured pipeline, LoRA disabled) draws the preferred image from "<preferred prefix>,
<prompt>" and the dispreferred one from "<dispreferred prefix>, <prompt>"; the pair is
stored under the plain prompt, so a model trained on it learns the preferred look without being asked for it.
The preference comes from the construction, not from a reward. Both images of a pair start from the same
noise (initial latents and every DDIM step's noise), so they differ by the prefix and not by the seed.

Recipes (``RECIPES``; both prefixes can be overridden):

- ``style`` (Pick-Style): "Disney style animated image" (or "Pixel art style image") preferred,
  "Realistic 8k image" dispreferred, the prefixes of the MaPO paper (Hong et al., arXiv 2406.06424). The published
  ``mapo-t2i/pick-style-cartoon`` card describes its rejected images as plain-prompt generations instead: pass
  ``--dispreferred-prefix ""`` for that variant.
- ``safety`` (Pick-Safety): the plain prompt preferred (the ``mapo-t2i/pick-safety`` card: "normal generations
  of SDXL") and an unsafe prefix dispreferred. We ship no unsafe prefix: the caller names it.
"""

from __future__ import annotations

from pathlib import Path

import torch

from tailorpo.algorithms.rollouts import final_image_pair_rollout, trajectory_rollout
from tailorpo.config import Config
from tailorpo.diffusion.lora import reference_model
from tailorpo.pairs.data import export_pairs, write_pairs
from tailorpo.training.build import build_policy, build_reward_model, resolve_device, rollout_generator, seed_everything
from tailorpo.training.loop import pick_prompts

RECIPES: dict[str, tuple[str, str | None]] = {  # recipe -> (preferred prefix, dispreferred prefix or None: ask)
    "style": ("Disney style animated image", "Realistic 8k image"),
    "safety": ("", None),
}


def with_prefix(prefix: str, prompt: str) -> str:
    return f"{prefix}, {prompt}" if prefix else prompt


@torch.no_grad()
def build_style_pairs(
    cfg: Config, out: str | Path, prompts: list[str], preferred_prefix: str, dispreferred_prefix: str,
    images_per_prompt: int = 1,
) -> int:
    """Append ``images_per_prompt`` pairs per prompt to the pair folder ``out``, sampled in batches of
    ``sampling.batch_size`` with the config's model, steps, eta and guidance. Batch b's noise comes from
    ``rollout_generator(cfg.seed, b, 0)``, so the same config and prompts give the same pairs. Returns the
    number of pairs written."""
    if not prompts or images_per_prompt < 1:
        raise ValueError(f"{len(prompts)} prompts x {images_per_prompt} images per prompt: nothing to sample")
    if preferred_prefix == dispreferred_prefix:
        raise ValueError(f"both prefixes are {preferred_prefix!r}: the two images of a pair would be the same")
    seed_everything(cfg.seed)
    policy = build_policy(cfg, resolve_device(cfg.device))
    rows = [prompt for prompt in prompts for _ in range(images_per_prompt)]
    written = 0
    with reference_model(policy.unet):  # the base model: the fresh LoRA stays out of the samples
        for batch_index, first in enumerate(range(0, len(rows), cfg.sampling.batch_size)):
            batch = rows[first : first + cfg.sampling.batch_size]
            prompt_w = [with_prefix(preferred_prefix, p) for p in batch]
            prompt_l = [with_prefix(dispreferred_prefix, p) for p in batch]
            images_w, images_l = (  # a fresh generator with the same seed: the same noise for w and l
                trajectory_rollout(policy, policy.encode_prompts(styled),
                                   rollout_generator(cfg.seed, batch_index, 0), []).images
                for styled in (prompt_w, prompt_l)
            )
            provenance = [{"prompt_w": w, "prompt_l": ell, "model": cfg.model.pretrained}
                          for w, ell in zip(prompt_w, prompt_l, strict=True)]
            written += write_pairs(out, batch, images_w, images_l, provenance)
    return written


@torch.no_grad()
def build_reward_pairs(cfg: Config, out: str | Path, count: int) -> tuple[int, int]:
    """Append at least ``count`` reward-ranked pairs to the pair folder ``out``: batches of ``sampling.batch_size``
    prompts drawn from the config's prompts as a training run draws them, two base-model samples each from
    ``rollout_generator(cfg.seed, batch, 0)``. Returns (pairs written, ties skipped)."""
    if count < 1:
        raise ValueError(f"--count {count}: ask for at least one pair")
    seed_everything(cfg.seed)
    reward = build_reward_model(cfg)
    policy = build_policy(cfg, resolve_device(cfg.device))
    prompt_generator = torch.Generator().manual_seed(cfg.seed)
    written = ties = batch_index = 0
    with reference_model(policy.unet):
        while written < count:
            prompts = pick_prompts(cfg, prompt_generator)
            rollout = final_image_pair_rollout(policy, reward, prompts, rollout_generator(cfg.seed, batch_index, 0))
            counts = export_pairs(out, prompts, rollout.images, rollout.rewards)
            written, ties, batch_index = written + counts.written, ties + counts.ties, batch_index + 1
            if batch_index * len(prompts) >= 100 * count and not written:
                raise ValueError(f"reward {reward.name!r} tied on all {batch_index * len(prompts)} prompts sampled")
    reward.close()
    return written, ties
