"""Fig. 2, order inconsistency: for pairs of independent base-model trajectories, how often the order of the
step-wise rewards r(c, decode(x0_hat(x_{t-1}))) at a fine-tuned step disagrees with the order of the final
rewards. Optionally, for two branches of ONE x_t, the x0_hat order against the order of each branch's expected
final reward (the mean over K - 1 continuations), next to what one continuation's final reward (D3PO's ranking
signal) gets: the paper's claim is that the step-wise reward estimates the expected one. The step-wise reward is
the sampler's ``step_reward_fn`` without gradients, so any reward works."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from tailorpo.config import Config

from .files import pyplot
from .runs import chunks, cycled, reward_model
from .stats import order_disagreement

if TYPE_CHECKING:
    from tailorpo.diffusion.policy import DiffusionPolicy
    from tailorpo.rewards import RewardModel


@torch.no_grad()
def trajectory_pair_rewards(policy: DiffusionPolicy, reward: RewardModel, prompts: list[str],
                            generator: torch.Generator, fine_tuned_steps: list[int]) -> tuple[torch.Tensor, ...]:
    """Two independent chains per prompt: the step-wise rewards of each at the fine-tuned steps (k descending),
    (S, B) twice, and their final rewards, (B,) twice."""
    from tailorpo.algorithms.branching import step_reward_fn
    from tailorpo.algorithms.rollouts import trajectory_rollout

    batch = prompts * 2
    embeds = policy.encode_prompts(batch)
    traj = trajectory_rollout(policy, embeds, generator, fine_tuned_steps)
    steps = torch.stack([step_reward_fn(policy, reward, int(s["step"][0]), embeds, batch, differentiable=False)(
        s["x_next"]).cpu() for s in traj.steps])  # (S, 2B): rows i and B + i are prompt i's pair
    final = reward.score(traj.images, batch).scores.cpu()
    return (*steps.chunk(2, dim=1), *final.chunk(2))


@torch.no_grad()
def branch_pair_rewards(policy: DiffusionPolicy, reward: RewardModel, prompts: list[str], generator: torch.Generator,
                        k: int, continuations: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Two children of ONE x_k per prompt (TailorPO's branches): their step-wise rewards (2, B) and the final
    rewards of ``continuations`` independent chains from each child (K, 2, B)."""
    from tailorpo.algorithms.branching import sample_children, step_reward_fn
    from tailorpo.algorithms.rollouts import denoise

    i, batch = policy.num_steps - k, len(prompts)
    embeds = policy.encode_prompts(prompts)
    x = denoise(policy, policy.initial_latents(batch, generator), embeds, generator, 0, i)  # x_k
    children = sample_children(policy, i, policy.eps(x, i, embeds), x, generator).flatten(0, 1)  # (2B, C, h, w)
    r_t = step_reward_fn(policy, reward, i, embeds.repeat(2), prompts * 2, differentiable=False)
    step = r_t(children).cpu().view(2, batch)
    repeats = 2 * continuations
    finals = denoise(policy, children.repeat(continuations, 1, 1, 1), embeds.repeat(repeats), generator, i + 1)
    final = reward.score(policy.decode(finals), prompts * repeats).scores.cpu().view(continuations, 2, batch)
    return step, final


@dataclass
class InconsistencyRow:
    reward: str
    step: int  # k: the fine-tuned step x_k -> x_{k-1}
    comparison: str
    pairs: int  # pairs with an order in both rankings
    disagreement: float


COMPARISONS = {
    "trajectories": "independent trajectories: x0_hat order vs final order",
    "branches_x0_hat": "branches of one x_t: x0_hat order vs expected final order",
    "branches_one_final": "branches of one x_t: one continuation's final order vs expected final order",
}


def order_inconsistency(cfg: Config, pairs: int, continuations: int, branch_pairs: int) -> list[InconsistencyRow]:
    """Fig. 2 on the base model (see the module docstring); ``continuations`` < 2 skips the branch part."""
    from tailorpo.diffusion.lora import reference_model
    from tailorpo.training.build import build_policy, resolve_device

    reward = reward_model(cfg)
    policy = build_policy(cfg, resolve_device(cfg.device))
    generator = torch.Generator().manual_seed(cfg.seed)
    steps_k = sorted(cfg.algorithm.fine_tuned_steps, reverse=True)
    size = cfg.eval.batch_size
    rows = []
    try:
        with reference_model(policy.unet):
            prompts = cycled(cfg.prompts, pairs)
            parts = [trajectory_pair_rewards(policy, reward, prompts[c.start:c.stop], generator, steps_k)
                     for c in chunks(pairs, size)]
            a_step, b_step, a_final, b_final = (torch.cat(p, dim=-1) for p in zip(*parts, strict=True))
            rates, counted = order_disagreement(a_step, b_step, a_final, b_final)
            rows += [InconsistencyRow(reward.name, k, "trajectories", int(n), float(r))
                     for k, r, n in zip(steps_k, rates, counted, strict=True)]
            if continuations >= 2:
                prompts = cycled(cfg.prompts, branch_pairs)
                per_chunk = max(1, size // continuations)  # 2 x continuations chains per pair: keep batches ~2 size
                for k in steps_k:
                    step, final = zip(*[branch_pair_rewards(policy, reward, prompts[c.start:c.stop], generator, k,
                                                            continuations) for c in chunks(branch_pairs, per_chunk)],
                                      strict=True)
                    step, final = torch.cat(step, 1), torch.cat(final, 2)  # (2, N), (K, 2, N)
                    expected = final[1:].mean(0)  # (2, N): held out from the single continuation below
                    for name, ranking in (("branches_x0_hat", step), ("branches_one_final", final[0])):
                        rate, n = order_disagreement(ranking[:1], ranking[1:], expected[0], expected[1])
                        rows.append(InconsistencyRow(reward.name, k, name, int(n), float(rate)))
    finally:
        reward.close()
    return rows


def plot_inconsistency(rows: list[InconsistencyRow], path: Path) -> None:
    """Fig. 2's shape: disagreement rate per fine-tuned step, one bar per comparison."""
    plt = pyplot()
    steps = sorted({r.step for r in rows}, reverse=True)
    names = [c for c in COMPARISONS if any(r.comparison == c for r in rows)]
    fig, ax = plt.subplots(figsize=(7, 4.4))
    width = 0.8 / len(names)
    for j, name in enumerate(names):
        rate = {r.step: r.disagreement for r in rows if r.comparison == name}
        ax.bar([s + (j - (len(names) - 1) / 2) * width for s in range(len(steps))],
               [rate.get(k, float("nan")) for k in steps], width, label=COMPARISONS[name])
    ax.set_xticks(range(len(steps)), [f"k={k}" for k in steps])
    ax.set(xlabel="fine-tuned step (x_k -> x_{k-1})", ylabel="order disagreement rate",
           title=f"order inconsistency ({rows[0].reward})")
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.18))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def inconsistency_markdown(rows: list[InconsistencyRow], pairs: int, continuations: int, branch_pairs: int) -> str:
    steps = sorted({r.step for r in rows}, reverse=True)
    names = [c for c in COMPARISONS if any(r.comparison == c for r in rows)]
    table = {(r.comparison, r.step): r for r in rows}
    lines = ["## Fig. 2: order inconsistency of intermediate vs final rankings", "",
             "![order inconsistency](fig2_order_inconsistency.png)", "",
             f"Base model, reward `{rows[0].reward}`; {pairs} trajectory pairs"
             + (f"; {branch_pairs} branch pairs per step, {continuations} continuations of each branch (expected "
                f"= mean of the last {continuations - 1})" if "branches_x0_hat" in names else "")
             + ". Disagreement rate (pairs counted):",
             "", "| comparison | " + " | ".join(f"k={k}" for k in steps) + " |",
             "|---|" + "---:|" * len(steps)]
    for name in names:
        cells = [table[name, k] for k in steps]
        lines.append(f"| {COMPARISONS[name]} | " + " | ".join(f"{c.disagreement:.2f} ({c.pairs})" for c in cells)
                     + " |")
    return "\n".join(lines)
