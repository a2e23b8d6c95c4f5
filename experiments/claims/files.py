"""What the experiments write: CSV rows of dataclasses (read back for ``merge``), matplotlib figures, summary.md."""

from __future__ import annotations

import csv
from dataclasses import fields
from pathlib import Path

from tailorpo.config import ConfigError

FILES = {  # piece -> the files it writes into --out; summary.md embeds them in this order
    "curves": ("fig4_reward_curves.png", "fig4_reward_curves.csv", "fig4_reward_curves.md"),
    "inconsistency": ("fig2_order_inconsistency.png", "fig2_order_inconsistency.csv", "fig2_order_inconsistency.md"),
    "guidance": ("table1_guidance.csv", "table1_guidance.md"),
    "generalization": ("table3_generalization.csv", "table3_generalization.md"),
    "lora-steps": ("lora_steps.csv", "lora_steps.md"),
}


def pyplot():
    """matplotlib's pyplot without a display (the ``experiments`` extra installs matplotlib)."""
    try:
        import matplotlib
    except ImportError:
        raise ConfigError("the figures need matplotlib: pip install -e '.[experiments]'") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def write_csv(path: Path, rows: list) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow([field.name for field in fields(rows[0])])
        writer.writerows([getattr(row, field.name) for field in fields(row)] for row in rows)


def read_csv(path: Path, row_type: type) -> list:
    """Rows written by ``write_csv`` back as dataclasses (for ``merge``)."""
    types = {field.name: field.type for field in fields(row_type)}
    cast = {"int": int, "float": float, "str": str}
    with open(path, newline="") as f:
        return [row_type(**{key: cast[types[key]](value) for key, value in row.items()}) for row in csv.DictReader(f)]


def write_summary(out: Path, header: str) -> Path:
    """summary.md: the header and every piece's markdown found in ``out``, ready for docs/results.md."""
    parts = [header] + [(out / files[-1]).read_text() for files in FILES.values() if (out / files[-1]).exists()]
    path = out / "summary.md"
    path.write_text("\n\n".join(parts) + "\n")
    return path
