"""Shared fixtures: the tiny SD-shaped model, written once per test session into a temporary cache."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("TAILORPO_CACHE", os.path.join(os.path.dirname(__file__), "..", ".cache"))

from tailorpo.models import add_lora, load_pipeline  # noqa: E402
from tailorpo.policy import DiffusionPolicy  # noqa: E402

LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "conv1", "conv2", "conv_out"]


@pytest.fixture(scope="session")
def tiny_pipe():
    torch.manual_seed(0)
    pipe = load_pipeline("tiny-sd")
    add_lora(pipe.unet, rank=4, alpha=4, target_modules=LORA_TARGETS)
    return pipe


@pytest.fixture
def policy(tiny_pipe):
    """A fresh policy over the shared pipeline, with the LoRA reset to zero (= the base model)."""
    for name, param in tiny_pipe.unet.named_parameters():
        param.grad = None
        if "lora_B" in name:
            param.data.zero_()
    return DiffusionPolicy(tiny_pipe, num_steps=20, eta=1.0, guidance_scale=5.0, resolution=64)


def perturb_lora(unet, seed: int = 0, scale: float = 0.05) -> None:
    """Give the LoRA non-zero weights so the policy differs from the reference."""
    gen = torch.Generator().manual_seed(seed)
    for name, param in unet.named_parameters():
        if "lora_B" in name:
            param.data = torch.randn(param.shape, generator=gen) * scale
