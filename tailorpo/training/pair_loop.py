"""The one-process loop of the offline pair objectives (``algorithm.name``: diffusion_dpo, mapo, diff_contrast).

The online trainer's pieces, with a pair reader in place of the sampler: the same policy and LoRA
(``build_policy``), optimizer path and ``train_on`` (``LoraLearner``), TensorBoard log, end-of-iteration cadence
(checkpoints, periodic evaluation, ``train.save_every``: ``loop.end_of_iteration``) and final evaluation with
``cfg.reward`` (here only an eval reward: the pairs carry the preference), and the same outputs
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

from tailorpo.algorithms.pair_learner import PairLearner, build_pair_learner
from tailorpo.algorithms.registry import algorithm_of
from tailorpo.config import Config
from tailorpo.core.objectives import PerPromptStatTracker
from tailorpo.diffusion.policy import DiffusionPolicy
from tailorpo.pairs.data import (
    PairBatch,
    PairDataError,
    PairDataset,
    PairReader,
    collate_pairs,
    read_pairs,
)
from tailorpo.training.build import (
    build_policy,
    build_reward_model,
    resolve_device,
    seed_everything,
)
from tailorpo.training.cadence import Counters
from tailorpo.training.checkpoint import Progress
from tailorpo.training.loop import (
    end_of_iteration,
    finish_run,
    prepare_output,
    resume_from,
)
from tailorpo.training.run_log import RunLog, RunSummary


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
    """The configured pair objective's learner, with Diff-contrast's embedding cache tagged by the source it
    caches."""
    data_tag = {"pairs_source": reader.description, "resolution": str(cfg.model.resolution)}
    cache = cfg.pairs.diff_contrast.embedding_cache or out / "clip_embeddings"
    return build_pair_learner(cfg, policy, algorithm_of(cfg).pair_objective, Path(cache), data_tag)


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
        before = Counters(state.iteration, learner.updates)
        batch = next(batches)
        log.record(len(batch.prompts), learner.train_on(batch, noise))
        log.record_iteration(len(batch.prompts), time.perf_counter() - tick)
        state = Progress(samples=log.samples, iteration=state.iteration + 1)
        if snapshot := end_of_iteration(cfg, policy, lambda: reward, learner, tracker, before, state,
                                        noise.get_state()):
            log.record_eval(snapshot)
    log.close()
    return finish_run(cfg, policy, reward, learner, log.samples, time.perf_counter() - start, log.figures())
