"""`tailorpo eval`: the report's statistics against hand computations, the LoRA file's strict loading, and the
command end to end on the tiny model (in-process reward and two reward servers on loopback)."""

import csv
import math

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from tailorpo.cli import main
from tailorpo.config import EvalConfig, load_config
from tailorpo.diffusion.lora import LORA_FILE, add_lora, load_lora, lora_mismatches, read_lora, save_lora
from tailorpo.diffusion.pipeline import load_pipeline
from tailorpo.rewards import build_reward
from tailorpo.rewards.grpc_client import WeightedSum
from tailorpo.rewards.jpeg import JpegCompressibility
from tailorpo.training import loop as trainer
from tailorpo.training import run_log
from tailorpo.training.evaluation import lora_settings, markdown_table, mean_std, result_rows, win_rate
from tailorpo.training.loop import score_each
from tailorpo.training.run_log import GRID_TILE, comparison_grid, grid_thumbnails
from tests.conftest import fresh_policy, perturb_lora
from tests.servers.test_reward_server import in_process_server

# two prompts x two images in batches of three: the second batch (one image) draws from seed + 1; 10 steps
IMAGES = 2
EVAL = ["eval.prompts=[a cat, a dog]", f"eval.images_per_prompt={IMAGES}", "eval.batch_size=3",
        "sampling.num_steps=10", "algorithm.fine_tuned_steps=[10]"]
SIDE = 64  # launch/tiny.yaml's resolution


def run_eval_cli(*args: str, sets: list[str] = EVAL) -> int:
    return main(["eval", "launch/tiny.yaml", *args, *[a for s in sets for a in ("--set", s)]])


def read_rows(path) -> list[dict]:
    with open(path, newline="") as f:
        return [{k: v if k in ("reward", "prompt") else float(v) for k, v in row.items()} for row in csv.DictReader(f)]


def test_mean_std_and_win_rate_match_hand_computations():
    mean, std = mean_std(torch.tensor([[1.0, 2.0, 3.0, 4.0], [2.0, 2.0, 2.0, 2.0]]))
    assert mean.tolist() == [2.5, 2.0]
    assert std.tolist() == pytest.approx([math.sqrt(1.25), 0.0])  # population std over the images
    # pairs: win, tie, loss, tie -> (1 + 1/2 + 0 + 1/2) / 4
    assert float(win_rate(torch.tensor([3.0, 1.0, 2.0, 2.0]), torch.tensor([1.0, 1.0, 3.0, 2.0]))) == 0.5
    # per row: (win, win, loss) -> 2/3; (tie, tie, tie) -> 1/2
    rates = win_rate(torch.tensor([[2.0, 5.0, 0.0], [1.0, 1.0, 1.0]]), torch.tensor([[1.0, 4.0, 3.0], [1.0, 1.0, 1.0]]))
    assert rates.tolist() == pytest.approx([2 / 3, 0.5])
    a, b = torch.randn(2, 101, generator=torch.Generator().manual_seed(0))
    assert float(win_rate(a, a)) == 0.5
    assert float(win_rate(a, b) + win_rate(b, a)) == pytest.approx(1.0)


def test_result_rows_per_prompt_and_over_all_images():
    # two prompts x two images, prompt-major; a second reward that the LoRA ties everywhere
    base = {"r": torch.tensor([1.0, 2.0, 3.0, 5.0]), "s": torch.zeros(4)}
    lora = {"r": torch.tensor([2.0, 2.0, 1.0, 6.0]), "s": torch.zeros(4)}
    rows = result_rows(["a | b", "c"], base, lora)
    assert [(r.reward, r.prompt, r.images) for r in rows] == [
        ("r", "a | b", 2), ("r", "c", 2), ("r", "all", 4), ("s", "a | b", 2), ("s", "c", 2), ("s", "all", 4)]
    a, c, everything = rows[:3]
    assert (a.base_mean, a.base_std, a.lora_mean, a.lora_std, a.win_rate) == pytest.approx((1.5, 0.5, 2.0, 0.0, 0.75))
    assert (c.base_mean, c.base_std, c.lora_mean, c.lora_std, c.win_rate) == pytest.approx((4.0, 1.0, 3.5, 2.5, 0.5))
    assert (everything.base_mean, everything.lora_mean, everything.win_rate) == pytest.approx((2.75, 2.75, 0.625))
    assert (everything.base_std, everything.lora_std) == pytest.approx((math.sqrt(8.75 / 4), math.sqrt(14.75 / 4)))
    assert all(r.win_rate == 0.5 for r in rows[3:])
    table = markdown_table(rows).splitlines()
    assert len(table) == 2 + len(rows)
    assert table[2] == "| r | a \\| b | 2 | 1.5000 | 0.5000 | 2.0000 | 0.0000 | 0.750 |"  # a "|" in a prompt escaped


def test_score_each_calls_each_summed_reward_once_and_adds_the_weighted_sum():
    jpeg, color = build_reward("jpeg"), build_reward("colorfulness")
    total = WeightedSum([(jpeg, 1.0), (color, 0.5)])
    images, prompts = torch.rand(3, 3, 16, 16, generator=torch.Generator().manual_seed(0)), ["a", "b", "c"]
    scores = score_each(total, images, prompts)
    assert list(scores) == ["jpeg", "colorfulness", "1*jpeg+0.5*colorfulness"]
    assert jpeg.calls == color.calls == 1
    torch.testing.assert_close(scores["colorfulness"], color.score(images, prompts).scores)
    torch.testing.assert_close(scores[total.name], scores["jpeg"] + 0.5 * scores["colorfulness"])
    torch.testing.assert_close(scores[total.name], total.score(images, prompts).scores)
    assert list(score_each(jpeg, images, prompts)) == ["jpeg"]


def test_lora_mismatches_name_missing_foreign_and_reshaped_weights():
    model = {"a.lora_A.weight": torch.Size([4, 32]), "a.lora_B.weight": torch.Size([32, 4])}
    assert lora_mismatches(model, dict(model)) == []
    problems = lora_mismatches(model, {"a.lora_A.weight": torch.Size([4, 320]), "z.lora_A.weight": torch.Size([4])})
    assert problems == [
        "1 of the model's LoRA weights are not in the file, e.g. a.lora_B.weight",
        "1 weights of the file have no place in the model, e.g. z.lora_A.weight",
        "1 weights differ in shape, e.g. a.lora_A.weight is (4, 320) in the file, (4, 32) in the model",
    ]


def test_the_grid_pairs_each_prompt_row_and_shrinks_large_images():
    base, lora = torch.ones(2 * 3, 3, 320, 320), torch.zeros(2 * 3, 3, 320, 320)  # 2 prompts x 3 images
    grid = np.asarray(comparison_grid(grid_thumbnails(base), grid_thumbnails(lora), images_per_prompt=3))
    assert grid.shape == (2 * GRID_TILE, 2 * 3 * GRID_TILE, 3)
    assert (grid[:, : 3 * GRID_TILE] == 255).all() and (grid[:, 3 * GRID_TILE :] == 0).all()


def test_evaluate_scores_every_image_but_keeps_thumbnails_of_the_first_prompts_only(tiny_pipe, monkeypatch):
    """500 SD prompts x 5 images at 512 px would hold 8 GB: the grids' share is bounded, the scores are not cut."""
    monkeypatch.setattr(trainer, "GRID_PROMPTS", 1)
    monkeypatch.setattr(run_log, "GRID_TILE", SIDE // 2)
    settings = EvalConfig(prompts=["a cat", "a dog", "a fox"], images_per_prompt=2, batch_size=4)
    samples = trainer.evaluate(fresh_policy(tiny_pipe), JpegCompressibility(), settings)
    assert samples.scores["jpeg"].shape == (6,)
    assert samples.images.shape == (2, 3, SIDE // 2, SIDE // 2) and samples.images.device.type == "cpu"


def _unet_out(unet) -> torch.Tensor:
    gen = torch.Generator().manual_seed(1)
    x, states = torch.randn(1, 4, 16, 16, generator=gen), torch.randn(1, 77, 32, generator=gen)
    with torch.no_grad():
        return unet(x, 500, encoder_hidden_states=states).sample


def test_a_saved_lora_carries_its_rank_alpha_and_targets(tmp_path):
    """alpha != rank: load_lora_weights and tailorpo eval both rebuild the same scale from the file, whatever
    the evaluating config's lora section says (without the metadata load_lora_weights assumed alpha = rank)."""
    torch.manual_seed(0)
    pipe = load_pipeline("tiny-sd")
    add_lora(pipe.unet, rank=2, alpha=8.0, target_modules=["to_q", "conv1"])
    perturb_lora(pipe.unet, scale=0.2)
    expected = _unet_out(pipe.unet)
    save_lora(pipe.unet, tmp_path / "lora")

    saved = read_lora(tmp_path / "lora")
    cfg = lora_settings(load_config("launch/tiny.yaml"), saved)  # tiny.yaml: rank 4, alpha 4, nine targets
    assert (cfg.lora.rank, cfg.lora.alpha, cfg.lora.target_modules) == (2, 8.0, ["conv1", "to_q"])
    for load in ("tailorpo", "diffusers"):
        fresh = load_pipeline("tiny-sd")
        base = _unet_out(fresh.unet)
        if load == "tailorpo":
            add_lora(fresh.unet, cfg.lora.rank, cfg.lora.alpha, cfg.lora.target_modules)
            load_lora(fresh.unet, saved)
        else:
            fresh.load_lora_weights(str(tmp_path / "lora"))
        assert not torch.allclose(base, expected, atol=1e-3)
        torch.testing.assert_close(_unet_out(fresh.unet), expected, atol=1e-5, rtol=1e-5)

    # a file saved without the metadata (older runs): the config's lora section decides
    save_file(load_file(tmp_path / "lora" / LORA_FILE), tmp_path / "lora" / LORA_FILE)
    tiny = load_config("launch/tiny.yaml")
    assert read_lora(tmp_path / "lora").lora_config is None
    assert lora_settings(tiny, read_lora(tmp_path / "lora")) is tiny


def test_a_zero_lora_ties_the_base_model_image_for_image(tiny_pipe, tmp_path, capsys):
    """No --lora, no --out: output_dir/lora is evaluated into output_dir/eval_report. A LoRA of zeros is the
    base model, and on shared noise every pair of images is identical: win rate exactly 1/2, equal statistics."""
    fresh_policy(tiny_pipe)  # zeroes the LoRA
    save_lora(tiny_pipe.unet, tmp_path / "lora")
    assert run_eval_cli(sets=[*EVAL, f"output_dir={tmp_path}"]) == 0
    report = tmp_path / "eval_report"
    rows = read_rows(report / "results.csv")
    assert [(r["reward"], r["prompt"], r["images"]) for r in rows] == [
        ("jpeg", "a cat", IMAGES), ("jpeg", "a dog", IMAGES), ("jpeg", "all", 2 * IMAGES)]
    for r in rows:
        assert r["win_rate"] == 0.5 and r["base_mean"] == r["lora_mean"] and r["base_std"] == r["lora_std"]
    grid = np.asarray(Image.open(report / "grid.png"))
    assert grid.shape == (2 * SIDE, 2 * IMAGES * SIDE, 3)  # a row per prompt: its base images, then the LoRA's
    assert np.array_equal(grid[:, : IMAGES * SIDE], grid[:, IMAGES * SIDE :])
    assert not np.array_equal(grid[:SIDE, :SIDE], grid[SIDE:, :SIDE])  # but not one image repeated
    out = capsys.readouterr().out
    assert f"| jpeg | all | {2 * IMAGES} |" in out and f"to {report}" in out
    assert markdown_table([]).splitlines()[0] in (report / "results.md").read_text()


def test_two_reward_servers_each_reward_and_their_sum(tiny_pipe, tmp_path, capsys):
    """A perturbed LoRA scored by two servers (jpeg, colorfulness x 0.5): a block per reward and the sum, the
    sum's means equal to the weighted means, "all" consistent with the prompts, the markdown equal to the CSV,
    and each LoRA image closer to its base twin (same noise) than base images are to each other."""
    fresh_policy(tiny_pipe)
    perturb_lora(tiny_pipe.unet, seed=2, scale=0.05)
    save_lora(tiny_pipe.unet, tmp_path / "lora")
    with in_process_server(build_reward("jpeg")) as jpeg, in_process_server(build_reward("colorfulness")) as color:
        servers = f"reward.servers=[{{addresses: [{jpeg.address}]}}, {{addresses: [{color.address}], weight: 0.5}}]"
        assert run_eval_cli("--lora", str(tmp_path / "lora"), "--out", str(tmp_path / "report"),
                            sets=[*EVAL, servers]) == 0
    rows = read_rows(tmp_path / "report" / "results.csv")
    total = "1*jpeg+0.5*colorfulness"
    by = {(r["reward"], r["prompt"]): r for r in rows}
    assert [r["reward"] for r in rows] == ["jpeg"] * 3 + ["colorfulness"] * 3 + [total] * 3
    for prompt in ("a cat", "a dog", "all"):
        for column in ("base_mean", "lora_mean"):
            weighted = by["jpeg", prompt][column] + 0.5 * by["colorfulness", prompt][column]
            assert by[total, prompt][column] == pytest.approx(weighted, rel=1e-6)
    for reward in ("jpeg", "colorfulness", total):
        per_prompt = [by[reward, p] for p in ("a cat", "a dog")]
        for column in ("base_mean", "lora_mean", "win_rate"):  # equal counts: "all" is the mean of the prompts
            assert by[reward, "all"][column] == pytest.approx(np.mean([r[column] for r in per_prompt]), rel=1e-6)
        assert all((r["win_rate"] * 2 * r["images"]) % 1 == pytest.approx(0, abs=1e-5) for r in per_prompt)
    assert any(r["lora_mean"] != r["base_mean"] for r in rows)
    md_rows = [line.strip("|").split("|") for line in (tmp_path / "report" / "results.md").read_text().splitlines()
               if line.startswith("| ") and "base mean" not in line]
    assert len(md_rows) == len(rows)
    for cells, r in zip(md_rows, rows, strict=True):
        assert [c.strip() for c in cells[:2]] == [r["reward"], r["prompt"]]
        assert [float(c) for c in cells[3:]] == pytest.approx(
            [r["base_mean"], r["base_std"], r["lora_mean"], r["lora_std"], r["win_rate"]], abs=1e-3)
    assert capsys.readouterr().out.count(f"| {total} |") == 3

    grid = np.asarray(Image.open(tmp_path / "report" / "grid.png")).astype(float)
    tiles = grid.reshape(2, SIDE, 2 * IMAGES, SIDE, 3).transpose(0, 2, 1, 3, 4)  # (prompt, column, H, W, 3)
    base, lora = tiles[:, :IMAGES], tiles[:, IMAGES:]
    twin_gap = np.abs(lora - base).mean()
    other_gap = np.abs(base - np.roll(base, 1, axis=1)).mean()  # each base image against another one
    assert 0 < twin_gap < other_gap / 2, (twin_gap, other_gap)


def test_bad_inputs_fail_with_a_message_before_or_instead_of_a_traceback(tiny_pipe, tmp_path, capsys):
    def error(*args: str, sets: list[str] = EVAL) -> str:
        assert run_eval_cli(*args, sets=sets) == 2
        return capsys.readouterr().err

    assert "--lora DIR" in error(sets=[*EVAL, f"output_dir={tmp_path / 'untrained'}"])
    assert "does not exist" in error("--lora", str(tmp_path / "nowhere"))
    (tmp_path / "empty").mkdir()
    assert LORA_FILE in error("--lora", str(tmp_path / "empty"))
    launched = error("--lora", str(tmp_path / "empty"),
                     sets=[*EVAL, "runtime.samplers=1", "reward.launch=[{name: aesthetic, device: cuda}]"])
    assert "tailorpo serve-reward aesthetic --device cuda --port 50051" in launched

    # an SD-v1.5-shaped weight and a block the tiny UNet does not have, in an otherwise fitting file
    fresh_policy(tiny_pipe)
    save_lora(tiny_pipe.unet, tmp_path / "lora")
    path = tmp_path / "lora" / LORA_FILE
    with safe_open(str(path), "pt") as f:  # keep the metadata (rank, alpha, targets) as it was
        metadata = f.metadata()
    state = load_file(path)
    key = next(k for k in state if k.endswith("attn1.to_q.lora_A.weight"))
    state[key] = torch.zeros(4, 320)
    state[key.replace("attentions.0", "attentions.1")] = torch.zeros(4, 320)
    save_file(state, path, metadata=metadata)
    message = error("--lora", str(tmp_path / "lora"))
    assert "does not fit this model" in message and "(4, 320) in the file, (4, 32) in the model" in message
    assert "attentions.1" in message and "Traceback" not in message
