"""The roles the driver calls, as plain classes: Ray wraps them as actors, tests can call them directly.

A sampler holds its own pipeline and a copy of the LoRA, replaced whenever the learner publishes a new
version; a rollout records the policy version it was drawn with. The learner holds the trainable LoRA, the
optimizer and the DDPO statistics, and evaluates and saves at the end.
"""

from __future__ import annotations

import json
import time
from dataclasses import replace
from pathlib import Path

import torch
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict

from tailorpo.checkpoint import Progress
from tailorpo.config import Config
from tailorpo.learner import Learner
from tailorpo.objectives import PerPromptStatTracker
from tailorpo.rollouts import Rollout, map_tensors
from tailorpo.trainer import (
    RunSummary,
    build_policy,
    build_reward_model,
    collect_rollout,
    finish_run,
    learn_from,
    maybe_checkpoint,
    resolve_device,
    resume_from,
    rollout_generator,
    seed_everything,
)

LoraState = dict[str, torch.Tensor]


def rollout_to(rollout: Rollout, device: torch.device | str) -> Rollout:
    """The rollout with every tensor on ``device``."""
    data = map_tensors(rollout.data, lambda value: value.to(device))
    return replace(rollout, images=rollout.images.to(device), rewards=rollout.rewards.to(device), data=data)


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

    def sample(self, state: LoraState, version: int, prompts: list[str], iteration: int, slot: int) -> Rollout:
        """A rollout with the LoRA of ``version``, drawn from the (seed, iteration, slot) noise stream."""
        self.load_lora(state, version)
        tick = time.perf_counter()
        rollout = collect_rollout(
            self.cfg, self.policy, self.reward, prompts, rollout_generator(self.cfg.seed, iteration, slot)
        )
        rollout.stats |= {"policy_version": float(version), "sample_time": time.perf_counter() - tick}
        rollout.sample_ids = [f"{iteration}:{slot}:{row}" for row in range(len(rollout.images))]
        return rollout_to(rollout, "cpu")


class LearnerWorker:
    def __init__(self, cfg: dict) -> None:
        self.cfg = Config.model_validate(cfg)
        seed_everything(self.cfg.seed)
        self.policy = build_policy(self.cfg, resolve_device(self.cfg.device))
        self.learner = Learner(self.policy, self.cfg.optim, self.cfg.algorithm)
        ddpo = self.cfg.algorithm.ddpo
        self.tracker = PerPromptStatTracker(ddpo.stat_buffer_size, ddpo.stat_min_count)
        self.updates_before = 0

    def lora_state(self) -> LoraState:
        return {k: v.detach().cpu().clone() for k, v in get_peft_model_state_dict(self.policy.unet).items()}

    def resume(self) -> tuple[Progress, torch.Tensor]:
        return resume_from(Path(self.cfg.output_dir), self.learner, self.tracker)

    def checkpoint_if_due(self, progress: Progress, prompt_state: torch.Tensor) -> None:
        maybe_checkpoint(self.cfg, self.learner, self.tracker, progress, prompt_state, self.updates_before)

    def train(self, *rollouts: Rollout) -> tuple[list[tuple[int, dict[str, float]]], LoraState]:
        """Learn from the rollouts in slot order (so the result does not depend on which sampler finished
        first); return (images, scalars) per rollout and the new LoRA weights."""
        self.updates_before = self.learner.updates
        results = [
            (len(r.images), learn_from(self.cfg, self.learner, self.tracker, rollout_to(r, self.policy.device)))
            for r in rollouts
        ]
        with open(Path(self.cfg.output_dir) / "ledger.jsonl", "a") as ledger:  # which samples each update saw
            ids = [i for r in rollouts for i in r.sample_ids]
            ledger.write(json.dumps({"updates": self.learner.updates, "samples": ids}) + "\n")
        return results, self.lora_state()

    def finish(self, samples: int, seconds: float) -> RunSummary:
        return finish_run(self.cfg, self.policy, build_reward_model(self.cfg), self.learner, samples, seconds)
