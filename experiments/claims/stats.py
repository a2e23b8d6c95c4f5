"""The math of the paper-claims experiments: pure functions of tensors, tested against hand computations."""

from __future__ import annotations

import torch

from tailorpo.training.evaluation import mean_std


def order_disagreement(
    step_a: torch.Tensor, step_b: torch.Tensor, final_a: torch.Tensor, final_b: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per step, the share of pairs (a, b) whose step-wise order disagrees with their final order.

    step_a, step_b: (S, N) step-wise rewards of the two samples of N pairs at S steps; final_a, final_b: (N,)
    or (S, N). A pair tied in either reward has no order and is left out. Returns (rates (S,), counted (S,));
    a step with nothing counted has rate NaN."""
    step_sign = torch.sign(step_a - step_b)  # (S, N)
    final_sign = torch.sign(final_a - final_b).expand_as(step_sign)
    counted = (step_sign != 0) & (final_sign != 0)
    disagree = counted & (step_sign != final_sign)
    return disagree.sum(1) / counted.sum(1), counted.sum(1)


def success_rates(r_x: torch.Tensor, r_plus: torch.Tensor, r_minus: torch.Tensor) -> tuple[float, float]:
    """Table 1: (share with r(x^+) > r(x), share with r(x^-) < r(x)) over samples (N,); strict, so an
    unmoved sample counts as a failure."""
    return float((r_plus > r_x).float().mean()), float((r_minus < r_x).float().mean())


def seed_band(curves: list[dict[int, float]]) -> tuple[list[int], torch.Tensor, torch.Tensor]:
    """Fig. 4's band: the sample counts every seed's curve has, and the mean and (population) std of the
    reward across seeds at each of them: (steps, mean (K,), std (K,))."""
    steps = sorted(set.intersection(*(set(c) for c in curves)))
    values = torch.tensor([[c[s] for c in curves] for s in steps], dtype=torch.float64)  # (K, seeds)
    mean, std = mean_std(values)
    return steps, mean, std


def guidance_figures(r_x: torch.Tensor, r_plus: torch.Tensor, r_minus: torch.Tensor) -> tuple[float, ...]:
    """(raised share, lowered share, mean gain of x^+, mean gain of x^-) over samples (N,)."""
    return (*success_rates(r_x, r_plus, r_minus), float((r_plus - r_x).mean()), float((r_minus - r_x).mean()))


def paired_bootstrap(values: torch.Tensor, draws: int = 10_000, level: float = 0.95,
                     seed: int = 0) -> tuple[float, float, float]:
    """(mean, low, high): the mean of (S, I) values (paired differences of S seeds' runs on the same I images,
    or rewards) and its two-level percentile bootstrap interval: each draw resamples the seeds, then the
    images (the same image draw for every seed, since image i is the same noise and prompt in each), so both
    the seed-to-seed spread and the image sample count. One seed: the images alone."""
    s, i = values.shape
    generator = torch.Generator().manual_seed(seed)
    seeds = torch.randint(s, (draws, s), generator=generator)
    images = torch.randint(i, (draws, i), generator=generator)
    per_seed = values.double()[:, images].mean(-1)  # (S, draws): each seed's mean over the drawn images
    means = per_seed.gather(0, seeds.T).mean(0)  # (draws,)
    tail = (1 - level) / 2
    low, high = torch.quantile(means, torch.tensor([tail, 1 - tail], dtype=torch.float64)).tolist()
    return float(values.double().mean()), low, high
