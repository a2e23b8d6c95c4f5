"""The roles the driver calls, as plain classes: Ray wraps them as actors, tests can call them directly.

A sampler holds its own pipeline and a copy of the LoRA, replaced whenever the learner publishes a new
version; a rollout records the policy version it was drawn with. The learner holds the trainable LoRA, the
optimizer and the DDPO statistics; after each iteration it does what the cadence makes due (checkpoint, eval,
``train.save_every``) as the one-process loop does, and it evaluates and saves at the end.
"""

from __future__ import annotations

import json
import os
from dataclasses import replace
from pathlib import Path

import torch
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict

from tailorpo.algorithms.rollouts import Rollout, map_tensors
from tailorpo.config import Config
from tailorpo.core.objectives import PerPromptStatTracker
from tailorpo.rewards import RewardModel
from tailorpo.training.build import (
    build_learner,
    build_policy,
    build_reward_model,
    resolve_device,
    rollout_generator,
    seed_everything,
)
from tailorpo.training.cadence import Counters
from tailorpo.training.checkpoint import Progress, latest_checkpoint
from tailorpo.training.loop import (
    collect_rollout,
    end_of_iteration,
    finish_run,
    learn_from,
    resume_from,
)
from tailorpo.training.run_log import EvalSnapshot, RunSummary

LoraState = dict[str, torch.Tensor]


def rollout_to(rollout: Rollout, device: torch.device | str) -> Rollout:
    """The rollout with every tensor on ``device``."""
    data = map_tensors(rollout.data, lambda value: value.to(device))
    return replace(rollout, images=rollout.images.to(device), rewards=rollout.rewards.to(device), data=data)


def _ledger_entry(line: str) -> dict | None:
    """A ledger line, or None for the torn last line of a learner killed mid-write."""
    try:
        return json.loads(line)
    except json.JSONDecodeError:
        return None


class SamplerWorker:
    def __init__(self, cfg: dict) -> None:
        self.cfg = Config.model_validate(cfg)
        seed_everything(self.cfg.seed)
        self.policy = build_policy(self.cfg, resolve_device(self.cfg.device))
        self.reward = build_reward_model(self.cfg)
        self.version = -1

    def load_lora(self, state: LoraState, version: int) -> None:
        if version != self.version:
            set_peft_model_state_dict(self.policy.unet, state)
            self.version = version

    def sample(
        self, state: LoraState, version: int, prompts: list[str], iteration: int, slot: int
    ) -> tuple[dict[str, float], Rollout]:
        """A rollout with the LoRA of ``version``, drawn from the (seed, iteration, slot) noise stream, and
        its small summary (images, seconds) that the driver reads without fetching the rollout."""
        self.load_lora(state, version)
        rollout = collect_rollout(
            self.cfg, self.policy, self.reward, prompts, rollout_generator(self.cfg.seed, iteration, slot)
        )
        rollout.stats["policy_version"] = float(version)
        rollout.sample_ids = [f"{iteration}:{slot}:{row}" for row in range(len(rollout.images))]
        return {"images": len(rollout.images), "sample_time": rollout.stats["sample_time"]}, rollout_to(rollout, "cpu")


class LearnerWorker:
    def __init__(self, cfg: dict) -> None:
        self.cfg = Config.model_validate(cfg)
        seed_everything(self.cfg.seed)
        self.policy = build_policy(self.cfg, resolve_device(self.cfg.device))
        self.learner = build_learner(self.cfg, self.policy, lambda: self.reward)
        ddpo = self.cfg.algorithm.ddpo
        self.tracker = PerPromptStatTracker(ddpo.stat_buffer_size, ddpo.stat_min_count)
        self.updates_before = 0
        self.ledger = Path(self.cfg.output_dir) / "ledger.jsonl"
        self._reward: RewardModel | None = None

    @property
    def reward(self) -> RewardModel:
        """A reward client for evaluation, opened on first use (the learner does not score during training)."""
        if self._reward is None:
            self._reward = build_reward_model(self.cfg)
        return self._reward

    def lora_state(self) -> LoraState:
        return {k: v.detach().cpu().clone() for k, v in get_peft_model_state_dict(self.policy.unet).items()}

    def resume(self, fresh_if_none: bool = False) -> tuple[Progress, torch.Tensor | None]:
        """Load the newest checkpoint (or, with ``fresh_if_none`` and no checkpoint yet, keep the fresh state)
        and cut the ledger back to it: the updates after it are replayed, so they must not count twice."""
        if fresh_if_none and latest_checkpoint(self.cfg.output_dir) is None:
            progress, prompt_state = Progress(samples=0, iteration=0), None
        else:
            progress, prompt_state = resume_from(Path(self.cfg.output_dir), self.learner, self.tracker)
        if self.ledger.exists():
            kept = [line for line in self.ledger.read_text().splitlines()
                    if (entry := _ledger_entry(line)) and entry["updates"] <= self.learner.updates]
            tmp = self.ledger.with_suffix(".tmp")
            tmp.write_text("".join(f"{line}\n" for line in kept))
            os.replace(tmp, self.ledger)
        return progress, prompt_state

    def train(self, *rollouts: Rollout) -> tuple[list[tuple[int, dict[str, float]]], LoraState]:
        """Learn from the rollouts in slot order (so the result does not depend on which sampler finished
        first); return (images, scalars) per rollout and the new LoRA weights."""
        self.updates_before = self.learner.updates
        results = [
            (len(r.images), learn_from(self.cfg, self.learner, self.tracker, rollout_to(r, self.policy.device)))
            for r in rollouts
        ]
        with open(self.ledger, "a") as ledger:  # which samples each update saw
            ids = [i for r in rollouts for i in r.sample_ids]
            ledger.write(json.dumps({"updates": self.learner.updates, "samples": ids}) + "\n")
        return results, self.lora_state()

    def end_iteration(self, progress: Progress, prompt_state: torch.Tensor) -> EvalSnapshot | None:
        """After ``train`` on an iteration's rollouts (``progress`` counts it): the checkpoint, eval and LoRA
        save that are due, as the one-process loop does them; returns the eval for the driver's log."""
        before = Counters(progress.iteration - 1, self.updates_before)
        return end_of_iteration(self.cfg, self.policy, lambda: self.reward, self.learner, self.tracker, before,
                                progress, prompt_state)

    def finish(self, samples: int, seconds: float, figures: dict[str, float | dict | None]) -> RunSummary:
        return finish_run(self.cfg, self.policy, self.reward, self.learner, samples, seconds, figures)
