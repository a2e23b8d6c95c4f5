"""Reward models behind one interface (``RewardModel``), built by name from the config."""

from __future__ import annotations

from tailorpo.rewards.base import (
    RewardInputError,
    RewardModel,
    RewardOutput,
    TorchReward,
    differentiable_reward,
)
from tailorpo.rewards.colorfulness import Colorfulness
from tailorpo.rewards.jpeg import JpegCompressibility

REWARDS: dict[str, type[RewardModel]] = {
    "jpeg": JpegCompressibility,
    "colorfulness": Colorfulness,
}


def build_reward(name: str) -> RewardModel:
    if name not in REWARDS:
        raise ValueError(f"reward.name={name!r} is not a known reward; choose one of {sorted(REWARDS)}")
    return REWARDS[name]()


__all__ = [
    "REWARDS",
    "RewardInputError",
    "RewardModel",
    "RewardOutput",
    "TorchReward",
    "build_reward",
    "differentiable_reward",
]
