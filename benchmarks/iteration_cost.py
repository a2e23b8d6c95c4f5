"""What one training iteration costs for TailorPO and for D3PO, given the same number of trained pairs.

TailorPO should cost less per trained pair than D3PO: TailorPO's two branches share one x_t (TailorPO, Ren et
al., arXiv 2502.01667, Fig. 1b), so one forward at that x_t serves both, while D3PO's pairs (Yang et al., arXiv
2311.13231) sit on two trajectories. This script checks that claim on the real code path: ``collect_rollout``
followed by ``Learner.train_on``. It reports:

- Guided UNet evaluations, counted by ``policy.unet_evals`` (one count per batch row), per phase. Each
  count sits next to the minimum the algorithm needs. A count above the minimum means some eps is computed
  twice, and the per-pair advantage is partly lost.
    TailorPO sampling  B*(T + n): one chain, plus one extra eval per branch for the loser's x0_hat. A branch at
                       k=1 needs no extra eval, so it is not counted.
    TailorPO training  2 per pair: one trainable forward and one reference forward at the shared x_t.
    D3PO sampling      2*B*T: two whole trajectories per prompt.
    D3PO training      4 per pair: the parents differ, so both forwards run on [x_t^w; x_t^l].
- VAE decodes. These are TailorPO's own overhead: 2 x0_hat decodes per branch
  plus the final image. Each decode is about three UNet forwards at SD scale. D3PO needs only 2*B.
- Wall time per iteration: the median of ``--iterations`` runs after one warm-up, split into sampling and
  training. Because B and the fine-tuned steps are the same for both, the TailorPO/D3PO time ratio is also the
  per-pair cost ratio. On the tiny model the decode and reward costs are not in SD's proportions. Use this
  ratio to catch regressions, not to predict SD costs. ``--threads`` defaults to 1 because an oversubscribed
  OpenMP pool on a shared CPU makes timings meaningless.
- Peak memory growth over the state after loading. Each algorithm runs in its own spawned process. On CUDA
  the figure is max_memory_allocated, measured after a reset. On CPU it is the peak RSS (VmHWM, reset through
  /proc/self/clear_refs, or ru_maxrss as a fallback) minus the RSS after loading. TailorPO should not need
  more activation memory than D3PO: D3PO backpropagates through twice as many rows per step.

Usage: python benchmarks/iteration_cost.py [--config launch/tiny.yaml] [--iterations 3] [--quick] [--set KEY=VALUE ...]
"""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import dataclass

import torch

from common import (
    Figure,
    MiB,
    add_figures_argument,
    in_spawned_process,
    load_policy,
    peak_memory_growth,
    synchronize,
    text_table,
    write_figures,
)
from tailorpo.algorithms.learner import Learner
from tailorpo.config import Config, ConfigError, load_config
from tailorpo.training.build import build_reward_model
from tailorpo.training.loop import collect_rollout

ALGORITHMS = ("tailorpo", "d3po")


@dataclass
class Counts:
    """Counters for one iteration: guided UNet evals and VAE decodes."""

    pairs: int
    sample_unet: int
    train_unet: int
    sample_vae: int
    train_vae: int


@dataclass
class Measurement:
    algorithm: str
    counts: list[Counts]  # one per measured iteration (the warm-up is excluded)
    sample_s: list[float]
    train_s: list[float]
    peak_growth_bytes: int
    memory_kind: str


def expected(cfg: Config, algorithm: str, pairs: int) -> Counts:
    """The minimum counts each algorithm needs (VAE: x0_hat decodes of both children plus the final image)."""
    b, t, steps = cfg.sampling.batch_size, cfg.sampling.num_steps, cfg.algorithm.fine_tuned_steps
    if algorithm == "tailorpo":
        branches_with_next_eps = sum(k > 1 for k in steps)
        return Counts(pairs, b * (t + branches_with_next_eps), 2 * pairs, b * (2 * len(steps) + (1 not in steps)), 0)
    return Counts(pairs, 2 * b * t, 4 * pairs, 2 * b, 0)


def measure(config: str, overrides: list[str], algorithm: str, iterations: int, threads: int) -> Measurement:
    """One warm-up plus ``iterations`` timed iterations of ``algorithm``. Run this in a fresh process."""
    cfg, policy = load_policy(config, [*overrides, f"algorithm.name={algorithm}"], threads)
    reward = build_reward_model(cfg)
    learner = Learner(policy, cfg.optim, cfg.algorithm)
    generator = torch.Generator().manual_seed(cfg.seed)

    def counters() -> tuple[int, int]:
        return policy.unet_evals, policy.vae_decodes

    def delta(after: tuple[int, int], before: tuple[int, int]) -> tuple[int, int]:
        return after[0] - before[0], after[1] - before[1]

    counts, sample_s, train_s = [], [], []
    with peak_memory_growth(policy.device) as growth:
        for it in range(iterations + 1):
            picks = torch.randint(len(cfg.prompts), (cfg.sampling.batch_size,), generator=generator).tolist()
            c0, t0 = counters(), time.perf_counter()
            rollout = collect_rollout(cfg, policy, reward, [cfg.prompts[j] for j in picks], generator)
            synchronize(policy.device)
            c1, t1 = counters(), time.perf_counter()
            stats = learner.train_on(rollout)
            synchronize(policy.device)
            c2, t2 = counters(), time.perf_counter()
            if it == 0:
                continue  # warm-up: allocator, optimizer state, lazy kernels
            (su, sv), (tu, tv) = delta(c1, c0), delta(c2, c1)
            counts.append(Counts(int(stats["pairs"]), su, tu, sv, tv))
            sample_s.append(t1 - t0)
            train_s.append(t2 - t1)
    return Measurement(algorithm, counts, sample_s, train_s, growth.bytes, growth.kind)


FIELDS = [("UNet evals, sampling", "sample_unet"), ("UNet evals, training", "train_unet"),
          ("VAE decodes, sampling", "sample_vae"), ("VAE decodes, training", "train_vae")]


def _excess(cfg: Config, m: Measurement, field: str) -> list[int]:
    """Each timed iteration's count minus its own minimum (0 everywhere when nothing is computed twice)."""
    return [getattr(c, field) - getattr(expected(cfg, m.algorithm, c.pairs), field) for c in m.counts]


def _check(cfg: Config, m: Measurement, shown: Counts, field: str) -> str:
    """The shown iteration's count and minimum; ok only if EVERY timed iteration hit its own minimum."""
    measured = getattr(shown, field)
    diffs = _excess(cfg, m, field)
    verdict = "ok" if not any(diffs) else "ABOVE" if max(diffs) > 0 else "below"
    return f"{measured} (min {getattr(expected(cfg, m.algorithm, shown.pairs), field)}, {verdict})"


def _shown(m: Measurement) -> Counts:
    """The iteration with the most pairs: ties (equal rewards) drop pairs before training."""
    return max(m.counts, key=lambda c: c.pairs)


def _evals_per_pair(c: Counts) -> float:
    return (c.sample_unet + c.train_unet) / max(c.pairs, 1)


def _seconds_per_pair(m: Measurement) -> float:
    return (sum(m.sample_s) + sum(m.train_s)) / max(sum(c.pairs for c in m.counts), 1)


def report(cfg: Config, results: dict[str, Measurement]) -> None:
    tp, d3 = results["tailorpo"], results["d3po"]
    b, t, n = cfg.sampling.batch_size, cfg.sampling.num_steps, len(cfg.algorithm.fine_tuned_steps)
    print(f"\nOne iteration: B={b} prompts, T={t} DDIM steps, {n} fine-tuned steps, "
          f"model={cfg.model.pretrained} @ {cfg.model.resolution}px, {len(tp.counts)} timed iterations\n")

    def ratio(a: float | None, c: float | None) -> str:
        return f"{a / c:.2f}" if a is not None and c else "-"

    shown = {name: _shown(m) for name, m in results.items()}
    a, c = shown["tailorpo"], shown["d3po"]
    rows = [("trained pairs", str(a.pairs), str(c.pairs), "")]
    for label, field in FIELDS:
        rows.append((label, _check(cfg, tp, a, field), _check(cfg, d3, c, field),
                     ratio(getattr(a, field), getattr(c, field))))
    evals = {k: _evals_per_pair(v) for k, v in shown.items()}
    rows.append(("UNet evals per pair", f"{evals['tailorpo']:.1f}", f"{evals['d3po']:.1f}",
                 ratio(evals["tailorpo"], evals["d3po"])))
    for label, get in [("sampling s (median)", lambda m: statistics.median(m.sample_s)),
                       ("training s (median)", lambda m: statistics.median(m.train_s)),
                       ("iteration s (median)",
                        lambda m: statistics.median(map(sum, zip(m.sample_s, m.train_s, strict=True)))),
                       ("s per trained pair", _seconds_per_pair)]:
        x, y = get(tp), get(d3)
        rows.append((label, f"{x:.3f}", f"{y:.3f}", ratio(x, y)))
    x, y = tp.peak_growth_bytes / MiB, d3.peak_growth_bytes / MiB
    rows.append(("peak memory growth MiB", f"{x:.1f}", f"{y:.1f}", ratio(x, y)))

    print(text_table(("", "TailorPO", "D3PO", "TailorPO/D3PO"), rows))
    print(f"\nmemory: {tp.memory_kind}, growth over the state after model load, each algorithm in its own process")
    for name, m in results.items():
        pairs = [c.pairs for c in m.counts]
        if len(set(pairs)) > 1:
            print(f"note: {name} trained {pairs} pairs in the timed iterations (ties dropped); "
                  "the table shows the iteration with the most")


def headline(cfg: Config, results: dict[str, Measurement]) -> list[Figure]:
    """TailorPO's cost per pair against D3PO's in three ratios, plus the count check that guards them."""
    tp, d3 = results["tailorpo"], results["d3po"]
    off = sum(any(_excess(cfg, m, field)) for m in results.values() for _, field in FIELDS)
    a, c = _shown(tp), _shown(d3)
    least = _evals_per_pair(expected(cfg, "tailorpo", a.pairs)) / _evals_per_pair(expected(cfg, "d3po", c.pairs))
    return [
        Figure("UNet/VAE counts off their minimum", off, "0 (else some eps is computed twice, or a count is lost)",
               digits=0),
        Figure("UNet evals per pair, TailorPO/D3PO", _evals_per_pair(a) / _evals_per_pair(c),
               f"{least:.2f} at the minimum counts: one x_t serves both branches"),
        Figure("time per pair, TailorPO/D3PO", _seconds_per_pair(tp) / _seconds_per_pair(d3),
               "< 1 (shared x_t: cheaper per pair); tiny model ~0.7, a regression guard, not an SD prediction"),
        Figure("peak memory growth, TailorPO/D3PO", tp.peak_growth_bytes / max(d3.peak_growth_bytes, 1),
               "<= 1: D3PO backpropagates twice the rows (tiny model ~0.65)"),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="launch/tiny.yaml")
    parser.add_argument("--iterations", type=int, help="timed iterations after one warm-up (default 3, --quick 1)")
    parser.add_argument("--quick", action="store_true", help="one timed iteration (run_all.py --quick)")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads per run (0: torch's default). "
                        "1 is the default because an oversubscribed OpenMP pool can be 50x slower on a busy machine")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    add_figures_argument(parser)
    args = parser.parse_args()
    iterations = args.iterations or (1 if args.quick else 3)
    try:
        cfg = load_config(args.config, args.overrides)  # validate once before spawning
    except ConfigError as err:
        parser.error(str(err))
    results: dict[str, Measurement] = {}
    for algorithm in ALGORITHMS:
        start = time.perf_counter()
        results[algorithm] = in_spawned_process(measure, args.config, args.overrides, algorithm, iterations,
                                                args.threads)
        print(f"{algorithm}: measured in {time.perf_counter() - start:.1f}s (incl. process start and model load)")
    report(cfg, results)
    print(f"CPU threads per run: {args.threads or torch.get_num_threads()}")
    write_figures(args.figures, headline(cfg, results))


if __name__ == "__main__":
    main()
