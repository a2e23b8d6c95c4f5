"""The local one-process trainer: sample with the current policy, score, train the LoRA, log, save.

The Ray runtime wraps the same pieces (policy, rollouts, learner, ``end_of_iteration``); this loop is their
single-process driver. What a run is built from is ``training.build``.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import torch

from tailorpo.algorithms.learner import LoraLearner
from tailorpo.algorithms.registry import algorithm_of
from tailorpo.algorithms.rollouts import Rollout, trajectory_rollout
from tailorpo.config import Config, ConfigError, EvalConfig, dump_config
from tailorpo.core.objectives import PerPromptStatTracker
from tailorpo.diffusion.lora import reference_model, save_lora
from tailorpo.diffusion.policy import DiffusionPolicy
from tailorpo.rewards import RewardModel
from tailorpo.rewards.grpc_client import WeightedSum
from tailorpo.training.build import (
    build_learner,
    build_policy,
    build_reward_model,
    resolve_device,
    rollout_generator,
    seed_everything,
)
from tailorpo.training.cadence import Cadence, Counters
from tailorpo.training.checkpoint import (
    Progress,
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
)
from tailorpo.training.run_log import (
    GRID_PROMPTS,
    EvalSnapshot,
    RunLog,
    RunSummary,
    comparison_grid,
    grid_thumbnails,
)


def collect_rollout(
    cfg: Config, policy: DiffusionPolicy, reward: RewardModel, prompts: list[str], generator: torch.Generator
) -> Rollout:
    """The configured algorithm's rollout, with the seconds it took and the part of them spent in reward calls."""
    tick, calls, reward_seconds = time.perf_counter(), reward.calls, reward.seconds
    rollout = algorithm_of(cfg).sample(cfg, policy, reward, prompts, generator)
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


def prompts_per_iteration(cfg: Config) -> int:
    """sampling.batch_size prompts, or for an algorithm whose batch counts images (DDPO) that many images in
    groups of algorithm.ddpo.samples_per_prompt."""
    if cfg.algorithm.facts.batch_counts_images:
        return cfg.sampling.batch_size // cfg.algorithm.ddpo.samples_per_prompt
    return cfg.sampling.batch_size


def pick_prompts(cfg: Config, generator: torch.Generator) -> list[str]:
    picks = torch.randint(len(cfg.prompts), (prompts_per_iteration(cfg),), generator=generator).tolist()
    return [cfg.prompts[j] for j in picks]


def learn_from(cfg: Config, learner: LoraLearner, tracker: PerPromptStatTracker, rollout: Rollout) -> dict[str, float]:
    """One rollout into the learner, after the algorithm's own preparation (DDPO: advantages from ``tracker``);
    returns the scalars to log."""
    if (prepare := algorithm_of(cfg).prepare) is not None:
        prepare(cfg, rollout, tracker)
    tick = time.perf_counter()
    stats = learner.train_on(rollout) | rollout.stats
    stats["train_time"] = time.perf_counter() - tick
    stats["reward_mean"] = float(rollout.rewards.mean())
    stats["reward_std"] = float(rollout.rewards.std(unbiased=False))
    return stats


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


def finish_run(
    cfg: Config, policy: DiffusionPolicy, reward: RewardModel, learner: LoraLearner, samples: int, seconds: float,
    figures: dict[str, float | dict | None],
) -> RunSummary:
    """Apply pending gradients, save the LoRA, evaluate base vs trained on fixed seeds, write the grid and
    the summary (``figures``: the run log's throughput totals)."""
    out = Path(cfg.output_dir)
    if learner.pending_iterations:
        learner.apply_gradients()
    learner.persist()
    save_lora(policy.unet, out / "lora", policy.adapter_steps)
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


def end_of_iteration(
    cfg: Config, policy: DiffusionPolicy, reward: Callable[[], RewardModel], learner: LoraLearner,
    tracker: PerPromptStatTracker, before: Counters, progress: Progress, stream_state: torch.Tensor,
) -> EvalSnapshot | None:
    """What ``Cadence`` makes due after an iteration, done the same way by every loop (this one, the pair loop,
    the Ray learner): a checkpoint holding ``stream_state``, the state of the loop's own random stream (prompts
    or pair noise); the fixed-noise eval, returned for the run log; the LoRA saved to output_dir/lora.
    ``reward`` is only called for an eval (the Ray learner opens its client lazily)."""
    after = Counters(progress.iteration, learner.updates)
    due = Cadence.of(cfg).due(before, after, gradients_pending=bool(learner.pending_iterations))
    if due.checkpoint:
        learner.persist()
        save_checkpoint(cfg.output_dir, learner, tracker, progress, stream_state)
    snapshot = None
    if due.eval:
        scorer = reward()
        samples = evaluate(policy, scorer, cfg.eval)
        snapshot = EvalSnapshot(learner.updates, samples.scores[scorer.name], samples.images)
    if due.save_lora:
        save_lora(policy.unet, Path(cfg.output_dir) / "lora", policy.adapter_steps)
    return snapshot


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
    learner = build_learner(cfg, policy, lambda: reward)
    tracker = PerPromptStatTracker(cfg.algorithm.ddpo.stat_buffer_size, cfg.algorithm.ddpo.stat_min_count)
    prompt_generator = torch.Generator().manual_seed(cfg.seed)
    state = Progress(samples=0, iteration=0)
    if resume:
        state, prompt_state = resume_from(out, learner, tracker)
        prompt_generator.set_state(prompt_state)
    log = RunLog(cfg, out, progress, state.samples)
    while state.samples < cfg.train.total_samples:
        tick = time.perf_counter()
        before = Counters(state.iteration, learner.updates)
        prompts = pick_prompts(cfg, prompt_generator)
        rollout = collect_rollout(cfg, policy, reward, prompts, rollout_generator(cfg.seed, state.iteration, 0))
        log.record(len(rollout.images), learn_from(cfg, learner, tracker, rollout))
        log.record_iteration(len(rollout.images), time.perf_counter() - tick)
        state = Progress(samples=log.samples, iteration=state.iteration + 1)
        if snapshot := end_of_iteration(cfg, policy, lambda: reward, learner, tracker, before, state,
                                        prompt_generator.get_state()):
            log.record_eval(snapshot)
    log.close()
    return finish_run(cfg, policy, reward, learner, log.samples, time.perf_counter() - start, log.figures())
