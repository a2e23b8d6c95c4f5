"""Every benchmark in one command, and one table of each benchmark's headline figures.

Each script runs as its own process, one after another (they would compete for the cores otherwise): a crash or
a hang costs only that script's rows, which then read FAILED with the error, and the memory figures stay each
script's own. Each writes its headline figures (``--figures``); its full report goes to a log file, whose path
is printed. The exit code is 1 if any benchmark failed.

Usage: python benchmarks/run_all.py [--quick] [--only NAME ...] [--config launch/tiny.yaml] [--out table.md]
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from common import Figure, read_figures, text_table

BENCH_DIR = Path(__file__).resolve().parent
# name: whether it takes --config (the reward-server benchmarks start their own tiny servers instead)
BENCHMARKS = {"iteration_cost": True, "pair_objectives": True, "reward_server": False, "reward_load": False,
              "ray_scaling": True, "memory": False}
HEADER = ("benchmark", "figure", "value", "how to read it")
ERROR_CHARS = 200


@dataclass
class Outcome:
    """What one benchmark process left: its figures, and an error unless it exited 0 having written them."""

    benchmark: str
    figures: list[Figure]
    seconds: float
    error: str | None = None


def error_line(log: str) -> str:
    """The line that names a crash (a traceback's last line, argparse's "error:"), or "" if none does."""
    lines = [line.strip() for line in log.replace("\r", "\n").splitlines() if line.strip()]
    if lines and ("Traceback" in log or "error:" in lines[-1]):
        return lines[-1][:ERROR_CHARS]
    return ""


def _stop_session(proc: subprocess.Popen) -> None:
    """Ends the benchmark and whatever it started (servers, Ray): they share its session's process group."""
    for sig, grace_s in ((signal.SIGTERM, 10.0), (signal.SIGKILL, None)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(grace_s)
            return
        except subprocess.TimeoutExpired:
            continue


def run_benchmark(script: Path, args: list[str], log: Path, timeout_s: float) -> Outcome:
    """``python script args --figures F`` in a session of its own, its output in ``log``."""
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp, log.open("w") as out:
        figures_path = Path(tmp) / "figures.json"
        proc = subprocess.Popen([sys.executable, str(script), *args, "--figures", str(figures_path)],
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            code = proc.wait(timeout_s)
            error = None if code == 0 else f"exit code {code}"
        except subprocess.TimeoutExpired:
            error = f"timed out after {timeout_s:.0f} s"
        finally:
            if proc.poll() is None:  # timed out, or run_all itself interrupted
                _stop_session(proc)
        figures = read_figures(figures_path) if figures_path.exists() else []
    if error is None and not figures:
        error = "wrote no figures"
    elif error is not None and (line := error_line(log.read_text(errors="replace"))):
        error = f"{error}: {line}"
    return Outcome(script.stem, figures, time.perf_counter() - start, error)


def table_rows(outcomes: list[Outcome]) -> list[tuple[str, str, str, str]]:
    """One row per figure, plus a FAILED row for a failed benchmark; its name only on its first row."""
    rows = []
    for outcome in outcomes:
        own = [(f.name, f.shown(), f.reading) for f in outcome.figures]
        if outcome.error is not None:
            own.append(("FAILED", "-", outcome.error))
        rows += [(outcome.benchmark if i == 0 else "", *row) for i, row in enumerate(own)]
    return rows


def markdown_table(rows: list[tuple[str, ...]]) -> str:
    def line(cells: tuple[str, ...]) -> str:
        return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"

    return "\n".join([line(HEADER), "|---|---|--:|---|", *map(line, rows)]) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="each benchmark's --quick: fewer iterations and steps")
    parser.add_argument("--only", nargs="+", choices=list(BENCHMARKS), metavar="NAME",
                        help=f"run only these, of: {', '.join(BENCHMARKS)}")
    parser.add_argument("--config", help="YAML for the benchmarks that train (default: each one's launch/tiny.yaml)")
    parser.add_argument("--out", metavar="PATH", help="also write the table as markdown")
    parser.add_argument("--logs", metavar="DIR", help="where each benchmark's report goes (default: a new temp dir)")
    parser.add_argument("--timeout", type=float, default=3600.0, help="seconds before a benchmark counts as hung")
    args = parser.parse_args(argv)
    logs = Path(args.logs) if args.logs else Path(tempfile.mkdtemp(prefix="tailorpo-benchmarks-"))
    logs.mkdir(parents=True, exist_ok=True)
    print(f"{'quick' if args.quick else 'full'} mode; reports in {logs}", flush=True)

    start, outcomes = time.perf_counter(), []
    for name in args.only or BENCHMARKS:
        flags = (["--quick"] if args.quick else []) + (["--config", args.config] if args.config and BENCHMARKS[name]
                                                        else [])
        outcome = run_benchmark(BENCH_DIR / f"{name}.py", flags, logs / f"{name}.log", args.timeout)
        print(f"{name}: {'ok' if outcome.error is None else 'FAILED'} in {outcome.seconds:.0f} s", flush=True)
        outcomes.append(outcome)

    rows = table_rows(outcomes)
    print(f"\n{text_table(HEADER, rows, align='llrl')}\n\nall in {time.perf_counter() - start:.0f} s")
    if args.out:
        Path(args.out).write_text(markdown_table(rows))
    return 1 if any(o.error is not None for o in outcomes) else 0


if __name__ == "__main__":
    sys.exit(main())
