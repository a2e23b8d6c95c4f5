"""Table 3, prompt generalization: each trained LoRA on held-out prompts, five images per prompt, the mean reward
per method (mean and std across seeds) and its win rate over the base model on the same noise."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import torch

from tailorpo.config import Config, ConfigError, EvalConfig
from tailorpo.training.evaluation import mean_std, win_rate

from .runs import LABELS, METHODS, reward_model


@dataclass
class GeneralizationRow:
    method: str  # "base" or an algorithm name
    reward: str
    prompts: int
    images: int  # per model
    seeds: int  # LoRAs averaged (0 for the base model)
    mean: float  # mean reward over all images, averaged over seeds
    std: float  # std of that mean across seeds
    win_rate: float  # share of images beating the base model's twin (same noise), ties 1/2, mean over seeds


def held_out_prompts(cfg: Config, spec: str) -> list[str]:
    """``eval``: the config's eval prompts; ``shapes``: the tiny-shapes captions never seen in pretraining;
    anything else: a text file with one prompt per line."""
    from tailorpo.prompts import SHAPE_HELD_OUT

    if spec == "eval":
        return list(cfg.eval.prompts)
    if spec == "shapes":
        return list(SHAPE_HELD_OUT)
    path = Path(spec)
    if not path.is_file():
        raise ConfigError(f"--held-out {spec!r}: not 'eval', 'shapes' or a prompt file")
    return [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def generalization(cfg: Config, runs: dict[tuple[str, int], Path], prompts: list[str],
                   images_per_prompt: int) -> list[GeneralizationRow]:
    """Every run's LoRA and the base model on ``prompts`` with the same noise per (prompt, image): the base
    model once, each LoRA loaded into the same pipeline in turn (``training.loop.evaluate``, as ``tailorpo eval``)."""
    from tailorpo.diffusion.lora import load_lora, read_lora, reference_model
    from tailorpo.training.build import build_policy, resolve_device
    from tailorpo.training.loop import evaluate

    settings = EvalConfig(**(cfg.eval.model_dump() | {"prompts": prompts, "images_per_prompt": images_per_prompt,
                                                      "every": 0}))
    reward = reward_model(cfg)
    policy = build_policy(cfg, resolve_device(cfg.device))
    try:
        with reference_model(policy.unet):
            base = evaluate(policy, reward, settings).scores
        by_method: dict[str, list[dict[str, torch.Tensor]]] = defaultdict(list)
        for (method, _), folder in runs.items():
            load_lora(policy.unet, read_lora(folder / "lora"))
            by_method[method].append(evaluate(policy, reward, settings).scores)
    finally:
        reward.close()
    images = len(prompts) * images_per_prompt
    rows = [GeneralizationRow("base", name, len(prompts), images, 0, float(s.mean()), 0.0, 0.5)
            for name, s in base.items()]
    for method in [m for m in METHODS if m in by_method]:
        for name, base_scores in base.items():
            seed_means = torch.stack([s[name].mean() for s in by_method[method]])
            wins = torch.stack([win_rate(s[name], base_scores) for s in by_method[method]])
            mean, std = mean_std(seed_means)
            rows.append(GeneralizationRow(method, name, len(prompts), images, len(seed_means), float(mean),
                                          float(std), float(wins.mean())))
    return rows


def generalization_markdown(rows: list[GeneralizationRow]) -> str:
    """Table 3's layout: a row per model, a column per reward; mean +- std across seeds (LoRA win rate)."""
    rewards = list(dict.fromkeys(r.reward for r in rows))
    cell = {(r.method, r.reward): r for r in rows}
    first = rows[0]
    lines = ["## Table 3: prompt generalization (held-out prompts)", "",
             f"{first.prompts} held-out prompts x {first.images // first.prompts} images, each model on the same "
             "noise; mean reward of all images, mean +- std across seeds (win rate of the LoRA's image over the "
             "base model's twin).", "",
             "| model | " + " | ".join(rewards) + " |", "|---|" + "---:|" * len(rewards)]
    for method in ["base", *METHODS]:
        if not any((method, reward) in cell for reward in rewards):
            continue
        cells = []
        for reward in rewards:
            r = cell.get((method, reward))
            cells.append("n/a" if r is None else f"{r.mean:.4f}" if method == "base"
                         else f"{r.mean:.4f} ± {r.std:.4f} ({r.win_rate:.0%})")
        lines.append(f"| {LABELS[method]} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
