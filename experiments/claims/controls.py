"""Does TailorPO raise the reward, and by more than chance? Each variant trained on the same budget for several
seeds, every LoRA and the base model rendered on the same noise for the training prompts and for held-out
prompts, and paired bootstrap 95% intervals of the reward differences against the base model, the
random-label control (the same sampler and learner with coin-flip labels: what training on no preference
information does) and DDPO (the same budget). The exact-ranking bound ranks the siblings by the mean final reward
of chains continued from each (``algorithm.branching.labels: continuations``): what a perfect step-wise reward
would give.

Runs and per-model scores are reused when their config matches, so several invocations with disjoint
``--variants`` / ``--seeds`` can train in parallel and a last one writes the table."""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from tailorpo.config import Config, ConfigError, EvalConfig, load_config

from .files import write_csv
from .generalization import held_out_prompts
from .runs import reward_model, train_or_reuse, with_overrides
from .stats import paired_bootstrap


@dataclass(frozen=True)
class Variant:
    name: str
    label: str
    overrides: tuple[str, ...]


STUDY = (
    Variant("tailorpo", "TailorPO", ("algorithm.name=tailorpo",)),
    Variant("tailorpo_g", "TailorPO-G", ("algorithm.name=tailorpo_g",)),
    Variant("random_labels", "TailorPO, random labels (control)",
            ("algorithm.name=tailorpo", "algorithm.branching.labels=random")),
    Variant("ddpo", "DDPO", ("algorithm.name=ddpo",)),
    Variant("exact", "TailorPO, exact ranking (bound)",
            ("algorithm.name=tailorpo", "algorithm.branching.labels=continuations")),
)
REFERENCES = ("base", "random_labels", "ddpo")  # each model's reward difference is reported against these


def parse_variant(text: str) -> Variant:
    """``NAME=key=value;key=value``: a variant of the config beyond STUDY (an ablation)."""
    name, sep, overrides = text.partition("=")
    if not sep or not name or not overrides:
        raise ConfigError(f"--variant {text!r}: write NAME=key=value;key=value (for example "
                          "'gap=algorithm.name=tailorpo;algorithm.branching.min_reward_gap=1.0')")
    return Variant(name, name, tuple(o.strip() for o in overrides.split(";") if o.strip()))


def variant_run(cfg: Config, variant: Variant, seed: int, samples: int, out: Path) -> Config:
    """The config one (variant, seed) trains with: only the variant's fields, the seed and the budget differ."""
    return with_overrides(cfg, [*variant.overrides, f"seed={seed}", f"train.total_samples={samples}",
                                f"output_dir={out / 'runs' / variant.name / f'seed{seed}'}", "runtime.samplers=0",
                                "eval.every=0"])


def prompt_sets(cfg: Config, held_out: list[str], train_images: int, held_out_images: int) -> dict[str, EvalConfig]:
    """The fixed-noise evaluations: the config's training prompts and the held-out ones, each (prompt, image)
    with its own noise, the same for every model."""
    base = cfg.eval.model_dump() | {"every": 0}
    return {"training": EvalConfig(**base | {"prompts": list(cfg.prompts), "images_per_prompt": train_images}),
            "held-out": EvalConfig(**base | {"prompts": held_out, "images_per_prompt": held_out_images})}


class Scorer:
    """One policy and reward; the per-image rewards of the base model or of a run's LoRA (as trained: switched
    on only at the steps its adapter_steps.json names), cached as JSON beside the output."""

    def __init__(self, cfg: Config, sets: dict[str, EvalConfig], cache: Path) -> None:
        self.cfg, self.sets, self.cache = cfg, sets, cache
        self.key = {"model": cfg.model.model_dump(), "sampling": cfg.sampling.model_dump(), "reward": cfg.reward.name,
                    "sets": {name: s.model_dump() for name, s in sets.items()}}
        self.policy = self.reward = None

    def scores(self, name: str, folder: Path | None) -> dict[str, torch.Tensor]:
        path = self.cache / f"{name}.json"
        # the run's own config too: a folder retrained with another config must not reuse the old scores
        key = self.key | {"run": str(folder), "run_config": folder and (folder / "config.yaml").read_text()}
        if path.exists() and (saved := json.loads(path.read_text()))["key"] == key:
            return {s: torch.tensor(v, dtype=torch.float64) for s, v in saved["scores"].items()}
        scores = self._render(folder)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"key": key, "scores": {s: v.tolist() for s, v in scores.items()}}))
        return scores

    def _render(self, folder: Path | None) -> dict[str, torch.Tensor]:
        from tailorpo.diffusion.lora import load_lora, read_lora, reference_model
        from tailorpo.training.build import build_policy, resolve_device
        from tailorpo.training.loop import evaluate

        if self.policy is None:
            self.policy = build_policy(self.cfg, resolve_device(self.cfg.device))
            self.reward = reward_model(self.cfg)
        policy, name = self.policy, self.cfg.reward.name
        if folder is None:
            context = reference_model(policy.unet)
        else:
            saved = read_lora(folder / "lora")
            load_lora(policy.unet, saved)
            gate = saved.steps  # None: saved ungated, so it acts at every step, whatever the config's own gate
            context = policy.lora_only_at(
                range(policy.num_steps) if gate is None else {policy.num_steps - k for k in gate.active})
        with context:
            return {s: evaluate(policy, self.reward, settings).scores[name].double()
                    for s, settings in self.sets.items()}

    def close(self) -> None:
        if self.reward is not None:
            self.reward.close()


@dataclass
class ControlRow:
    prompts: str  # "training" or "held-out"
    model: str  # "base" or a variant's name
    reference: str  # what the difference is against ("" for the model's own reward)
    seeds: int
    images: int  # per seed
    mean: float  # the model's mean reward (the difference's, with a reference), over seeds and images
    seed_std: float  # sample std across seeds of the per-seed mean
    low: float  # paired bootstrap 95% interval (seeds and images resampled); the mean's own without a reference
    high: float
    win_rate: float  # share of paired images where the model beats the reference, ties 1/2 (NaN: no reference)


def control_rows(scores: dict[str, list[dict[str, torch.Tensor]]], draws: int = 10_000) -> list[ControlRow]:
    """scores: model -> per seed (the base model: one entry) -> prompt set -> (I,) rewards on shared noise.
    A model's row against each reference present, pairing seed s with the reference's seed s (the base model
    pairs with every seed)."""
    rows = []
    for prompts in scores["base"][0]:
        for model, per_seed in scores.items():
            own = torch.stack([s[prompts] for s in per_seed])  # (S, I)
            rows.append(_row(prompts, model, "", own, draws))
            for reference in REFERENCES:
                if reference == model or reference not in scores or model == "base":
                    continue
                ref = torch.stack([s[prompts] for s in scores[reference]]).expand_as(own)
                rows.append(_row(prompts, model, reference, own - ref, draws, (own > ref) + 0.5 * (own == ref)))
    return rows


def _row(prompts: str, model: str, reference: str, values: torch.Tensor, draws: int,
         wins: torch.Tensor | None = None) -> ControlRow:
    mean, low, high = paired_bootstrap(values, draws)
    seed_means = values.mean(1)
    std = float(seed_means.std()) if len(seed_means) > 1 else 0.0
    return ControlRow(prompts, model, reference, values.shape[0], values.shape[1], mean, std, low, high,
                      float("nan") if wins is None else float(wins.float().mean()))


def controls_markdown(rows: list[ControlRow], labels: dict[str, str]) -> str:
    """One table per prompt set: each model's reward, and its paired difference against each reference."""
    cell = {(r.prompts, r.model, r.reference): r for r in rows}
    references = [ref for ref in REFERENCES if any(r.model == ref for r in rows)]
    lines = []
    for prompts in dict.fromkeys(r.prompts for r in rows):
        first = cell[prompts, "base", ""]
        seeds = max(r.seeds for r in rows if r.prompts == prompts)
        lines += [f"**{prompts.capitalize()} prompts** ({first.images} images per model and seed, {seeds} seeds; "
                  "mean reward ± sample std across seeds; Δ: paired difference, mean [bootstrap 95% interval], "
                  "win rate on the same noise)", "",
                  "| model | reward | " + " | ".join(f"Δ vs {labels.get(r, r)}" for r in references) + " |",
                  "|---|---:|" + "---:|" * len(references)]
        for model in dict.fromkeys(r.model for r in rows if r.prompts == prompts):
            own = cell[prompts, model, ""]
            cells = [f"{own.mean:.2f} ± {own.seed_std:.2f}"]
            for ref in references:
                r = cell.get((prompts, model, ref))
                cells.append("" if r is None else
                             f"{r.mean:+.2f} [{r.low:+.2f}, {r.high:+.2f}] ({r.win_rate:.0%})")
            lines.append(f"| {labels.get(model, model)} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines).rstrip()


def training_curve(folder: Path, bins: int) -> torch.Tensor:
    """(B,) the run's training reward (TensorBoard ``train/reward_mean``: the final images it sampled, for
    TailorPO-G after guidance) averaged over equal ranges of sample counts: how the reward moved during a run
    trained without periodic evals. B = bins, or fewer when the run logged fewer iterations."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder / "tensorboard")).Reload().Scalars("train/reward_mean")
    samples = torch.tensor([e.step for e in events], dtype=torch.float64)
    values = torch.tensor([e.value for e in events], dtype=torch.float64)
    bins = min(bins, len(events))
    which = ((samples - 1) * bins / samples.max()).long().clamp(0, bins - 1)
    return torch.stack([values[which == b].mean() for b in range(bins)])


def plot_training_curves(runs: dict[tuple[str, int], Path], labels: dict[str, str], path: Path,
                         bins: int = 8) -> None:
    """A line per variant: the binned training reward, mean +- std across its seeds."""
    from .files import pyplot

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.8))
    for name in dict.fromkeys(name for name, _ in runs):
        curves = torch.stack([training_curve(folder, bins) for (n, _), folder in runs.items() if n == name])
        total = json.loads((next(f for (n, _), f in runs.items() if n == name) / "summary.json").read_text())
        x = [(b + 0.5) * total["samples"] / curves.shape[1] for b in range(curves.shape[1])]
        mean, std = curves.mean(0), curves.std(0) if len(curves) > 1 else torch.zeros_like(curves[0])
        (line,) = ax.plot(x, mean, label=f"{labels.get(name, name)} ({len(curves)} seeds)")
        ax.fill_between(x, mean - std, mean + std, color=line.get_color(), alpha=0.15)
    ax.set(xlabel="Number of samples", ylabel=f"training reward ({total['reward']})")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="controls", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="launch/shapes.yaml")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--out", default="outputs/controls")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--samples", type=int, help="training budget per run (default: train.total_samples)")
    parser.add_argument("--variants", nargs="*", choices=[v.name for v in STUDY], default=[v.name for v in STUDY])
    parser.add_argument("--variant", dest="extra", action="append", default=[], metavar="NAME=K=V;K=V",
                        help="a further variant (repeatable), for ablations")
    parser.add_argument("--held-out", default="shapes", help="'shapes', 'eval' or a prompt file (as paper_claims)")
    parser.add_argument("--train-images", type=int, default=2, help="images per training prompt")
    parser.add_argument("--held-out-images", type=int, default=5, help="images per held-out prompt")
    parser.add_argument("--stop-after", choices=["train", "score"], help="train (and score) only; no table")
    args = parser.parse_args(argv)

    cfg = load_config(args.config, args.overrides)
    out = Path(args.out)
    variants = [v for v in STUDY if v.name in args.variants] + [parse_variant(t) for t in args.extra]
    samples = args.samples or cfg.train.total_samples
    runs = {(v.name, seed): train_or_reuse(variant_run(cfg, v, seed, samples, out), f"{v.name} seed {seed}")
            for v in variants for seed in args.seeds}
    if args.stop_after == "train":
        return 0
    sets = prompt_sets(cfg, held_out_prompts(cfg, args.held_out), args.train_images, args.held_out_images)
    scorer = Scorer(cfg, sets, out / "scores")
    try:
        scores = {"base": [scorer.scores("base", None)]}
        for (name, seed), folder in runs.items():
            scores.setdefault(name, []).append(scorer.scores(f"{name}-seed{seed}", folder))
    finally:
        scorer.close()
    if args.stop_after == "score":
        return 0
    rows = control_rows(scores)
    write_csv(out / "controls.csv", rows)
    labels = {"base": "base model"} | {v.name: v.label for v in variants}
    text = (f"`{args.config}` {' '.join(f'--set {o}' for o in args.overrides)}, {samples} samples per run, "
            f"seeds {args.seeds}.\n\n" + controls_markdown(rows, labels))
    (out / "controls.md").write_text(text + "\n")
    plot_training_curves(runs, labels, out / "controls_training_reward.png")
    print(text)
    return 0

