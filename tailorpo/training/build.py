"""What a run is built from: the device, the seeds, the policy with its fresh LoRA, the learner, the reward, and
the rollout noise streams. Shared by the one-process loops (``loop``, ``pair_loop``), the Ray workers, the
evaluation command and the experiments."""

from __future__ import annotations

import random

import numpy as np
import torch

from tailorpo.algorithms.learner import LoraLearner, RewardSource
from tailorpo.algorithms.registry import algorithm_of
from tailorpo.config import Config, ConfigError
from tailorpo.diffusion.lora import adapter_aware_checkpointing, add_lora
from tailorpo.diffusion.pipeline import load_pipeline
from tailorpo.diffusion.policy import DiffusionPolicy
from tailorpo.rewards import RewardModel, build_reward
from tailorpo.rewards.grpc_client import WeightedSum
from tailorpo.rewards.service import token_from_env

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"device={device!r} but no CUDA device is visible; use device=cpu or auto")
    return torch.device(device)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def build_policy(cfg: Config, device: torch.device) -> DiffusionPolicy:
    """Load the base pipeline, attach a fresh LoRA, and wrap it as the sampling/training policy (its LoRA gated
    to the steps lora.active_steps names)."""
    pipe = load_pipeline(cfg.model.pretrained, cfg.model.revision, DTYPES[cfg.model.dtype], str(device))
    if "unet" in cfg.model.gradient_checkpointing:  # diffusers checkpoints only while grad is enabled
        pipe.unet.enable_gradient_checkpointing(adapter_aware_checkpointing(pipe.unet))
    if "vae" in cfg.model.gradient_checkpointing:
        pipe.vae.enable_gradient_checkpointing()
    if cfg.model.vae_slicing:
        pipe.vae.enable_slicing()
    add_lora(pipe.unet, cfg.lora.rank, cfg.lora.alpha, cfg.lora.target_modules)
    autocast = torch.bfloat16 if cfg.optim.mixed_precision == "bf16" else None
    return DiffusionPolicy(
        pipe,
        num_steps=cfg.sampling.num_steps,
        eta=cfg.sampling.eta,
        guidance_scale=cfg.sampling.guidance_scale,
        resolution=cfg.model.resolution,
        logprob_reduction=cfg.sampling.logprob_reduction,
        autocast_dtype=autocast,
        lora_at=None if (steps := cfg.adapter_steps()) is None else {cfg.sampling.num_steps - k for k in steps},
    )


def build_learner(cfg: Config, policy: DiffusionPolicy, reward: RewardSource) -> LoraLearner:
    """The configured algorithm's learner (for a pair objective: on the policy's own samples). ``reward`` opens
    the run's reward, for learners whose diagnostics need it (``log.reward_gradient_cosine``)."""
    return algorithm_of(cfg).build_learner(cfg, policy, reward)


def build_reward_model(cfg: Config) -> RewardModel:
    """The in-process reward, or a client of the configured servers (a weighted sum if several). Fails
    fast, naming the address, when a server does not answer."""
    reward_cfg = cfg.reward
    if not reward_cfg.servers:
        reward = build_reward(reward_cfg.name)
    else:
        from tailorpo.rewards.grpc_client import GrpcReward

        try:
            token = token_from_env(reward_cfg.token_env, "reward.token_env")
        except ValueError as err:
            raise ConfigError(str(err)) from None
        clients = [
            (GrpcReward(s.addresses, reward_cfg.timeout_s, reward_cfg.retries, token=token, tls_ca=reward_cfg.tls_ca,
                        tls_client_cert=reward_cfg.tls_client_cert, tls_client_key=reward_cfg.tls_client_key),
             s.weight)
            for s in reward_cfg.servers
        ]
        reward = clients[0][0] if len(clients) == 1 and clients[0][1] == 1.0 else WeightedSum(clients)
    if cfg.algorithm.facts.differentiable_reward and not reward.differentiable:
        raise ConfigError(
            f"algorithm.name: {cfg.algorithm.name!r} needs a differentiable reward, and {reward.name!r} is not; "
            "use algorithm.name=tailorpo or a differentiable reward server"
        )
    return reward


def rollout_generator(seed: int, iteration: int, slot: int) -> torch.Generator:
    """The noise of one rollout depends only on (seed, iteration, sampler slot), never on which process or
    node draws it: a run whose samplers live elsewhere reproduces the one-process run."""
    state = np.random.SeedSequence([seed, iteration, slot]).generate_state(1, dtype=np.uint64)[0]
    return torch.Generator().manual_seed(int(state) & (2**63 - 1))

