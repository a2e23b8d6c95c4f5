"""The LoRA learner: turns a rollout's pairs or transitions into log-probs and applies the objective.

Per fine-tuned step the batch shares one timestep, so each group costs one batched UNet call:
- TailorPO: x^w and x^l share x_t, so ONE trainable and ONE reference forward at x_t give all four
  log-probs (the reference is the same UNet with its adapter disabled).
- D3PO: different parents, so the forward runs on [x_t^w; x_t^l]: twice the rows.
- DDPO: one trainable forward; the old log-prob was stored at sampling time, no reference.

``LoraLearner`` holds what every learner shares, online or offline (``pair_learner.PairLearner``): AdamW on the
UNet's LoRA, gradient accumulation, clipping, the update count that checkpoints and the driver read, and the one
method the loops call, ``train_on(rollout or pair batch, noise)``.
"""

from __future__ import annotations

import torch

from tailorpo.algorithms.rollouts import PolicySteps, PreferencePairs, Rollout, select_rows
from tailorpo.config import AlgorithmConfig, OptimConfig
from tailorpo.core.ddim import gaussian_log_prob
from tailorpo.core.objectives import ddpo_loss, dpo_logits, preference_accuracy, step_dpo_loss
from tailorpo.diffusion.lora import lora_parameters, reference_model
from tailorpo.diffusion.policy import DiffusionPolicy, PromptEmbeds
from tailorpo.pairs.data import PairBatch


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


class Learner(LoraLearner):
    """The online objectives' learner: rollouts of TailorPO / TailorPO-G / D3PO pairs or DDPO steps."""

    def __init__(self, policy: DiffusionPolicy, optim: OptimConfig, algorithm: AlgorithmConfig) -> None:
        super().__init__(policy, optim)
        self.algorithm = algorithm

    def log_probs(
        self, x_t: torch.Tensor, step_index: int, targets: list[torch.Tensor], embeds: PromptEmbeds
    ) -> list[torch.Tensor]:
        """log pi(target | x_t, c) for each target, from ONE guided UNet call at x_t."""
        eps = self.policy.eps(x_t, step_index, embeds)
        step = self.policy.step(step_index, eps, x_t, prev_sample=targets[0])
        reduction = self.policy.logprob_reduction
        return [step.log_prob] + [gaussian_log_prob(t, step.mean, step.std, reduction) for t in targets[1:]]

    def _pair_log_probs(self, pairs: PreferencePairs, embeds: PromptEmbeds) -> tuple[torch.Tensor, torch.Tensor]:
        i = int(pairs.step_index[0])
        if pairs.shared_parent:
            return tuple(self.log_probs(pairs.x_t_w, i, [pairs.x_next_w, pairs.x_next_l], embeds))
        x_t = torch.cat([pairs.x_t_w, pairs.x_t_l])
        (log_prob,) = self.log_probs(x_t, i, [torch.cat([pairs.x_next_w, pairs.x_next_l])], embeds.repeat(2))
        return tuple(log_prob.chunk(2))

    def pair_logits(self, pairs: PreferencePairs, embeds: PromptEmbeds) -> torch.Tensor:
        """DPO logits h for pairs of one fine-tuned step (Eq. 10 for TailorPO, Eq. 5 for D3PO).

        The reference runs first: disabling the adapter toggles the LoRA weights' requires_grad, which must
        not happen while a trainable graph through them is alive."""
        with torch.no_grad(), reference_model(self.policy.unet):
            ref_w, ref_l = self._pair_log_probs(pairs, embeds)
        log_prob_w, log_prob_l = self._pair_log_probs(pairs, embeds)
        return dpo_logits(log_prob_w, log_prob_l, ref_w, ref_l, self.algorithm.beta, self.algorithm.ratio_clip)

    def _group_loss(self, data: PreferencePairs | PolicySteps, embeds: PromptEmbeds) -> tuple[torch.Tensor, dict]:
        if isinstance(data, PreferencePairs):
            logits = self.pair_logits(data, embeds)
            return step_dpo_loss(logits), {"logits": logits.detach()}
        if data.advantages is None:
            raise ValueError("PolicySteps.advantages is unset: assign them (PerPromptStatTracker) before training")
        (log_prob,) = self.log_probs(data.x_t, int(data.step_index[0]), [data.x_next], embeds)
        loss = ddpo_loss(log_prob, data.old_log_prob, data.advantages, self.algorithm.ddpo.clip_range)
        ratio = torch.exp(log_prob.detach() - data.old_log_prob)
        return loss, {"clipped": (ratio - 1).abs() > self.algorithm.ddpo.clip_range}

    def train_on(self, rollout: Rollout, noise: torch.Generator | None = None) -> dict[str, float]:
        """Accumulate the rollout's gradients, one fine-tuned step at a time; step the optimizer every
        ``gradient_accumulation_steps`` rollouts. Ties are dropped before any forward; nothing is drawn, so
        ``noise`` is unused."""
        data = rollout.data
        if isinstance(data, PreferencePairs):
            data = select_rows(data, data.valid)
        embeds = self.policy.encode_prompts(rollout.prompts)
        total_rows = len(data.step_index)
        stats: dict[str, float] = {"pairs": float(total_rows)}
        logits, clipped, loss_sum = [], [], 0.0
        for step_index in data.step_index.unique().tolist():
            group = select_rows(data, data.step_index == step_index)
            loss, extra = self._group_loss(group, embeds.index(group.prompt_index))
            weight = len(group.step_index) / total_rows
            self.backward(loss * weight, f"at step index {step_index}")
            loss_sum += loss.item() * weight
            logits += [extra["logits"]] if "logits" in extra else []
            clipped += [extra["clipped"]] if "clipped" in extra else []
        stats["loss"] = loss_sum
        if logits:
            stats["preference_accuracy"] = preference_accuracy(torch.cat(logits))
        if clipped:
            stats["clip_fraction"] = float(torch.cat(clipped).float().mean())
        return stats | self.end_iteration()
