"""End-to-end runs of the local trainer on the tiny model."""

import json
import math

import pytest
import torch
from safetensors.torch import load_file
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from tailorpo.config import load_config
from tailorpo.diffusion.pipeline import load_pipeline
from tailorpo.training.loop import train

# Observed eval gains (kB less JPEG per 64x64 image, base about -4.38 kB) after the 64-sample run of
# launch/tiny.yaml with the default steps (20, 16, 12, 8, 4, 3, 2, 1, the LoRA gated to them): +0.027 (seed 0),
# +0.024 (seed 1), +0.060 (seed 2). The test asks for +0.01 at seed 0 (no update or a flipped sign fails it).
# The gate costs most of the gain on this model: at seed 0 the paper's steps give +0.475 with the LoRA at all 20
# steps, +0.073 gated; the default steps ungated +0.202.
JPEG_MARGIN_KB = 0.01


@pytest.mark.long
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
    # per fine-tuned step: a scalar per rollout, and their run means in summary.json (the printout is unchanged)
    assert len(events.Scalars("steps/k20/mean_shift_sigma")) == 32
    per_step = json.loads((tmp_path / "summary.json").read_text())["per_step"]
    assert sorted(int(k) for k in per_step) == sorted(cfg.algorithm.fine_tuned_steps)
    for values in per_step.values():
        assert set(values) == {"reward_gap", "dropped", "grad_norm", "clamp_fraction", "mean_shift_sigma"}
        assert all(math.isfinite(v) for v in values.values()) and 0 <= values["clamp_fraction"] <= 1
        assert values["mean_shift_sigma"] > 0  # the first rollout's shift is exactly 0, the later ones are not
    assert len(summary.text().splitlines()) == 6  # the README's printed example
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


def test_run_log_averages_each_steps_scalars_over_the_rollouts_that_have_them(tmp_path):
    """The one-process loop and the Ray driver both hand the learner's stats to RunLog.record: per-step keys go to
    TensorBoard as they are and into the summary's per_step means; the rest stays under train/."""
    from tailorpo.training.run_log import RunLog

    log = RunLog(load_config("launch/tiny.yaml", [f"output_dir={tmp_path}"]), tmp_path, progress=False)
    log.record(2, {"loss": 0.7, "steps/k20/grad_norm": 1.0, "steps/k4/grad_norm": 4.0, "steps/k4/dropped": 0.5})
    log.record(2, {"loss": 0.6, "steps/k20/grad_norm": 3.0})
    log.close()
    per_step = log.figures()["per_step"]
    assert per_step == {20: {"grad_norm": 2.0}, 4: {"grad_norm": 4.0, "dropped": 0.5}} and list(per_step) == [20, 4]
    scalars = set(EventAccumulator(str(tmp_path / "tensorboard")).Reload().Tags()["scalars"])
    assert {"train/loss", "steps/k20/grad_norm", "steps/k4/dropped"} <= scalars
    assert "train/steps/k4/dropped" not in scalars


@pytest.mark.slow
def test_reward_gradient_cosine_is_logged_per_step_without_changing_the_run(tmp_path):
    """log.reward_gradient_cosine adds the cosine per trained step; the LoRA and the rewards stay bit-identical."""
    summaries = {}
    for on in (False, True):
        cfg = load_config("launch/tiny.yaml", [
            f"output_dir={tmp_path / str(on)}", "train.total_samples=4", "reward.name=colorfulness",
            "algorithm.fine_tuned_steps=[20,4]", f"log.reward_gradient_cosine={str(on).lower()}",
            "eval.images_per_prompt=1",
        ])
        summaries[on] = train(cfg, progress=False)
    lora = [load_file(tmp_path / str(on) / "lora" / "pytorch_lora_weights.safetensors") for on in (False, True)]
    assert lora[0].keys() == lora[1].keys() and all(torch.equal(lora[0][key], lora[1][key]) for key in lora[0])
    off, on = summaries[False], summaries[True]
    assert (on.eval_reward_trained, on.train_reward_end) == (off.eval_reward_trained, off.train_reward_end)
    assert sorted(on.per_step) == [4, 20] and all("reward_gradient_cosine" not in v for v in off.per_step.values())
    assert all(-1 <= values["reward_gradient_cosine"] <= 1 for values in on.per_step.values())


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


@pytest.mark.slow
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


@pytest.mark.slow
def test_a_step_gated_lora_is_saved_with_its_steps_and_tailorpo_eval_gates_it_the_same(tmp_path, capsys):
    """lora.active_steps=trained with random training steps: the run saves the gate next to the LoRA, and
    `tailorpo eval` on the run's config reproduces the end-of-run eval exactly; without the gate file the same
    LoRA acts at every step and scores otherwise."""
    from tailorpo.cli import main
    from tailorpo.diffusion.lora import ADAPTER_STEPS_FILE
    from tailorpo.training.evaluation import run_eval

    cfg = load_config("launch/tiny.yaml", [
        f"output_dir={tmp_path}", "train.total_samples=4", "eval.images_per_prompt=1", "sampling.num_steps=10",
        "algorithm.fine_tuned_steps=[10, 6, 2]", "algorithm.train_steps={random: 2}", "lora.active_steps=trained",
    ])
    summary = train(cfg, progress=False)
    assert json.loads((tmp_path / "lora" / ADAPTER_STEPS_FILE).read_text()) == {"active_steps": [10, 6, 2],
                                                                                 "num_steps": 10}
    assert main(["eval", str(tmp_path / "config.yaml")]) == 0
    assert "| jpeg | all |" in capsys.readouterr().out
    report = (tmp_path / "eval_report" / "results.md").read_text()
    assert "The LoRA acts at steps k = [10, 6, 2] only" in report
    gated = [row for row in run_eval(cfg, tmp_path / "lora", tmp_path / "gated") if row.prompt == "all"]
    assert gated[0].lora_mean == pytest.approx(summary.eval_reward_trained, abs=1e-6)
    (tmp_path / "lora" / ADAPTER_STEPS_FILE).unlink()
    ungated = [row for row in run_eval(cfg, tmp_path / "lora", tmp_path / "ungated") if row.prompt == "all"]
    assert ungated[0].base_mean == gated[0].base_mean and ungated[0].lora_mean != gated[0].lora_mean
