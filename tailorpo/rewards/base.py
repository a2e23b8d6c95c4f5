"""The reward interface the samplers call: images (N, 3, H, W) in [0, 1] plus prompts -> scores (N,),
and for differentiable rewards optionally d score_i / d image_i.

In-process rewards and the gRPC client implement the same ``RewardModel``, so a sampler never knows where
its reward runs. ``differentiable_reward`` wraps any of them as an autograd op for guidance.
"""

from __future__ import annotations

import functools
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch


class RewardInputError(ValueError):
    """Images or prompts that a reward model must not score (wrong shape, NaN, out of range, count mismatch)."""


@dataclass
class RewardOutput:
    scores: torch.Tensor  # (N,) float32
    grad: torch.Tensor | None = None  # (N, 3, H, W) d score_i / d images_i, only when asked


def validate_reward_input(images: torch.Tensor, prompts: list[str]) -> None:
    if images.ndim != 4 or images.shape[1] != 3:
        raise RewardInputError(f"images must be (N, 3, H, W); got shape {tuple(images.shape)}")
    if images.shape[0] == 0:
        raise RewardInputError("images is an empty batch")
    if len(prompts) != images.shape[0]:
        raise RewardInputError(f"{images.shape[0]} images but {len(prompts)} prompts; give one prompt per image")
    if not torch.isfinite(images).all():
        raise RewardInputError("images contain NaN or inf")
    low, high = float(images.min()), float(images.max())
    if low < -1e-4 or high > 1 + 1e-4:
        raise RewardInputError(f"images must lie in [0, 1]; got values in [{low:.4g}, {high:.4g}]")


class RewardModel(ABC):
    name: str
    differentiable: bool = False
    calls: int = 0  # score calls so far, and the wall time they took: the run log's reward latency
    seconds: float = 0.0

    def score(self, images: torch.Tensor, prompts: list[str], want_grad: bool = False) -> RewardOutput:
        validate_reward_input(images, prompts)
        self.check_prompts(prompts)
        if want_grad and not self.differentiable:
            raise RewardInputError(f"reward {self.name!r} is not differentiable; it cannot return a gradient")
        tick = time.perf_counter()
        out = self._score(images.detach().float(), prompts, want_grad)
        if not torch.isfinite(out.scores).all():  # a NaN ranks no pair: never train on it
            bad = (~torch.isfinite(out.scores)).nonzero().flatten().tolist()
            raise FloatingPointError(f"reward {self.name!r} returned non-finite scores for rows {bad} "
                                     f"(prompts {[prompts[i] for i in bad]}); stopping")
        self.calls += 1
        self.seconds += time.perf_counter() - tick
        return out

    @abstractmethod
    def _score(self, images: torch.Tensor, prompts: list[str], want_grad: bool) -> RewardOutput: ...

    def check_prompts(self, prompts: list[str]) -> None:  # noqa: B027 - optional: most rewards score any prompt
        """Raise RewardInputError for prompts this reward cannot score (most score any). A server calls it before
        batching, so one caller's bad prompt is that caller's INVALID_ARGUMENT, not a failed batch for all."""

    def close(self) -> None:  # noqa: B027 (optional hook, not abstract)
        """Release what the reward holds (the gRPC client closes its channels); in-process rewards hold
        nothing, so callers may close any reward without knowing where it runs."""


def upcast(x: torch.Tensor) -> torch.Tensor:
    """``x`` in float32 unless it is already wider (float64 in the gradient checks)."""
    return x if x.dtype == torch.float64 else x.float()


class TorchReward(RewardModel):
    """A reward written as a differentiable torch function of the pixels; gradients come from autograd."""

    differentiable = True

    float32_parts: tuple[str, ...] = ()  # submodules (dotted names) that ``cast`` leaves in float32

    def cast(self, dtype: torch.dtype) -> None:
        """Its weights (the ``nn.Module`` attributes) in ``dtype``, except ``float32_parts``: the small score
        heads, so that a score is not rounded to bfloat16's 8-bit mantissa (0.03 at an aesthetic score of 6, as
        large as the gaps between sibling branches). ``forward`` casts the pixels to the backbone and the features
        to float32 before the head; scores and gradients leave as float32."""
        for value in vars(self).values():
            if isinstance(value, torch.nn.Module):
                value.to(dtype)
        for name in self.float32_parts:
            functools.reduce(getattr, name.split("."), self).float()

    @abstractmethod
    def forward(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        """(N, 3, H, W) in [0, 1] -> (N,) scores."""

    def _score(self, images: torch.Tensor, prompts: list[str], want_grad: bool) -> RewardOutput:
        if not want_grad:
            with torch.no_grad():
                return RewardOutput(self.forward(images, prompts).float())
        images = images.clone().requires_grad_(True)
        with torch.enable_grad():
            scores = self.forward(images, prompts)
            (grad,) = torch.autograd.grad(scores.sum(), images)
        return RewardOutput(scores.detach().float(), grad)


class _RewardFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, images: torch.Tensor, reward: RewardModel, prompts: list[str]) -> torch.Tensor:
        out = reward.score(images, prompts, want_grad=True)
        ctx.save_for_backward(out.grad.to(images))
        return out.scores.to(images.device)

    @staticmethod
    def backward(ctx, grad_scores: torch.Tensor):
        (grad_images,) = ctx.saved_tensors
        return grad_scores[:, None, None, None] * grad_images, None, None


def differentiable_reward(reward: RewardModel, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
    """r(c, image) as an autograd op whose backward uses the reward's own d score / d image (in process or
    over the wire), so guidance can chain it with the VAE decoder and the UNet."""
    if not reward.differentiable:
        raise RewardInputError(f"reward {reward.name!r} is not differentiable")
    return _RewardFunction.apply(images, reward, prompts)
