"""Checkpoints that resume a run exactly: LoRA, optimizer, DDPO statistics, counters, the prompt stream.

Rollout noise is a function of (seed, iteration, slot), so with the prompt generator's state and the
iteration counter the next iteration after a resume draws what the uninterrupted run would have drawn.
A checkpoint is written to a temporary folder and renamed into place, so a crash or a full disk mid-write
leaves the previous checkpoint usable. Weights go to safetensors; the rest is JSON or tensors loaded with
``weights_only=True``.
"""

from __future__ import annotations

import json
import os
import shutil
from collections import deque
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from tailorpo.algorithms.learner import LoraLearner
from tailorpo.core.objectives import PerPromptStatTracker

PREFIX = "checkpoint-"


@dataclass
class Progress:
    """Where the driver stands: what it has sampled and where its prompt stream is."""

    samples: int
    iteration: int


def save_checkpoint(
    output_dir: str | Path,
    learner: LoraLearner,
    tracker: PerPromptStatTracker,
    progress: Progress,
    prompt_state: torch.Tensor,
    keep: int = 2,
) -> Path:
    """Write ``checkpoint-<updates>`` atomically and keep the newest ``keep`` checkpoints. Call between
    optimizer steps (no gradients pending), which is where the run can restart exactly."""
    if learner.pending_iterations:
        raise RuntimeError("checkpoint with gradients pending; save right after an optimizer step")
    root = Path(output_dir)
    final = root / f"{PREFIX}{learner.updates:08d}"
    tmp = root / f".tmp-{final.name}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    lora = {k: v.detach().cpu().contiguous() for k, v in get_peft_model_state_dict(learner.policy.unet).items()}
    save_file(lora, tmp / "lora.safetensors")
    torch.save(learner.optimizer.state_dict(), tmp / "optimizer.pt")
    torch.save(prompt_state, tmp / "prompt_generator.pt")
    state = {
        "progress": asdict(progress),
        "updates": learner.updates,
        "tracker": {prompt: list(values) for prompt, values in tracker.history.items()},
    }
    (tmp / "state.json").write_text(json.dumps(state))
    for path in tmp.iterdir():  # on disk before the rename makes the checkpoint visible
        with open(path, "rb") as f:
            os.fsync(f.fileno())
    os.replace(tmp, final)
    for old in sorted(root.glob(f"{PREFIX}*"))[:-keep]:
        shutil.rmtree(old)
    return final


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    found = sorted(Path(output_dir).glob(f"{PREFIX}*"))
    return found[-1] if found else None


def load_checkpoint(
    path: str | Path, learner: LoraLearner, tracker: PerPromptStatTracker
) -> tuple[Progress, torch.Tensor]:
    """Restore a checkpoint into a freshly built learner; returns where the driver resumes and the state of
    its prompt generator."""
    path = Path(path)
    try:
        state = json.loads((path / "state.json").read_text())
        lora = load_file(path / "lora.safetensors")
        optimizer = torch.load(path / "optimizer.pt", weights_only=True)
        generator_state = torch.load(path / "prompt_generator.pt", weights_only=True)
    except (OSError, ValueError, RuntimeError, SafetensorError) as err:
        raise RuntimeError(f"checkpoint {path} is unreadable ({err}); delete it to resume from an older one") from err
    result = set_peft_model_state_dict(learner.policy.unet, lora)
    if result.unexpected_keys:
        raise RuntimeError(f"checkpoint {path} does not match this LoRA config: {result.unexpected_keys[:3]}")
    learner.optimizer.load_state_dict(optimizer)
    learner.updates = state["updates"]
    tracker.history = {p: deque(v, maxlen=tracker.buffer_size) for p, v in state["tracker"].items()}
    return Progress(**state["progress"]), generator_state
