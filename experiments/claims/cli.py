"""The command line of ``experiments/paper_claims.py``: one piece, all of them (plus summary.md), or a merge of
per-reward output folders."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from tailorpo.config import Config, load_config

from . import __doc__ as overview
from .curves import CurvePoint, curve_points, curves_markdown, plot_curves
from .files import FILES, read_csv, write_csv, write_summary
from .generalization import GeneralizationRow, generalization, generalization_markdown, held_out_prompts
from .guidance import PAPER_DELTA, PAPER_ETA, guidance_markdown, guidance_success
from .inconsistency import inconsistency_markdown, order_inconsistency, plot_inconsistency
from .lora_steps import lora_steps, lora_steps_markdown
from .runs import METHODS, launched_rewards, reward_is_differentiable, runnable_methods, train_runs


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="paper_claims", description=overview.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("piece", choices=[*FILES, "all", "merge"],
                        help="one figure/table, all of them (plus summary.md), or merge the CSVs of --from dirs")
    parser.add_argument("--config", default="launch/tiny.yaml", help="training YAML (default launch/tiny.yaml)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config field (repeatable), as tailorpo train --set")
    parser.add_argument("--out", default="outputs/paper_claims", help="output folder (runs go to OUT/runs)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--samples", type=int, help="training budget per run (default: train.total_samples)")
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--eval-every-samples", type=int,
                        help="eval reward every N sampled images during training (default: samples / 8)")
    parser.add_argument("--pairs", type=int, default=100, help="Fig. 2: trajectory pairs")
    parser.add_argument("--continuations", type=int, default=4,
                        help="Fig. 2: chains continued from each branch (< 2 skips the branch comparison)")
    parser.add_argument("--branch-pairs", type=int, default=64,
                        help="Fig. 2: branch pairs per fine-tuned step (64: a rate's standard error <= 0.06)")
    parser.add_argument("--noisy-samples", type=int, default=100, help="Table 1: noisy samples over all steps")
    parser.add_argument("--eta", type=float, default=PAPER_ETA, help="Table 1: eta_t")
    parser.add_argument("--delta", type=float, default=PAPER_DELTA, help="Table 1: r_high = r + delta")
    parser.add_argument("--held-out", default="eval",
                        help="Table 3 prompts: 'eval' (the config's eval prompts), 'shapes', or a prompt file")
    parser.add_argument("--images-per-prompt", type=int, default=5, help="Table 3: images per prompt (paper: 5)")
    parser.add_argument("--lora-steps-images", type=int, default=2,
                        help="lora-steps: images per training prompt, for each LoRA and each set of steps")
    parser.add_argument("--from", dest="sources", nargs="+", default=[], help="merge: output folders to combine")
    return parser.parse_args(argv)


def run_piece(piece: str, cfg: Config, args: argparse.Namespace, out: Path) -> float:
    """Run one piece and write its files into ``out`` (a skipped piece: only its markdown, saying why);
    returns its seconds."""
    from tailorpo.training.build import resolve_device

    tick = time.perf_counter()
    samples = args.samples or cfg.train.total_samples
    every = args.eval_every_samples or max(1, samples // 8)
    if piece in ("curves", "generalization", "lora-steps"):
        runs = train_runs(cfg, runnable_methods(cfg, args.methods), args.seeds, samples, every, out)
    written = FILES[piece]
    if piece == "curves":
        points = curve_points(runs)
        write_csv(out / FILES[piece][1], points)
        plot_curves(points, out / FILES[piece][0])
        text = curves_markdown(points)
    elif piece == "inconsistency":
        rows = order_inconsistency(cfg, args.pairs, args.continuations, args.branch_pairs)
        write_csv(out / FILES[piece][1], rows)
        plot_inconsistency(rows, out / FILES[piece][0])
        text = inconsistency_markdown(rows, args.pairs, args.continuations, args.branch_pairs)
    elif piece == "guidance" and not reward_is_differentiable(cfg):
        text = ("## Table 1: gradient guidance on noisy samples\n\nSkipped: the reward is not differentiable, so "
                "there is no gradient to guide by.")
        print("skipping Table 1: the config's reward is not differentiable")
        written = FILES[piece][-1:]
    elif piece == "guidance":
        rows = guidance_success(cfg, args.noisy_samples, args.eta, args.delta)
        write_csv(out / FILES[piece][0], rows)
        text = guidance_markdown(rows)
    elif piece == "lora-steps":
        rows = lora_steps(cfg, runs, cfg.prompts, args.lora_steps_images)
        write_csv(out / FILES[piece][0], rows)
        text = lora_steps_markdown(rows)
    else:
        rows = generalization(cfg, runs, held_out_prompts(cfg, args.held_out), args.images_per_prompt)
        write_csv(out / FILES[piece][0], rows)
        text = generalization_markdown(rows)
    seconds = time.perf_counter() - tick
    device = resolve_device(cfg.device).type
    (out / FILES[piece][-1]).write_text(f"{text}\n\n_{piece}: {seconds / 60:.1f} min on {device}._\n")
    print(f"{piece}: wrote {', '.join(written)} to {out} in {seconds:.0f}s")
    return seconds


def merge(out: Path, sources: list[Path]) -> None:
    """One Fig. 4 (a panel per reward) and one Table 3 (a column per reward) from per-reward output folders."""
    points = [p for s in sources if (s / FILES["curves"][1]).exists()
              for p in read_csv(s / FILES["curves"][1], CurvePoint)]
    if points:
        write_csv(out / FILES["curves"][1], points)
        plot_curves(points, out / FILES["curves"][0])
        (out / FILES["curves"][-1]).write_text(curves_markdown(points) + "\n")
    rows = [r for s in sources if (s / FILES["generalization"][0]).exists()
            for r in read_csv(s / FILES["generalization"][0], GeneralizationRow)]
    if rows:
        write_csv(out / FILES["generalization"][0], rows)
        (out / FILES["generalization"][-1]).write_text(generalization_markdown(rows) + "\n")
    print(f"merged {len(points)} curve points and {len(rows)} table rows from {len(sources)} folders into {out}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.piece == "merge":
        merge(out, [Path(s) for s in args.sources])
        return 0
    pieces = list(FILES) if args.piece == "all" else [args.piece]
    with launched_rewards(load_config(args.config, args.overrides)) as cfg:
        seconds = {piece: run_piece(piece, cfg, args, out) for piece in pieces}
    if args.piece == "all":
        header = (f"# Paper claims: `{args.config}` {' '.join(f'--set {o}' for o in args.overrides)}\n\n"
                  f"Seeds {args.seeds}, {args.samples or cfg.train.total_samples} samples per run. Wall time: "
                  + ", ".join(f"{p} {s / 60:.1f} min" for p, s in seconds.items()) + ".")
        print(f"wrote {write_summary(out, header)}")
    timings = out / "timings.json"  # seconds per piece, kept across separate invocations
    previous = json.loads(timings.read_text()) if timings.exists() else {}
    timings.write_text(json.dumps(previous | seconds, indent=2))
    return 0
