"""Which of two samples won: one rule for branch pairs, trajectory pairs and pair data."""

from __future__ import annotations

import torch


def select_winner(reward_0: torch.Tensor, reward_1: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(winner_is_1, tie) per row: the higher reward wins; on a tie child 0 counts as the winner."""
    return reward_1 > reward_0, reward_1 == reward_0


def order_by_winner(
    winner_is_1: torch.Tensor, value_0: torch.Tensor, value_1: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Row-wise (winner's value, loser's value) from the values of child/trajectory 0 and 1."""
    mask = winner_is_1.view(-1, *([1] * (value_0.ndim - 1)))
    return torch.where(mask, value_1, value_0), torch.where(mask, value_0, value_1)
