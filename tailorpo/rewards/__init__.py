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


def is_differentiable(name: str) -> bool:
    """Whether the in-process reward ``name`` returns gradients, known before it loads: the learned reward
    models (not in ``REWARDS``) are torch models."""
    return REWARDS.get(name, TorchReward).differentiable


def build_reward(name: str) -> RewardModel:
    """An in-process reward: one of ``REWARDS``, or a learned reward server's model with its default weights."""
    from reward_servers import SERVABLE, load_reward_model  # imported late: reward_servers imports this package

    if name not in SERVABLE:
        raise ValueError(f"reward.name={name!r} is not a known reward; choose one of {SERVABLE}")
    return load_reward_model(name)


__all__ = [
    "REWARDS",
    "RewardInputError",
    "RewardModel",
    "RewardOutput",
    "TorchReward",
    "build_reward",
    "differentiable_reward",
    "is_differentiable",
]
