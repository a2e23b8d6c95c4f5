"""The headline figures a benchmark hands to ``run_all.py`` (each script prints its full report, and with
``--figures PATH`` also writes the few numbers its issue asked for, each with how to read it, so that one table
can collect them across scripts that run in separate processes), and the text table every report prints."""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path


@dataclass(frozen=True)
class Figure:
    """One measured number and what the issue expected of it ("< 1: shared x_t saves forwards")."""

    name: str
    value: float
    reading: str
    digits: int = 2  # decimals shown

    def shown(self) -> str:
        return f"{self.value:.{self.digits}f}" if math.isfinite(self.value) else str(self.value)


def add_figures_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--figures", metavar="PATH", help="also write the headline figures as JSON (run_all.py)")


def write_figures(path: str | None, figures: list[Figure]) -> None:
    if path:
        Path(path).write_text(json.dumps([asdict(f) for f in figures], indent=1))


def read_figures(path: Path) -> list[Figure]:
    return [Figure(**item) for item in json.loads(path.read_text())]


def text_table(header: tuple[str, ...], rows: list[tuple[str, ...]], align: str = "") -> str:
    """Columns padded to their widest cell, two spaces apart; ``align`` has an "l" or "r" per column (default:
    the first column left, numbers right)."""
    align = align or "l" + "r" * (len(header) - 1)
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = ("  ".join(c.ljust(w) if a == "l" else c.rjust(w) for c, w, a in zip(r, widths, align, strict=True))
             for r in [header, *rows])
    return "\n".join(line.rstrip() for line in lines)
