"""Policy losses for online preference optimization, as pure functions on per-sample log-probabilities.

Shapes: every argument is (N,), one entry per (prompt, fine-tuned step) pair.

    h      = beta * [ (log pi(x^w) - log pi_ref(x^w)) - (log pi(x^l) - log pi_ref(x^l)) ]
    L_DPO  = -mean log sigmoid(h)

TailorPO (paper Eq. 10) and D3PO (Eq. 5) share this form. They differ in the data: TailorPO's x^w and x^l are
two children of ONE x_t (so both log-probs come from one forward), D3PO's sit on two trajectories with
different x_t^w, x_t^l, ranked by their final images. D3PO's code clamps each ratio pi/pi_ref to
[1 - c, 1 + c] (``train.eps = 0.1`` in yk7333/d3po ``config/base.py``); ``ratio_clip=None`` turns that off.
"""

from __future__ import annotations

import math
from collections import deque

import torch
import torch.nn.functional as F


def clipped_log_ratio(log_prob: torch.Tensor, ref_log_prob: torch.Tensor, ratio_clip: float | None) -> torch.Tensor:
    """log(pi / pi_ref), clamped to [log(1 - c), log(1 + c)] as D3PO clamps the ratio itself."""
    log_ratio = log_prob - ref_log_prob
    if ratio_clip is None:
        return log_ratio
    return log_ratio.clamp(math.log(1 - ratio_clip), math.log(1 + ratio_clip))


def dpo_logits(
    log_prob_w: torch.Tensor,
    log_prob_l: torch.Tensor,
    ref_log_prob_w: torch.Tensor,
    ref_log_prob_l: torch.Tensor,
    beta: float,
    ratio_clip: float | None = None,
) -> torch.Tensor:
    """h = beta * (log-ratio of the winner - log-ratio of the loser); h > 0 means the policy prefers x^w."""
    return beta * (
        clipped_log_ratio(log_prob_w, ref_log_prob_w, ratio_clip)
        - clipped_log_ratio(log_prob_l, ref_log_prob_l, ratio_clip)
    )


def step_dpo_loss(logits: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
    """-mean log sigmoid(h) over the valid pairs (ties are invalid and dropped). Zero if none is valid."""
    losses = -F.logsigmoid(logits)
    if valid is None:
        return losses.mean()
    return (losses * valid).sum() / valid.sum().clamp(min=1)


def preference_accuracy(logits: torch.Tensor, valid: torch.Tensor | None = None) -> float:
    """Fraction of valid pairs where the implicit reward already prefers x^w (h > 0)."""
    correct = (logits > 0).float()
    if valid is None:
        return float(correct.mean())
    return float((correct * valid).sum() / valid.sum().clamp(min=1))


def normalized_advantages(
    rewards: torch.Tensor, mean: torch.Tensor | float, std: torch.Tensor | float, clip: float, eps: float = 1e-6
) -> torch.Tensor:
    """DDPO's advantage A = (r - mean) / (std + eps), clipped to [-clip, clip]."""
    return ((rewards - mean) / (std + eps)).clamp(-clip, clip)


class PerPromptStatTracker:
    """ddpo-pytorch's per-prompt reward statistics: the last ``buffer_size`` rewards of each prompt; until a
    prompt has ``min_count`` of them, the current batch's mean and std stand in (defaults 16 and 16, from
    ddpo-pytorch's ``config/base.py``). State lives across iterations, so the driver owns it."""

    def __init__(self, buffer_size: int = 16, min_count: int = 16) -> None:
        self.buffer_size = buffer_size
        self.min_count = min_count
        self.history: dict[str, deque[float]] = {}

    def advantages(self, prompts: list[str], rewards: torch.Tensor, clip: float) -> torch.Tensor:
        """(B,) advantages for one batch of final rewards, after adding them to the history."""
        out = torch.empty_like(rewards)
        for prompt in dict.fromkeys(prompts):
            rows = torch.tensor([p == prompt for p in prompts], device=rewards.device)
            seen = self.history.setdefault(prompt, deque(maxlen=self.buffer_size))
            seen.extend(rewards[rows].tolist())
            if len(seen) < self.min_count:
                mean, std = rewards.mean(), rewards.std(unbiased=False)
            else:
                history = torch.tensor(list(seen))
                mean, std = history.mean(), history.std(unbiased=False)
            out[rows] = normalized_advantages(rewards[rows], mean, std, clip)
        return out


def ddpo_loss(
    log_prob: torch.Tensor, old_log_prob: torch.Tensor, advantages: torch.Tensor, clip_range: float
) -> torch.Tensor:
    """DDPO-IS clipped surrogate: mean max(-A * ratio, -A * clip(ratio, 1 - c, 1 + c))."""
    ratio = torch.exp(log_prob - old_log_prob)
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1.0 - clip_range, 1.0 + clip_range)
    return torch.maximum(unclipped, clipped).mean()
