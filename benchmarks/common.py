"""What the benchmarks share, so that no benchmark imports another's names:

- the headline figures each script hands to ``run_all.py`` (with ``--figures PATH`` it writes its few headline
  numbers, each with how to read it, so that one table can collect them across scripts that run in
  separate processes), and the text table every report prints;
- measurement: a fresh spawned process per measurement, CUDA-synchronized timing, peak memory growth;
- setup: a config's tiny policy in this process, and a ``tailorpo serve-reward --tiny`` server as a subprocess.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import math
import multiprocessing as mp
import resource
import signal
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import torch

if TYPE_CHECKING:
    from tailorpo.config import Config
    from tailorpo.diffusion.policy import DiffusionPolicy

T = TypeVar("T")
MiB = 2**20
PROMPT = "a photograph of an astronaut riding a horse"  # the reward-server benchmarks' prompt

# ---------------------------------------------------------------- figures and tables


@dataclass(frozen=True)
class Figure:
    """One measured number and what to expect of it ("< 1: shared x_t saves forwards")."""

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


# ---------------------------------------------------------------- measurement


def in_spawned_process(fn: Callable[..., T], *args: Any) -> T:
    """``fn(*args)`` in a fresh spawned process, so that its memory figures and warm-up are its own."""
    with ProcessPoolExecutor(max_workers=1, mp_context=mp.get_context("spawn")) as pool:
        return pool.submit(fn, *args).result()


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued kernels, so that a wall-clock time covers them (nothing to wait for on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def rss_bytes() -> int:
    try:
        import psutil

        return psutil.Process().memory_info().rss
    except ImportError:
        return int(Path("/proc/self/statm").read_text().split()[1]) * resource.getpagesize()


def reset_peak_rss() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")  # Linux: reset VmHWM to the current RSS
        return True
    except OSError:
        return False


def peak_rss_bytes(reset_worked: bool) -> int:
    if reset_worked:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # since process start (includes loading)


@dataclass
class MemoryGrowth:
    """Peak memory during a block over the memory at its start; ``kind`` says what was measured."""

    bytes: int = 0
    kind: str = ""


@contextmanager
def peak_memory_growth(device: torch.device) -> Iterator[MemoryGrowth]:
    """On CUDA max_memory_allocated after a reset; on CPU the peak RSS (VmHWM, reset through
    /proc/self/clear_refs, or ru_maxrss since the process started where that reset is refused)."""
    growth = MemoryGrowth()
    cuda = device.type == "cuda"
    if cuda:
        synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    else:
        base, reset_worked = rss_bytes(), reset_peak_rss()
    yield growth
    if cuda:
        growth.bytes, growth.kind = torch.cuda.max_memory_allocated(device) - base, "CUDA max_memory_allocated"
    else:
        growth.bytes = peak_rss_bytes(reset_worked) - base
        growth.kind = "CPU peak RSS (VmHWM)" if reset_worked else "CPU peak RSS (ru_maxrss, includes load)"


HEAP_SAMPLE_S = 2e-4


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]


class HeapPeak:
    """The peak of live malloc'd bytes (in-use arena chunks + mmapped blocks, glibc >= 2.33's ``mallinfo2``)
    while the block runs, sampled by a thread (torch releases the GIL inside its ops). ``growth`` stays None
    where mallinfo2 does not exist."""

    def __init__(self) -> None:
        try:
            self._mallinfo2 = ctypes.CDLL("libc.so.6").mallinfo2
            self._mallinfo2.restype = _MallInfo2
        except (OSError, AttributeError):
            self._mallinfo2 = None
        self.growth: int | None = None

    def _live(self) -> int:
        info = self._mallinfo2()
        return info.uordblks + info.hblkhd

    def __enter__(self) -> HeapPeak:
        if self._mallinfo2 is not None:
            self._base = self._peak = self._live()
            self._stop = threading.Event()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(HEAP_SAMPLE_S):
            self._peak = max(self._peak, self._live())

    def __exit__(self, *exc: object) -> None:
        if self._mallinfo2 is not None:
            self._stop.set()
            self._thread.join()
            self.growth = max(self._peak, self._live()) - self._base


# ---------------------------------------------------------------- setup


def load_policy(config: str, overrides: list[str], threads: int) -> tuple[Config, DiffusionPolicy]:
    """The config and its policy (a fresh LoRA) in this process, seeded by the config, with ``threads`` CPU
    threads (0: torch's default; an oversubscribed OpenMP pool on a shared CPU makes timings meaningless)."""
    from tailorpo.config import load_config
    from tailorpo.training.build import build_policy, resolve_device, seed_everything

    if threads > 0:
        torch.set_num_threads(threads)
    cfg = load_config(config, overrides)
    seed_everything(cfg.seed)
    return cfg, build_policy(cfg, resolve_device(cfg.device))


class RewardServerProcess:
    """``tailorpo serve-reward NAME --tiny --port 0 ARGS``; stderr goes to a temp file so a chatty server
    cannot fill a pipe and block."""

    def __init__(self, name: str, *args: str) -> None:
        self.label = " ".join([name, *args])
        self.stderr = tempfile.TemporaryFile(mode="w+")  # noqa: SIM115 (closed in close())
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tailorpo.cli", "serve-reward", name, "--tiny", "--port", "0", *args],
            stdout=subprocess.PIPE, stderr=self.stderr, text=True,
        )
        self.address: str | None = None

    def wait_ready(self, timeout_s: float = 90.0) -> str:
        line: list[str] = []
        reader = threading.Thread(target=lambda: line.append(self.proc.stdout.readline()), daemon=True)
        reader.start()
        reader.join(timeout_s)
        if not line or "listening on" not in line[0]:
            self.stderr.seek(0)
            tail = self.stderr.read()[-2000:]
            raise RuntimeError(f"server '{self.label}' did not start: {line[:1]!r}\n{tail}")
        self.address = line[0].rsplit(" ", 1)[-1].strip()
        return self.address

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc.stdout:
            self.proc.stdout.close()
        self.stderr.close()
