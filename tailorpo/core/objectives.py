"""Preference losses as pure functions on tensors: online ones on per-sample log-probabilities, offline
(pairwise) ones on per-sample noise-prediction errors.

Online. Every argument is (N,), one entry per (prompt, fine-tuned step) pair.

    h      = beta * [ (log pi(x^w) - log pi_ref(x^w)) - (log pi(x^l) - log pi_ref(x^l)) ]
    L_DPO  = -mean log sigmoid(h)

TailorPO (paper Eq. 10) and D3PO (Eq. 5) share this form. They differ in the data: TailorPO's x^w and x^l are
two children of ONE x_t (so both log-probs come from one forward), D3PO's sit on two trajectories with
different x_t^w, x_t^l, ranked by their final images. D3PO's code clamps each ratio pi/pi_ref to
[1 - c, 1 + c] (``train.eps = 0.1`` in yk7333/d3po ``config/base.py``); ``ratio_clip=None`` turns that off.

Offline. A pair of final images is noised with the SAME t and eps*; e = mean over dims of
(eps_pred - eps*)^2 per sample, e_ref the same for the reference (LoRA disabled). A lower error stands in
for a higher log-likelihood (the ELBO), hence the minus signs.

    Diffusion-DPO  h = -beta/2 * [ (e^w - e_ref^w) - (e^l - e_ref^l) ],  L = -mean log sigmoid(h)
    MaPO           m = g(e^w) - g(e^l),  g(e) = s e / (exp(s e) - 1),   L = mean e^w - beta_mapo mean log sigmoid(T m)
    Diff-contrast  h_ij = Diffusion-DPO h of winner i against loser j,  L = -1/M sum_ij W_ij log sigmoid(h_ij)

Papers: TailorPO (Ren et al., arXiv 2502.01667), D3PO (Yang et al., arXiv 2311.13231), DDPO (Black et al., arXiv
2305.13301), Diffusion-DPO (Wallace et al., arXiv 2311.12908), MaPO (Hong et al., arXiv 2406.06424), and
Diff-contrast ("Diffusion Preference Alignment via Relative Text-Image Contrast", a later version of Gu et al.'s
Diffusion-RPO, arXiv 2406.06382; its equation and section numbers are the ones cited here).
"""

from __future__ import annotations

import math
from collections import deque

import torch
import torch.nn.functional as F


def log_ratio_bounds(ratio_clip: float) -> tuple[float, float]:
    """[log(1 - c), log(1 + c)]: where D3PO's clamp of the ratio pi/pi_ref to [1 - c, 1 + c] puts log(pi/pi_ref)."""
    return math.log(1 - ratio_clip), math.log(1 + ratio_clip)


def clipped_log_ratio(log_prob: torch.Tensor, ref_log_prob: torch.Tensor, ratio_clip: float | None) -> torch.Tensor:
    """log(pi / pi_ref), clamped to [log(1 - c), log(1 + c)] as D3PO clamps the ratio itself."""
    log_ratio = log_prob - ref_log_prob
    if ratio_clip is None:
        return log_ratio
    return log_ratio.clamp(*log_ratio_bounds(ratio_clip))


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
    """Fraction of valid pairs where the implicit reward already prefers x^w (h > 0), a tie (h = 0) counting
    one half as in diffusers' ``diffusion_dpo`` example: a fresh LoRA equals the reference, so every h is
    exactly 0 at the start and the accuracy reads 0.5, chance, rather than 0."""
    correct = (logits > 0).float() + 0.5 * (logits == 0).float()
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


# Offline / pairwise objectives: per-sample noise-prediction errors stand in for log-probabilities.


def noise_prediction_error(eps_pred: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """(N,) e = mean over the non-batch dims of (eps_pred - eps)^2: the e_theta / e_ref of the losses below.

    Half precision is promoted to float32, as the diffusers and MaPO scripts do with ``.float()``: the losses
    scale differences of these errors by beta in the thousands, where fp16/bf16 rounding would swamp them.
    float64 stays float64."""
    dtype = torch.promote_types(eps_pred.dtype, torch.float32)
    squared = (eps_pred.to(dtype) - eps.to(dtype)).pow(2)  # (N, C, H, W)
    return squared.flatten(1).mean(dim=1)


def diffusion_dpo_logits(
    err_w: torch.Tensor, err_l: torch.Tensor, ref_err_w: torch.Tensor, ref_err_l: torch.Tensor, beta: float
) -> torch.Tensor:
    """Diffusion-DPO's inside term h = -beta/2 * [(e^w - e_ref^w) - (e^l - e_ref^l)]: h > 0 when the model
    lowered the winner's error, relative to the reference, more than the loser's.

    Wallace et al. 2024, Eq. 14 with T * omega(lambda_t) folded into beta, written as diffusers'
    ``examples/research_projects/diffusion_dpo/train_diffusion_dpo_sdxl.py`` does (``scale_term = -0.5 *
    beta_dpo``), so the papers' beta (2000 for SD1.5, 5000 for SDXL) applies as is; the SD1.5 script beside it
    drops the 1/2 (its beta_dpo is half ours). The loss is ``step_dpo_loss(h)``, the implicit accuracy
    ``preference_accuracy(h)``. Broadcasts: (M, 1) winners against (1, M) losers give Diff-contrast's matrix."""
    return -0.5 * beta * ((err_w - ref_err_w) - (err_l - ref_err_l))


_SERIES_BELOW = 1e-2  # |s e| under which g is its Taylor series; the first dropped term, x^6/30240, is < 4e-17


def mapo_score(err: torch.Tensor, snr_value: float) -> torch.Tensor:
    """g(e) = x / (exp(x) - 1) with x = s e: MaPO's stand-in for the likelihood, 1 at e = 0 and falling toward 0
    as the error grows (mapo-t2i/mapo ``train.py``, logged there as "Win Score" / "Lose Score").

    The closed form is 0/0 at e = 0, and near it autograd's gradient is a difference of two terms of size 1/x
    (garbage in float32 for x ~ 1e-7), so small x takes the series 1 - x/2 + x^2/12 - x^4/720: g(0) = 1,
    g'(0) = -1/2. Otherwise x e^-x / -expm1(-x), the same value without exp(x) overflowing (an inf/inf
    gradient) for a diverged model's large error. Errors are squared norms and s > 0, so x >= 0. Each branch
    only sees inputs it is safe on, because torch.where still backpropagates 0 * (the other branch's gradient),
    which is NaN if that gradient is inf."""
    x = snr_value * err
    small = x.abs() < _SERIES_BELOW
    x_small = torch.where(small, x, torch.zeros_like(x))
    x_large = torch.where(small, torch.ones_like(x), x)
    series = 1 - x_small / 2 + x_small**2 / 12 - x_small**4 / 720
    closed = x_large * torch.exp(-x_large) / -torch.expm1(-x_large)
    return torch.where(small, series, closed)


def mapo_log_odds(err_w: torch.Tensor, err_l: torch.Tensor, snr_value: float) -> torch.Tensor:
    """(N,) MaPO's margin g(e^w) - g(e^l), > 0 when the winner has the lower error (g falls with e). No
    reference error enters: MaPO needs no reference forward, no second model and no adapter toggling."""
    return mapo_score(err_w, snr_value) - mapo_score(err_l, snr_value)


def mapo_loss(err_w: torch.Tensor, log_odds: torch.Tensor, beta_mapo: float, num_train_timesteps: int) -> torch.Tensor:
    """MaPO (Hong et al., arXiv 2406.06424; mapo-t2i/mapo ``train.py``@b1c1088):
    L = mean(e^w) - beta_mapo * mean log sigmoid(T * m).

    The first term is plain denoising on the winners, so their likelihood rises and the two sides cannot sink
    together; the second widens the margin m, scaled by T = the scheduler's ``num_train_timesteps`` to stand
    for the whole chain. Public defaults (mapo-t2i/mapo ``args.py``): beta_mapo 0.1, snr_value 0.5."""
    margin_term = F.logsigmoid(num_train_timesteps * log_odds)  # (N,)
    return err_w.mean() - beta_mapo * margin_term.mean()


def clip_joint_embedding(image_embeds: torch.Tensor, text_embeds: torch.Tensor) -> torch.Tensor:
    """(M, D) f(y, x) = normalise(normalise(CLIP image) + normalise(CLIP text)), our default joint prompt+image
    embedding for Diff-contrast (the paper leaves the combination open). Normalising each modality first keeps
    either from dominating by its norm."""
    joint = F.normalize(image_embeds, dim=-1) + F.normalize(text_embeds, dim=-1)
    return F.normalize(joint, dim=-1)


def diff_contrast_weights(emb_w: torch.Tensor, emb_l: torch.Tensor, tau: float) -> torch.Tensor:
    """(M, M) W, row i weighting winner i's contrast against each of the M losers (Diff-contrast Sec. 2.1):
    W~_ij = exp(-(1 - cos(f_i^w, f_j^l)) / tau), each row normalised to sum 1.

    Written as a softmax over j, which cannot overflow at the paper's SD1.5 tau = 0.01. Small tau puts a row's
    weight on its most similar loser, large tau spreads it evenly (1/M)."""
    cos = F.normalize(emb_w, dim=-1) @ F.normalize(emb_l, dim=-1).T  # (M, M) cos(f_i^w, f_j^l)
    return torch.softmax(-(1 - cos) / tau, dim=1)


def diff_contrast_logits(
    err_w: torch.Tensor, err_l: torch.Tensor, ref_err_w: torch.Tensor, ref_err_l: torch.Tensor, beta: float
) -> torch.Tensor:
    """(M, M) h_ij, the Diffusion-DPO inside term of winner i against loser j. The diagonal holds the
    same-prompt pairs, so ``preference_accuracy(h.diagonal())`` is Diffusion-DPO's implicit accuracy."""
    return diffusion_dpo_logits(err_w[:, None], err_l[None, :], ref_err_w[:, None], ref_err_l[None, :], beta)


def diff_contrast_loss(logits: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Diff-contrast (Eq. 9): L = -1/M sum_i sum_j W_ij log sigmoid(h_ij).

    The weight multiplies log sigma, outside it (RPO puts it on the logit). Eq. 9's expectation is read as the
    paper's conditional-transport remark after it does: i uniform over the M winners, j ~ W_i. A mean over
    rows of W-weighted row sums: M = 1, or W = I (small tau, each winner nearest its own loser), gives
    Diffusion-DPO's loss exactly, where a plain mean over the M^2 entries would shrink the loss by 1/M."""
    return -(weights * F.logsigmoid(logits)).sum(dim=1).mean()
