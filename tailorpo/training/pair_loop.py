"""The one-process loop of the offline pair objectives (``algorithm.name``: diffusion_dpo, mapo, diff_contrast).

The online trainer's pieces, with a pair reader in place of the sampler: the same policy and LoRA
(``build_policy``), optimizer path (``LoraLearner``), TensorBoard log, checkpoints, periodic and final
evaluation with ``cfg.reward`` (here only an eval reward: the pairs carry the preference), and the same outputs
(``lora/``, ``tensorboard/``, ``samples.png``, ``config.yaml``, ``summary.json``).

The data are a stream that re-reads ``pairs.source`` after each pass; ``train.total_samples`` counts the pairs
trained on. A checkpoint stores that count as its data position and the state of the generator that draws
the VAE samples, t and eps*, so ``--resume`` skips the pairs already consumed (re-reading, not re-training,
them) and continues with the same draws as the uninterrupted run.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from tailorpo.training.checkpoint import Progress, save_checkpoint
from tailorpo.config import Config
from tailorpo.diffusion.lora import save_lora
from tailorpo.core.objectives import PerPromptStatTracker
from tailorpo.pairs.data import PairBatch, PairDataError, PairDataset, PairReader, collate_pairs, read_pairs
from tailorpo.algorithms.pair_learner import PairLearner, build_pair_learner
from tailorpo.diffusion.policy import DiffusionPolicy
from tailorpo.training.run_log import RunLog, RunSummary
from tailorpo.training.loop import (
    build_policy,
    build_reward_model,
    crossed,
    evaluate_if_due,
    finish_run,
    prepare_output,
    resolve_device,
    resume_from,
    seed_everything,
)


def pair_batches(dataset: PairDataset, batch_size: int, skip: int = 0) -> Iterator[PairBatch]:
    """Endless batches of ``batch_size`` pairs, passing over the source again and again; a batch may span
    the end of one pass and the start of the next. The first ``skip`` pairs are read and dropped (a resumed
    run's position). A pass without a single usable pair is an error, not an endless loop."""
    batch: list[dict[str, Any]] = []
    position = 0
    while True:
        used_this_pass = 0
        for item in dataset:
            used_this_pass += 1
            position += 1
            if position <= skip:
                continue
            batch.append(item)
            if len(batch) == batch_size:
                yield collate_pairs(batch)
                batch = []
        if not used_this_pass:
            reader = dataset.reader
            raise PairDataError(f"pairs.source {reader.description}: no usable pair ({reader.stats.summary()})")


def pair_learner_for(cfg: Config, reader: PairReader, out: Path, policy: DiffusionPolicy) -> PairLearner:
    """The pair learner, with Diff-contrast's embedding cache tagged by the source it caches."""
    data_tag = {"pairs_source": reader.description, "resolution": str(cfg.model.resolution)}
    cache = cfg.pairs.diff_contrast.embedding_cache or out / "clip_embeddings"
    return build_pair_learner(cfg, policy, Path(cache), data_tag)


def checkpoint_if_due(
    cfg: Config, learner: PairLearner, tracker: PerPromptStatTracker, progress: Progress, noise: torch.Generator,
    updates_before: int,
) -> None:
    """``trainer.maybe_checkpoint``'s rule, with Diff-contrast's embedding cache flushed first so that the
    checkpoint never refers to embeddings that exist only in memory."""
    if crossed(cfg.train.checkpoint_every, updates_before, learner.updates) and not learner.pending_iterations:
        if learner.embedder is not None:
            learner.embedder.cache.flush()
        save_checkpoint(cfg.output_dir, learner, tracker, progress, noise.get_state())


def train_pairs(cfg: Config, progress: bool = True, resume: bool = False) -> RunSummary:
    """Train the LoRA with the configured pair objective on ``train.total_samples`` pairs from
    ``pairs.source`` and write the outputs; ``resume`` continues from the newest checkpoint in output_dir."""
    start = time.perf_counter()
    seed_everything(cfg.seed)
    out = prepare_output(cfg)
    reader = read_pairs(cfg.pairs.source, on_error=cfg.pairs.on_error, split=cfg.pairs.split,
                        streaming=cfg.pairs.streaming)  # a source that cannot be read fails before model load
    reward = build_reward_model(cfg)
    policy = build_policy(cfg, resolve_device(cfg.device))
    learner = pair_learner_for(cfg, reader, out, policy)
    tracker = PerPromptStatTracker()  # DDPO's statistics: empty here, but part of the checkpoint format
    noise = torch.Generator().manual_seed(cfg.seed)  # VAE samples, t and eps*
    state = Progress(samples=0, iteration=0)
    if resume:
        state, noise_state = resume_from(out, learner, tracker)
        noise.set_state(noise_state)
    log = RunLog(cfg, out, progress, state.samples)
    batches = pair_batches(PairDataset(reader, cfg.model.resolution), cfg.pairs.batch_size, skip=state.samples)
    while state.samples < cfg.train.total_samples:
        tick = time.perf_counter()
        updates_before = learner.updates
        batch = next(batches)
        log.record(len(batch.prompts), learner.train_on(batch, noise))
        log.record_iteration(len(batch.prompts), time.perf_counter() - tick)
        state = Progress(samples=log.samples, iteration=state.iteration + 1)
        checkpoint_if_due(cfg, learner, tracker, state, noise, updates_before)
        if snapshot := evaluate_if_due(cfg, policy, reward, learner, updates_before):
            log.record_eval(snapshot)
        if cfg.train.save_every and state.iteration % cfg.train.save_every == 0:
            save_lora(policy.unet, out / "lora")
    log.close()
    if learner.embedder is not None:
        learner.embedder.cache.flush()
    return finish_run(cfg, policy, reward, learner, log.samples, time.perf_counter() - start, log.figures())
