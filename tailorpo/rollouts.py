"""Sampling the training data of each algorithm with the DDIM eta=1 policy.

- ``tailorpo_rollout``: one chain per prompt that branches at the fine-tuned steps into two children of ONE
  x_t, ranks them by the step-wise reward r(c, decode(x0_hat(x_{t-1}))) (Eq. 12), optionally pushes the winner
  up the reward gradient (TailorPO-G, Eq. 14), and continues from the winner.
- ``trajectory_rollout``: plain chains recording (x_t, x_{t-1}, log pi) at the fine-tuned steps, which D3PO
  ranks pairwise by final reward and DDPO weights by advantage.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from tailorpo.guidance import guide
from tailorpo.objectives import group_advantages
from tailorpo.policy import DiffusionPolicy, PromptEmbeds
from tailorpo.rewards import RewardModel, differentiable_reward


@dataclass
class PreferencePairs:
    """Step-wise preference pairs, one row per (prompt, fine-tuned step). For TailorPO the parents coincide
    (x_t_w is x_t_l); for D3PO they are the same step of two different trajectories."""

    step_index: torch.Tensor  # (N,) index i into policy.timesteps
    prompt_index: torch.Tensor  # (N,) row of the prompt batch
    x_t_w: torch.Tensor  # (N, C, h, w)
    x_next_w: torch.Tensor
    x_t_l: torch.Tensor
    x_next_l: torch.Tensor
    reward_w: torch.Tensor  # (N,)
    reward_l: torch.Tensor
    valid: torch.Tensor  # (N,) bool; ties are False and drop out of the loss

    @property
    def shared_parent(self) -> bool:
        return self.x_t_w is self.x_t_l


@dataclass
class PolicySteps:
    """Recorded transitions with the sampling policy's log-probs, for policy-gradient training (DDPO)."""

    step_index: torch.Tensor  # (N,)
    prompt_index: torch.Tensor  # (N,)
    x_t: torch.Tensor
    x_next: torch.Tensor
    old_log_prob: torch.Tensor  # (N,)
    advantages: torch.Tensor  # (N,)


@dataclass
class Rollout:
    prompts: list[str]  # one per final image
    images: torch.Tensor  # (B, 3, H, W) final images in [0, 1]
    rewards: torch.Tensor  # (B,) reward of the final images
    data: PreferencePairs | PolicySteps
    stats: dict[str, float] = field(default_factory=dict)


def select_winner(reward_0: torch.Tensor, reward_1: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(winner_is_1, tie) per row: the child with the higher reward wins; equal rewards are a tie."""
    return reward_1 > reward_0, reward_1 == reward_0


def pick(mask: torch.Tensor, if_true: torch.Tensor, if_false: torch.Tensor) -> torch.Tensor:
    """Row-wise choice between two batches of the same shape."""
    return torch.where(mask.view(-1, *([1] * (if_true.ndim - 1))), if_true, if_false)


def _noise(shape: torch.Size, generator: torch.Generator, device: torch.device) -> torch.Tensor:
    return torch.randn(shape, generator=generator, device=generator.device).to(device)


def sample_branch_pair(
    policy: DiffusionPolicy, step_index: int, eps: torch.Tensor, x_t: torch.Tensor, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Two children x^0_{t-1}, x^1_{t-1} = mu_theta(x_t) + sigma_t z_i of the same x_t and the same eps."""
    step = policy.step(step_index, eps, x_t, prev_sample=x_t)  # only mu and sigma are used
    children = step.mean + step.std * _noise((2, *x_t.shape), generator, x_t.device)
    return children[0], children[1]


def step_reward_fn(
    policy: DiffusionPolicy, reward: RewardModel, step_index: int, embeds: PromptEmbeds, prompts: list[str],
    fixed_eps: torch.Tensor | None,
):
    """r_t(c, x_{t-1}) = r(c, decode(x0_hat(x_{t-1}))) as a differentiable function of x_{t-1} (Eq. 12).

    With ``fixed_eps`` the UNet output is held constant (d x0_hat / d x = 1/sqrt(alpha_bar)); else the
    UNet at the next timestep is differentiated too."""
    last = step_index + 1 == policy.num_steps

    def r_t(x: torch.Tensor) -> torch.Tensor:
        eps = None if last else (fixed_eps if fixed_eps is not None else policy.eps(x, step_index + 1, embeds))
        return differentiable_reward(reward, policy.decode(policy.predict_x0_after(step_index, x, eps)), prompts)

    return r_t


@torch.no_grad()
def tailorpo_rollout(
    policy: DiffusionPolicy,
    reward: RewardModel,
    prompts: list[str],
    generator: torch.Generator,
    fine_tuned_steps: list[int],
    guidance_eta: dict[int, float] | None = None,
    guidance_delta: float = 0.5,
    guidance_through_unet: bool = True,
) -> Rollout:
    """TailorPO (and TailorPO-G when ``guidance_eta`` maps each fine-tuned step k to eta_t)."""
    embeds = policy.encode_prompts(prompts)
    batch = len(prompts)
    x = policy.initial_latents(batch, generator)
    eps = policy.eps(x, 0, embeds)
    rows: list[dict[str, torch.Tensor]] = []
    final: tuple[torch.Tensor, torch.Tensor] | None = None  # (image, reward) of x_0 when already scored
    for i in range(policy.num_steps):
        k = policy.num_steps - i
        last = i + 1 == policy.num_steps
        if k not in fine_tuned_steps:
            x = policy.step(i, eps, x, noise=_noise(x.shape, generator, x.device)).prev_sample
            eps = None if last else policy.eps(x, i + 1, embeds)
            continue
        child_0, child_1 = sample_branch_pair(policy, i, eps, x, generator)
        children = torch.cat([child_0, child_1])  # (2B, C, h, w)
        eps_children = None if last else policy.eps(children, i + 1, embeds.repeat(2))
        x0_children = policy.predict_x0_after(i, children, eps_children)
        images = policy.decode(x0_children)
        scores = reward.score(images, prompts * 2).scores.to(x.device)
        winner_is_1, tie = select_winner(scores[:batch], scores[batch:])
        x_w, x_l = pick(winner_is_1, child_1, child_0), pick(winner_is_1, child_0, child_1)
        r_w = pick(winner_is_1, scores[batch:], scores[:batch])
        r_l = pick(winner_is_1, scores[:batch], scores[batch:])
        eps_w = None if last else pick(winner_is_1, eps_children[batch:], eps_children[:batch])
        if guidance_eta is not None:
            fixed = None if guidance_through_unet else eps_w
            r_t = step_reward_fn(policy, reward, i, embeds, prompts, fixed)
            x_w, _ = guide(x_w, r_t, guidance_eta[k], guidance_delta, increase=True)
            eps_w = None if last else policy.eps(x_w, i + 1, embeds)  # x^+ moved: its eps is new
        elif last:  # the winner is x_0: its image and reward are known, never decode twice
            final = (pick(winner_is_1, images[batch:], images[:batch]), r_w)
        rows.append(dict(step=torch.full((batch,), i, device=x.device), x_t=x, x_w=x_w, x_l=x_l, r_w=r_w, r_l=r_l, valid=~tie))
        x, eps = x_w, eps_w
    if final is None:
        images = policy.decode(x)
        final = (images, reward.score(images, prompts).scores.to(x.device))
    pairs = _stack_pairs(rows, batch)
    return Rollout(
        prompts=prompts,
        images=final[0],
        rewards=final[1],
        data=pairs,
        stats={"ties": float((~pairs.valid).sum())},
    )


def _stack_pairs(rows: list[dict[str, torch.Tensor]], batch: int) -> PreferencePairs:
    """Rows without their own ``x_t_l`` share one parent: x_t_l is then the very tensor x_t_w."""
    cat = lambda key: torch.cat([r[key] for r in rows])  # noqa: E731
    x_t_w = cat("x_t")
    return PreferencePairs(
        step_index=cat("step"),
        prompt_index=torch.arange(batch, device=x_t_w.device).repeat(len(rows)),
        x_t_w=x_t_w,
        x_next_w=cat("x_w"),
        x_t_l=cat("x_t_l") if "x_t_l" in rows[0] else x_t_w,
        x_next_l=cat("x_l"),
        reward_w=cat("r_w"),
        reward_l=cat("r_l"),
        valid=cat("valid"),
    )


@dataclass
class Trajectories:
    images: torch.Tensor  # (B, 3, H, W)
    steps: list[dict[str, torch.Tensor]]  # per recorded step: step, x_t, x_next, log_prob


@torch.no_grad()
def trajectory_rollout(
    policy: DiffusionPolicy, embeds: PromptEmbeds, generator: torch.Generator, fine_tuned_steps: list[int]
) -> Trajectories:
    """Independent DDIM chains, one per row of ``embeds``, recording the fine-tuned transitions."""
    x = policy.initial_latents(embeds.cond.shape[0], generator)
    steps = []
    for i in range(policy.num_steps):
        step = policy.step(i, policy.eps(x, i, embeds), x, noise=_noise(x.shape, generator, x.device))
        if policy.num_steps - i in fine_tuned_steps:
            steps.append(
                dict(step=torch.full((x.shape[0],), i, device=x.device), x_t=x, x_next=step.prev_sample, log_prob=step.log_prob)
            )
        x = step.prev_sample
    return Trajectories(policy.decode(x), steps)


def d3po_rollout(
    policy: DiffusionPolicy,
    reward: RewardModel,
    prompts: list[str],
    generator: torch.Generator,
    fine_tuned_steps: list[int],
) -> Rollout:
    """D3PO: two trajectories per prompt, ranked by their final images; every fine-tuned step of the pair
    inherits that ranking (Eq. 5)."""
    batch = len(prompts)
    traj = trajectory_rollout(policy, policy.encode_prompts(prompts).repeat(2), generator, fine_tuned_steps)
    scores = reward.score(traj.images, prompts * 2).scores.to(policy.device)
    winner_is_1, tie = select_winner(scores[:batch], scores[batch:])
    rows = []
    for s in traj.steps:
        halves = {key: (s[key][:batch], s[key][batch:]) for key in ("x_t", "x_next")}
        rows.append(
            dict(
                step=s["step"][:batch],
                x_t=pick(winner_is_1, halves["x_t"][1], halves["x_t"][0]),
                x_t_l=pick(winner_is_1, halves["x_t"][0], halves["x_t"][1]),
                x_w=pick(winner_is_1, halves["x_next"][1], halves["x_next"][0]),
                x_l=pick(winner_is_1, halves["x_next"][0], halves["x_next"][1]),
                r_w=pick(winner_is_1, scores[batch:], scores[:batch]),
                r_l=pick(winner_is_1, scores[:batch], scores[batch:]),
                valid=~tie,
            )
        )
    pairs = _stack_pairs(rows, batch)
    return Rollout(prompts * 2, traj.images, scores, pairs, {"ties": float(tie.sum())})


def ddpo_rollout(
    policy: DiffusionPolicy,
    reward: RewardModel,
    prompts: list[str],
    generator: torch.Generator,
    fine_tuned_steps: list[int],
    samples_per_prompt: int,
    adv_clip: float,
) -> Rollout:
    """DDPO: ``samples_per_prompt`` chains for each prompt; advantages from per-prompt statistics."""
    batch_prompts = [p for p in prompts for _ in range(samples_per_prompt)]
    embeds = policy.encode_prompts(batch_prompts)
    traj = trajectory_rollout(policy, embeds, generator, fine_tuned_steps)
    scores = reward.score(traj.images, batch_prompts).scores.to(policy.device)
    groups = torch.arange(len(prompts), device=scores.device).repeat_interleave(samples_per_prompt)
    advantages = group_advantages(scores, groups, adv_clip)
    cat = lambda key: torch.cat([s[key] for s in traj.steps])  # noqa: E731
    steps = PolicySteps(
        step_index=cat("step"),
        prompt_index=torch.arange(len(batch_prompts), device=scores.device).repeat(len(traj.steps)),
        x_t=cat("x_t"),
        x_next=cat("x_next"),
        old_log_prob=cat("log_prob"),
        advantages=advantages.repeat(len(traj.steps)),
    )
    return Rollout(batch_prompts, traj.images, scores, steps)
