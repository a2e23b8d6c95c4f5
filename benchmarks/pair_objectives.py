"""What a training step of the offline pair objectives costs: MaPO against Diffusion-DPO on the same batch, and
Diff-contrast against the in-batch size M.

MaPO vs Diffusion-DPO. The MaPO paper reports MaPO 14.5% faster than Diffusion-DPO (SDXL on GPUs), from
dropping the reference forward. This script runs ``PairLearner.train_on`` (VAE encode, prompt encode, UNet
forwards, backward, AdamW) for both on the same pairs and the same (t, eps*) draws, each in its own spawned
process, and prints UNet forwards per step, the median step time and the peak memory growth, as MaPO/DPO ratios.
Where our ratio lands, and why it is not the paper's:

- Time. Per step Diffusion-DPO runs one no-grad reference forward F_ref plus the trainable forward and backward
  F + B; MaPO only F + B. With B ~ 2F that is (F + B) / (F_ref + F + B) ~ 0.75 of the UNet time, and the shared
  costs (VAE and text encoding, the optimizer step) pull the ratio toward 1. The paper trains SDXL at 1024 px
  with gradient checkpointing (the backward recomputes the forward: F + B ~ 4F, so ~0.8 before shared costs) and
  a 1024 px VAE encode and an 8-bit Adam step over the whole UNet in both arms; hence 0.855. On the tiny model on
  a CPU the UNet dominates less predictably (small kernels, thread scheduling), so expect roughly 0.6-0.8, and
  use the ratio to catch regressions (MaPO must never run the reference), not to predict GPU figures.
- Memory. The paper's saving includes not holding a reference model. Here the reference is the same UNet with
  its LoRA disabled (no second copy), and its no-grad forward frees its activations before the trainable
  forward builds its graph, so the peak of live memory is set by the trainable graph in both arms: the ratio of
  live-heap peaks is 1.00. The script prints what a separate reference copy of the UNet would add instead.
- How memory is measured, each objective in a fresh process, after a warm-up step: on CUDA,
  max_memory_allocated. On CPU two figures: the live-heap peak (glibc ``mallinfo2``: bytes malloc has handed
  out and not taken back, sampled every 0.2 ms in a thread while the steps run; what max_memory_allocated
  measures on a GPU), and the peak RSS growth (VmHWM reset after the warm-up). The RSS figure is smaller than
  the heap figure (pages touched in the warm-up stay resident) and it is often lower for MaPO (0.65-0.9x in our
  runs on the tiny model: the extra reference forward makes malloc fault in fresh pages), which is allocator
  behaviour, not tensors the reference keeps alive; the heap figure is the one to compare with a GPU's.

Diff-contrast vs M. Each step contrasts M winners with M losers: the UNet cost is Diffusion-DPO's on the same M
pairs (2M rows trainable + 2M reference), plus an M x M weighted loss (negligible: M^2 scalars) and CLIP, which
embeds each pair once and is then read from the cache. The sweep prints, for M = 1, 2, 4, 8, with steps of both
objectives alternating in one process (so the ratio is not process-to-process noise): the step time of both
with a warm cache, their ratio, Diff-contrast's time per pair, what the cache lookup and the weights W add to a
step, and the one-time CLIP cost per pair of the first pass.

Usage: python benchmarks/pair_objectives.py [--config launch/tiny.yaml] [--steps 8] [--batch 4] [--threads 1] [--quick]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from common import (
    Figure,
    HeapPeak,
    MiB,
    add_figures_argument,
    in_spawned_process,
    load_policy,
    peak_memory_growth,
    synchronize,
    text_table,
    write_figures,
)
from tailorpo.algorithms.pair_learner import DIFF_CONTRAST, DIFFUSION_DPO, PairLearner
from tailorpo.algorithms.registry import ALGORITHMS
from tailorpo.config import Config, ConfigError, load_config
from tailorpo.core.objectives import diff_contrast_weights
from tailorpo.diffusion.policy import DiffusionPolicy
from tailorpo.pairs.data import PairBatch, PairDataset, collate_pairs, read_pairs, write_pairs
from tailorpo.pairs.embeddings import ClipPairEmbedder

SWEEP = (1, 2, 4, 8)
QUICK_SWEEP = (1, 8)
@dataclass
class StepCost:
    """One objective's steps in a process of its own (MaPO vs Diffusion-DPO)."""

    objective: str
    pairs: int
    unet_calls: int  # UNet forwards per step
    unet_rows: int  # rows through the UNet per step
    step_s: list[float]  # timed steps (after one warm-up)
    peak_growth_bytes: int
    memory_kind: str
    heap_growth_bytes: int | None  # CPU: live-heap peak growth (None off glibc or on CUDA)
    unet_weight_bytes: int  # what a separate reference copy of the UNet would hold


@dataclass
class ContrastCost:
    """Diff-contrast and Diffusion-DPO on the same M pairs, their steps alternating in one process."""

    pairs: int
    contrast_s: list[float]
    dpo_s: list[float]
    clip_s_per_pair: float  # the first pass, when CLIP embeds each pair once
    lookup_s: float  # a warm step's cache lookup and M x M weights


def write_synthetic_pairs(folder: Path, count: int, resolution: int) -> None:
    """``count`` pairs of random bright (preferred) and dark images: the step cost does not depend on content."""
    gen = torch.Generator().manual_seed(0)
    shape = (count, 3, resolution, resolution)
    write_pairs(folder, [f"prompt {i}" for i in range(count)], 0.6 + 0.4 * torch.rand(shape, generator=gen),
                0.4 * torch.rand(shape, generator=gen), [{}] * count)


def write_tiny_clip(folder: Path) -> None:
    """A random-weight CLIPModel of the reward servers' tiny configuration, with CLIP's tokenizer files."""
    from transformers import CLIPModel

    from tailorpo.rewards.clip import tiny_clip_config
    from tailorpo.tiny.tokenizer import write_clip_tokenizer_files

    torch.manual_seed(0)
    CLIPModel(tiny_clip_config(32)).save_pretrained(folder)
    write_clip_tokenizer_files(folder)


def load_run(
    config: str, overrides: list[str], objective: str, threads: int, data: str
) -> tuple[Config, DiffusionPolicy, list[dict[str, Any]]]:
    """The config, the policy (with a fresh LoRA) and the pairs as tensors, in this process."""
    cfg, policy = load_policy(config, [*overrides, f"algorithm.name={objective}", f"pairs.source={data}"], threads)
    return cfg, policy, list(PairDataset(read_pairs(data), cfg.model.resolution))


def timed_step(learner: PairLearner, batch: PairBatch, seed: int) -> float:
    """Seconds of one ``train_on`` (seeded draws, so every objective sees the same t and eps*)."""
    synchronize(learner.policy.device)
    tick = time.perf_counter()
    learner.train_on(batch, torch.Generator().manual_seed(seed))
    synchronize(learner.policy.device)
    return time.perf_counter() - tick


def measure(config: str, overrides: list[str], objective: str, pairs: int, steps: int, threads: int,
            data: str) -> StepCost:
    """One warm-up and ``steps`` timed steps on the same ``pairs`` pairs, with the memory they grow by. Run in a
    fresh process, so that the memory figures are this objective's alone."""
    cfg, policy, items = load_run(config, overrides, objective, threads, data)
    batch = collate_pairs(items[:pairs])
    learner = PairLearner(policy, cfg.optim, ALGORITHMS[objective].pair_objective, cfg.pairs)
    rows: list[int] = []
    hook = policy.unet.register_forward_hook(lambda module, args, out: rows.append(args[0].shape[0]))
    timed_step(learner, batch, 0)  # warm-up: optimizer state, allocator, lazy kernels
    rows.clear()
    with peak_memory_growth(policy.device) as growth, HeapPeak() as heap:
        times = [timed_step(learner, batch, seed) for seed in range(1, steps + 1)]
    hook.remove()
    weights = sum(p.numel() * p.element_size() for p in policy.unet.parameters())
    heap_growth = None if policy.device.type == "cuda" else heap.growth
    return StepCost(objective, pairs, len(rows) // steps, sum(rows) // steps, times, growth.bytes, growth.kind,
                    heap_growth, weights)


def measure_contrast(config: str, overrides: list[str], pairs: int, steps: int, threads: int, data: str,
                     clip: str) -> ContrastCost:
    """Diff-contrast against Diffusion-DPO on the same M = ``pairs`` pairs, steps alternating in one process so
    that the ratio is free of process-to-process noise; CLIP's first pass is timed apart."""
    cfg, policy, items = load_run(config, overrides, "diff_contrast", threads, data)
    batch = collate_pairs(items[:pairs])
    with tempfile.TemporaryDirectory() as cache:  # never flushed: the cache lives in memory here
        embedder = ClipPairEmbedder.load(clip, policy.device, cache, {})
    embedder(collate_pairs(items[-1:]))  # warms CLIP up on a pair outside the batch
    tick = time.perf_counter()
    embedder(batch)  # the first pass: CLIP embeds each pair once
    clip_s = (time.perf_counter() - tick) / pairs
    tick = time.perf_counter()
    diff_contrast_weights(*embedder(batch), cfg.pairs.diff_contrast.tau)  # what a warm step adds before the loss
    lookup_s = time.perf_counter() - tick
    contrast = PairLearner(policy, cfg.optim, DIFF_CONTRAST, cfg.pairs, embedder)
    dpo = PairLearner(policy, cfg.optim, DIFFUSION_DPO, cfg.pairs)
    for learner in (contrast, dpo):
        timed_step(learner, batch, 0)
    times = [(timed_step(contrast, batch, seed), timed_step(dpo, batch, seed)) for seed in range(1, steps + 1)]
    return ContrastCost(pairs, [c for c, _ in times], [d for _, d in times], clip_s, lookup_s)


def report_mapo(mapo: StepCost, dpo: StepCost, cfg_text: str) -> None:
    print(f"\nMaPO vs Diffusion-DPO: {mapo.pairs} pairs per step, {cfg_text}, {len(mapo.step_s)} timed steps\n")
    t_mapo, t_dpo = statistics.median(mapo.step_s), statistics.median(dpo.step_s)
    m_mapo, m_dpo = mapo.peak_growth_bytes / MiB, dpo.peak_growth_bytes / MiB
    rows = [
        ("UNet forwards per step", f"{mapo.unet_calls} ({mapo.unet_rows} rows)",
         f"{dpo.unet_calls} ({dpo.unet_rows} rows)", f"{mapo.unet_rows / dpo.unet_rows:.2f}"),
        ("step s (median)", f"{t_mapo:.3f}", f"{t_dpo:.3f}", f"{t_mapo / t_dpo:.2f}"),
        (f"peak memory growth MiB ({'GPU' if 'CUDA' in mapo.memory_kind else 'RSS'})", f"{m_mapo:.1f}",
         f"{m_dpo:.1f}", f"{m_mapo / m_dpo:.2f}" if m_dpo > 0 else "-"),
    ]
    if mapo.heap_growth_bytes is not None and dpo.heap_growth_bytes:
        h_mapo, h_dpo = mapo.heap_growth_bytes / MiB, dpo.heap_growth_bytes / MiB
        rows.append(("live-heap peak growth MiB", f"{h_mapo:.1f}", f"{h_dpo:.1f}", f"{h_mapo / h_dpo:.2f}"))
    print(text_table(("", "MaPO", "Diffusion-DPO", "MaPO/DPO"), rows))
    print(f"\nMaPO is {1 - t_mapo / t_dpo:.1%} faster per step here; the paper reports 14.5% (SDXL, GPU, "
          "gradient checkpointing: see the module docstring for why the ratios differ).")
    print(f"memory: {mapo.memory_kind}. A separate reference UNet (Diffusion-DPO's original full fine-tuning) "
          f"would add {dpo.unet_weight_bytes / MiB:.1f} MiB of weights; ours is the adapter-disabled UNet.")


def report_sweep(sweep: dict[int, ContrastCost]) -> None:
    print("\nDiff-contrast vs in-batch size M (warm CLIP cache), against Diffusion-DPO on the same M pairs, "
          "steps alternating in one process\n")
    rows = []
    for m, cost in sweep.items():
        c, d = statistics.median(cost.contrast_s), statistics.median(cost.dpo_s)
        rows.append((str(m), f"{c:.3f}", f"{d:.3f}", f"{c / d:.2f}", f"{c / m:.3f}", f"{cost.lookup_s * 1000:.2f}",
                     f"{cost.clip_s_per_pair * 1000:.1f}"))
    print(text_table(("M", "Diff-contrast s", "DPO s", "ratio", "Diff-contrast s/pair", "lookup + W ms",
                      "CLIP ms/pair (once)"), rows))


def headline(mapo: StepCost, dpo: StepCost, sweep: dict[int, ContrastCost]) -> list[Figure]:
    """MaPO's saving (no reference forward) and Diff-contrast's price (none beyond Diffusion-DPO's) as ratios."""
    figures = [
        Figure("UNet rows per step, MaPO/DPO", mapo.unet_rows / dpo.unet_rows, "0.50: MaPO never runs the reference"),
        Figure("step time, MaPO/DPO", statistics.median(mapo.step_s) / statistics.median(dpo.step_s),
               "< 1: ~0.75 = (F+B)/(F_ref+F+B) on the tiny CPU model; paper 0.855 (SDXL, GPU)"),
    ]
    if mapo.heap_growth_bytes is not None and dpo.heap_growth_bytes:
        figures.append(Figure("live-heap peak, MaPO/DPO", mapo.heap_growth_bytes / dpo.heap_growth_bytes,
                              "1.00: the reference is the adapter-disabled UNet, freed before the trainable graph"))
    else:
        figures.append(Figure("peak memory growth, MaPO/DPO", mapo.peak_growth_bytes / max(dpo.peak_growth_bytes, 1),
                              "<= 1 (CPU RSS is allocator-noisy: 0.65-0.9 seen on the tiny model)"))
    small, large = min(sweep), max(sweep)
    for m in (small, large):
        figures.append(Figure(f"step time M={m}, Diff-contrast/DPO",
                              statistics.median(sweep[m].contrast_s) / statistics.median(sweep[m].dpo_s),
                              "~1 at every M: the same UNet rows; M x M weights and cached CLIP are negligible"))
    per_pair = {m: statistics.median(sweep[m].contrast_s) / m for m in (small, large)}
    figures.append(Figure(f"Diff-contrast s/pair, M={large} / M={small}", per_pair[large] / per_pair[small],
                          "< 1: a larger in-batch M amortizes the per-step costs (tiny model ~0.5)"))
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="launch/tiny.yaml")
    parser.add_argument("--steps", type=int, help="timed steps after one warm-up (default 8, --quick 5)")
    parser.add_argument("--quick", action="store_true", help=f"5 timed steps, M in {QUICK_SWEEP} (run_all.py --quick)")
    parser.add_argument("--batch", type=int, default=4, help="pairs per step for MaPO vs Diffusion-DPO")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads per run (0: torch's default)")
    parser.add_argument("--clip", help="CLIPModel (hub id or folder) for Diff-contrast (default: a tiny random "
                        "one, like the tests)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    add_figures_argument(parser)
    args = parser.parse_args()
    steps, sweep_sizes = args.steps or (5 if args.quick else 8), QUICK_SWEEP if args.quick else SWEEP
    try:  # validate before spawning (a dummy source: the real one is written below)
        cfg = load_config(args.config, [*args.overrides, "algorithm.name=mapo", "pairs.source=synthetic"])
    except ConfigError as err:
        parser.error(str(err))
    with tempfile.TemporaryDirectory() as tmp:
        data, clip = Path(tmp) / "pairs", args.clip
        write_synthetic_pairs(data, max(args.batch, *sweep_sizes) + 1, cfg.model.resolution)  # + 1: CLIP warm-up
        if clip is None:
            clip = str(Path(tmp) / "clip")
            write_tiny_clip(Path(clip))
        start = time.perf_counter()
        common = (args.config, args.overrides)
        mapo, dpo = (in_spawned_process(measure, *common, name, args.batch, steps, args.threads, str(data))
                     for name in ("mapo", "diffusion_dpo"))
        sweep = {m: in_spawned_process(measure_contrast, *common, m, steps, args.threads, str(data), clip)
                 for m in sweep_sizes}
        print(f"measured in {time.perf_counter() - start:.1f}s (one process per measurement)")
    report_mapo(mapo, dpo, f"model={cfg.model.pretrained} @ {cfg.model.resolution}px")
    report_sweep(sweep)
    print(f"CPU threads per run: {args.threads or torch.get_num_threads()}")
    write_figures(args.figures, headline(mapo, dpo, sweep))


if __name__ == "__main__":
    main()
