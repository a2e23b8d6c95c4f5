"""End-to-end runs of the local trainer on the tiny model."""

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from tailorpo.config import load_config
from tailorpo.diffusion.pipeline import load_pipeline
from tailorpo.training.loop import train

# Observed eval gains (kB less JPEG per 64x64 image, base about -4.38 kB) after the 64-sample run of
# launch/tiny.yaml: +0.13 (seed 0), +0.11 (seed 1), +0.21 (seed 2). The test asks for +0.05 at seed 0.
JPEG_MARGIN_KB = 0.05


@pytest.mark.slow
def test_tailorpo_raises_jpeg_compressibility_and_writes_outputs(tmp_path):
    cfg = load_config("launch/tiny.yaml", [f"output_dir={tmp_path}", "eval.every=16"])
    summary = train(cfg, progress=False)
    # the same eval seeds through the base model (adapter off) and the trained LoRA
    assert summary.eval_reward_trained - summary.eval_reward_base > JPEG_MARGIN_KB, summary.text()
    assert summary.samples == 64 and summary.updates == 32

    for name in ("lora/pytorch_lora_weights.safetensors", "samples.png", "config.yaml", "summary.json",
                 "eval/samples-000016.png", "eval/samples-000032.png"):
        assert (tmp_path / name).exists(), name
    assert load_config(tmp_path / "config.yaml") == cfg
    events = EventAccumulator(str(tmp_path / "tensorboard")).Reload()
    scalars = set(events.Tags()["scalars"])
    for tag in ("train/reward_mean", "train/reward_std", "train/loss", "train/preference_accuracy",
                "train/sample_time", "train/reward_latency", "perf/samples_per_second"):
        assert tag in scalars, tag
    assert len(events.Scalars("train/loss")) == 32
    # the periodic eval on fixed noise ends where the final eval does
    assert [e.step for e in events.Scalars("eval/reward_mean")] == [32, 64]
    assert events.Scalars("eval/reward_mean")[-1].value == pytest.approx(summary.eval_reward_trained, abs=1e-6)
    assert len(events.Images("eval/samples")) == 2
    # throughput figures: reward calls are a real but minor share of sampling on the tiny model
    assert summary.samples_per_second > 0 and summary.sampler_idle_fraction is None
    assert 0 < summary.reward_time_fraction < 0.5 and summary.reward_latency_s > 0

    # the saved LoRA loads into a fresh pipeline and changes its output
    def sample(pipe):
        generator = torch.Generator().manual_seed(0)
        return pipe("a cat", num_inference_steps=5, height=64, width=64, generator=generator, output_type="pt").images

    fresh = load_pipeline("tiny-sd")
    base = sample(fresh)
    fresh.load_lora_weights(str(tmp_path / "lora"))
    assert (sample(fresh) - base).abs().max() > 1e-3


@pytest.mark.slow
@pytest.mark.parametrize(
    "overrides",
    [
        ["algorithm.name=d3po"],
        ["algorithm.name=ddpo", "sampling.batch_size=4"],
        ["algorithm.name=tailorpo_g", "reward.name=colorfulness"],
        ["algorithm.name=tailorpo_g", "reward.name=colorfulness", "algorithm.guidance.through_unet=false"],
    ],
    ids=["d3po", "ddpo", "tailorpo_g", "tailorpo_g_fixed_eps"],
)
def test_every_algorithm_trains_its_lora(tmp_path, overrides):
    cfg = load_config("launch/tiny.yaml", [f"output_dir={tmp_path}", "train.total_samples=8", *overrides])
    summary = train(cfg, progress=False)
    assert summary.updates >= 2
    events = EventAccumulator(str(tmp_path / "tensorboard")).Reload()
    losses = [e.value for e in events.Scalars("train/loss")]
    assert all(torch.isfinite(torch.tensor(losses)))
    assert summary.eval_reward_trained != summary.eval_reward_base  # the LoRA moved the samples


@pytest.mark.slow
def test_weights_and_biases_mirror_offline(tmp_path, monkeypatch):
    """log.wandb: scalars and eval grids go to a W&B run as well (offline mode: no account, no network)."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    cfg = load_config("launch/tiny.yaml", [f"output_dir={tmp_path}", "train.total_samples=4", "log.wandb=true",
                                           "eval.every=1", "eval.images_per_prompt=1"])
    train(cfg, progress=False)
    (run,) = (tmp_path / "wandb").glob("offline-run-*")
    assert len(list((run / "files" / "media" / "images" / "eval").glob("*.png"))) == 2  # one per update
    records = next(run.glob("*.wandb")).read_bytes()
    assert b"train/loss" in records and b"perf/samples_per_second" in records


def test_a_non_finite_reward_stops_the_run_before_training_on_it(tmp_path, monkeypatch, capsys):
    """A reward that turns NaN mid-run (the third call) stops `tailorpo train` with exit code 1, naming the reward
    and the prompts, after the checkpoint of the last good update; --resume is the way on."""
    from tailorpo.cli import main
    from tailorpo.rewards import TorchReward
    from tailorpo.training import loop as trainer

    class TurnsNaN(TorchReward):
        name = "turns_nan"
        calls_before_nan = 2

        def forward(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
            type(self).calls_before_nan -= 1
            scores = images.mean(dim=(1, 2, 3))
            return scores if self.calls_before_nan >= 0 else scores * float("nan")

    monkeypatch.setattr(trainer, "build_reward_model", lambda cfg: TurnsNaN())
    sets = ["algorithm.name=d3po", "train.checkpoint_every=1", f"output_dir={tmp_path}"]
    assert main(["train", "launch/tiny.yaml", "--no-progress", *[a for s in sets for a in ("--set", s)]]) == 1
    err = capsys.readouterr().err
    assert "training stopped: reward 'turns_nan' returned non-finite scores for rows [0, 1, 2, 3]" in err
    assert "--resume" in err
    assert max(p.name for p in tmp_path.glob("checkpoint-*")) == "checkpoint-00000002"  # two good updates
    assert not (tmp_path / "lora").exists()


def test_a_diverged_lora_stops_the_run_on_its_nan_samples(tmp_path, capsys):
    """lr 1e30 blows the LoRA up after one step: the next samples are NaN, which stops the run (exit 1) before
    the reward ranks or the learner trains on them."""
    from tailorpo.cli import main

    sets = ["optim.lr=1e30", "train.checkpoint_every=1", f"output_dir={tmp_path}"]
    assert main(["train", "launch/tiny.yaml", "--no-progress", *[a for s in sets for a in ("--set", s)]]) == 1
    err = capsys.readouterr().err
    assert "training stopped: images contain NaN or inf (the policy's samples: a diverged LoRA?" in err
    assert max(p.name for p in tmp_path.glob("checkpoint-*")) == "checkpoint-00000001"
