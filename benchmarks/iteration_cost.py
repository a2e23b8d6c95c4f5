"""What one training iteration costs per trained pair: the config's TailorPO, TailorPO at the paper's steps, and D3PO.

TailorPO should cost less per trained pair than D3PO: TailorPO's two branches share one x_t (TailorPO, Ren et
al., arXiv 2502.01667, Fig. 1b), so one forward at that x_t serves both, while D3PO's pairs (Yang et al., arXiv
2311.13231) sit on two trajectories. Where TailorPO branches sets its cost too: the chain's T evaluations are
shared by the pairs of its branch steps, so the config's steps (a default that may differ from the paper's) are
measured next to the paper's preset, branching and training at [20, 16, 12, 8, 4] with the LoRA at every step
(the steps of that list <= sampling.num_steps; the column is left out, with a note, if none are). Three
configurations, each in its own spawned process, on the real code path: ``collect_rollout`` followed by
``Learner.train_on``. ``--set`` overrides apply to all three, before each configuration's own:
    TailorPO (config)       algorithm.name=tailorpo, the config's steps (TailorPO-G's guidance is not included)
    TailorPO, paper steps   algorithm.name=tailorpo, the paper's steps (branch_steps, train_steps: null)
    D3PO                    algorithm.name=d3po, recording the config's branch steps
It reports, per configuration, then the ratios config/D3PO, paper/D3PO and config/paper:

- Guided UNet evaluations, counted by ``policy.unet_evals`` (one count per batch row), per phase. Each
  count sits next to the minimum the configuration needs, from the n steps where the sampler branches
  (``algorithm.branch_selection``; 'all' is every step). A count above the minimum means some eps is computed
  twice, and the per-pair advantage is partly lost.
    TailorPO sampling  B*(T + (c-1)*n'): one chain, plus c-1 extra evals per branch for the other children's
                       x0_hat (c = algorithm.branching.children, 2 in the paper). n' leaves out a branch at k=1,
                       whose children are x_0 and need no eval.
    TailorPO training  2 per pair: one trainable forward and one reference forward at the shared x_t.
    D3PO sampling      2*B*T: two whole trajectories per prompt.
    D3PO training      4 per pair: the parents differ, so both forwards run on [x_t^w; x_t^l].
  With ``{random: m}`` branch steps the count varies with the steps drawn: its check reads n/a. The minimums
  assume labels 'reward' or 'random' (labels='continuations' runs extra chains).
- VAE decodes. These are TailorPO's own overhead: c x0_hat decodes per branch plus the final image (unless a
  branch at k=1 gave it). Each decode is about three UNet forwards at SD scale. D3PO needs only 2*B.
- Wall time per iteration: the median of ``--iterations`` runs after one warm-up, split into sampling and
  training, and the seconds per trained pair over all timed iterations. On the tiny model the decode and reward
  costs are not in SD's proportions. Use these ratios to catch regressions, not to predict SD costs.
  ``--threads`` defaults to 1 because an oversubscribed OpenMP pool on a shared CPU makes timings meaningless.
- Peak memory growth over the state after loading. On CUDA the figure is max_memory_allocated, measured after
  a reset. On CPU it is the peak RSS (VmHWM, reset through /proc/self/clear_refs, or ru_maxrss as a fallback)
  minus the RSS after loading. TailorPO should not need more activation memory than D3PO: D3PO backpropagates
  through twice as many rows per step.

Usage: python benchmarks/iteration_cost.py [--config launch/tiny.yaml] [--iterations 3] [--quick] [--set KEY=VALUE ...]
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from collections.abc import Callable
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
from tailorpo.config import Config, ConfigError, RandomSteps, load_config, steps_k
from tailorpo.training.build import build_reward_model
from tailorpo.training.loop import collect_rollout

PAPER_STEPS = [20, 16, 12, 8, 4]  # TailorPO's fine-tuned steps k for a 20-step chain (the paper's preset)


@dataclass(frozen=True)
class Setup:
    """One measured configuration: a column of the table, ``short`` naming it in the ratio columns."""

    key: str
    label: str
    short: str
    overrides: tuple[str, ...]


def setups(num_steps: int) -> list[Setup]:
    """The config's TailorPO, the paper's preset at its steps <= num_steps (left out if none are), and D3PO."""
    runs = [Setup("tailorpo", "TailorPO (config)", "config", ("algorithm.name=tailorpo",)),
            Setup("d3po", "D3PO", "D3PO", ("algorithm.name=d3po",))]
    if paper := [k for k in PAPER_STEPS if k <= num_steps]:
        runs.insert(1, Setup("paper", "TailorPO, paper steps", "paper", (
            "algorithm.name=tailorpo", f"algorithm.fine_tuned_steps={paper}", "algorithm.branch_steps=null",
            "algorithm.train_steps=null", "lora.active_steps=all")))
    return runs


# (numerator, denominator) keys of the ratio columns, shown where both were measured
RATIOS = (("tailorpo", "d3po"), ("paper", "d3po"), ("tailorpo", "paper"))


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
    counts: list[Counts]  # one per measured iteration (the warm-up is excluded)
    sample_s: list[float]
    train_s: list[float]
    peak_growth_bytes: int
    memory_kind: str


@dataclass
class Column:
    """A configuration's measurement with the config it ran, which sets its minimum counts."""

    setup: Setup
    cfg: Config
    m: Measurement


def expected(cfg: Config, pairs: int) -> Counts | None:
    """The minimum counts the config's algorithm needs for ``pairs`` trained pairs (VAE: x0_hat decodes of every
    child plus the final image), from the steps where the sampler branches. None for TailorPO branching at
    ``{random: m}`` steps: the count then depends on the steps drawn (a branch at k=1 saves evals and a decode)."""
    b, t = cfg.sampling.batch_size, cfg.sampling.num_steps
    if cfg.algorithm.name != "tailorpo":
        return Counts(pairs, 2 * b * t, 4 * pairs, 2 * b, 0)
    _, selection = cfg.algorithm.branch_selection
    if isinstance(selection, RandomSteps):
        return None
    steps, children = steps_k(selection, t), cfg.algorithm.branching.children
    with_next_eps = sum(k > 1 for k in steps)
    return Counts(pairs, b * (t + (children - 1) * with_next_eps), 2 * pairs,
                  b * (children * len(steps) + (1 not in steps)), 0)


def measure(config: str, overrides: list[str], iterations: int, threads: int) -> Measurement:
    """One warm-up plus ``iterations`` timed iterations of the config. Run this in a fresh process."""
    cfg, policy = load_policy(config, overrides, threads)
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
    return Measurement(counts, sample_s, train_s, growth.bytes, growth.kind)


FIELDS = [("UNet evals, sampling", "sample_unet"), ("UNet evals, training", "train_unet"),
          ("VAE decodes, sampling", "sample_vae"), ("VAE decodes, training", "train_vae")]


def _excess(col: Column, field: str) -> list[int] | None:
    """Each timed iteration's count minus its own minimum (0 everywhere when nothing is computed twice); None
    when the minimum is not fixed."""
    if expected(col.cfg, 0) is None:
        return None
    return [getattr(c, field) - getattr(expected(col.cfg, c.pairs), field) for c in col.m.counts]


def _check(col: Column, field: str) -> str:
    """The shown iteration's count and minimum; ok only if EVERY timed iteration hit its own minimum."""
    shown, diffs = _shown(col.m), _excess(col, field)
    if diffs is None:
        return f"{getattr(shown, field)} (min n/a)"
    verdict = "ok" if not any(diffs) else "ABOVE" if max(diffs) > 0 else "below"
    return f"{getattr(shown, field)} (min {getattr(expected(col.cfg, shown.pairs), field)}, {verdict})"


def _shown(m: Measurement) -> Counts:
    """The iteration with the most pairs: ties (equal rewards) drop pairs before training."""
    return max(m.counts, key=lambda c: c.pairs)


def _evals_per_pair(c: Counts) -> float:
    return (c.sample_unet + c.train_unet) / max(c.pairs, 1)


def _seconds_per_pair(m: Measurement) -> float:
    return (sum(m.sample_s) + sum(m.train_s)) / max(sum(c.pairs for c in m.counts), 1)


def _count(field: str) -> Callable[[Column], float]:
    return lambda col: getattr(_shown(col.m), field)


def _check_cell(field: str) -> Callable[[Column], str]:
    return lambda col: _check(col, field)


@dataclass(frozen=True)
class Row:
    """One table row: a number per column, whose ratios fill the ratio columns, shown as ``spec`` unless
    ``cell`` writes the column's cell."""

    label: str
    value: Callable[[Column], float]
    spec: str = ".3f"
    cell: Callable[[Column], str] | None = None

    def text(self, col: Column) -> str:
        return self.cell(col) if self.cell else format(self.value(col), self.spec)


ROWS = [
    Row("trained pairs", _count("pairs"), "d"),
    *[Row(label, _count(field), cell=_check_cell(field)) for label, field in FIELDS],
    Row("UNet evals per pair", lambda col: _evals_per_pair(_shown(col.m)), ".1f"),
    Row("sampling s (median)", lambda col: statistics.median(col.m.sample_s)),
    Row("training s (median)", lambda col: statistics.median(col.m.train_s)),
    Row("iteration s (median)",
        lambda col: statistics.median(map(sum, zip(col.m.sample_s, col.m.train_s, strict=True)))),
    Row("s per trained pair", lambda col: _seconds_per_pair(col.m)),
    Row("peak memory growth MiB", lambda col: col.m.peak_growth_bytes / MiB, ".1f"),
]


def _ratio(a: float, b: float) -> float:
    return a / b if b else math.nan


def _ratios(columns: dict[str, Column]) -> list[tuple[str, str]]:
    """The (numerator, denominator) keys of RATIOS whose both columns were measured."""
    return [(a, b) for a, b in RATIOS if a in columns and b in columns]


def report(columns: dict[str, Column]) -> None:
    cfg = columns["tailorpo"].cfg
    print(f"\nOne iteration: B={cfg.sampling.batch_size} prompts, T={cfg.sampling.num_steps} DDIM steps, "
          f"model={cfg.model.pretrained} @ {cfg.model.resolution}px, "
          f"{len(columns['tailorpo'].m.counts)} timed iterations")
    for col in columns.values():  # D3PO records its transitions at the branch steps
        branch, train = ("=".join(map(str, s)) for s in (col.cfg.algorithm.branch_selection,
                                                          col.cfg.algorithm.train_selection))
        trains = "" if train == branch else f", trains at {train}"
        print(f"  {col.setup.label}: {branch}{trains}, lora.active_steps={col.cfg.lora.active_steps}")
    ratios = _ratios(columns)
    header = ("", *(col.setup.label for col in columns.values()),
              *(f"{columns[a].setup.short}/{columns[b].setup.short}" for a, b in ratios))
    rows = []
    for row in ROWS:
        shares = (_ratio(row.value(columns[a]), row.value(columns[b])) for a, b in ratios)
        rows.append((row.label, *(row.text(col) for col in columns.values()),
                     *(f"{r:.2f}" if math.isfinite(r) else "-" for r in shares)))
    print()
    print(text_table(header, rows))
    memory = columns["tailorpo"].m.memory_kind
    print(f"\nmemory: {memory}, growth over the state after model load, each configuration in its own process")
    for col in columns.values():
        pairs = [c.pairs for c in col.m.counts]
        if len(set(pairs)) > 1:
            print(f"note: {col.setup.label} trained {pairs} pairs in the timed iterations (ties dropped); "
                  "the table shows the iteration with the most")


def headline(columns: dict[str, Column]) -> list[Figure]:
    """The config's cost per pair against D3PO's and the paper preset's, plus the count check that guards them
    (configurations whose minimum is not fixed left out)."""
    tp, d3, paper = columns["tailorpo"], columns["d3po"], columns.get("paper")
    off = sum(any(diffs) for col in columns.values() for _, field in FIELDS
              if (diffs := _excess(col, field)) is not None)

    def least_evals(a: Column, b: Column) -> str:
        """The UNet evals per pair ratio at both columns' minimum counts, or n/a."""
        ea, eb = expected(a.cfg, _shown(a.m).pairs), expected(b.cfg, _shown(b.m).pairs)
        return "n/a" if ea is None or eb is None else f"{_evals_per_pair(ea) / _evals_per_pair(eb):.2f}"

    if paper is None:
        per_pair_paper = Figure("time per pair, TailorPO/paper steps", math.nan,
                                f"n/a: none of the paper's steps {PAPER_STEPS} is <= num_steps")
    else:
        per_pair_paper = Figure(
            "time per pair, TailorPO/paper steps", _seconds_per_pair(tp.m) / _seconds_per_pair(paper.m),
            f"~1 when both branch at a similar number of steps ({least_evals(tp, paper)} in UNet evals per pair at "
            "the minimum counts: fewer branch steps, fewer pairs share the chain); guidance not included")
    return [
        Figure("UNet/VAE counts off their minimum", off, "0 (else some eps is computed twice, or a count is lost)",
               digits=0),
        Figure("UNet evals per pair, TailorPO/D3PO", _evals_per_pair(_shown(tp.m)) / _evals_per_pair(_shown(d3.m)),
               f"{least_evals(tp, d3)} at the minimum counts: one x_t serves both branches"),
        Figure("time per pair, TailorPO/D3PO", _seconds_per_pair(tp.m) / _seconds_per_pair(d3.m),
               "< 1 (shared x_t: cheaper per pair); tiny model ~0.7 at the paper's steps, a regression guard, "
               "not an SD prediction"),
        per_pair_paper,
        Figure("peak memory growth, TailorPO/D3PO", tp.m.peak_growth_bytes / max(d3.m.peak_growth_bytes, 1),
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
    try:  # each configuration validated once before spawning
        num_steps = load_config(args.config, args.overrides).sampling.num_steps
        runs = setups(num_steps)
        configs = [load_config(args.config, [*args.overrides, *setup.overrides]) for setup in runs]
    except ConfigError as err:
        parser.error(str(err))
    if "paper" not in {setup.key for setup in runs}:
        print(f"note: no paper-steps column: none of {PAPER_STEPS} is <= sampling.num_steps={num_steps}")
    columns: dict[str, Column] = {}
    for setup, cfg in zip(runs, configs, strict=True):
        start = time.perf_counter()
        m = in_spawned_process(measure, args.config, [*args.overrides, *setup.overrides], iterations, args.threads)
        columns[setup.key] = Column(setup, cfg, m)
        print(f"{setup.label}: measured in {time.perf_counter() - start:.1f}s (incl. process start and model load)")
    report(columns)
    print(f"CPU threads per run: {args.threads or torch.get_num_threads()}")
    write_figures(args.figures, headline(columns))


if __name__ == "__main__":
    main()
