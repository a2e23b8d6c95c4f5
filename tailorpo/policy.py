"""The diffusion policy pi_theta(x_{t-1} | x_t, c): guided UNet noise prediction, DDIM steps, VAE decode.

A thin layer over a diffusers pipeline that the samplers and the learner share, so both compute the same
eps for the same (x_t, t, c). It counts UNet evaluations and VAE decodes per image, which tests and benchmarks read.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass

import torch
from diffusers import StableDiffusionPipeline

from tailorpo.ddim import DDIMStep, LogProbReduction, ddim_step, predict_x0, step_alphas


@dataclass
class PromptEmbeds:
    cond: torch.Tensor  # (B, L, D) text-encoder states of the prompts
    uncond: torch.Tensor  # (B, L, D) states of the empty prompt, for classifier-free guidance

    def index(self, rows: torch.Tensor) -> "PromptEmbeds":
        return PromptEmbeds(self.cond[rows], self.uncond[rows])

    def repeat(self, times: int) -> "PromptEmbeds":
        return PromptEmbeds(self.cond.repeat(times, 1, 1), self.uncond.repeat(times, 1, 1))


class DiffusionPolicy:
    """Step k of ``num_steps`` (paper numbering, k = num_steps..1) maps x_k -> x_{k-1}; index i = num_steps - k
    into the scheduler's descending timesteps."""

    def __init__(
        self,
        pipe: StableDiffusionPipeline,
        num_steps: int = 20,
        eta: float = 1.0,
        guidance_scale: float = 5.0,
        resolution: int = 512,
        logprob_reduction: LogProbReduction = "mean",
        autocast_dtype: torch.dtype | None = None,
    ) -> None:
        self.pipe = pipe
        self.unet = pipe.unet
        self.num_steps = num_steps
        self.eta = eta
        self.guidance_scale = guidance_scale
        self.resolution = resolution
        self.logprob_reduction: LogProbReduction = logprob_reduction
        self.autocast_dtype = autocast_dtype
        pipe.scheduler.set_timesteps(num_steps)
        self.timesteps = [int(t) for t in pipe.scheduler.timesteps]
        self.alphas = [step_alphas(pipe.scheduler, t) for t in self.timesteps]  # (alpha_bar_t, alpha_bar_prev)
        self.unet_evals = 0  # guided noise predictions, counted per image
        self.vae_decodes = 0  # decoded images

    @property
    def device(self) -> torch.device:
        return self.unet.device

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        factor = 2 ** (len(self.pipe.vae.config.block_out_channels) - 1)
        return (self.unet.config.in_channels, self.resolution // factor, self.resolution // factor)

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> PromptEmbeds:
        cond, uncond = self.pipe.encode_prompt(
            prompts, self.device, num_images_per_prompt=1, do_classifier_free_guidance=True
        )
        return PromptEmbeds(cond, uncond)

    def initial_latents(self, batch: int, generator: torch.Generator) -> torch.Tensor:
        shape = (batch, *self.latent_shape)
        return torch.randn(shape, generator=generator, device=generator.device).to(self.device)

    def eps(self, x: torch.Tensor, step_index: int, embeds: PromptEmbeds) -> torch.Tensor:
        """Classifier-free guided eps_theta(x_t, t, c) = eps_u + s (eps_c - eps_u), one batched UNet call."""
        self.unet_evals += x.shape[0]
        t = self.timesteps[step_index]
        autocast = (
            torch.autocast(self.device.type, dtype=self.autocast_dtype) if self.autocast_dtype else nullcontext()
        )
        with autocast:
            out = self.unet(
                torch.cat([x, x]),
                t,
                encoder_hidden_states=torch.cat([embeds.uncond, embeds.cond]),
                return_dict=False,
            )[0].float()
        eps_uncond, eps_cond = out.chunk(2)
        return eps_uncond + self.guidance_scale * (eps_cond - eps_uncond)

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
        image = vae.decode(latents.to(vae.dtype) / vae.config.scaling_factor, return_dict=False)[0]
        return (image.float() / 2 + 0.5).clamp(0, 1)
