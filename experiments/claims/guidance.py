"""Table 1, guidance: over noisy base-model samples x_{t-1}, the share with r_t(x^+) > r_t(x) and with
r_t(x^-) < r_t(x) (Eq. 14, fixed eta_t and delta), and beyond the paper the same for the final images those
samples end in."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from tailorpo.config import Config

from .runs import chunks, cycled, reward_model
from .stats import guidance_figures

if TYPE_CHECKING:
    from tailorpo.diffusion.policy import DiffusionPolicy, PromptEmbeds
    from tailorpo.rewards import RewardModel

PAPER_ETA, PAPER_DELTA = 0.2, 0.5  # Table 1's guidance settings (Sec. 3.4)


@dataclass
class GuidanceRow:
    reward: str
    step: str  # "k=20", ..., or "all"
    eta: float
    delta: float
    samples: int
    raised: float  # share with r_t(x^+) > r_t(x)
    lowered: float  # share with r_t(x^-) < r_t(x)
    mean_gain_plus: float  # mean r_t(x^+) - r_t(x)
    mean_gain_minus: float  # mean r_t(x^-) - r_t(x)
    final_raised: float  # the same for the final images of x, x^+, x^- continued on shared noise
    final_lowered: float
    mean_final_gain_plus: float
    mean_final_gain_minus: float


def guidance_success(cfg: Config, noisy_samples: int, eta: float, delta: float) -> list[GuidanceRow]:
    """Table 1: noisy base-model samples x_{t-1} at each fine-tuned step (``noisy_samples`` in all), moved to
    x^+ and x^- by the package's guidance (reward differentiated through the UNet at t-1, the VAE decoder and
    the reward), batched as training batches them (``sampling.batch_size``). Beyond the paper: x, x^+ and x^-
    are each denoised to an image on the same noise, so the final rewards show whether raising r(x0_hat)
    raises the reward of the image the chain ends in."""
    from tailorpo.algorithms.branching import step_reward_fn
    from tailorpo.algorithms.rollouts import trajectory_rollout
    from tailorpo.core.guidance import guide
    from tailorpo.diffusion.lora import reference_model
    from tailorpo.training.build import build_policy, resolve_device

    reward = reward_model(cfg)
    policy = build_policy(cfg, resolve_device(cfg.device))
    generator = torch.Generator().manual_seed(cfg.seed)
    steps_k = sorted(cfg.algorithm.fine_tuned_steps, reverse=True)
    per_step = max(1, noisy_samples // len(steps_k))
    prompts = cycled(cfg.prompts, per_step)
    results: dict[int, list[torch.Tensor]] = {}
    try:
        with reference_model(policy.unet):
            for k in steps_k:
                i, r_x, r_plus, r_minus, finals = policy.num_steps - k, [], [], [], []
                for c in chunks(per_step, cfg.sampling.batch_size):
                    batch = prompts[c.start:c.stop]
                    embeds = policy.encode_prompts(batch)
                    x = trajectory_rollout(policy, embeds, generator, [k]).steps[0]["x_next"]  # noisy x_{t-1}
                    r_t = step_reward_fn(policy, reward, i, embeds, batch)
                    x_plus, r = guide(x, r_t, eta, delta, increase=True)
                    x_minus, _ = guide(x, r_t, eta, delta, increase=False)
                    with torch.no_grad():
                        r_x.append(r.cpu())
                        r_plus.append(r_t(x_plus).cpu())
                        r_minus.append(r_t(x_minus).cpu())
                        finals.append(final_rewards_on_shared_noise(policy, reward, [x, x_plus, x_minus], embeds,
                                                                    batch, generator, i + 1))
                results[k] = [torch.cat(r_x), torch.cat(r_plus), torch.cat(r_minus),
                              *(torch.cat(f) for f in zip(*finals, strict=True))]
    finally:
        reward.close()
    groups = [(f"k={k}", results[k]) for k in steps_k]
    groups.append(("all", [torch.cat([results[k][j] for k in steps_k]) for j in range(6)]))
    return [GuidanceRow(reward.name, name, eta, delta, len(r[0]), *guidance_figures(*r[:3]), *guidance_figures(*r[3:]))
            for name, r in groups]


@torch.no_grad()
def final_rewards_on_shared_noise(policy: DiffusionPolicy, reward: RewardModel, starts: list[torch.Tensor],
                                  embeds: PromptEmbeds, prompts: list[str], generator: torch.Generator,
                                  start: int) -> list[torch.Tensor]:
    """The final-image reward of each batch in ``starts`` (inputs of step index ``start``), all denoised with
    the same noise draws, so their differences come from the starting points alone."""
    from tailorpo.algorithms.rollouts import denoise

    state, finals = generator.get_state(), []
    for x in starts:
        generator.set_state(state)
        finals.append(reward.score(policy.decode(denoise(policy, x, embeds, generator, start)), prompts).scores.cpu())
    return finals


def guidance_markdown(rows: list[GuidanceRow]) -> str:
    r = rows[0]
    lines = ["## Table 1: gradient guidance on noisy samples", "",
             f"Base model, reward `{r.reward}`, eta_t = {r.eta:g}, delta = {r.delta:g}; r_t = r(decode(x0_hat(x))) "
             "differentiated through the UNet at t-1, the VAE decoder and the reward. Step-wise: r_t of x+ / x- "
             "against x (the paper's Table 1). Final: the reward of the image that x+ / x- ends in against x's, "
             "all three denoised on the same noise.", "",
             "| step | samples | r_t(x+) > r_t(x) | r_t(x-) < r_t(x) | mean r_t(x+) - r_t(x) | mean r_t(x-) - r_t(x) "
             "| final: x+ > x | final: x- < x | mean final gain x+ | mean final gain x- |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    lines += [f"| {r.step} | {r.samples} | {r.raised:.0%} | {r.lowered:.0%} | {r.mean_gain_plus:+.4f} | "
              f"{r.mean_gain_minus:+.4f} | {r.final_raised:.0%} | {r.final_lowered:.0%} | "
              f"{r.mean_final_gain_plus:+.4f} | {r.mean_final_gain_minus:+.4f} |" for r in rows]
    return "\n".join(lines)
