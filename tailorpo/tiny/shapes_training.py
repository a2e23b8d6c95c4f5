"""Training the tiny-shapes model and its prompt-match classifier on a CPU (``tailorpo train-tiny-shapes DIR``).

A Stable Diffusion pipeline small enough to train here that really follows its prompts, for experiments whose
rewards must mean something. Three stages on ``tailorpo/tiny/shapes.py``'s images, deterministic from one seed:
1. the classifier of ``reward_servers/shapes.py`` (the prompt-match reward) on all 90 captions, so it also
   judges the held-out ones;
2. the VAE as LDM trains it, minus the perceptual and GAN terms: reconstruction plus a small KL, then its
   ``scaling_factor`` set to 1 / std of the latents (as SD's 0.18215 was chosen);
3. the UNet and the CLIP text encoder together on the 75 training captions: DDPM noise prediction on SD's
   schedule, the caption dropped to "" 10% of the time for classifier-free guidance.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, StableDiffusionPipeline
from safetensors.torch import save_file
from tqdm import tqdm
from transformers import CLIPTextModel

from tailorpo.prompts import SHAPE_SCENES, shape_caption, shape_held_out
from tailorpo.tiny.models import tiny_shapes_pipeline
from tailorpo.tiny.shape_classifier import ShapeClassifier, attribute_log_probs
from tailorpo.tiny.shapes import draw_scenes, render

TRAIN_SCENES = [s for s in SHAPE_SCENES if not shape_held_out(s)]


@dataclass(frozen=True)
class TrainingPlan:
    """Steps and batch sizes of the three stages; the defaults are the shipped model's (tests shorten them)."""

    classifier_steps: int = 1500
    vae_steps: int = 2500
    denoiser_steps: int = 3000
    batch_size: int = 32
    latent_set: int = 16384  # training images encoded once for stage 3 (their posteriors are sampled anew)
    lr: float = 1e-3
    kl_weight: float = 1e-6  # LDM's (kl-f8): the posterior stays narrow
    cfg_dropout: float = 0.1
    threads: int = 1  # torch threads: the reduction order, and so the weights, depend on it


@dataclass
class TrainingReport:
    seconds: dict[str, float] = field(default_factory=dict)  # stage -> wall-clock seconds
    cpu_seconds: dict[str, float] = field(default_factory=dict)  # stage -> this process's CPU seconds: the wall
    # time on an idle machine (one thread), whatever else shares the CPU while it runs
    metrics: dict[str, float] = field(default_factory=dict)  # last-step losses, latent statistics

    @contextmanager
    def timed(self, stage: str) -> Iterator[None]:
        wall, cpu = time.perf_counter(), time.process_time()
        yield
        self.seconds[stage] = time.perf_counter() - wall
        self.cpu_seconds[stage] = time.process_time() - cpu

    def took(self, stage: str) -> str:
        return f"{self.seconds[stage]:.0f} s ({self.cpu_seconds[stage]:.0f} s CPU)"


def warmup_cosine(step: int, total: int, warmup: int = 100) -> float:
    """Learning-rate factor: linear warm-up, then a cosine to zero (the last steps average out the noise)."""
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(total - warmup, 1)))


def fit(
    params: Iterable[torch.nn.Parameter], steps: int, lr: float, batch_loss: Callable[[], torch.Tensor],
    desc: str | None = None,
) -> float:
    """``steps`` AdamW steps on ``batch_loss()`` (each call draws a fresh batch) with ``warmup_cosine``, a
    progress bar named ``desc`` (None: none); returns the last loss."""
    params = list(params)
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: warmup_cosine(step, steps))
    loss = torch.tensor(float("nan"))
    for _ in tqdm(range(steps), desc=desc, disable=desc is None, leave=False):
        loss = batch_loss()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        schedule.step()
    return float(loss.detach())


def train_classifier(
    plan: TrainingPlan, generator: torch.Generator, desc: str | None = None
) -> tuple[ShapeClassifier, float]:
    """Cross-entropy of the three attributes on fresh images of all captions, with a little pixel noise so
    the grain of decoded samples does not throw it."""
    classifier = ShapeClassifier()

    def batch_loss() -> torch.Tensor:
        scenes = draw_scenes(plan.batch_size, SHAPE_SCENES, generator)
        images = render(scenes, generator)
        noise_std = 0.05 * torch.rand(len(images), 1, 1, 1, generator=generator)
        noise = torch.randn(images.shape, generator=generator) * noise_std
        return -attribute_log_probs(classifier((images + noise).clamp(0, 1)), scenes).sum(1).mean()

    return classifier, fit(classifier.parameters(), plan.classifier_steps, plan.lr, batch_loss, desc)


def train_vae(vae: AutoencoderKL, plan: TrainingPlan, generator: torch.Generator, desc: str | None = None) -> float:
    """LDM's loss without its perceptual and GAN terms: reconstruction error plus ``kl_weight`` x KL, both summed
    over an image (the sum divided by the pixels here, so gradients have a sane norm for clipping); MSE in
    [-1, 1] rather than LDM's L1, which here trained slower and blurrier. Returns the last MSE."""
    mse = torch.tensor(float("nan"))

    def batch_loss() -> torch.Tensor:
        nonlocal mse
        images = render(draw_scenes(plan.batch_size, TRAIN_SCENES, generator), generator) * 2 - 1
        posterior = vae.encode(images).latent_dist
        mse = F.mse_loss(vae.decode(posterior.sample(generator)).sample, images)
        return mse + plan.kl_weight * posterior.kl().mean() / images[0].numel()

    fit(vae.parameters(), plan.vae_steps, plan.lr, batch_loss, desc)
    return float(mse.detach())


@torch.no_grad()
def encode_latent_set(
    vae: AutoencoderKL, plan: TrainingPlan, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``latent_set`` training images once through the encoder: scenes (N, 3), posterior mean and std (N, 4, 8, 8)."""
    scenes = draw_scenes(plan.latent_set, TRAIN_SCENES, generator)
    means, stds = [], []
    for chunk in scenes.split(512):
        posterior = vae.encode(render(chunk, generator) * 2 - 1).latent_dist
        means.append(posterior.mean)
        stds.append(posterior.std)
    return scenes, torch.cat(means), torch.cat(stds)


def caption_ids(pipe: StableDiffusionPipeline, scenes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids (N, 77) of the scenes' captions and (1, 77) of "", padded as the pipeline's encode_prompt pads."""
    def tokenize(texts: list[str]) -> torch.Tensor:
        return pipe.tokenizer(
            texts, padding="max_length", max_length=pipe.tokenizer.model_max_length, truncation=True,
            return_tensors="pt",
        ).input_ids

    return tokenize([shape_caption(tuple(s)) for s in scenes.tolist()]), tokenize([""])


def train_denoiser(
    pipe: StableDiffusionPipeline, scenes: torch.Tensor, mean: torch.Tensor, std: torch.Tensor,
    plan: TrainingPlan, generator: torch.Generator, desc: str | None = None,
) -> float:
    """eps-prediction MSE of UNet(x_t, t, text_encoder(caption)) on scaled posterior samples; returns the last."""
    ids, empty = caption_ids(pipe, scenes)
    scale = pipe.vae.config.scaling_factor

    def batch_loss() -> torch.Tensor:
        rows = torch.randint(len(scenes), (plan.batch_size,), generator=generator)
        x0 = (mean[rows] + std[rows] * torch.randn(mean[rows].shape, generator=generator)) * scale
        eps = torch.randn(x0.shape, generator=generator)
        t = torch.randint(pipe.scheduler.config.num_train_timesteps, (plan.batch_size,), generator=generator)
        x_t = pipe.scheduler.add_noise(x0, eps, t)  # q(x_t | x_0) on SD's schedule
        dropped = torch.rand(plan.batch_size, generator=generator) < plan.cfg_dropout
        tokens = torch.where(dropped[:, None], empty, ids[rows])
        states = pipe.text_encoder(tokens)[0]
        return F.mse_loss(pipe.unet(x_t, t, states).sample, eps)

    params = [*pipe.unet.parameters(), *pipe.text_encoder.parameters()]
    return fit(params, plan.denoiser_steps, plan.lr, batch_loss, desc)


def zero_untrained_tokens(text_encoder: CLIPTextModel, token_ids: torch.Tensor) -> None:
    """Zero the embeddings of the tokens no caption uses (all but a handful of CLIP's 49,408): they were never
    trained, so their random init means nothing, and zeros keep the shipped file small once compressed."""
    unused = torch.ones(text_encoder.config.vocab_size, dtype=torch.bool)
    unused[token_ids.unique()] = False
    with torch.no_grad():
        text_encoder.get_input_embeddings().weight[unused] = 0


def train_tiny_shapes(
    directory: str | Path, seed: int = 0, plan: TrainingPlan = TrainingPlan(), progress: bool = True
) -> TrainingReport:
    """Train the three stages and write ``directory``: a StableDiffusionPipeline folder with fp16 safetensors
    and the classifier in ``classifier/model.safetensors``. The same seed and plan write the same weights."""
    directory = Path(directory)
    report = TrainingReport()
    say = print if progress else lambda _: None
    threads = torch.get_num_threads()
    torch.set_num_threads(plan.threads)
    try:
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            generator = torch.Generator().manual_seed(seed)
            pipe = tiny_shapes_pipeline(directory)
            for model in (pipe.vae, pipe.unet, pipe.text_encoder):
                model.train().requires_grad_(True)

            with report.timed("classifier"):
                classifier, report.metrics["classifier_loss"] = train_classifier(
                    plan, generator, "classifier" if progress else None)
            say(f"classifier: {plan.classifier_steps} steps in {report.took('classifier')}, "
                f"loss {report.metrics['classifier_loss']:.4f}")

            with report.timed("vae"):
                report.metrics["vae_mse"] = train_vae(pipe.vae, plan, generator, "vae" if progress else None)
                pipe.vae.eval().requires_grad_(False)
                scenes, mean, std = encode_latent_set(pipe.vae, plan, generator)
                latent_std = float((mean + std * torch.randn(mean.shape, generator=generator)).std())
                pipe.vae.register_to_config(scaling_factor=round(1 / latent_std, 5))
            report.metrics["posterior_std_over_latent_std"] = float(std.mean()) / latent_std
            say(f"vae: {plan.vae_steps} steps in {report.took('vae')}, MSE {report.metrics['vae_mse']:.5f} in "
                f"[-1, 1], scaling_factor {pipe.vae.config.scaling_factor}")

            with report.timed("denoiser"):
                report.metrics["denoiser_loss"] = train_denoiser(
                    pipe, scenes, mean, std, plan, generator, "unet + text encoder" if progress else None)
            say(f"unet + text encoder: {plan.denoiser_steps} steps in {report.took('denoiser')}, "
                f"loss {report.metrics['denoiser_loss']:.4f}")
    finally:
        torch.set_num_threads(threads)
    zero_untrained_tokens(pipe.text_encoder, torch.cat(caption_ids(pipe, torch.tensor(SHAPE_SCENES)), dim=0))
    pipe.to(dtype=torch.float16)  # half the bytes to keep in the repository; loaded back as float32
    pipe.save_pretrained(directory, safe_serialization=True)
    # rebuilt from vocab.json and merges.txt when loaded (half a second): 3.6 MB not worth keeping
    (directory / "tokenizer" / "tokenizer.json").unlink()
    (directory / "classifier").mkdir(exist_ok=True)
    save_file(classifier.half().state_dict(), str(directory / "classifier" / "model.safetensors"))
    say(f"wrote {directory}: trained in {sum(report.seconds.values()) / 60:.1f} min "
        f"({sum(report.cpu_seconds.values()) / 60:.1f} min CPU, {plan.threads} thread)")
    return report
