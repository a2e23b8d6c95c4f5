"""Beyond the paper, where a LoRA acts: each trained LoRA switched on only at the fine-tuned steps, only at the
other steps, or at all steps, every chain on the same noise, against the base model. A method trained on 5 of 20
steps still changes the other 15."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from tailorpo.config import Config
from tailorpo.training.evaluation import mean_std, win_rate

from .runs import LABELS, METHODS, chunks, reward_model

if TYPE_CHECKING:
    from tailorpo.diffusion.policy import DiffusionPolicy
    from tailorpo.rewards import RewardModel

LORA_STEP_SETS = ("fine-tuned steps only", "other steps only", "all steps")


@torch.no_grad()
def final_rewards_with_lora_at(policy: DiffusionPolicy, reward: RewardModel, prompts: list[str], active: set[int],
                               seed: int, batch_size: int) -> torch.Tensor:
    """Final-image rewards (N,) of plain DDIM chains whose UNet has its LoRA on only at step indices ``active``
    (the base model elsewhere); batch j draws its noise from seed + j, so any two calls pair image by image."""
    from tailorpo.algorithms.rollouts import denoise

    scores = []
    for j, c in enumerate(chunks(len(prompts), batch_size)):
        batch = prompts[c.start:c.stop]
        embeds, generator = policy.encode_prompts(batch), torch.Generator().manual_seed(seed + j)
        x = denoise(policy, policy.initial_latents(len(batch), generator), embeds, generator, 0, lora_at=active)
        scores.append(reward.score(policy.decode(x), batch).scores.cpu())
    return torch.cat(scores)


@dataclass
class LoraStepsRow:
    method: str
    reward: str
    active: str  # one of LORA_STEP_SETS
    images: int
    seeds: int
    gain: float  # mean over seeds of (mean LoRA reward - mean base reward)
    gain_std: float  # across seeds
    win_rate: float  # mean over seeds, paired with the base model's image


def lora_steps(cfg: Config, runs: dict[tuple[str, int], Path], prompts: list[str],
               images_per_prompt: int) -> list[LoraStepsRow]:
    """Each run's LoRA at the fine-tuned steps only, the other steps only, and all steps, against the base
    model on the same noise (the training prompts, ``images_per_prompt`` each)."""
    from tailorpo.diffusion.lora import load_lora, read_lora
    from tailorpo.training.build import build_policy, resolve_device

    reward, batch = reward_model(cfg), [p for p in prompts for _ in range(images_per_prompt)]
    policy = build_policy(cfg, resolve_device(cfg.device))
    steps = set(range(policy.num_steps))
    fine = {policy.num_steps - k for k in cfg.algorithm.fine_tuned_steps}
    step_sets = dict(zip(LORA_STEP_SETS, (fine, steps - fine, steps), strict=True))

    def rewards(active: set[int]) -> torch.Tensor:
        return final_rewards_with_lora_at(policy, reward, batch, active, cfg.eval.seed, cfg.eval.batch_size)

    try:
        base = rewards(set())
        results: dict[tuple[str, str], list[torch.Tensor]] = defaultdict(list)
        for (method, _), folder in runs.items():
            load_lora(policy.unet, read_lora(folder / "lora"))
            for name, active in step_sets.items():
                results[method, name].append(rewards(active))
    finally:
        reward.close()
    rows = []
    for (method, name), per_seed in results.items():
        gain_mean, gain_std = mean_std(torch.stack([s.mean() - base.mean() for s in per_seed]))
        wins = torch.stack([win_rate(s, base) for s in per_seed]).mean()
        rows.append(LoraStepsRow(method, reward.name, name, len(batch), len(per_seed), float(gain_mean),
                                 float(gain_std), float(wins)))
    return rows


def lora_steps_markdown(rows: list[LoraStepsRow]) -> str:
    first = rows[0]
    lines = ["## Where the LoRA acts: fine-tuned steps, other steps, all steps", "",
             f"Reward `{first.reward}` of final images, {first.images} images on the training prompts, every chain on "
             "the same noise; the change against the base model (mean +- std across seeds) and the LoRA's win rate "
             "over the base model's image.", "",
             "| method | " + " | ".join(LORA_STEP_SETS) + " |", "|---|" + "---:|" * len(LORA_STEP_SETS)]
    cell = {(r.method, r.active): r for r in rows}
    for method in [m for m in METHODS if any(r.method == m for r in rows)]:
        cells = [f"{c.gain:+.4f} ± {c.gain_std:.4f} ({c.win_rate:.0%})"
                 for c in (cell[method, name] for name in LORA_STEP_SETS)]
        lines.append(f"| {LABELS[method]} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
