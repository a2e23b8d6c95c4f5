"""Reward models behind one interface (``RewardModel``), built by name from the catalogue (``catalogue.py``).

The names below are imported on first use (PEP 562): ``tailorpo.config`` and the CLI read the torch-free
``catalogue`` and ``service`` modules at import, so ``tailorpo --help`` and a config error do not wait for torch.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from tailorpo.rewards.base import (
        RewardInputError,
        RewardModel,
        RewardOutput,
        TorchReward,
        differentiable_reward,
    )
    from tailorpo.rewards.catalogue import build_reward, is_differentiable

_MODULE_OF = {
    "RewardInputError": "base",
    "RewardModel": "base",
    "RewardOutput": "base",
    "TorchReward": "base",
    "differentiable_reward": "base",
    "build_reward": "catalogue",
    "is_differentiable": "catalogue",
}
__all__ = [
    "RewardInputError",
    "RewardModel",
    "RewardOutput",
    "TorchReward",
    "build_reward",
    "differentiable_reward",
    "is_differentiable",
]


def __getattr__(name: str) -> Any:
    """Import the module defining ``name`` when ``name`` is first asked for."""
    if name not in _MODULE_OF:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(import_module(f"{__name__}.{_MODULE_OF[name]}"), name)
