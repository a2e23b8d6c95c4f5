"""The diffusion policy pi_theta(x_{t-1} | x_t, c): guided UNet noise prediction, DDIM steps, VAE decode.

A thin layer over a diffusers pipeline that the samplers and the learner share, so both compute the same
eps for the same (x_t, t, c). It counts UNet evaluations and VAE decodes per image, which tests and benchmarks read.
Optionally its LoRA acts only at some steps (``lora_at``): a LoRA trained at a few steps of the chain need not
act at the others, where it was never fitted.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass, fields

import torch
from diffusers import DDIMScheduler, StableDiffusionXLPipeline

from tailorpo.core.ddim import DDIMStep, LogProbReduction, ddim_mean, ddim_sigma, ddim_step, predict_x0
from tailorpo.diffusion.lora import AdapterSteps, reference_model
from tailorpo.diffusion.pipeline import Pipeline


def step_alphas(scheduler: DDIMScheduler, timestep: int) -> tuple[float, float]:
    """alpha_bar_t and alpha_bar_{t-1} for one inference step, exactly as ``DDIMScheduler.step`` picks them."""
    if scheduler.num_inference_steps is None:
        raise ValueError("call scheduler.set_timesteps(num_steps) before stepping")
    prev_timestep = timestep - scheduler.config.num_train_timesteps // scheduler.num_inference_steps
    alpha_prod_t = scheduler.alphas_cumprod[timestep]
    alpha_prod_prev = (
        scheduler.alphas_cumprod[prev_timestep] if prev_timestep >= 0 else scheduler.final_alpha_cumprod
    )
    return float(alpha_prod_t), float(alpha_prod_prev)

@dataclass
class PromptEmbeds:
    """The conditioning of a batch of prompts, row i for prompt i. SDXL adds the second text encoder's pooled
    projection and its size/crop micro-conditioning ids; for SD v1.x those stay None."""

    cond: torch.Tensor  # (B, L, D) text-encoder states of the prompts
    uncond: torch.Tensor  # (B, L, D) states of the empty prompt, for classifier-free guidance
    pooled_cond: torch.Tensor | None = None  # (B, P) SDXL: text_encoder_2's pooled projection of the prompts
    pooled_uncond: torch.Tensor | None = None  # (B, P) SDXL: the same for the empty prompt
    time_ids: torch.Tensor | None = None  # (B, 6) SDXL: original size, crop top-left, target size

    def _map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> PromptEmbeds:
        """``fn`` on every row-indexed tensor, so no field is forgotten by index or repeat."""
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        return PromptEmbeds(**{name: None if v is None else fn(v) for name, v in values.items()})

    def index(self, rows: torch.Tensor) -> PromptEmbeds:
        return self._map(lambda t: t[rows])

    def repeat(self, times: int) -> PromptEmbeds:
        return self._map(lambda t: t.repeat(times, *[1] * (t.dim() - 1)))


def check_schedule(alphas: list[tuple[float, float]], eta: float) -> None:
    """The chain must be consistent (alpha_bar_{t-1} of step i is alpha_bar_t of step i+1, which x0_hat of a
    child relies on) and every step must have sigma_t > 0 (else it has no log-probability)."""
    for i, (alpha_t, alpha_prev) in enumerate(alphas):
        if ddim_sigma(alpha_t, alpha_prev, eta) == 0.0:
            raise ValueError(
                f"DDIM step {i} has sigma_t = 0 (alpha_bar_prev = {alpha_prev}); a scheduler with "
                "set_alpha_to_one=True gives the last step no density: set it to False (SD v1.5's setting)"
            )
        if i + 1 < len(alphas) and abs(alphas[i + 1][0] - alpha_prev) > 1e-7:
            raise ValueError(
                "the scheduler's timesteps are not evenly spaced by num_train_timesteps // num_steps; "
                "use timestep_spacing='leading' or 'trailing'"
            )


class DiffusionPolicy:
    """Step k of ``num_steps`` (paper numbering, k = num_steps..1) maps x_k -> x_{k-1}; index i = num_steps - k
    into the scheduler's descending timesteps. ``lora_at``: the step indices i where the UNet's LoRA acts in
    ``eps`` (the base model at the others); None: every step."""

    def __init__(
        self,
        pipe: Pipeline,
        num_steps: int = 20,
        eta: float = 1.0,
        guidance_scale: float = 5.0,
        resolution: int = 512,
        logprob_reduction: LogProbReduction = "mean",
        autocast_dtype: torch.dtype | None = None,
        lora_at: Collection[int] | None = None,
    ) -> None:
        self.pipe = pipe
        self.unet = pipe.unet
        self.num_steps = num_steps
        self.eta = eta
        self.guidance_scale = guidance_scale
        self.resolution = resolution
        self.logprob_reduction: LogProbReduction = logprob_reduction
        self.autocast_dtype = autocast_dtype
        self.lora_at = None if lora_at is None else frozenset(lora_at)
        pipe.scheduler.set_timesteps(num_steps)
        self.timesteps = [int(t) for t in pipe.scheduler.timesteps]
        self.alphas = [step_alphas(pipe.scheduler, t) for t in self.timesteps]  # (alpha_bar_t, alpha_bar_prev)
        check_schedule(self.alphas, eta)
        self.unet_evals = 0  # guided noise predictions, counted per image
        self.vae_decodes = 0  # decoded images

    @property
    def device(self) -> torch.device:
        return self.unet.device

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        factor = 2 ** (len(self.pipe.vae.config.block_out_channels) - 1)
        return (self.unet.config.in_channels, self.resolution // factor, self.resolution // factor)

    @property
    def adapter_steps(self) -> AdapterSteps | None:
        """The gate in paper numbering, as ``save_lora`` records it; None when the LoRA acts at every step."""
        if self.lora_at is None:
            return None
        return AdapterSteps(tuple(sorted((self.num_steps - i for i in self.lora_at), reverse=True)), self.num_steps)

    @contextmanager
    def lora_only_at(self, step_indices: Collection[int]) -> Iterator[None]:
        """Within the block the LoRA acts at ``step_indices`` only, whatever the policy's own gate."""
        saved, self.lora_at = self.lora_at, frozenset(step_indices)
        try:
            yield
        finally:
            self.lora_at = saved

    def adapter_at(self, step_index: int) -> AbstractContextManager:
        """The UNet as it acts at step ``step_index``: the LoRA on, or off where the gate excludes the step
        (peft's switch: no second UNet)."""
        if self.lora_at is None or step_index in self.lora_at:
            return nullcontext()
        return reference_model(self.unet)

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> PromptEmbeds:
        """The pipeline's own prompt encoding, so the conditioning is the one it samples with (for SDXL this
        includes zeros for the empty prompt when its config says force_zeros_for_empty_prompt)."""
        encoded = self.pipe.encode_prompt(
            prompts, device=self.device, num_images_per_prompt=1, do_classifier_free_guidance=True
        )
        if not isinstance(self.pipe, StableDiffusionXLPipeline):
            return PromptEmbeds(*encoded)
        cond, uncond, pooled_cond, pooled_uncond = encoded
        # SDXL's micro-conditioning as its pipeline builds it by default (_get_add_time_ids): original size,
        # crop top-left (0, 0), target size, each (height, width); the same for the empty prompt
        size = (self.resolution, self.resolution)
        time_ids = torch.tensor([size + (0, 0) + size], dtype=cond.dtype, device=self.device)
        return PromptEmbeds(cond, uncond, pooled_cond, pooled_uncond, time_ids.repeat(len(prompts), 1))

    def noise(self, shape: tuple[int, ...] | torch.Size, generator: torch.Generator) -> torch.Tensor:
        """N(0, I) drawn from ``generator`` on its own device (CPU generators stay reproducible on any GPU)."""
        return torch.randn(shape, generator=generator, device=generator.device).to(self.device)

    def initial_latents(self, batch: int, generator: torch.Generator) -> torch.Tensor:
        return self.noise((batch, *self.latent_shape), generator)

    def eps(self, x: torch.Tensor, step_index: int, embeds: PromptEmbeds) -> torch.Tensor:
        """Classifier-free guided eps_theta(x_t, t, c) = eps_u + s (eps_c - eps_u), one batched UNet call on the
        rows [uncond; cond] (the order of diffusers' SD and SDXL pipelines), with the LoRA as gated at the step."""
        self.unet_evals += x.shape[0]
        sdxl = embeds.time_ids is not None
        with self.adapter_at(step_index):
            out = self._unet_eps(
                torch.cat([x, x]),
                self.timesteps[step_index],
                torch.cat([embeds.uncond, embeds.cond]),
                torch.cat([embeds.pooled_uncond, embeds.pooled_cond]) if sdxl else None,
                torch.cat([embeds.time_ids, embeds.time_ids]) if sdxl else None,
            )
        eps_uncond, eps_cond = out.chunk(2)
        return eps_uncond + self.guidance_scale * (eps_cond - eps_uncond)

    def cond_eps(self, x: torch.Tensor, timesteps: torch.Tensor, embeds: PromptEmbeds) -> torch.Tensor:
        """Unguided eps_theta(x_t, t, c) with a timestep per row (B,): the noise prediction that the offline pair
        objectives (Diffusion-DPO, MaPO, Diff-contrast) regress on, as diffusers' DPO training scripts do.
        Not counted in ``unet_evals``, which counts guided predictions."""
        return self._unet_eps(x, timesteps, embeds.cond, embeds.pooled_cond, embeds.time_ids)

    def _unet_eps(
        self,
        x: torch.Tensor,
        t: int | torch.Tensor,
        states: torch.Tensor,
        pooled: torch.Tensor | None,
        time_ids: torch.Tensor | None,
    ) -> torch.Tensor:
        """One UNet call, (N, C, h, w) -> fp32 eps. SDXL's pooled text and size ids enter as added_cond_kwargs;
        SD v1.x has none (None)."""
        dtype = self.unet.dtype  # bf16/fp16 base weights take inputs of their dtype; LoRA stays fp32
        added = None if time_ids is None else {"text_embeds": pooled.to(dtype), "time_ids": time_ids.to(dtype)}
        with self._autocast():
            return self.unet(
                x.to(dtype), t, encoder_hidden_states=states.to(dtype), added_cond_kwargs=added, return_dict=False
            )[0].float()

    def mean(self, step_index: int, eps: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, float]:
        """(mu_theta(x_t), sigma_t) of step ``step_index``."""
        mean, sigma, _ = ddim_mean(eps, x, *self.alphas[step_index], self.eta)
        return mean, sigma

    def step(
        self,
        step_index: int,
        eps: torch.Tensor,
        x: torch.Tensor,
        noise: torch.Tensor | None = None,
        prev_sample: torch.Tensor | None = None,
    ) -> DDIMStep:
        alpha_t, alpha_prev = self.alphas[step_index]
        return ddim_step(
            eps, x, alpha_t, alpha_prev, self.eta, noise=noise, prev_sample=prev_sample,
            reduction=self.logprob_reduction,
        )

    def predict_x0_after(self, step_index: int, x_prev: torch.Tensor, eps_prev: torch.Tensor | None) -> torch.Tensor:
        """x0_hat(x_{t-1}) for the sample produced by step ``step_index``; x_0 itself after the last step."""
        if step_index + 1 == self.num_steps:
            return x_prev
        return predict_x0(x_prev, eps_prev, self.alphas[step_index + 1][0])

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """VAE decode to images in [0, 1], (B, 3, H, W). Differentiable (guidance back-propagates through it)."""
        vae = self.pipe.vae
        self.vae_decodes += latents.shape[0]
        with self._autocast():  # at 512 px a decode costs more than a guided UNet call, and its backward more
            image = vae.decode(latents.to(vae.dtype) / vae.config.scaling_factor, return_dict=False)[0]
        return (image.float() / 2 + 0.5).clamp(0, 1)

    def _autocast(self) -> AbstractContextManager:
        """``optim.mixed_precision``'s autocast for the UNet and the VAE decoder (nothing without it)."""
        if self.autocast_dtype is None:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)
