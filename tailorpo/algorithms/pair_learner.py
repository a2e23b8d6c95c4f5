"""The learner of the offline pair objectives (Diffusion-DPO, MaPO, Diff-contrast) on pairs of final images.

One step on B pairs (prompt, x_0^w, x_0^l), as diffusers' Diffusion-DPO and mapo-t2i/mapo's scripts do it:

    z^w, z^l = VAE(x_0^w), VAE(x_0^l) * scaling_factor        (2B, C, h, w) rows [w; l]
    t ~ U{0, .., T_train - 1},  eps* ~ N(0, I)                 one per pair, the SAME for w and l
    x_t = sqrt(ab_t) z + sqrt(1 - ab_t) eps*                   scheduler.add_noise
    e = mean (eps_theta(x_t, t, c) - eps*)^2                   ONE trainable UNet call on the 2B rows
    e_ref = the same with the LoRA disabled, no grad           Diffusion-DPO and Diff-contrast only

then the loss of ``objectives.py``. MaPO is reference-free: it never runs the reference forward and never
toggles the adapter, which is its whole saving over Diffusion-DPO (one UNet forward per step instead of two).
Gradient accumulation, clipping and AdamW are ``LoraLearner``'s, shared with the online learner.

The pairs come from ``pairs.source`` (``pair_trainer``) or from the policy's own samples, two per prompt ranked by
the reward (``rollouts.final_image_pair_rollout``), which the online trainer and the Ray runtime feed in as
rollouts (``train_on_rollout``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from tailorpo.config import Config, OptimConfig, PairsConfig
from tailorpo.algorithms.learner import LoraLearner
from tailorpo.diffusion.lora import reference_model
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
from tailorpo.pairs.data import PairBatch
from tailorpo.pairs.embeddings import ClipPairEmbedder
from tailorpo.diffusion.policy import DiffusionPolicy, PromptEmbeds
from tailorpo.algorithms.rollouts import FinalImagePairs, Rollout

PairObjective = Literal["diffusion_dpo", "mapo", "diff_contrast"]


@dataclass
class NoisedPair:
    """One step's forward-diffusion draw for B pairs; every tensor holds 2B rows [winners; losers]."""

    latents: torch.Tensor  # (2B, C, h, w) z_0, VAE latents times scaling_factor
    timesteps: torch.Tensor  # (2B,) t, row i and B + i equal
    noise: torch.Tensor  # (2B, C, h, w) eps*, row i and B + i equal
    noisy: torch.Tensor  # (2B, C, h, w) x_t


class PairLearner(LoraLearner):
    """Trains the policy's LoRA on batches of preference pairs with one of the offline objectives."""

    def __init__(
        self,
        policy: DiffusionPolicy,
        optim: OptimConfig,
        objective: PairObjective,
        pairs: PairsConfig,
        embedder: ClipPairEmbedder | None = None,
    ) -> None:
        super().__init__(policy, optim)
        if objective == "diff_contrast" and embedder is None:
            raise ValueError("diff_contrast needs a ClipPairEmbedder for its in-batch weights")
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

    def loss(self, batch: PairBatch, noised: NoisedPair) -> tuple[torch.Tensor, dict[str, float]]:
        """The configured objective on one noised batch, and the scalars to log (all means over the batch)."""
        embeds = self.policy.encode_prompts(batch.prompts).repeat(2)  # rows [w; l] share their prompt
        if self.objective == "mapo":
            err_w, err_l = self.errors(noised, embeds)
            snr_value = self.pairs.mapo.snr_value
            log_odds = mapo_log_odds(err_w, err_l, snr_value)  # (B,)
            loss = mapo_loss(err_w, log_odds, self.pairs.mapo.beta_mapo, self.num_train_timesteps)
            stats = {
                "win_score": float(mapo_score(err_w.detach(), snr_value).mean()),
                "lose_score": float(mapo_score(err_l.detach(), snr_value).mean()),
                "margin": float(log_odds.detach().mean()),
                "preference_accuracy": preference_accuracy(log_odds.detach()),
            }
        else:
            # the reference first: disabling the adapter must not happen while a graph through it is alive
            ref_w, ref_l = self.reference_errors(noised, embeds)
            err_w, err_l = self.errors(noised, embeds)
            if self.objective == "diffusion_dpo":
                logits = diffusion_dpo_logits(err_w, err_l, ref_w, ref_l, self.pairs.beta)  # (B,)
                loss, same_prompt = step_dpo_loss(logits), logits.detach()
                stats = {}
            else:
                weights = diff_contrast_weights(*self.embedder(batch), self.pairs.diff_contrast.tau)  # (B, B)
                logits = diff_contrast_logits(err_w, err_l, ref_w, ref_l, self.pairs.beta)  # (B, B)
                loss, same_prompt = diff_contrast_loss(logits, weights), logits.detach().diagonal()
                stats = {"diagonal_weight": float(weights.diagonal().mean())}
            stats |= {
                "preference_accuracy": preference_accuracy(same_prompt),  # Diffusion-DPO's implicit accuracy
                "model_gap": float((err_w - err_l).detach().mean()),  # e^w - e^l: < 0 when the winner fits better
                "ref_gap": float((ref_w - ref_l).mean()),
            }
        return loss, stats | {"error_w": float(err_w.detach().mean()), "error_l": float(err_l.detach().mean())}

    def train_on(self, batch: PairBatch, generator: torch.Generator) -> dict[str, float]:
        """Accumulate one batch's gradient; step the optimizer every ``gradient_accumulation_steps`` batches."""
        loss, stats = self.loss(batch, self.noise_pair(batch, generator))
        self.backward(loss, f"on pair rows {batch.index.tolist()}")
        return {"loss": loss.item(), "pairs": float(len(batch.prompts))} | stats | self.end_iteration()

    def train_on_rollout(self, rollout: Rollout) -> dict[str, float]:
        """One online rollout's ranked final images; the forward-diffusion draw is seeded by the rollout, so
        the step does not depend on where or when it runs. A rollout of ties only still counts as an iteration."""
        pairs = rollout.data
        if not isinstance(pairs, FinalImagePairs):
            raise TypeError(f"the pair learner trains on FinalImagePairs, not {type(pairs).__name__}")
        if not len(pairs.prompt_index):
            return {"pairs": 0.0} | self.end_iteration()
        prompts = [rollout.prompts[i] for i in pairs.prompt_index.tolist()]
        batch = PairBatch(pairs.prompt_index, prompts, pairs.image_w, pairs.image_l)
        return self.train_on(batch, torch.Generator().manual_seed(pairs.noise_seed))


def build_pair_learner(
    cfg: Config, policy: DiffusionPolicy, cache_folder: Path | None = None, data_tag: dict[str, str] | None = None
) -> PairLearner:
    """The configured objective's learner; Diff-contrast also loads its CLIP, with an embedding cache in
    ``cache_folder`` for pairs read from a source (``data_tag`` names it), without one for online pairs."""
    embedder = None
    if cfg.algorithm.name == "diff_contrast":
        dc = cfg.pairs.diff_contrast
        embedder = ClipPairEmbedder.load(dc.clip_model, policy.device, cache_folder, data_tag or {})
    return PairLearner(policy, cfg.optim, cfg.algorithm.name, cfg.pairs, embedder)
