"""What a run reports: TensorBoard scalars and image grids against the sample count, the progress bar,
optional Weights & Biases, and the summary written at the end.

The local trainer and the Ray driver feed the same log, so a run's curves read the same wherever it ran.
Throughput figures: samples/s over the training loop, reward latency (seconds per reward call, measured in
the samplers), and on Ray the samplers' idle fraction, 1 - busy / (samplers x wall time): the share of sampler
time spent waiting for the learner, which ``runtime.pipeline`` reduces.

Per fine-tuned step k the learner's ``steps/k{k}/<name>`` scalars go to TensorBoard as they are, and their
means over the run to ``summary.json``'s ``per_step`` table (not to the printed summary).
"""

from __future__ import annotations

import json
import time
from collections import defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from diffusers.utils import make_image_grid
from PIL import Image
from torch.utils.tensorboard import SummaryWriter
from tqdm.auto import tqdm

from tailorpo.algorithms.learner import split_step_key
from tailorpo.config import Config, ConfigError
from tailorpo.rewards.images import resize_and_center_crop

# What an eval keeps of its images for the grids, so memory stays bounded: 500 SD prompts x 5 images at 512 px
# would hold 8 GB per model; 45 prompts (the paper's training set) x 5 images at 256 px hold 177 MB.
GRID_PROMPTS = 45
GRID_TILE = 256  # largest side of a kept image


def image_grid(rows: list[torch.Tensor]) -> Image.Image:
    """One grid row per tensor of images (B, 3, H, W) in [0, 1]."""
    pil = [
        Image.fromarray((img.permute(1, 2, 0).cpu().numpy() * 255).round().astype("uint8"))
        for images in rows
        for img in images
    ]
    return make_image_grid(pil, rows=len(rows), cols=len(rows[0]))


def grid_thumbnails(images: torch.Tensor) -> torch.Tensor:
    """Images as grids keep them: on the CPU, at most ``GRID_TILE`` pixels a side."""
    if images.shape[-1] > GRID_TILE:
        images = resize_and_center_crop(images, GRID_TILE).clamp(0, 1)
    return images.cpu()


def comparison_grid(base: torch.Tensor, lora: torch.Tensor, images_per_prompt: int) -> Image.Image:
    """A row per prompt: its base images, then the LoRA's from the same noise, in the same order."""
    pairs = zip(base.split(images_per_prompt), lora.split(images_per_prompt), strict=True)
    return image_grid([torch.cat(pair) for pair in pairs])


@dataclass
class EvalSnapshot:
    """The fixed eval prompts rendered with fixed noise after ``updates`` optimizer steps."""

    updates: int
    rewards: torch.Tensor  # (P * I,) one reward per image
    images: torch.Tensor  # grid thumbnails, prompt-major: I images of each of the first GRID_PROMPTS prompts


@dataclass
class RunSummary:
    algorithm: str
    samples: int
    updates: int
    seconds: float
    reward: str
    eval_reward_base: float
    eval_reward_trained: float
    output_dir: str
    samples_per_second: float = 0.0
    reward_latency_s: float = 0.0  # per reward call, as the samplers saw it
    reward_time_fraction: float = 0.0  # share of sampling time spent waiting for rewards
    sampler_idle_fraction: float | None = None  # Ray runs only
    sample_seconds_per_rollout: float = 0.0  # one sampler drawing one rollout
    train_seconds_per_rollout: float = 0.0  # the learner training on one: a learner feeds ~sample/train samplers
    train_reward_start: float | None = None  # mean training reward over the first tenth of the run's rollouts
    train_reward_end: float | None = None  # ... and over the last tenth (None for pair objectives: no reward)
    sampler_redraws: int | None = None  # Ray runs: rollouts redrawn after their sampler died
    learner_restarts: int | None = None  # Ray runs: learners replaced from the newest checkpoint
    per_step: dict[int, dict[str, float]] | None = None  # fine-tuned step k -> learner scalar -> mean over the run

    def text(self) -> str:
        """Lines that apply to this run: pair objectives have no sampling and no training reward."""
        idle = "" if self.sampler_idle_fraction is None else f", samplers idle {self.sampler_idle_fraction:.0%}"
        lines = [f"{self.algorithm}: {self.samples} samples, {self.updates} LoRA updates in {self.seconds:.1f}s "
                 f"({self.samples_per_second:.2f} samples/s{idle})"]
        if self.sample_seconds_per_rollout:
            lines.append(f"per rollout: sampling {self.sample_seconds_per_rollout:.2f}s, "
                         f"training {self.train_seconds_per_rollout:.2f}s")
        if self.reward_latency_s:
            lines.append(f"reward calls: {self.reward_latency_s * 1000:.1f} ms each, "
                         f"{self.reward_time_fraction:.0%} of sampling")
        if self.sampler_redraws or self.learner_restarts:
            lines.append(f"recovered from faults: {self.sampler_redraws} rollouts redrawn, "
                         f"{self.learner_restarts} learner restarts")
        if self.train_reward_start is not None:
            lines.append(f"train {self.reward}: {self.train_reward_start:.4f} (first tenth) -> "
                         f"{self.train_reward_end:.4f} (last tenth)")
        gain = self.eval_reward_trained - self.eval_reward_base
        lines += [f"eval {self.reward}: base {self.eval_reward_base:.4f} -> trained {self.eval_reward_trained:.4f} "
                  f"({gain:+.4f})", f"outputs: {self.output_dir}"]
        return "\n".join(lines)

    def write(self, path: Path) -> None:
        path.write_text(json.dumps(asdict(self), indent=2))


def start_wandb(cfg: Config, out: Path):
    """A W&B run mirroring the TensorBoard scalars; ``WANDB_MODE=offline`` works without network."""
    try:
        import wandb
    except ImportError:
        raise ConfigError(
            "log.wandb: the wandb package is not installed; pip install wandb, or set log.wandb=false"
        ) from None
    return wandb.init(project=cfg.log.wandb_project, dir=str(out), config=cfg.model_dump(mode="json"),
                      name=out.name)


class RunLog:
    """Scalars per rollout and per iteration, eval grids, and the run's throughput totals."""

    def __init__(self, cfg: Config, out: Path, progress: bool, samples: int = 0) -> None:
        self.out = out
        self.writer = SummaryWriter(str(out / "tensorboard"))
        self.wandb = start_wandb(cfg, out) if cfg.log.wandb else None
        self.bar = tqdm(total=cfg.train.total_samples, initial=samples, unit="img", desc=cfg.algorithm.name,
                        disable=not progress)
        self.images_per_prompt = cfg.eval.images_per_prompt
        self.samples = self.first_sample = samples
        self.started = time.perf_counter()
        self.rollouts = 0
        self.rollout_rewards: list[float] = []  # online rollouts; pair batches carry no reward of their own
        self.sample_seconds = self.train_seconds = self.reward_seconds = self.reward_calls = self.sampler_seconds = 0.0
        self.per_step: defaultdict[tuple[int, str], list[float]] = defaultdict(list)  # (k, name) -> per rollout

    def _log(self, scalars: dict[str, float]) -> None:
        for key, value in scalars.items():
            self.writer.add_scalar(key, value, self.samples)
        if self.wandb is not None:
            self.wandb.log(scalars, step=self.samples)

    def record(self, images: int, stats: dict[str, float]) -> None:
        """One rollout the learner trained on, with its scalars (loss, rewards, timings, ...)."""
        self.samples += images
        self.rollouts += 1
        if "reward_mean" in stats:
            self.rollout_rewards.append(stats["reward_mean"])
        self.sample_seconds += stats.get("sample_time", 0.0)
        self.train_seconds += stats.get("train_time", 0.0)
        self.reward_seconds += stats.get("reward_time", 0.0)
        self.reward_calls += stats.get("reward_calls", 0.0)
        scalars = {}
        for key, value in stats.items():
            if (step := split_step_key(key)) is None:
                scalars[f"train/{key}"] = value
            else:
                scalars[key] = value
                self.per_step[step].append(value)
        if stats.get("reward_calls"):
            scalars["train/reward_latency"] = stats["reward_time"] / stats["reward_calls"]
        self._log(scalars)
        self.bar.update(images)
        shown = ("reward_mean", "loss", "preference_accuracy")
        self.bar.set_postfix({key: f"{stats[key]:.4g}" for key in shown if key in stats})

    def record_iteration(self, images: int, seconds: float, sampler_busy: list[float] | None = None) -> None:
        """Throughput of one iteration; ``sampler_busy`` lists each sampler's seconds of work in it (Ray)."""
        scalars = {"perf/samples_per_second": images / seconds}
        if sampler_busy is not None:
            self.sampler_seconds += len(sampler_busy) * seconds
            scalars["perf/sampler_idle_fraction"] = max(0.0, 1 - sum(sampler_busy) / (len(sampler_busy) * seconds))
        self._log(scalars)

    def record_eval(self, snapshot: EvalSnapshot) -> None:
        """Eval reward and the fixed-prompt grid (one row per prompt) to TensorBoard and ``eval/``."""
        grid = image_grid(list(snapshot.images.split(self.images_per_prompt)))
        (self.out / "eval").mkdir(exist_ok=True)
        grid.save(self.out / "eval" / f"samples-{snapshot.updates:06d}.png")
        self.writer.add_image("eval/samples", np.asarray(grid), self.samples, dataformats="HWC")
        self._log({"eval/reward_mean": float(snapshot.rewards.mean()),
                   "eval/reward_std": float(snapshot.rewards.std(unbiased=False))})
        if self.wandb is not None:
            import wandb

            self.wandb.log({"eval/samples": wandb.Image(grid)}, step=self.samples)

    def step_means(self) -> dict[int, dict[str, float]] | None:
        """Each fine-tuned step's scalars averaged over the rollouts that had them, noisiest step first; None
        for a learner without per-step scalars (the pair objectives)."""
        if not self.per_step:
            return None
        table: dict[int, dict[str, float]] = {}
        for (k, name), values in sorted(self.per_step.items(), key=lambda item: -item[0][0]):
            table.setdefault(k, {})[name] = float(np.mean(values))
        return table

    def figures(self) -> dict[str, float | dict | None]:
        """The run's totals for the summary (this process's share of the run, after a resume)."""
        seconds = time.perf_counter() - self.started
        rewards = self.rollout_rewards
        tenth = max(1, len(rewards) // 10)
        busy = self.sample_seconds
        return {
            "samples_per_second": (self.samples - self.first_sample) / seconds,
            "reward_latency_s": self.reward_seconds / self.reward_calls if self.reward_calls else 0.0,
            "reward_time_fraction": self.reward_seconds / busy if busy else 0.0,
            "sampler_idle_fraction": max(0.0, 1 - busy / self.sampler_seconds) if self.sampler_seconds else None,
            "sample_seconds_per_rollout": busy / max(1, self.rollouts),
            "train_seconds_per_rollout": self.train_seconds / max(1, self.rollouts),
            "train_reward_start": float(np.mean(rewards[:tenth])) if rewards else None,
            "train_reward_end": float(np.mean(rewards[-tenth:])) if rewards else None,
            "per_step": self.step_means(),
        }

    def close(self) -> None:
        self.bar.close()
        self.writer.close()
        if self.wandb is not None:
            self.wandb.finish()
