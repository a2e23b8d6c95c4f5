"""The LoRA learner: turns a rollout's pairs or transitions into log-probs and applies the objective.

Per fine-tuned step the batch shares one timestep, so each group costs one batched UNet call:
- TailorPO: x^w and x^l share x_t, so ONE trainable and ONE reference forward at x_t give all four
  log-probs (the reference is the same UNet with its adapter disabled).
- D3PO: different parents, so the forward runs on [x_t^w; x_t^l]: twice the rows.
- DDPO: one trainable forward; the old log-prob was stored at sampling time, no reference.

``LoraLearner`` holds what every learner shares, online or offline (``pair_learner.PairLearner``): AdamW on the
UNet's LoRA, gradient accumulation, clipping, the update count that checkpoints and the driver read, and the one
method the loops call, ``train_on(rollout or pair batch, noise)``.

Per fine-tuned step k the online learner also reports, under ``steps/k{k}/`` (``step_key``): the gradient norm
of that step's loss and, for pairs, the reward gap and dropped share of its pairs, the share whose ratio the
clip clamps, the LoRA's shift of the DDIM mean in sigma_t units, and optionally (``log.reward_gradient_cosine``)
that shift's cosine with the step reward's gradient. They only read what training computes, so a run's LoRA
is the same with or without them.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

import torch

from tailorpo.algorithms.branching import step_reward_fn
from tailorpo.algorithms.rollouts import PolicySteps, PreferencePairs, Rollout, pair_stats_by_step, select_rows
from tailorpo.config import AlgorithmConfig, OptimConfig
from tailorpo.core.ddim import DDIMStep, gaussian_log_prob
from tailorpo.core.diagnostics import clamp_fraction, mean_shift_in_sigma, row_cosine
from tailorpo.core.objectives import ddpo_loss, dpo_logits, preference_accuracy, step_dpo_loss
from tailorpo.diffusion.lora import lora_parameters, reference_model
from tailorpo.diffusion.policy import DiffusionPolicy, PromptEmbeds
from tailorpo.pairs.data import PairBatch
from tailorpo.rewards import RewardModel

RewardSource = Callable[[], RewardModel]  # opens the reward on first use (the Ray learner's client is lazy)


def step_key(k: int, name: str) -> str:
    """The stats key (and TensorBoard tag) of a per-step scalar: ``steps/k{k}/{name}`` for paper step k."""
    return f"steps/k{k}/{name}"


def split_step_key(key: str) -> tuple[int, str] | None:
    """(k, name) of a ``step_key``, None for a run-wide scalar."""
    match = re.fullmatch(r"steps/k(\d+)/(.+)", key)
    return None if match is None else (int(match[1]), match[2])


class LoraLearner:
    """AdamW on the policy's LoRA parameters, with gradient accumulation over ``gradient_accumulation_steps``
    iterations and clipping to ``max_grad_norm``: one optimizer path for every objective."""

    def __init__(self, policy: DiffusionPolicy, optim: OptimConfig) -> None:
        self.policy = policy
        self.optim_cfg = optim
        self.params = lora_parameters(policy.unet)
        if not self.params:
            raise ValueError("the UNet has no trainable LoRA parameters; call add_lora first")
        self.optimizer = torch.optim.AdamW(
            self.params, lr=optim.lr, betas=optim.betas, weight_decay=optim.weight_decay, eps=optim.eps
        )
        self.pending_iterations = 0
        self.updates = 0

    def backward(self, loss: torch.Tensor, where: str) -> None:
        """Accumulate d loss / d LoRA, scaled so that an optimizer step averages its iterations' losses. A
        non-finite loss stops the run before it reaches the weights (``where`` says which part of the batch)."""
        if not torch.isfinite(loss):
            raise FloatingPointError(f"non-finite loss {loss.item()} {where}; stopping")
        (loss / self.optim_cfg.gradient_accumulation_steps).backward()

    def backward_norm(self, loss: torch.Tensor, weight: float, where: str) -> float:
        """``backward(loss * weight)``, returning the norm of d loss / d LoRA: the accumulated gradient's increase,
        rescaled, before any clipping. The gradients are only read, so what accumulates is ``backward``'s."""
        before = [None if p.grad is None else p.grad.clone() for p in self.params]
        self.backward(loss * weight, where)
        increase = [p.grad if old is None else p.grad - old
                    for p, old in zip(self.params, before, strict=True) if p.grad is not None]
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in increase]))
        return float(norm) * self.optim_cfg.gradient_accumulation_steps / weight

    def end_iteration(self) -> dict[str, float]:
        """Count one iteration's gradients in; step the optimizer once ``gradient_accumulation_steps`` are in
        (then the stats hold the pre-clipping gradient norm)."""
        self.pending_iterations += 1
        if self.pending_iterations < self.optim_cfg.gradient_accumulation_steps:
            return {}
        return {"grad_norm": self.apply_gradients()}

    def train_on(self, data: Rollout | PairBatch, noise: torch.Generator | None = None) -> dict[str, float]:
        """Accumulate one iteration's gradients (stepping the optimizer when ``gradient_accumulation_steps``
        are in) and return the scalars to log. ``noise``: the generator of the learner's own random draws, for
        data that do not seed them themselves (a batch read from pairs.source)."""
        raise NotImplementedError

    def persist(self) -> None:
        """Write what a checkpoint must not refer to in memory only (nothing, unless the objective caches)."""

    def apply_gradients(self) -> float:
        """Clip and apply the accumulated gradients (also called at the end of a run, so none is lost)."""
        grad_norm = float(torch.nn.utils.clip_grad_norm_(self.params, self.optim_cfg.max_grad_norm))
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.pending_iterations = 0
        self.updates += 1
        return grad_norm


@dataclass
class PairForward:
    """One model's side of a group of pairs (the policy's, or the reference's with the adapter off)."""

    log_prob_w: torch.Tensor  # (N,)
    log_prob_l: torch.Tensor  # (N,)
    mean: torch.Tensor  # mu(x_t) at the parents' rows: (N, ...) for a shared parent, (2N, ...) [x_t^w; x_t^l] else
    sigma: float  # sigma_t of the step


class Learner(LoraLearner):
    """The online objectives' learner: rollouts of TailorPO / TailorPO-G / D3PO pairs or DDPO steps. With
    ``reward`` (``log.reward_gradient_cosine``) it also measures, per step, the cosine of the LoRA's mean shift
    with the step reward's gradient: one more UNet forward and backward and a decode backward per step."""

    def __init__(
        self,
        policy: DiffusionPolicy,
        optim: OptimConfig,
        algorithm: AlgorithmConfig,
        reward: RewardSource | None = None,
    ) -> None:
        super().__init__(policy, optim)
        self.algorithm = algorithm
        self.reward = reward

    def scored_step(
        self, x_t: torch.Tensor, step_index: int, targets: list[torch.Tensor], embeds: PromptEmbeds
    ) -> tuple[DDIMStep, list[torch.Tensor]]:
        """The DDIM step at x_t (mean mu(x_t), sigma_t) and log pi(target | x_t, c) for each target, from ONE
        guided UNet call at x_t."""
        eps = self.policy.eps(x_t, step_index, embeds)
        step = self.policy.step(step_index, eps, x_t, prev_sample=targets[0])
        reduction = self.policy.logprob_reduction
        return step, [step.log_prob] + [gaussian_log_prob(t, step.mean, step.std, reduction) for t in targets[1:]]

    def log_probs(
        self, x_t: torch.Tensor, step_index: int, targets: list[torch.Tensor], embeds: PromptEmbeds
    ) -> list[torch.Tensor]:
        """log pi(target | x_t, c) for each target, from ONE guided UNet call at x_t."""
        return self.scored_step(x_t, step_index, targets, embeds)[1]

    def _pair_forward(self, pairs: PreferencePairs, embeds: PromptEmbeds) -> PairForward:
        i = int(pairs.step_index[0])
        if pairs.shared_parent:
            step, (log_prob_w, log_prob_l) = self.scored_step(pairs.x_t_w, i, [pairs.x_next_w, pairs.x_next_l], embeds)
            return PairForward(log_prob_w, log_prob_l, step.mean, step.std)
        x_t = torch.cat([pairs.x_t_w, pairs.x_t_l])
        step, (log_prob,) = self.scored_step(x_t, i, [torch.cat([pairs.x_next_w, pairs.x_next_l])], embeds.repeat(2))
        return PairForward(*log_prob.chunk(2), step.mean, step.std)

    def pair_forwards(self, pairs: PreferencePairs, embeds: PromptEmbeds) -> tuple[PairForward, PairForward]:
        """(policy, reference) forwards for pairs of one fine-tuned step.

        The reference runs first: disabling the adapter toggles the LoRA weights' requires_grad, which must
        not happen while a trainable graph through them is alive."""
        with torch.no_grad(), reference_model(self.policy.unet):
            ref = self._pair_forward(pairs, embeds)
        return self._pair_forward(pairs, embeds), ref

    def dpo_logits(self, policy: PairForward, ref: PairForward) -> torch.Tensor:
        return dpo_logits(policy.log_prob_w, policy.log_prob_l, ref.log_prob_w, ref.log_prob_l,
                          self.algorithm.beta, self.algorithm.ratio_clip)

    def pair_logits(self, pairs: PreferencePairs, embeds: PromptEmbeds) -> torch.Tensor:
        """DPO logits h for pairs of one fine-tuned step (Eq. 10 for TailorPO, Eq. 5 for D3PO)."""
        return self.dpo_logits(*self.pair_forwards(pairs, embeds))

    def pair_diagnostics(
        self, pairs: PreferencePairs, policy: PairForward, ref: PairForward, embeds: PromptEmbeds, prompts: list[str]
    ) -> dict[str, float]:
        """A step's clamp fraction and the LoRA's mean shift in sigma_t units, from its DPO forwards; with
        ``self.reward`` differentiable, also the shift's cosine with the step reward's gradient (Eq. 12)."""
        mean = policy.mean.detach()
        log_ratio_w = policy.log_prob_w.detach() - ref.log_prob_w
        log_ratio_l = policy.log_prob_l.detach() - ref.log_prob_l
        stats = {
            "clamp_fraction": clamp_fraction(log_ratio_w, log_ratio_l, self.algorithm.ratio_clip),
            "mean_shift_sigma": float(mean_shift_in_sigma(mean, ref.mean, ref.sigma).mean()),
        }
        if self.reward is not None and (reward := self.reward()).differentiable:
            rows = 1 if pairs.shared_parent else 2  # the rows of ``mean``: [x_t^w; x_t^l] for D3PO
            gradient = self.step_reward_gradient(reward, int(pairs.step_index[0]), ref.mean, embeds.repeat(rows),
                                                 prompts * rows)
            stats["reward_gradient_cosine"] = float(row_cosine(mean - ref.mean, gradient).mean())
        return stats

    def step_reward_gradient(
        self, reward: RewardModel, step_index: int, x: torch.Tensor, embeds: PromptEmbeds, prompts: list[str]
    ) -> torch.Tensor:
        """d r_t / d x_{t-1} at ``x`` (Eq. 12 through the current policy's UNet and the decoder). Only x gets a
        gradient: the LoRA's accumulated gradients are untouched."""
        r_t = step_reward_fn(self.policy, reward, step_index, embeds, prompts)
        with torch.enable_grad():
            x = x.detach().requires_grad_()
            (gradient,) = torch.autograd.grad(r_t(x).sum(), x)
        return gradient

    def _group_loss(
        self, data: PreferencePairs | PolicySteps, embeds: PromptEmbeds, prompts: list[str]
    ) -> tuple[torch.Tensor, dict]:
        if isinstance(data, PreferencePairs):
            policy, ref = self.pair_forwards(data, embeds)
            logits = self.dpo_logits(policy, ref)
            return step_dpo_loss(logits), {"logits": logits.detach(), "forwards": (policy, ref)}
        if data.advantages is None:
            raise ValueError("PolicySteps.advantages is unset: assign them (PerPromptStatTracker) before training")
        (log_prob,) = self.log_probs(data.x_t, int(data.step_index[0]), [data.x_next], embeds)
        loss = ddpo_loss(log_prob, data.old_log_prob, data.advantages, self.algorithm.ddpo.clip_range)
        ratio = torch.exp(log_prob.detach() - data.old_log_prob)
        return loss, {"clipped": (ratio - 1).abs() > self.algorithm.ddpo.clip_range}

    def train_on(self, rollout: Rollout, noise: torch.Generator | None = None) -> dict[str, float]:
        """Accumulate the rollout's gradients, one fine-tuned step at a time; step the optimizer every
        ``gradient_accumulation_steps`` rollouts. Ties are dropped before any forward; nothing is drawn, so
        ``noise`` is unused. Per-step scalars are under ``step_key(k, name)``."""
        data = rollout.data
        per_step: dict[int, dict[str, float]] = {}
        if isinstance(data, PreferencePairs):
            per_step = pair_stats_by_step(data)
            data = select_rows(data, data.valid)
        embeds = self.policy.encode_prompts(rollout.prompts)
        total_rows = len(data.step_index)
        stats: dict[str, float] = {"pairs": float(total_rows)}
        logits, clipped, loss_sum = [], [], 0.0
        for step_index in data.step_index.unique().tolist():
            group = select_rows(data, data.step_index == step_index)
            group_embeds = embeds.index(group.prompt_index)
            prompts = [rollout.prompts[j] for j in group.prompt_index.tolist()]
            loss, extra = self._group_loss(group, group_embeds, prompts)
            weight = len(group.step_index) / total_rows
            step_stats = per_step.setdefault(step_index, {})
            step_stats["grad_norm"] = self.backward_norm(loss, weight, f"at step index {step_index}")
            loss_sum += loss.item() * weight
            logits += [extra["logits"]] if "logits" in extra else []
            clipped += [extra["clipped"]] if "clipped" in extra else []
            if "forwards" in extra:
                step_stats |= self.pair_diagnostics(group, *extra["forwards"], group_embeds, prompts)
        stats |= {step_key(self.policy.num_steps - i, name): value
                  for i, values in per_step.items() for name, value in values.items()}
        stats["loss"] = loss_sum
        if logits:
            stats["preference_accuracy"] = preference_accuracy(torch.cat(logits))
        if clipped:
            stats["clip_fraction"] = float(torch.cat(clipped).float().mean())
        return stats | self.end_iteration()
