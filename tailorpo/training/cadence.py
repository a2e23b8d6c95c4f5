"""When a run checkpoints, evaluates and saves its LoRA: one rule for the one-process loop, the pair loop and
the Ray learner, checked once at the end of every iteration.

Units. ``train.checkpoint_every`` and ``eval.every`` count optimizer updates: an iteration makes none (while
gradients accumulate), one, or on Ray one per sampler's rollout, and a checkpoint is only exact between updates.
``train.save_every`` counts iterations (a rollout from each sampler, or a batch of pairs.source pairs), as its
description has always said: the LoRA is saved as it stands, pending gradients or not.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

from tailorpo.config import Config


class Counters(NamedTuple):
    iteration: int
    updates: int


@dataclass(frozen=True)
class Due:
    checkpoint: bool
    eval: bool
    save_lora: bool


def crossed(every: int, before: int, after: int) -> bool:
    """Whether going from ``before`` to ``after`` passed a multiple of ``every`` (0: never); so an action is due
    once however many updates one iteration makes."""
    return bool(every) and after // every > before // every


@dataclass(frozen=True)
class Cadence:
    checkpoint_every: int  # optimizer updates
    eval_every: int  # optimizer updates
    save_every: int  # iterations

    @classmethod
    def of(cls, cfg: Config) -> Cadence:
        return cls(cfg.train.checkpoint_every, cfg.eval.every, cfg.train.save_every)

    def due(self, before: Counters, after: Counters, gradients_pending: bool) -> Due:
        """What the iteration that took the counters from ``before`` to ``after`` makes due."""
        return Due(
            checkpoint=crossed(self.checkpoint_every, before.updates, after.updates) and not gradients_pending,
            eval=crossed(self.eval_every, before.updates, after.updates),
            save_lora=crossed(self.save_every, before.iteration, after.iteration),
        )
