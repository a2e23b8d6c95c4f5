"""Exact per-step check of TailorPO's sibling ranking (Eq. 12) and TailorPO-G's guidance step (Eq. 14).

A Gaussian mixture in d dims stands in for the data and its exact denoiser for the model, sampled with SD v1.5's
20-step DDIM schedule (eta = 1). Each step reports how often r(x0_hat) ranks two children of one x_t as the exact
E[r(x_0) | x_{t-1}] does (r(x) = -|x - target|^2), the same for one-sample estimates, and what one guidance step
on the winner does to the exact expected reward. See ``tailorpo/core/gaussian_mixture.py``.

    python experiments/analytic_testbed.py --out outputs/analytic_testbed.md
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from tailorpo.core.gaussian_mixture import GaussianMixture, StepRanking, measure_step_ranking
from tailorpo.core.guidance import cosine_eta_schedule
from tailorpo.diffusion.policy import step_alphas
from tailorpo.tiny.models import sd_scheduler


def random_mixture(dim: int, components: int, generator: torch.Generator) -> tuple[GaussianMixture, torch.Tensor]:
    """Means of norm ~1.5 (latent-scale data), stds in [0.1, 0.5] so the posterior spread differs between
    components (the Jensen gap E[r|x] - r(x0_hat) is minus that spread), and a target between two of the means."""
    weights = torch.rand(components, generator=generator, dtype=torch.float64) + 0.5
    means = torch.randn(components, dim, generator=generator, dtype=torch.float64)
    means = 1.5 * means / means.norm(dim=1, keepdim=True)
    stds = 0.1 + 0.4 * torch.rand(components, generator=generator, dtype=torch.float64)
    mixture = GaussianMixture(weights / weights.sum(), means, stds)
    return mixture, 0.5 * (means[0] + means[1])


def sd_schedule(num_steps: int) -> list[tuple[float, float]]:
    """(alpha_bar_t, alpha_bar_{t-1}) per step of SD v1.5's DDIM scheduler, first step first."""
    scheduler = sd_scheduler()
    scheduler.set_timesteps(num_steps)
    return [step_alphas(scheduler, int(t)) for t in scheduler.timesteps]


def markdown_table(rows: list[StepRanking]) -> str:
    header = (
        "| step k | sqrt(1-abar_{t-1}) | sigma_t | mean sibling gap in E[r] | agree r(x0_hat) "
        "| agree 1 posterior draw | agree 1 DDIM rollout "
        "| guided: E[r] up | guided: mean E[r] gain | guided: r(x0_hat) up |\n|" + "---|" * 10
    )
    lines = [
        f"| {r.step} | {(1 - r.alpha_prev) ** 0.5:.3f} | {r.sigma:.3f} | {r.sibling_gap:.4f} | {r.agree_x0_hat:.3f} "
        f"| {r.agree_posterior_sample:.3f} | {r.agree_rollout:.3f} | {r.guided_up:.3f} | {r.guided_gain:+.4f} "
        f"| {r.guided_proxy_up:.3f} |"
        for r in rows
    ]
    return "\n".join([header, *lines])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="markdown file to write the table to")
    parser.add_argument("--dim", type=int, default=8)
    parser.add_argument("--components", type=int, default=6)
    parser.add_argument("--chains", type=int, default=16384, help="sibling pairs per step")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--delta", type=float, default=0.5, help="r_high - r in Eq. 14")
    parser.add_argument("--eta-min", type=float, default=0.1)
    parser.add_argument("--eta-max", type=float, default=0.2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    torch.set_num_threads(1)  # (B, K, d) tensors this small only pay for a thread pool's wake-ups on a busy machine
    start = time.perf_counter()
    generator = torch.Generator().manual_seed(args.seed)
    mixture, target = random_mixture(args.dim, args.components, generator)
    eta = cosine_eta_schedule(list(range(args.steps, 0, -1)), args.eta_min, args.eta_max)
    rows = measure_step_ranking(
        mixture,
        target,
        sd_schedule(args.steps),
        args.chains,
        [eta[k] for k in range(args.steps, 0, -1)],
        args.delta,
        generator,
    )
    setup = (
        f"{args.dim}-D mixture of {args.components} Gaussians, r(x) = -|x - target|^2, {args.chains} sibling pairs "
        f"per step, SD v1.5 DDIM schedule ({args.steps} steps, eta = 1), guidance eta_t cosine "
        f"{args.eta_min}..{args.eta_max}, delta = {args.delta}, seed {args.seed}"
    )
    text = f"{setup}\n\n{markdown_table(rows)}\n"
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(text)
    print(f"({time.perf_counter() - start:.1f} s)")


if __name__ == "__main__":
    main()
