"""The local one-process trainer: sample with the current policy, score, train the LoRA, log, save.

The Ray runtime wraps the same pieces (policy, rollouts, learner); this loop is their single-process driver.
"""

from __future__ import annotations

import os
import random
import time
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from tailorpo.algorithms.branching import tailorpo_rollout
from tailorpo.training.checkpoint import Progress, latest_checkpoint, load_checkpoint, save_checkpoint
from tailorpo.config import PAIR_ALGORITHMS, Config, ConfigError, EvalConfig, dump_config
from tailorpo.core.guidance import cosine_eta_schedule
from tailorpo.algorithms.learner import Learner, LoraLearner
from tailorpo.diffusion.lora import add_lora, reference_model, save_lora
from tailorpo.diffusion.pipeline import load_pipeline
from tailorpo.core.objectives import PerPromptStatTracker
from tailorpo.algorithms.pair_learner import PairLearner, build_pair_learner
from tailorpo.diffusion.policy import DiffusionPolicy
from tailorpo.rewards import RewardModel, build_reward
from tailorpo.rewards.grpc_client import WeightedSum
from tailorpo.algorithms.rollouts import (
    Rollout,
    d3po_rollout,
    ddpo_rollout,
    final_image_pair_rollout,
    trajectory_rollout,
)
from tailorpo.training.run_log import GRID_PROMPTS, EvalSnapshot, RunLog, RunSummary, comparison_grid, grid_thumbnails

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
    """Load the base pipeline, attach a fresh LoRA, and wrap it as the sampling/training policy."""
    pipe = load_pipeline(cfg.model.pretrained, cfg.model.revision, DTYPES[cfg.model.dtype], str(device))
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
    )


def build_learner(cfg: Config, policy: DiffusionPolicy) -> Learner | PairLearner:
    """The online objectives' learner, or for a pair objective on the policy's own samples the pair learner."""
    if cfg.algorithm.name in PAIR_ALGORITHMS:
        return build_pair_learner(cfg, policy)
    return Learner(policy, cfg.optim, cfg.algorithm)


def build_reward_model(cfg: Config) -> RewardModel:
    """The in-process reward, or a client of the configured servers (a weighted sum if several). Fails
    fast, naming the address, when a server does not answer."""
    reward_cfg = cfg.reward
    if not reward_cfg.servers:
        reward = build_reward(reward_cfg.name)
    else:
        from tailorpo.rewards.grpc_client import GrpcReward

        token = os.environ.get(reward_cfg.token_env) if reward_cfg.token_env else None
        if reward_cfg.token_env and not token:
            raise ConfigError(f"reward.token_env: environment variable {reward_cfg.token_env!r} is empty or unset")
        clients = [
            (GrpcReward(s.addresses, reward_cfg.timeout_s, reward_cfg.retries, token=token, tls_ca=reward_cfg.tls_ca,
                        tls_client_cert=reward_cfg.tls_client_cert, tls_client_key=reward_cfg.tls_client_key),
             s.weight)
            for s in reward_cfg.servers
        ]
        reward = clients[0][0] if len(clients) == 1 and clients[0][1] == 1.0 else WeightedSum(clients)
    if cfg.algorithm.name == "tailorpo_g" and not reward.differentiable:
        raise ConfigError(
            f"algorithm.name: 'tailorpo_g' needs a differentiable reward, and {reward.name!r} is not; "
            "use algorithm.name=tailorpo or a differentiable reward server"
        )
    return reward


def collect_rollout(
    cfg: Config, policy: DiffusionPolicy, reward: RewardModel, prompts: list[str], generator: torch.Generator
) -> Rollout:
    """The configured algorithm's rollout, with the seconds it took and the part of them spent in reward calls."""
    tick, calls, reward_seconds = time.perf_counter(), reward.calls, reward.seconds
    rollout = _algorithm_rollout(cfg, policy, reward, prompts, generator)
    rollout.stats |= {
        "sample_time": time.perf_counter() - tick,
        "reward_time": reward.seconds - reward_seconds,
        "reward_calls": float(reward.calls - calls),
    }
    if isinstance(reward, WeightedSum):  # each configured reward on its own: one extra call on the final images
        for component, _ in reward.components:
            scores = component.score(rollout.images, rollout.prompts).scores
            rollout.stats[f"reward_{component.name}_mean"] = float(scores.mean())
            rollout.stats[f"reward_{component.name}_std"] = float(scores.std(unbiased=False))
    return rollout


def _algorithm_rollout(
    cfg: Config, policy: DiffusionPolicy, reward: RewardModel, prompts: list[str], generator: torch.Generator
) -> Rollout:
    algo = cfg.algorithm
    if algo.name in ("tailorpo", "tailorpo_g"):
        eta = None
        if algo.name == "tailorpo_g":
            eta = cosine_eta_schedule(algo.fine_tuned_steps, algo.guidance.eta_min, algo.guidance.eta_max)
        return tailorpo_rollout(
            policy, reward, prompts, generator, algo.fine_tuned_steps, eta, algo.guidance.delta,
            algo.guidance.through_unet,
        )
    if algo.name == "d3po":
        return d3po_rollout(policy, reward, prompts, generator, algo.fine_tuned_steps)
    if algo.name in PAIR_ALGORITHMS:
        return final_image_pair_rollout(policy, reward, prompts, generator)
    return ddpo_rollout(policy, reward, prompts, generator, algo.fine_tuned_steps, algo.ddpo.samples_per_prompt)


def assign_advantages(rollout: Rollout, tracker: PerPromptStatTracker, clip: float) -> None:
    """DDPO: per-sample advantages from the driver's per-prompt statistics, copied to each recorded step."""
    per_sample = tracker.advantages(rollout.prompts, rollout.rewards, clip)
    rollout.data.advantages = per_sample[rollout.data.prompt_index]


def prompts_per_iteration(cfg: Config) -> int:
    if cfg.algorithm.name == "ddpo":
        return cfg.sampling.batch_size // cfg.algorithm.ddpo.samples_per_prompt
    return cfg.sampling.batch_size


class EvalSamples(NamedTuple):
    images: torch.Tensor  # (P' * I, 3, h, w) in [0, 1] grid thumbnails of the first P' = min(P, GRID_PROMPTS)
    scores: dict[str, torch.Tensor]  # reward name -> (P * I,) on the CPU; see score_each


def score_each(reward: RewardModel, images: torch.Tensor, prompts: list[str]) -> dict[str, torch.Tensor]:
    """Each configured reward's scores and, under ``reward.name``, the weighted sum the run trains on (the
    same entry when there is one reward); each server of a sum is called once."""
    if not isinstance(reward, WeightedSum):
        return {reward.name: reward.score(images, prompts).scores.cpu()}
    parts = [(part.name, weight, part.score(images, prompts).scores.cpu()) for part, weight in reward.components]
    return {name: scores for name, _, scores in parts} | {reward.name: sum(w * scores for _, w, scores in parts)}


@torch.no_grad()
def evaluate(policy: DiffusionPolicy, reward: RewardModel, settings: EvalConfig) -> EvalSamples:
    """Plain DDIM samples, ``images_per_prompt`` of each eval prompt, drawn and scored ``batch_size`` at a
    time; batch j draws its noise from ``seed + j``. So every (prompt, image) gets the same noise whatever the
    weights, and the base model's and the LoRA's images pair up. All are scored; only the grids' thumbnails
    are kept (run_log.GRID_PROMPTS)."""
    batch = [p for p in settings.prompts for _ in range(settings.images_per_prompt)]
    kept = GRID_PROMPTS * settings.images_per_prompt
    images, scores = [], []
    for j, start in enumerate(range(0, len(batch), settings.batch_size)):
        chunk = batch[start : start + settings.batch_size]
        generator = torch.Generator().manual_seed(settings.seed + j)
        chunk_images = trajectory_rollout(policy, policy.encode_prompts(chunk), generator, []).images
        scores.append(score_each(reward, chunk_images, chunk))
        if start < kept:
            images.append(grid_thumbnails(chunk_images[: kept - start]))
    return EvalSamples(torch.cat(images), {name: torch.cat([s[name] for s in scores]) for name in scores[0]})


def compare_with_base(
    policy: DiffusionPolicy, reward: RewardModel, settings: EvalConfig
) -> tuple[EvalSamples, EvalSamples]:
    """(base, LoRA): the eval prompts with the adapter disabled and enabled, on the same noise."""
    trained = evaluate(policy, reward, settings)
    with reference_model(policy.unet):
        base = evaluate(policy, reward, settings)
    return base, trained


def rollout_generator(seed: int, iteration: int, slot: int) -> torch.Generator:
    """The noise of one rollout depends only on (seed, iteration, sampler slot), never on which process or
    node draws it: a run whose samplers live elsewhere reproduces the one-process run."""
    state = np.random.SeedSequence([seed, iteration, slot]).generate_state(1, dtype=np.uint64)[0]
    return torch.Generator().manual_seed(int(state) & (2**63 - 1))


def pick_prompts(cfg: Config, generator: torch.Generator) -> list[str]:
    picks = torch.randint(len(cfg.prompts), (prompts_per_iteration(cfg),), generator=generator).tolist()
    return [cfg.prompts[j] for j in picks]


def learn_from(
    cfg: Config, learner: Learner | PairLearner, tracker: PerPromptStatTracker, rollout: Rollout
) -> dict[str, float]:
    """One rollout into the learner (DDPO advantages first); returns the scalars to log."""
    if cfg.algorithm.name == "ddpo":
        assign_advantages(rollout, tracker, cfg.algorithm.ddpo.adv_clip)
    tick = time.perf_counter()
    train_on = learner.train_on_rollout if isinstance(learner, PairLearner) else learner.train_on
    stats = train_on(rollout) | rollout.stats
    stats["train_time"] = time.perf_counter() - tick
    stats["reward_mean"] = float(rollout.rewards.mean())
    stats["reward_std"] = float(rollout.rewards.std(unbiased=False))
    return stats


def finish_run(
    cfg: Config, policy: DiffusionPolicy, reward: RewardModel, learner: LoraLearner, samples: int, seconds: float,
    figures: dict[str, float | None],
) -> RunSummary:
    """Apply pending gradients, save the LoRA, evaluate base vs trained on fixed seeds, write the grid and
    the summary (``figures``: the run log's throughput totals)."""
    out = Path(cfg.output_dir)
    if learner.pending_iterations:
        learner.apply_gradients()
    save_lora(policy.unet, out / "lora")
    base, trained = compare_with_base(policy, reward, cfg.eval)
    comparison_grid(base.images, trained.images, cfg.eval.images_per_prompt).save(out / "samples.png")
    summary = RunSummary(
        algorithm=cfg.algorithm.name,
        samples=samples,
        updates=learner.updates,
        seconds=seconds,
        reward=reward.name,
        eval_reward_base=float(base.scores[reward.name].mean()),
        eval_reward_trained=float(trained.scores[reward.name].mean()),
        output_dir=str(out),
        **figures,
    )
    summary.write(out / "summary.json")
    return summary


def prepare_output(cfg: Config) -> Path:
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    dump_config(cfg, out / "config.yaml")
    return out


def crossed(every: int, before: int, after: int) -> bool:
    """Whether the optimizer steps of one iteration (``before`` -> ``after`` updates) passed a multiple of
    ``every`` (0: never); checkpoints and evals are due on the updates, however many steps an iteration takes."""
    return bool(every) and after // every > before // every


def maybe_checkpoint(
    cfg: Config, learner: LoraLearner, tracker: PerPromptStatTracker, progress: Progress, prompt_state: torch.Tensor,
    updates_before: int,
) -> None:
    if crossed(cfg.train.checkpoint_every, updates_before, learner.updates) and not learner.pending_iterations:
        save_checkpoint(cfg.output_dir, learner, tracker, progress, prompt_state)


def evaluate_if_due(
    cfg: Config, policy: DiffusionPolicy, reward: RewardModel, learner: LoraLearner, updates_before: int
) -> EvalSnapshot | None:
    """The eval prompts with fixed noise every ``eval.every`` updates: the run's reward curve and image grids."""
    if not crossed(cfg.eval.every, updates_before, learner.updates):
        return None
    samples = evaluate(policy, reward, cfg.eval)
    return EvalSnapshot(learner.updates, samples.scores[reward.name], samples.images)


def resume_from(out: Path, learner: LoraLearner, tracker: PerPromptStatTracker) -> tuple[Progress, torch.Tensor]:
    path = latest_checkpoint(out)
    if path is None:
        raise ConfigError(f"--resume: no checkpoint-* folder in output_dir={str(out)!r}; set train.checkpoint_every")
    return load_checkpoint(path, learner, tracker)


def train(cfg: Config, progress: bool = True, resume: bool = False) -> RunSummary:
    """Run the configured algorithm to ``train.total_samples`` sampled images in this process and write the
    outputs; ``resume`` continues from the newest checkpoint in ``output_dir``. (``runtime.samplers > 0``
    runs the same loop on Ray: ``tailorpo.runtime.driver``.)"""
    start = time.perf_counter()
    seed_everything(cfg.seed)
    out = prepare_output(cfg)
    reward = build_reward_model(cfg)
    policy = build_policy(cfg, resolve_device(cfg.device))
    learner = build_learner(cfg, policy)
    tracker = PerPromptStatTracker(cfg.algorithm.ddpo.stat_buffer_size, cfg.algorithm.ddpo.stat_min_count)
    prompt_generator = torch.Generator().manual_seed(cfg.seed)
    state = Progress(samples=0, iteration=0)
    if resume:
        state, prompt_state = resume_from(out, learner, tracker)
        prompt_generator.set_state(prompt_state)
    log = RunLog(cfg, out, progress, state.samples)
    while state.samples < cfg.train.total_samples:
        tick = time.perf_counter()
        updates_before = learner.updates
        prompts = pick_prompts(cfg, prompt_generator)
        rollout = collect_rollout(cfg, policy, reward, prompts, rollout_generator(cfg.seed, state.iteration, 0))
        log.record(len(rollout.images), learn_from(cfg, learner, tracker, rollout))
        log.record_iteration(len(rollout.images), time.perf_counter() - tick)
        state = Progress(samples=log.samples, iteration=state.iteration + 1)
        maybe_checkpoint(cfg, learner, tracker, state, prompt_generator.get_state(), updates_before)
        if snapshot := evaluate_if_due(cfg, policy, reward, learner, updates_before):
            log.record_eval(snapshot)
        if cfg.train.save_every and state.iteration % cfg.train.save_every == 0:
            save_lora(policy.unet, out / "lora")
    log.close()
    return finish_run(cfg, policy, reward, learner, log.samples, time.perf_counter() - start, log.figures())
