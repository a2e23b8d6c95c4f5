"""The learner of the offline pair objectives (Diffusion-DPO, MaPO, Diff-contrast) on pairs of final images.

One step on B pairs (prompt, x_0^w, x_0^l), as diffusers' Diffusion-DPO and mapo-t2i/mapo's scripts do it:

    z^w, z^l = VAE(x_0^w), VAE(x_0^l) * scaling_factor        (2B, C, h, w) rows [w; l]
    t ~ U{0, .., T_train - 1},  eps* ~ N(0, I)                 one per pair, the SAME for w and l
    x_t = sqrt(ab_t) z + sqrt(1 - ab_t) eps*                   scheduler.add_noise
    e = mean (eps_theta(x_t, t, c) - eps*)^2                   ONE trainable UNet call on the 2B rows
    e_ref = the same with the LoRA disabled, no grad           Diffusion-DPO and Diff-contrast only

then the objective's loss (a ``PairObjective``: MAPO, DIFFUSION_DPO, DIFF_CONTRAST, on ``objectives.py``'s
math). MaPO is reference-free: it never runs the reference forward and never
toggles the adapter, which is its whole saving over Diffusion-DPO (one UNet forward per step instead of two).
Gradient accumulation, clipping and AdamW are ``LoraLearner``'s, shared with the online learner.

The pairs come from ``pairs.source`` (``training.pair_loop``) or from the policy's own samples, two per prompt
ranked by the reward (``rollouts.final_image_pair_rollout``), which the online loop and the Ray runtime feed to
the same ``train_on`` as rollouts.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from tailorpo.algorithms.learner import LoraLearner
from tailorpo.algorithms.rollouts import FinalImagePairs, Rollout
from tailorpo.config import Config, OptimConfig, PairsConfig
from tailorpo.core.objectives import (
    diff_contrast_logits,
    diff_contrast_loss,
    diff_contrast_weights,
    diffusion_dpo_logits,
    mapo_log_odds,
    mapo_loss,
    mapo_score,
    noise_prediction_error,
    preference_accuracy,
    step_dpo_loss,
)
from tailorpo.diffusion.lora import reference_model
from tailorpo.diffusion.policy import DiffusionPolicy, PromptEmbeds
from tailorpo.pairs.data import PairBatch
from tailorpo.pairs.embeddings import ClipPairEmbedder


@dataclass
class NoisedPair:
    """One step's forward-diffusion draw for B pairs; every tensor holds 2B rows [winners; losers]."""

    latents: torch.Tensor  # (2B, C, h, w) z_0, VAE latents times scaling_factor
    timesteps: torch.Tensor  # (2B,) t, row i and B + i equal
    noise: torch.Tensor  # (2B, C, h, w) eps*, row i and B + i equal
    noisy: torch.Tensor  # (2B, C, h, w) x_t


PairLoss = Callable[["PairLearner", PairBatch, NoisedPair, PromptEmbeds], tuple[torch.Tensor, dict[str, float]]]


@dataclass(frozen=True)
class PairObjective:
    """One objective on pairs of final images: its loss on a noised batch (``embeds`` has the 2B rows [w; l])
    and the scalars it logs, all means over the batch."""

    loss: PairLoss
    clip_embeddings: bool = False  # in-batch weights from CLIP joint embeddings: needs a ClipPairEmbedder


def mapo_batch_loss(
    learner: PairLearner, batch: PairBatch, noised: NoisedPair, embeds: PromptEmbeds
) -> tuple[torch.Tensor, dict[str, float]]:
    """MaPO (Hong et al., arXiv 2406.06424): reference-free, so one UNet forward and the adapter never toggled."""
    err_w, err_l = learner.errors(noised, embeds)
    mapo = learner.pairs.mapo
    log_odds = mapo_log_odds(err_w, err_l, mapo.snr_value)  # (B,)
    loss = mapo_loss(err_w, log_odds, mapo.beta_mapo, learner.num_train_timesteps)
    return loss, {
        "win_score": float(mapo_score(err_w.detach(), mapo.snr_value).mean()),
        "lose_score": float(mapo_score(err_l.detach(), mapo.snr_value).mean()),
        "margin": float(log_odds.detach().mean()),
        "preference_accuracy": preference_accuracy(log_odds.detach()),
        **error_stats(err_w, err_l),
    }


def diffusion_dpo_batch_loss(
    learner: PairLearner, batch: PairBatch, noised: NoisedPair, embeds: PromptEmbeds
) -> tuple[torch.Tensor, dict[str, float]]:
    """Diffusion-DPO (Wallace et al., arXiv 2311.12908) against the adapter-free reference."""
    ref_w, ref_l, err_w, err_l = learner.reference_and_model_errors(noised, embeds)
    logits = diffusion_dpo_logits(err_w, err_l, ref_w, ref_l, learner.pairs.beta)  # (B,)
    return step_dpo_loss(logits), reference_stats(logits.detach(), ref_w, ref_l, err_w, err_l)


def diff_contrast_batch_loss(
    learner: PairLearner, batch: PairBatch, noised: NoisedPair, embeds: PromptEmbeds
) -> tuple[torch.Tensor, dict[str, float]]:
    """Diff-contrast: every winner against every loser of the batch, weighted by CLIP similarity of the pairs."""
    ref_w, ref_l, err_w, err_l = learner.reference_and_model_errors(noised, embeds)
    weights = diff_contrast_weights(*learner.embedder(batch), learner.pairs.diff_contrast.tau)  # (B, B)
    logits = diff_contrast_logits(err_w, err_l, ref_w, ref_l, learner.pairs.beta)  # (B, B)
    stats = reference_stats(logits.detach().diagonal(), ref_w, ref_l, err_w, err_l)
    return diff_contrast_loss(logits, weights), stats | {"diagonal_weight": float(weights.diagonal().mean())}


def error_stats(err_w: torch.Tensor, err_l: torch.Tensor) -> dict[str, float]:
    return {"error_w": float(err_w.detach().mean()), "error_l": float(err_l.detach().mean())}


def reference_stats(
    same_prompt_logits: torch.Tensor, ref_w: torch.Tensor, ref_l: torch.Tensor, err_w: torch.Tensor,
    err_l: torch.Tensor,
) -> dict[str, float]:
    """The scalars of the objectives with a reference: Diffusion-DPO's implicit accuracy on each pair's own
    logit, and the model's and the reference's error gaps (< 0 when the winner fits better)."""
    return {
        "preference_accuracy": preference_accuracy(same_prompt_logits),
        "model_gap": float((err_w - err_l).detach().mean()),
        "ref_gap": float((ref_w - ref_l).mean()),
        **error_stats(err_w, err_l),
    }


MAPO = PairObjective(mapo_batch_loss)
DIFFUSION_DPO = PairObjective(diffusion_dpo_batch_loss)
DIFF_CONTRAST = PairObjective(diff_contrast_batch_loss, clip_embeddings=True)


class PairLearner(LoraLearner):
    """Trains the policy's LoRA on batches of preference pairs with one of the pair objectives."""

    def __init__(
        self,
        policy: DiffusionPolicy,
        optim: OptimConfig,
        objective: PairObjective,
        pairs: PairsConfig,
        embedder: ClipPairEmbedder | None = None,
    ) -> None:
        super().__init__(policy, optim)
        if objective.clip_embeddings and embedder is None:
            raise ValueError(f"{objective.loss.__name__} needs a ClipPairEmbedder for its in-batch weights")
        self.objective = objective
        self.pairs = pairs
        self.embedder = embedder
        self.scheduler = policy.pipe.scheduler
        self.num_train_timesteps = int(self.scheduler.config.num_train_timesteps)

    @torch.no_grad()
    def noise_pair(self, batch: PairBatch, generator: torch.Generator) -> NoisedPair:
        """Encode both images and noise them with one (t, eps*) per pair. ``generator`` is drawn in a fixed
        order (VAE posterior sample, t, eps*), so a run restored with its state draws the same."""
        vae = self.policy.pipe.vae
        pixels = torch.cat([batch.image_w, batch.image_l]).to(self.policy.device, vae.dtype)  # (2B, 3, R, R)
        posterior = vae.encode(pixels).latent_dist
        latents = posterior.sample(generator=generator).float() * vae.config.scaling_factor
        pairs = len(batch.prompts)
        timesteps = torch.randint(0, self.num_train_timesteps, (pairs,), generator=generator).repeat(2)
        noise = self.policy.noise((pairs, *latents.shape[1:]), generator).repeat(2, 1, 1, 1)
        timesteps = timesteps.to(self.policy.device)
        return NoisedPair(latents, timesteps, noise, self.scheduler.add_noise(latents, noise, timesteps))

    def errors(self, noised: NoisedPair, embeds: PromptEmbeds) -> tuple[torch.Tensor, torch.Tensor]:
        """(B,) e^w and (B,) e^l from ONE unguided UNet call on the 2B rows (``embeds`` has 2B rows too)."""
        eps_pred = self.policy.cond_eps(noised.noisy, noised.timesteps, embeds)
        return noise_prediction_error(eps_pred, noised.noise).chunk(2)

    def reference_errors(self, noised: NoisedPair, embeds: PromptEmbeds) -> tuple[torch.Tensor, torch.Tensor]:
        """e_ref^w, e_ref^l: the same call with the adapter disabled, without a graph."""
        with torch.no_grad(), reference_model(self.policy.unet):
            return self.errors(noised, embeds)

    def reference_and_model_errors(self, noised: NoisedPair, embeds: PromptEmbeds) -> tuple[torch.Tensor, ...]:
        """(e_ref^w, e_ref^l, e^w, e^l), the reference first: disabling the adapter must not happen while a
        graph through it is alive."""
        return *self.reference_errors(noised, embeds), *self.errors(noised, embeds)

    def loss(self, batch: PairBatch, noised: NoisedPair) -> tuple[torch.Tensor, dict[str, float]]:
        """The objective on one noised batch, and the scalars to log."""
        embeds = self.policy.encode_prompts(batch.prompts).repeat(2)  # rows [w; l] share their prompt
        return self.objective.loss(self, batch, noised, embeds)

    def train_on(self, data: PairBatch | Rollout, noise: torch.Generator | None = None) -> dict[str, float]:
        """Accumulate one batch's gradient; step the optimizer every ``gradient_accumulation_steps`` batches.

        A batch from ``pairs.source`` draws its VAE sample, t and eps* from ``noise``, the loop's checkpointed
        stream. An online rollout's ranked final images draw them from the rollout's own seed, so the step does
        not depend on where or when it runs; a rollout of ties only still counts as an iteration."""
        if isinstance(data, Rollout):
            data, noise = self._rollout_pairs(data)
            if data is None:
                return {"pairs": 0.0} | self.end_iteration()
        if noise is None:
            raise ValueError("train_on: a pair batch needs the generator of its forward-diffusion draws (noise)")
        loss, stats = self.loss(data, self.noise_pair(data, noise))
        self.backward(loss, f"on pair rows {data.index.tolist()}")
        return {"loss": loss.item(), "pairs": float(len(data.prompts))} | stats | self.end_iteration()

    @staticmethod
    def _rollout_pairs(rollout: Rollout) -> tuple[PairBatch | None, torch.Generator]:
        pairs = rollout.data
        if not isinstance(pairs, FinalImagePairs):
            raise TypeError(f"the pair learner trains on FinalImagePairs, not {type(pairs).__name__}")
        noise = torch.Generator().manual_seed(pairs.noise_seed)
        if not len(pairs.prompt_index):
            return None, noise
        prompts = [rollout.prompts[i] for i in pairs.prompt_index.tolist()]
        return PairBatch(pairs.prompt_index, prompts, pairs.image_w, pairs.image_l), noise

    def persist(self) -> None:
        """Diff-contrast's embedding cache to disk, so a checkpoint never refers to embeddings in memory only."""
        if self.embedder is not None and self.embedder.cache is not None:
            self.embedder.cache.flush()


def build_pair_learner(
    cfg: Config, policy: DiffusionPolicy, objective: PairObjective, cache_folder: Path | None = None,
    data_tag: dict[str, str] | None = None,
) -> PairLearner:
    """The objective's learner; one with CLIP embeddings (Diff-contrast) also loads its CLIP, with an embedding
    cache in ``cache_folder`` for pairs read from a source (``data_tag`` names it), without one for online pairs."""
    embedder = None
    if objective.clip_embeddings:
        dc = cfg.pairs.diff_contrast
        embedder = ClipPairEmbedder.load(dc.clip_model, policy.device, cache_folder, data_tag or {})
    return PairLearner(policy, cfg.optim, objective, cfg.pairs, embedder)
