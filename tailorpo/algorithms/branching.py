"""TailorPO's sampler: branch pairs from ONE x_t, ranked by the step-wise reward, the winner continues.

At a fine-tuned step k (x_k -> x_{k-1}) with x_t = x_k:
    x^i_{t-1} = mu_theta(x_t) + sigma_t z_i,   i = 0, 1            (same x_t, same eps)
    r_t(c, x^i_{t-1}) = r(c, decode(x0_hat(x^i_{t-1})))             (Eq. 12; one batched UNet call at t-1)
    x^w, x^l = the higher / lower;  TailorPO-G: x^w <- x^+ (Eq. 14)
and the chain continues from x^w, whose UNet output at t-1 is the next step's eps (never recomputed).

``BranchingConfig`` generalises this as SPO does (Liang et al., Step-aware Preference Optimization,
arXiv 2406.04314): n >= 2 children with the pair best vs worst, pairs within a reward gap dropped, and the
chain continued from a random child; it offers a random-label control (winner = coin flip) and an upper bound
that ranks the children by their expected final reward, estimated from chains continued to x_0.

Which steps branch may differ per trajectory (``steps.StepPlan``): at a step where only some rows branch, the
others take a plain DDIM step.
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from typing import NamedTuple

import torch

from tailorpo.algorithms.rollouts import Rollout, denoise, keep_trained, stack_pairs
from tailorpo.algorithms.steps import StepPlan, as_plan
from tailorpo.config import BranchingConfig, GuidanceConfig
from tailorpo.core.ddim import ddim_sigma
from tailorpo.core.guidance import cosine_eta_schedule, guide, guide_in_sigma_units
from tailorpo.core.ranking import best_and_worst, gap_is_valid, pick
from tailorpo.diffusion.policy import DiffusionPolicy, PromptEmbeds
from tailorpo.rewards import RewardModel, differentiable_reward


def sample_children(
    policy: DiffusionPolicy,
    step_index: int,
    eps: torch.Tensor,
    x_t: torch.Tensor,
    generator: torch.Generator,
    num_children: int = 2,
) -> torch.Tensor:
    """(num_children, B, C, h, w) samples of pi(x_{t-1} | x_t, c): one mean, independent noise."""
    mean, sigma = policy.mean(step_index, eps, x_t)
    return mean + sigma * policy.noise((num_children, *x_t.shape), generator)


def step_reward_fn(
    policy: DiffusionPolicy,
    reward: RewardModel,
    step_index: int,
    embeds: PromptEmbeds,
    prompts: list[str],
    fixed_eps: torch.Tensor | None = None,
    differentiable: bool = True,
) -> Callable[[torch.Tensor], torch.Tensor]:
    """r_t(c, x_{t-1}) = r(c, decode(x0_hat(x_{t-1}))) as a differentiable function of x_{t-1} (Eq. 12).

    With ``fixed_eps`` the UNet output is held constant (d x0_hat / d x = 1/sqrt(alpha_bar)); otherwise the
    UNet at the next timestep is differentiated too. ``differentiable=False`` scores with ``reward.score``
    alone, so that any reward can be measured, including one without gradients (nothing is guided then)."""
    last = step_index + 1 == policy.num_steps

    def r_t(x: torch.Tensor) -> torch.Tensor:
        eps = None if last else (fixed_eps if fixed_eps is not None else policy.eps(x, step_index + 1, embeds))
        images = policy.decode(policy.predict_x0_after(step_index, x, eps))
        if differentiable:
            return differentiable_reward(reward, images, prompts)
        return reward.score(images, prompts).scores.to(x.device)

    return r_t


def guidance_schedule(guidance: GuidanceConfig, fine_tuned_steps: list[int]) -> dict[int, float]:
    """TailorPO-G's step size per step k that may branch: eta_t on the paper's cosine ramp (units 'reward') or
    the fraction of sigma_t (units 'sigma'), as ``tailorpo_rollout``'s ``guidance_eta``."""
    if guidance.units == "sigma":
        return dict.fromkeys(fine_tuned_steps, guidance.sigma_fraction)
    return cosine_eta_schedule(fine_tuned_steps, guidance.eta_min, guidance.eta_max)


def uniform_index(n: int, batch: int, generator: torch.Generator, device: torch.device) -> torch.Tensor:
    """(batch,) uniform draws from 0..n-1 on the generator's own device, as ``DiffusionPolicy.noise`` draws."""
    return torch.randint(n, (batch,), generator=generator, device=generator.device).to(device)


def branch_pair(
    scores: torch.Tensor, labels: str, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """(winner, loser) child index per column of (n, B) scores: best vs worst (labels 'reward' or
    'continuations', whichever scores ranked), or that same pair with the winner a fair coin flip (labels
    'random': a control that carries no reward information)."""
    best, worst = best_and_worst(scores)
    if labels != "random":
        return best, worst
    flip = uniform_index(2, scores.shape[1], generator, scores.device).bool()
    return torch.where(flip, worst, best), torch.where(flip, best, worst)


def expected_final_reward(
    policy: DiffusionPolicy,
    reward: RewardModel,
    step_index: int,
    x: torch.Tensor,
    embeds: PromptEmbeds,
    prompts: list[str],
    generator: torch.Generator,
    chains: int,
) -> torch.Tensor:
    """(B,) Monte Carlo E[r(c, x_0) | x_{t-1} = x]: the mean reward of ``chains`` DDIM chains run on from each row
    of x (the output of step index ``step_index``) with the current policy. The ranking Eq. 12 approximates with
    one x0_hat; the exact-ranking upper bound's labels."""
    batch = x.shape[0]
    x_0 = denoise(policy, x.repeat(chains, *([1] * (x.ndim - 1))), embeds.repeat(chains), generator,
                  start=step_index + 1)
    scores = reward.score(policy.decode(x_0), prompts * chains).scores.to(x.device)
    return scores.view(chains, batch).mean(0)


def combine_rows(rows: torch.Tensor, inside: torch.Tensor | None, outside: torch.Tensor | None) -> torch.Tensor | None:
    """A batch whose ``rows`` (bool) come from ``inside`` and whose other rows from ``outside``, in order; either
    part alone when it is the whole batch (None when both are: no eps after the last step)."""
    if bool(rows.all()) or outside is None:
        return inside
    if not bool(rows.any()) or inside is None:
        return outside
    merged = outside.new_empty((rows.shape[0], *outside.shape[1:]))
    merged[rows], merged[~rows] = inside, outside
    return merged


class Branched(NamedTuple):
    """One branching step of some rows: the chain's next x and eps, the pair, and x_0's image and reward when
    the step was the last one and the child taken is x_0 itself."""

    x: torch.Tensor
    eps: torch.Tensor | None
    pair: dict[str, torch.Tensor]
    final: tuple[torch.Tensor, torch.Tensor] | None


def branch_step(
    policy: DiffusionPolicy,
    reward: RewardModel,
    i: int,
    x: torch.Tensor,
    eps: torch.Tensor,
    embeds: PromptEmbeds,
    prompts: list[str],
    generator: torch.Generator,
    branching: BranchingConfig,
    guidance_eta: float | None,
    guidance: GuidanceConfig,
) -> Branched:
    """Step index i of the rows given (x_t, its eps, their prompts): n children, ranked by the step-wise reward,
    the winner guided up the reward with ``guidance_eta``, and the chain continued from the winner or a child."""
    batch, last, n = x.shape[0], i + 1 == policy.num_steps, branching.children
    children = sample_children(policy, i, eps, x, generator, n)  # (n, B, C, h, w)
    flat = children.flatten(0, 1)
    eps_flat = None if last else policy.eps(flat, i + 1, embeds.repeat(n))
    images = policy.decode(policy.predict_x0_after(i, flat, eps_flat)).unflatten(0, (n, batch))
    scores = reward.score(images.flatten(0, 1), prompts * n).scores.to(x.device).view(n, batch)
    eps_children = None if last else eps_flat.unflatten(0, (n, batch))
    ranking = scores  # a child of the last step is x_0: its reward is exact
    if branching.labels == "continuations" and not last:
        ranking = expected_final_reward(policy, reward, i, flat, embeds.repeat(n), prompts * n, generator,
                                        branching.continuations).view(n, batch)
    w, l = branch_pair(ranking, branching.labels, generator)
    x_w, x_l, r_w, r_l = pick(children, w), pick(children, l), pick(ranking, w), pick(ranking, l)
    eps_w = None if last else pick(eps_children, w)
    if guidance_eta is not None:
        x_w = guide_winners(policy, reward, i, x_w, eps_w, embeds, prompts, guidance_eta, guidance)
        eps_w = None if last else policy.eps(x_w, i + 1, embeds)  # x^+ moved: its eps is new
    valid = gap_is_valid(r_w, r_l, branching.min_reward_gap)
    pair = {"step": torch.full((batch,), i, device=x.device), "x_t": x, "x_w": x_w, "x_l": x_l, "r_w": r_w,
            "r_l": r_l, "valid": valid}
    if branching.continue_from == "winner":
        nxt, x_next, eps_next = w, x_w, eps_w
    else:  # SPO: a uniformly random child, the winner as guidance left it
        nxt = uniform_index(n, batch, generator, x.device)
        stays = (nxt == w).view(-1, *([1] * (x.ndim - 1)))
        x_next = torch.where(stays, x_w, pick(children, nxt))
        eps_next = None if last else torch.where(stays, eps_w, pick(eps_children, nxt))
    # the child is x_0: its image and reward are known, never decode twice
    final = (pick(images, nxt), pick(scores, nxt)) if last and guidance_eta is None else None
    return Branched(x_next, eps_next, pair, final)


def guide_winners(
    policy: DiffusionPolicy,
    reward: RewardModel,
    i: int,
    x_w: torch.Tensor,
    eps_w: torch.Tensor | None,
    embeds: PromptEmbeds,
    prompts: list[str],
    eta: float,
    guidance: GuidanceConfig,
) -> torch.Tensor:
    """x^+ of every winner (Eq. 14, or a push in sigma units), ``guidance.chunk_size`` rows per backward pass
    through the UNet at t-1, the VAE decoder and the reward: rows are independent, so chunks give the same x^+
    with a smaller memory peak."""
    chunk = guidance.chunk_size or len(prompts)
    moved = []
    for start in range(0, len(prompts), chunk):
        rows = torch.arange(start, min(start + chunk, len(prompts)), device=x_w.device)
        fixed = None if guidance.through_unet or eps_w is None else eps_w[rows]
        r_t = step_reward_fn(policy, reward, i, embeds.index(rows), prompts[start:start + chunk], fixed)
        if guidance.units == "sigma":
            sigma = ddim_sigma(*policy.alphas[i], policy.eta)
            moved.append(guide_in_sigma_units(x_w[rows], r_t, sigma, eta, increase=True)[0])
        else:
            moved.append(guide(x_w[rows], r_t, eta, guidance.delta, increase=True)[0])
    return torch.cat(moved)


@torch.no_grad()
def tailorpo_rollout(
    policy: DiffusionPolicy,
    reward: RewardModel,
    prompts: list[str],
    generator: torch.Generator,
    fine_tuned_steps: Collection[int] | StepPlan,
    guidance_eta: dict[int, float] | None = None,
    guidance: GuidanceConfig | None = None,
    branching: BranchingConfig | None = None,
) -> Rollout:
    """TailorPO (and TailorPO-G when ``guidance_eta`` maps each step k that may branch to eta_t, or with
    ``guidance.units='sigma'`` to the fraction of sigma_t the winner moves; see ``guidance_schedule``).
    ``fine_tuned_steps``: the steps k where every row branches and trains, or a plan per row.

    Per branching step the generator draws the children's noise, then the continuations' noise of
    labels='continuations' or the coin flips of labels='random', then
    the child to continue from with continue_from='random' (then, where only some rows branch, the other rows'
    noise); the defaults draw only the noise."""
    if branching is None:
        branching = BranchingConfig()  # the paper's: two children, the winner continues
    guidance = guidance or GuidanceConfig()  # Eq. 14 through the UNet, delta 0.5, the whole batch at once
    batch = len(prompts)
    plan = as_plan(fine_tuned_steps, policy.num_steps, batch)
    embeds = policy.encode_prompts(prompts)
    x = policy.initial_latents(batch, generator)
    eps = policy.eps(x, 0, embeds)
    pairs: list[dict[str, torch.Tensor]] = []
    final_images = final_scores = None  # of the rows whose x_0 a branch at the last step gave
    known = torch.zeros(batch, dtype=torch.bool, device=x.device)
    for i in range(policy.num_steps):
        last = i + 1 == policy.num_steps
        rows = plan.branch[:, i].to(x.device)
        branched = plain_x = plain_eps = None
        if rows.any():
            eta = None if guidance_eta is None else guidance_eta[policy.num_steps - i]
            branched = branch_step(
                policy, reward, i, x[rows], eps[rows], embeds.index(rows),
                [p for p, b in zip(prompts, rows.tolist(), strict=True) if b], generator, branching, eta, guidance,
            )
            pairs.append(branched.pair | {"prompt": rows.nonzero().flatten()})
            if branched.final is not None:
                known, (final_images, final_scores) = rows, branched.final
        if not rows.all():  # a plain DDIM step for the rows that do not branch here
            plain = ~rows
            plain_x = policy.step(i, eps[plain], x[plain], noise=policy.noise(x[plain].shape, generator)).prev_sample
            plain_eps = None if last else policy.eps(plain_x, i + 1, embeds.index(plain))
        x = combine_rows(rows, branched and branched.x, plain_x)
        eps = combine_rows(rows, branched and branched.eps, plain_eps)
    if not known.all():
        images = policy.decode(x[~known])
        scores = reward.score(images, [p for p, k in zip(prompts, known.tolist(), strict=True) if not k])
        final_images = combine_rows(known, final_images, images)
        final_scores = combine_rows(known, final_scores, scores.scores.to(x.device))
    data = keep_trained(stack_pairs(pairs, shared_parent=True), plan)
    ties = float((data.reward_w == data.reward_l).sum())
    return Rollout(prompts, final_images, final_scores, data, {"ties": ties})
