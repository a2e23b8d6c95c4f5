"""What samplers hand the learner, and the plain-trajectory samplers of the baselines.

- ``PreferencePairs``: step-wise (x_t, x^w_{t-1}, x^l_{t-1}) pairs for the DPO losses (TailorPO, D3PO).
- ``PolicySteps``: transitions with the sampling policy's log-probs for policy gradients (DDPO).
- ``FinalImagePairs``: ranked pairs of final images, for the pair objectives trained on the policy's own
  samples (Diffusion-DPO, MaPO, Diff-contrast without ``pairs.source``).
- ``denoise``: the plain DDIM chain between any two steps (optionally with the LoRA on at some steps only).
- ``trajectory_rollout``: independent DDIM chains recording the fine-tuned transitions, which D3PO ranks
  pairwise by final reward and DDPO weights by advantage. TailorPO's branching sampler is in branching.py.
  Which steps each trajectory records and trains on is a ``steps.StepPlan``; ``keep_trained`` applies it.
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from contextlib import nullcontext
from dataclasses import dataclass, field, fields

import torch

from tailorpo.algorithms.steps import StepPlan, as_plan
from tailorpo.core.ddim import DDIMStep
from tailorpo.core.ranking import order_by_winner, select_winner
from tailorpo.diffusion.policy import DiffusionPolicy, PromptEmbeds
from tailorpo.rewards import RewardModel


@dataclass
class PreferencePairs:
    """One row per (prompt, fine-tuned step). ``shared_parent``: x^w and x^l are children of one x_t
    (TailorPO; then x_t_l is x_t_w), else the same step of two trajectories (D3PO)."""

    step_index: torch.Tensor  # (N,) index i into policy.timesteps
    prompt_index: torch.Tensor  # (N,) row of the rollout's prompt batch
    x_t_w: torch.Tensor  # (N, C, h, w)
    x_next_w: torch.Tensor  # x^w_{t-1} (for TailorPO-G: x^+ after guidance)
    x_t_l: torch.Tensor
    x_next_l: torch.Tensor
    reward_w: torch.Tensor  # (N,) the score that ranked the pair (before any guidance): step-wise or expected final
    reward_l: torch.Tensor
    valid: torch.Tensor  # (N,) bool; ties are False and drop out of the loss
    shared_parent: bool


@dataclass
class PolicySteps:
    """Recorded transitions with the sampling policy's log-probs, for policy-gradient training (DDPO)."""

    step_index: torch.Tensor  # (N,)
    prompt_index: torch.Tensor  # (N,) row of the rollout's prompt batch = the sample it belongs to
    x_t: torch.Tensor
    x_next: torch.Tensor
    old_log_prob: torch.Tensor  # (N,)
    advantages: torch.Tensor | None = None  # (N,), set by the driver from its per-prompt statistics


@dataclass
class FinalImagePairs:
    """The two samples of each prompt, ranked by reward, as the pair objectives read them; ties are dropped.
    ``noise_seed`` seeds the learner's forward-diffusion draw (t, eps*), so it is fixed by the rollout's own
    noise stream and not by where or when the learner trains on it."""

    prompt_index: torch.Tensor  # (N,) row of the rollout's prompt batch
    image_w: torch.Tensor  # (N, 3, H, W) in [-1, 1], as pair_data's images
    image_l: torch.Tensor
    noise_seed: int


@dataclass
class Rollout:
    prompts: list[str]  # one per final image
    images: torch.Tensor  # (B, 3, H, W) final images in [0, 1]
    rewards: torch.Tensor  # (B,) reward of the final images
    data: PreferencePairs | PolicySteps | FinalImagePairs
    stats: dict[str, float] = field(default_factory=dict)
    sample_ids: list[str] = field(default_factory=list)  # "iteration:slot:row", for the runtime's ledger


def map_tensors(data: PreferencePairs | PolicySteps | FinalImagePairs, fn: Callable[[torch.Tensor], torch.Tensor]):
    """The same container with ``fn`` applied to every tensor field (a shared parent stays one tensor)."""
    mapped = {
        f.name: fn(value) if isinstance(value, torch.Tensor) else value
        for f in fields(data)
        for value in [getattr(data, f.name)]
    }
    if isinstance(data, PreferencePairs) and data.shared_parent:
        mapped["x_t_l"] = mapped["x_t_w"]
    return type(data)(**mapped)


def select_rows(data: PreferencePairs | PolicySteps, rows: torch.Tensor) -> PreferencePairs | PolicySteps:
    """The same container with only ``rows`` kept."""
    return map_tensors(data, lambda value: value[rows])


def keep_trained(data: PreferencePairs | PolicySteps, plan: StepPlan) -> PreferencePairs | PolicySteps:
    """Only the rows the learner trains on (``plan.train`` at each row's trajectory and step); the data itself
    when that is every row."""
    keep = plan.train.to(data.step_index.device)[data.prompt_index, data.step_index]
    return data if bool(keep.all()) else select_rows(data, keep)


def stack_pairs(rows: list[dict[str, torch.Tensor]], shared_parent: bool) -> PreferencePairs:
    """Concatenate per-step rows (keys: step, prompt, x_t, x_t_l, x_w, x_l, r_w, r_l, valid) into one container."""
    cat = lambda key: torch.cat([r[key] for r in rows])  # noqa: E731
    x_t_w = cat("x_t")
    return PreferencePairs(
        step_index=cat("step"),
        prompt_index=cat("prompt"),
        x_t_w=x_t_w,
        x_next_w=cat("x_w"),
        x_t_l=x_t_w if shared_parent else cat("x_t_l"),
        x_next_l=cat("x_l"),
        reward_w=cat("r_w"),
        reward_l=cat("r_l"),
        valid=cat("valid"),
        shared_parent=shared_parent,
    )


def pair_stats_by_step(pairs: PreferencePairs) -> dict[int, dict[str, float]]:
    """Per step index i of the pairs: the mean reward gap |r_w - r_l| of the pair (absolute, so the
    random-label control reports it too) and the fraction of pairs dropped from the loss (ties and gaps within
    algorithm.branching.min_reward_gap). A gap near zero means the ranking at that step is near chance."""
    stats = {}
    for i in pairs.step_index.unique().tolist():
        rows = pairs.step_index == i
        gap = (pairs.reward_w[rows] - pairs.reward_l[rows]).abs()
        stats[int(i)] = {"reward_gap": float(gap.mean()), "dropped": float((~pairs.valid[rows]).float().mean())}
    return stats


@dataclass
class Trajectories:
    images: torch.Tensor  # (B, 3, H, W)
    steps: list[dict[str, torch.Tensor]]  # per recorded step: step, x_t, x_next, log_prob


@torch.no_grad()
def denoise(
    policy: DiffusionPolicy,
    x: torch.Tensor,
    embeds: PromptEmbeds,
    generator: torch.Generator,
    start: int = 0,
    stop: int | None = None,
    lora_at: Collection[int] | None = None,
    on_step: Callable[[int, torch.Tensor, DDIMStep], None] | None = None,
) -> torch.Tensor:
    """The DDIM chain from x (the input of step index ``start``) through step index ``stop - 1`` (default: to
    x_0), each step's noise drawn from ``generator``; returns the last latents. With ``lora_at`` the UNet's
    LoRA is on only at those step indices (the base model elsewhere; without it, where the policy's own gate
    says); ``on_step(i, x_t, step)`` sees every transition."""
    with nullcontext() if lora_at is None else policy.lora_only_at(lora_at):
        for i in range(start, policy.num_steps if stop is None else stop):
            eps = policy.eps(x, i, embeds)
            step = policy.step(i, eps, x, noise=policy.noise(x.shape, generator))
            if on_step is not None:
                on_step(i, x, step)
            x = step.prev_sample
    return x


@torch.no_grad()
def trajectory_rollout(
    policy: DiffusionPolicy, embeds: PromptEmbeds, generator: torch.Generator, fine_tuned_steps: list[int]
) -> Trajectories:
    """Independent DDIM chains, one per row of ``embeds``, recording the fine-tuned transitions."""
    steps = []

    def record(i: int, x: torch.Tensor, step: DDIMStep) -> None:
        if policy.num_steps - i in fine_tuned_steps:
            index = torch.full((x.shape[0],), i, device=x.device)
            steps.append(dict(step=index, x_t=x, x_next=step.prev_sample, log_prob=step.log_prob))

    x = denoise(policy, policy.initial_latents(embeds.cond.shape[0], generator), embeds, generator, on_step=record)
    return Trajectories(policy.decode(x), steps)


@dataclass
class RankedTrajectories:
    """Two trajectories per prompt (rows i and B + i belong to prompt i) and their ranking by final reward."""

    traj: Trajectories
    scores: torch.Tensor  # (2B,)
    winner_is_1: torch.Tensor  # (B,) bool: row B + i won
    tie: torch.Tensor  # (B,) bool


def rank_two_samples(
    policy: DiffusionPolicy, reward: RewardModel, prompts: list[str], generator: torch.Generator,
    fine_tuned_steps: list[int],
) -> RankedTrajectories:
    batch = len(prompts)
    traj = trajectory_rollout(policy, policy.encode_prompts(prompts).repeat(2), generator, fine_tuned_steps)
    scores = reward.score(traj.images, prompts * 2).scores.to(policy.device)
    winner_is_1, tie = select_winner(scores[:batch], scores[batch:])
    return RankedTrajectories(traj, scores, winner_is_1, tie)


def d3po_rollout(
    policy: DiffusionPolicy,
    reward: RewardModel,
    prompts: list[str],
    generator: torch.Generator,
    fine_tuned_steps: Collection[int] | StepPlan,
) -> Rollout:
    """D3PO: two trajectories per prompt, ranked by their final images; every fine-tuned step of the pair
    inherits that ranking (Eq. 5). A plan has a row per prompt: both trajectories record the same steps."""
    batch = len(prompts)
    plan = as_plan(fine_tuned_steps, policy.num_steps, batch)
    ranked = rank_two_samples(policy, reward, prompts, generator, plan.recorded_steps())
    scores, winner_is_1, tie = ranked.scores, ranked.winner_is_1, ranked.tie
    r_w, r_l = order_by_winner(winner_is_1, scores[:batch], scores[batch:])
    rows = []
    for s in ranked.traj.steps:
        x_t_w, x_t_l = order_by_winner(winner_is_1, s["x_t"][:batch], s["x_t"][batch:])
        x_w, x_l = order_by_winner(winner_is_1, s["x_next"][:batch], s["x_next"][batch:])
        rows.append(dict(step=s["step"][:batch], prompt=torch.arange(batch, device=tie.device), x_t=x_t_w,
                         x_t_l=x_t_l, x_w=x_w, x_l=x_l, r_w=r_w, r_l=r_l, valid=~tie))
    pairs = keep_trained(stack_pairs(rows, shared_parent=False), plan)
    return Rollout(prompts * 2, ranked.traj.images, scores, pairs, {"ties": float(tie.sum())})


def final_image_pair_rollout(
    policy: DiffusionPolicy, reward: RewardModel, prompts: list[str], generator: torch.Generator
) -> Rollout:
    """The pair objectives on the policy's own samples: two plain DDIM samples per prompt, ranked by reward as
    ``export_pairs`` ranks them, with nothing recorded along the chains (the objectives re-noise the final
    images at a random t). Training on these equals training on the exported pairs, up to 8-bit rounding."""
    batch = len(prompts)
    ranked = rank_two_samples(policy, reward, prompts, generator, [])
    images = ranked.traj.images * 2 - 1  # [0, 1] -> [-1, 1]
    image_w, image_l = order_by_winner(ranked.winner_is_1, images[:batch], images[batch:])
    keep = (~ranked.tie).nonzero().flatten()
    noise_seed = int(torch.randint(2**62, (1,), generator=generator))
    pairs = FinalImagePairs(keep, image_w[keep], image_l[keep], noise_seed)
    return Rollout(prompts * 2, ranked.traj.images, ranked.scores, pairs, {"ties": float(ranked.tie.sum())})


def ddpo_rollout(
    policy: DiffusionPolicy,
    reward: RewardModel,
    prompts: list[str],
    generator: torch.Generator,
    fine_tuned_steps: Collection[int] | StepPlan,
    samples_per_prompt: int,
) -> Rollout:
    """DDPO: ``samples_per_prompt`` chains for each prompt, with their log-probs; advantages are the
    driver's business (they need statistics across iterations). A plan has a row per chain."""
    batch_prompts = [p for p in prompts for _ in range(samples_per_prompt)]
    plan = as_plan(fine_tuned_steps, policy.num_steps, len(batch_prompts))
    traj = trajectory_rollout(policy, policy.encode_prompts(batch_prompts), generator, plan.recorded_steps())
    scores = reward.score(traj.images, batch_prompts).scores.to(policy.device)
    cat = lambda key: torch.cat([s[key] for s in traj.steps])  # noqa: E731
    steps = PolicySteps(
        step_index=cat("step"),
        prompt_index=torch.arange(len(batch_prompts), device=scores.device).repeat(len(traj.steps)),
        x_t=cat("x_t"),
        x_next=cat("x_next"),
        old_log_prob=cat("log_prob"),
    )
    return Rollout(batch_prompts, traj.images, scores, keep_trained(steps, plan))
