"""Fig. 4, reward vs samples: the fixed-noise eval reward read back from each run's TensorBoard log (steps are
sample counts), mean and std across seeds."""

from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import torch

from .files import pyplot
from .runs import LABELS, METHODS
from .stats import seed_band


@dataclass
class CurvePoint:
    method: str
    reward: str
    samples: int
    mean: float
    std: float
    seeds: int


def read_curve(run_dir: Path) -> dict[int, float]:
    """Eval reward by sample count: the base model at 0 and the final eval (summary.json), and the periodic
    evals (TensorBoard ``eval/reward_mean``, whose steps are sample counts)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    summary = json.loads((run_dir / "summary.json").read_text())
    events = EventAccumulator(str(run_dir / "tensorboard")).Reload()
    curve = {0: summary["eval_reward_base"]}
    if "eval/reward_mean" in events.Tags()["scalars"]:
        curve |= {e.step: e.value for e in events.Scalars("eval/reward_mean")}
    return curve | {summary["samples"]: summary["eval_reward_trained"]}


def curve_points(runs: dict[tuple[str, int], Path]) -> list[CurvePoint]:
    """Each method's band across its seeds' runs (one reward: the sweep's)."""
    by_method = defaultdict(list)
    for (method, _), folder in runs.items():
        by_method[method].append(read_curve(folder))
    reward = json.loads((next(iter(runs.values())) / "summary.json").read_text())["reward"]
    points = []
    for method, curves in by_method.items():
        steps, mean, std = seed_band(curves)
        points += [CurvePoint(method, reward, s, float(m), float(d), len(curves))
                   for s, m, d in zip(steps, mean, std, strict=True)]
    return points


def plot_curves(points: list[CurvePoint], path: Path) -> None:
    """Fig. 4's shape: one panel per reward, a line per method with a mean +- std band across seeds."""
    plt = pyplot()
    rewards = sorted({p.reward for p in points})
    fig, axes = plt.subplots(1, len(rewards), figsize=(4.5 * len(rewards), 3.6), squeeze=False)
    for ax, reward in zip(axes[0], rewards, strict=True):
        for method in [m for m in METHODS if any(p.method == m and p.reward == reward for p in points)]:
            rows = [p for p in points if p.method == method and p.reward == reward]
            x = [p.samples for p in rows]
            mean, std = torch.tensor([p.mean for p in rows]), torch.tensor([p.std for p in rows])
            (line,) = ax.plot(x, mean, label=f"{LABELS[method]} ({rows[0].seeds} seeds)")
            ax.fill_between(x, mean - std, mean + std, color=line.get_color(), alpha=0.2)
        ax.set(xlabel="Number of samples", ylabel=f"eval reward ({reward})", title=reward)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def curves_markdown(points: list[CurvePoint]) -> str:
    lines = ["## Fig. 4: reward vs number of samples", "", "![reward curves](fig4_reward_curves.png)", "",
             "| method | reward | samples | mean | std (seeds) | seeds |", "|---|---|---:|---:|---:|---:|"]
    for method in METHODS:
        rows = [p for p in points if p.method == method]
        if rows:
            first, last = rows[0], rows[-1]
            for p in (first, last):
                lines.append(f"| {LABELS[method]} | {p.reward} | {p.samples} | {p.mean:.4f} | {p.std:.4f} | "
                             f"{p.seeds} |")
    return "\n".join(lines)
