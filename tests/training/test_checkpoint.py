"""Checkpoints and --resume: the resumed run continues exactly where the uninterrupted one would be."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from tailorpo.config import ConfigError, load_config
from tailorpo.training.checkpoint import latest_checkpoint
from tailorpo.training.loop import train

pytestmark = pytest.mark.slow
RUN = ["train.checkpoint_every=1", "eval.images_per_prompt=1", "algorithm.fine_tuned_steps=[20, 10]"]


def cfg(output_dir, samples: int, *extra: str):
    return load_config("launch/tiny.yaml", [*RUN, f"train.total_samples={samples}", f"output_dir={output_dir}", *extra])


def lora(output_dir) -> dict[str, torch.Tensor]:
    return load_file(str(output_dir / "lora" / "pytorch_lora_weights.safetensors"))


def losses(output_dir) -> dict[int, float]:
    events = EventAccumulator(str(output_dir / "tensorboard")).Reload()
    return {e.step: e.value for e in events.Scalars("train/loss")}


@pytest.mark.parametrize("algorithm", ["tailorpo", "ddpo"])
def test_resume_gives_the_same_losses_and_lora_as_an_uninterrupted_run(tmp_path, algorithm):
    extra = [f"algorithm.name={algorithm}"] + (["sampling.batch_size=4"] if algorithm == "ddpo" else [])
    whole, split = tmp_path / "whole", tmp_path / "split"
    train(cfg(whole, 8, *extra), progress=False)
    train(cfg(split, 4, *extra), progress=False)  # "interrupted" after 4 samples
    train(cfg(split, 8, *extra), progress=False, resume=True)
    assert losses(split) == losses(whole)  # every update after the resume, bit for bit
    for key, value in lora(whole).items():
        assert torch.equal(lora(split)[key], value), key


def test_a_failed_write_leaves_the_previous_checkpoint_usable(tmp_path, monkeypatch):
    out = tmp_path / "run"
    train(cfg(out, 4), progress=False)
    before = latest_checkpoint(out)
    import tailorpo.training.checkpoint as checkpoint

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(checkpoint.torch, "save", disk_full)
    with pytest.raises(OSError, match="No space left"):
        train(cfg(out, 6), progress=False, resume=True)
    monkeypatch.undo()
    assert latest_checkpoint(out) == before  # the half-written one never became visible
    train(cfg(out, 6), progress=False, resume=True)  # and the old one still resumes


def test_truncated_checkpoint_and_missing_checkpoint_are_named(tmp_path):
    out = tmp_path / "run"
    with pytest.raises(ConfigError, match="no checkpoint"):
        train(cfg(out, 2), progress=False, resume=True)
    train(cfg(out, 2), progress=False)
    path = latest_checkpoint(out)
    data = (path / "lora.safetensors").read_bytes()
    (path / "lora.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(RuntimeError, match=f"checkpoint {path} is unreadable"):
        train(cfg(out, 4), progress=False, resume=True)
