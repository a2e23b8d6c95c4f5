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


def best_and_worst(scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(best, worst) child index per column of (n, B) scores: the first maximum and the last minimum, so
    children of equal scores still form a pair of two distinct children (for n = 2 exactly ``select_winner``'s
    rule: on a tie child 0 is the winner and child 1 the loser)."""
    last_minimum = scores.shape[0] - 1 - scores.flip(0).argmin(dim=0)
    return scores.argmax(dim=0), last_minimum


def gap_is_valid(reward_w: torch.Tensor, reward_l: torch.Tensor, min_gap: float = 0.0) -> torch.Tensor:
    """Pairs that train: |r_w - r_l| > min_gap. Ties always drop; a positive gap also drops pairs whose
    ranking is within the reward's noise (SPO, Liang et al., arXiv 2406.04314)."""
    return (reward_w - reward_l).abs() > min_gap


def pick(values: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """values[index[b], b] per column b of (n, B, ...) values: each row's chosen child."""
    return values[index, torch.arange(values.shape[1], device=values.device)]
