"""TailorPO's sampler: branch pairs from ONE x_t, ranked by the step-wise reward, the winner continues.

At a fine-tuned step k (x_k -> x_{k-1}) with x_t = x_k:
    x^i_{t-1} = mu_theta(x_t) + sigma_t z_i,   i = 0, 1            (same x_t, same eps)
    r_t(c, x^i_{t-1}) = r(c, decode(x0_hat(x^i_{t-1})))             (Eq. 12; one batched UNet call at t-1)
    x^w, x^l = the higher / lower;  TailorPO-G: x^w <- x^+ (Eq. 14)
and the chain continues from x^w, whose UNet output at t-1 is the next step's eps (never recomputed).
"""

from __future__ import annotations

from typing import Callable

import torch

from tailorpo.core.guidance import guide
from tailorpo.diffusion.policy import DiffusionPolicy, PromptEmbeds
from tailorpo.rewards import RewardModel, differentiable_reward
from tailorpo.algorithms.rollouts import Rollout, stack_pairs
from tailorpo.core.ranking import order_by_winner, select_winner


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
) -> Callable[[torch.Tensor], torch.Tensor]:
    """r_t(c, x_{t-1}) = r(c, decode(x0_hat(x_{t-1}))) as a differentiable function of x_{t-1} (Eq. 12).

    With ``fixed_eps`` the UNet output is held constant (d x0_hat / d x = 1/sqrt(alpha_bar)); otherwise the
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
            x = policy.step(i, eps, x, noise=policy.noise(x.shape, generator)).prev_sample
            eps = None if last else policy.eps(x, i + 1, embeds)
            continue
        children = sample_children(policy, i, eps, x, generator).flatten(0, 1)  # (2B, C, h, w)
        eps_children = None if last else policy.eps(children, i + 1, embeds.repeat(2))
        images = policy.decode(policy.predict_x0_after(i, children, eps_children))
        scores = reward.score(images, prompts * 2).scores.to(x.device)
        winner_is_1, tie = select_winner(scores[:batch], scores[batch:])
        x_w, x_l = order_by_winner(winner_is_1, children[:batch], children[batch:])
        r_w, r_l = order_by_winner(winner_is_1, scores[:batch], scores[batch:])
        eps_w = None if last else order_by_winner(winner_is_1, eps_children[:batch], eps_children[batch:])[0]
        if guidance_eta is not None:
            fixed = None if guidance_through_unet else eps_w
            r_t = step_reward_fn(policy, reward, i, embeds, prompts, fixed)
            x_w, _ = guide(x_w, r_t, guidance_eta[k], guidance_delta, increase=True)
            eps_w = None if last else policy.eps(x_w, i + 1, embeds)  # x^+ moved: its eps is new
        elif last:  # the winner is x_0: its image and reward are known, never decode twice
            final = (order_by_winner(winner_is_1, images[:batch], images[batch:])[0], r_w)
        index = torch.full((batch,), i, device=x.device)
        rows.append(dict(step=index, x_t=x, x_w=x_w, x_l=x_l, r_w=r_w, r_l=r_l, valid=~tie))
        x, eps = x_w, eps_w
    if final is None:
        images = policy.decode(x)
        final = (images, reward.score(images, prompts).scores.to(x.device))
    pairs = stack_pairs(rows, batch, shared_parent=True)
    return Rollout(prompts, final[0], final[1], pairs, {"ties": float((~pairs.valid).sum())})
