"""Checkpoint plumbing shared by the learned reward models (aesthetic, pickscore, hpsv2, imagereward): resolving
a local file / folder / hub repo, reading weights without running code, the strict key/shape check, and building
random weights reproducibly."""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TypeVar

import torch
from torch import nn

T = TypeVar("T")
M = TypeVar("M", bound=nn.Module)

_HUB_ID = re.compile(r"[\w.-]+/[\w.-]+")
_WEIGHT_SUFFIXES = {".pt", ".pth", ".bin", ".ckpt", ".safetensors"}


def resolve_file(source: str, candidates: Sequence[str]) -> Path:
    """``source`` as a local file, a local folder holding one of ``candidates``, or a hub repo id (the first of
    ``candidates`` it has). Errors name ``source``: a typo in a path must not turn into a hub download."""
    path = Path(source).expanduser()
    if path.is_file():
        return path
    if path.is_dir():
        for name in candidates:
            if (path / name).is_file():
                return path / name
        raise FileNotFoundError(f"weights folder {source!r} holds none of {list(candidates)}")
    if not _HUB_ID.fullmatch(source) or path.suffix in _WEIGHT_SUFFIXES:
        raise FileNotFoundError(f"weights {source!r}: no such file or folder (and not a hub repo id owner/name)")
    from huggingface_hub import hf_hub_download

    errors = []
    for name in candidates:
        try:
            return Path(hf_hub_download(repo_id=source, filename=name))
        # the hub raises many types (missing file, offline, gated): try the next name, then report them all
        except Exception as error:  # noqa: BLE001
            errors.append(f"{name}: {type(error).__name__}: {error}")
    raise FileNotFoundError(
        f"weights {source!r}: not a local path, and the hub repo gave none of {list(candidates)} "
        f"({'; '.join(errors)}); pass a local file or folder instead"
    )


def read_checkpoint(path: Path) -> dict:
    """safetensors, or ``torch.load(weights_only=True)``: a checkpoint file must never run code."""
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise ValueError(f"{path}: not a readable weights file ({type(error).__name__}: {error})") from error


def check_state_dict(state: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Tensor], source: str) -> None:
    """Raise ValueError naming the first offending keys and ``source`` unless keys and shapes match exactly: a
    layer left at its random init would still give plausible-looking, meaningless rewards."""
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    wrong = [
        f"{k} {tuple(state[k].shape)} != {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state and tuple(state[k].shape) != tuple(v.shape)
    ]
    problems = [
        f"{label} ({len(keys)}): {', '.join(keys[:5])}{' ...' if len(keys) > 5 else ''}"
        for label, keys in (("missing keys", missing), ("unexpected keys", unexpected), ("wrong shapes", wrong))
        if keys
    ]
    if problems:
        raise ValueError(f"{source} does not match the model: " + "; ".join(problems))


def load_checked(module: M, state: Mapping[str, torch.Tensor], source: str, assign: bool = False) -> M:
    """``check_state_dict`` against ``module``, then a strict load. ``assign=True`` for a module built on the
    meta device: it takes the checkpoint's tensors instead of copying into its (absent) storage."""
    check_state_dict(state, module.state_dict(), source)
    module.load_state_dict(state, strict=True, assign=assign)
    return module


def seeded(build: Callable[[], T], seed: int = 0) -> T:
    """Build random weights reproducibly (two tiny loads score identically) without touching the caller's RNG."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()
