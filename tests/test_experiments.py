"""The paper-claims experiments: their math against hand computations, their configs, and one tiny run."""

import csv
import math
import socket
import subprocess
import sys

import pytest
import torch

from experiments import paper_sd15
from experiments.claims.cli import main
from experiments.claims.controls import (
    control_rows,
    controls_markdown,
    parse_variant,
    prompt_sets,
    training_curve,
    variant_run,
)
from experiments.claims.controls import main as controls_main
from experiments.claims.curves import CurvePoint
from experiments.claims.files import read_csv, write_csv
from experiments.claims.generalization import GeneralizationRow, generalization_markdown, held_out_prompts
from experiments.claims.guidance import final_rewards_on_shared_noise
from experiments.claims.lora_steps import LORA_STEP_SETS, final_rewards_with_lora_at
from experiments.claims.runs import launched_rewards, run_config, same_run, samples_per_update, with_overrides
from experiments.claims.stats import order_disagreement, paired_bootstrap, seed_band, success_rates
from tailorpo.config import DEFAULT_STEPS, ConfigError, load_config
from tailorpo.diffusion.lora import reference_model
from tailorpo.prompts import SHAPE_HELD_OUT
from tailorpo.rewards.colorfulness import Colorfulness
from tailorpo.rewards.jpeg import JpegCompressibility
from tests.conftest import fresh_policy, perturb_lora


def test_continuations_on_shared_noise_differ_only_by_their_start(tiny_pipe):
    """Table 1's final columns compare x, x+ and x- through chains that draw the same noise: equal starts end in
    equal images, and the generator moves on as after one continuation."""
    policy = fresh_policy(tiny_pipe)
    prompts = ["a cat", "a dog"]
    embeds = policy.encode_prompts(prompts)
    generator = torch.Generator().manual_seed(0)
    x = policy.initial_latents(2, generator)
    reward, start = Colorfulness(), policy.num_steps - 3
    same, again, moved = final_rewards_on_shared_noise(policy, reward, [x, x.clone(), x + 0.5], embeds, prompts,
                                                       generator, start)
    assert torch.equal(same, again) and not torch.allclose(same, moved)
    after_three = generator.get_state()
    generator = torch.Generator().manual_seed(0)
    policy.initial_latents(2, generator)
    (alone,) = final_rewards_on_shared_noise(policy, reward, [x], embeds, prompts, generator, start)
    assert torch.equal(alone, same) and torch.equal(generator.get_state(), after_three)


def test_a_chain_cut_at_x_k_and_continued_is_the_whole_chain(tiny_pipe):
    """Fig. 2's branches stop the library's DDIM chain at x_k and continue it: on the same noise stream the two
    halves make the uncut chain, and trajectory_rollout (which records on the same loop) ends in that x_0."""
    from tailorpo.algorithms.rollouts import denoise, trajectory_rollout

    policy = fresh_policy(tiny_pipe)
    embeds = policy.encode_prompts(["a cat", "a dog"])

    def generator():
        return torch.Generator().manual_seed(5)

    gen = generator()
    whole = denoise(policy, policy.initial_latents(2, gen), embeds, gen)
    gen = generator()
    x_k = denoise(policy, policy.initial_latents(2, gen), embeds, gen, 0, 7)
    torch.testing.assert_close(denoise(policy, x_k, embeds, gen, 7), whole, rtol=0, atol=1e-6)
    traj = trajectory_rollout(policy, embeds, generator(), [policy.num_steps - 7])
    torch.testing.assert_close(traj.images, policy.decode(whole), rtol=0, atol=1e-6)
    assert [int(s["step"][0]) for s in traj.steps] == [7]
    torch.testing.assert_close(traj.steps[0]["x_t"], x_k, rtol=0, atol=1e-6)


def test_step_rewards_are_measured_for_any_reward_with_the_samplers_function(tiny_pipe):
    """Fig. 2 scores x0_hat(x_{t-1}) with the sampler's step_reward_fn without gradients: the guided function's
    values for a differentiable reward, and a non-differentiable one (jpeg) works too."""
    from tailorpo.algorithms.branching import step_reward_fn

    policy = fresh_policy(tiny_pipe)
    prompts = ["a cat", "a dog"]
    embeds = policy.encode_prompts(prompts)
    x = policy.initial_latents(2, torch.Generator().manual_seed(0))
    with torch.no_grad():
        for i in (3, policy.num_steps - 1):  # an x0_hat, and x_0 itself after the last step
            measured = step_reward_fn(policy, Colorfulness(), i, embeds, prompts, differentiable=False)(x)
            guided = step_reward_fn(policy, Colorfulness(), i, embeds, prompts)(x)
            torch.testing.assert_close(measured, guided)
        jpeg = step_reward_fn(policy, JpegCompressibility(), 3, embeds, prompts, differentiable=False)(x)
    assert jpeg.shape == (2,) and torch.isfinite(jpeg).all()


@pytest.mark.slow
def test_the_script_runs_the_experiments_package(tmp_path):
    """``python experiments/paper_claims.py`` (as README and docs/results.md run it) reaches experiments/claims:
    a merge of one folder's Table 3 rewrites its markdown."""
    source = tmp_path / "aesthetic"
    source.mkdir()
    write_csv(source / "table3_generalization.csv", [GeneralizationRow("base", "aesthetic", 2, 4, 0, 5.5, 0.0, 0.5)])
    done = subprocess.run([sys.executable, "experiments/paper_claims.py", "merge", "--out", str(tmp_path / "merged"),
                           "--from", str(source)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "| base model | 5.5000 |" in (tmp_path / "merged" / "table3_generalization.md").read_text()


@pytest.mark.slow
def test_a_lora_switched_on_at_some_steps_is_the_base_model_elsewhere(tiny_pipe):
    """No step: the base model's chains; every step: the LoRA's; some steps: neither. Same noise throughout."""
    policy = fresh_policy(tiny_pipe)
    perturb_lora(policy.unet, scale=0.5)
    prompts, reward = ["a cat", "a dog", "a fox"], JpegCompressibility()

    def final(active):
        return final_rewards_with_lora_at(policy, reward, prompts, active, seed=3, batch_size=2)

    everywhere, nowhere, some = final(set(range(policy.num_steps))), final(set()), final({0, 4, 8})
    with reference_model(policy.unet):
        assert torch.equal(final(set(range(policy.num_steps))), nowhere)
    assert not torch.equal(everywhere, nowhere)
    assert not torch.equal(some, nowhere) and not torch.equal(some, everywhere)


def test_order_disagreement_counts_only_ordered_pairs():
    # step 0: signs + - 0 +, final + + - + -> pair 2 tied, pair 1 disagrees: 1 of 3
    # step 1: signs - + + 0, final + + - + -> pair 3 tied, pairs 0 and 2 disagree: 2 of 3
    step_a = torch.tensor([[1.0, 2.0, 3.0, 4.0], [4.0, 3.0, 2.0, 1.0]])
    step_b = torch.tensor([[0.0, 3.0, 3.0, 1.0], [5.0, 1.0, 1.0, 1.0]])
    final_a, final_b = torch.tensor([1.0, 1.0, 1.0, 1.0]), torch.tensor([0.0, 0.0, 2.0, 0.0])
    rates, counted = order_disagreement(step_a, step_b, final_a, final_b)
    torch.testing.assert_close(rates, torch.tensor([1 / 3, 2 / 3]))
    assert counted.tolist() == [3, 3]
    # a tie in the final rewards removes the pair at every step
    rates, counted = order_disagreement(step_a, step_b, final_a, torch.tensor([1.0, 0.0, 2.0, 0.0]))
    torch.testing.assert_close(rates, torch.tensor([1 / 2, 1 / 2]))
    assert counted.tolist() == [2, 2]


def test_order_disagreement_takes_per_step_finals_and_is_nan_without_pairs():
    step_a, step_b = torch.tensor([[1.0, 1.0], [1.0, 1.0]]), torch.tensor([[0.0, 0.0], [1.0, 1.0]])
    final_a, final_b = torch.tensor([[1.0, 0.0], [1.0, 0.0]]), torch.tensor([[0.0, 1.0], [0.0, 1.0]])  # (S, N)
    rates, counted = order_disagreement(step_a, step_b, final_a, final_b)
    assert rates[0].item() == 0.5 and math.isnan(rates[1].item())  # step 1: every step-wise pair tied
    assert counted.tolist() == [2, 0]


def test_success_rates_are_strict():
    r_x = torch.zeros(4)
    raised, lowered = success_rates(r_x, torch.tensor([1.0, 0.0, 2.0, -1.0]), torch.tensor([-1.0, -1.0, 0.0, 1.0]))
    assert (raised, lowered) == (0.5, 0.5)  # an unmoved sample is no success


def test_seed_band_aligns_on_common_sample_counts():
    curves = [{0: 1.0, 4: 2.0, 8: 3.0}, {0: 3.0, 4: 4.0, 8: 5.0, 12: 9.0}, {0: 2.0, 4: 3.0, 8: 4.0}]
    steps, mean, std = seed_band(curves)
    assert steps == [0, 4, 8]  # 12: only one seed reached it
    torch.testing.assert_close(mean, torch.tensor([2.0, 3.0, 4.0], dtype=torch.float64))
    torch.testing.assert_close(std, torch.full((3,), math.sqrt(2 / 3), dtype=torch.float64))  # population std


def test_samples_per_update_and_eval_every_give_the_same_sample_grid(tmp_path):
    cfg = load_config("launch/tiny.yaml")
    assert samples_per_update(cfg) == 2  # TailorPO: one kept chain per prompt, batch 2
    assert samples_per_update(with_overrides(cfg, ["algorithm.name=d3po"])) == 4  # two trajectories per prompt
    assert samples_per_update(with_overrides(cfg, ["algorithm.name=ddpo", "sampling.batch_size=4"])) == 4
    assert samples_per_update(with_overrides(cfg, ["optim.gradient_accumulation_steps=3"])) == 6
    runs = {m: run_config(cfg, m, 1, 32, 8, tmp_path) for m in ("tailorpo", "d3po")}
    assert runs["tailorpo"].eval.every == 4 and runs["d3po"].eval.every == 2  # both every 8 images
    assert runs["d3po"].seed == 1 and runs["d3po"].train.total_samples == 32
    assert runs["d3po"].output_dir == str(tmp_path / "runs" / "d3po" / "seed1")
    with pytest.raises(ConfigError, match="optim.lrr"):
        with_overrides(cfg, ["optim.lrr=1"])


def test_finished_runs_are_reused_whatever_port_their_reward_server_had():
    cfg = load_config("launch/tiny.yaml", ["reward.servers=[{addresses: ['127.0.0.1:1']}]"])
    assert same_run(cfg, with_overrides(cfg, ["reward.servers=[{addresses: ['127.0.0.1:2']}]"]))
    assert not same_run(cfg, with_overrides(cfg, ["optim.lr=0.1"]))


def test_launched_reward_servers_run_as_local_processes_for_the_experiments():
    """A Ray-style config (reward.launch) works in one process: its servers start here and stop after."""
    from tailorpo.training.build import build_reward_model

    cfg = load_config("launch/tiny.yaml", ["runtime.samplers=1", "reward.launch=[{name: jpeg}]"])
    with launched_rewards(cfg) as local:
        assert local.runtime.samplers == 0 and not local.reward.launch
        (server,) = local.reward.servers
        reward = build_reward_model(local)
        assert reward.name == "jpeg" and not reward.differentiable
        reward.close()
    host, port = server.addresses[0].rsplit(":", 1)
    with pytest.raises(ConnectionRefusedError):  # stopped on exit
        socket.create_connection((host, int(port)), timeout=5)


def test_held_out_prompts(tmp_path):
    cfg = load_config("launch/tiny.yaml")
    assert held_out_prompts(cfg, "eval") == cfg.eval.prompts
    assert held_out_prompts(cfg, "shapes") == SHAPE_HELD_OUT
    (tmp_path / "p.txt").write_text("a red fox\n\n  a blue whale \n")
    assert held_out_prompts(cfg, str(tmp_path / "p.txt")) == ["a red fox", "a blue whale"]
    with pytest.raises(ConfigError, match="--held-out"):
        held_out_prompts(cfg, str(tmp_path / "missing.txt"))


def test_table3_rows_round_trip_and_merge_into_the_papers_layout(tmp_path):
    rows = [GeneralizationRow("base", "aesthetic", 500, 2500, 0, 5.69, 0.0, 0.5),
            GeneralizationRow("tailorpo", "aesthetic", 500, 2500, 3, 6.26, 0.05, 0.81),
            GeneralizationRow("base", "jpeg", 500, 2500, 0, -98.95, 0.0, 0.5),
            GeneralizationRow("tailorpo", "jpeg", 500, 2500, 1, -7.32, 0.0, 0.97),
            GeneralizationRow("tailorpo_g", "aesthetic", 500, 2500, 1, 6.45, 0.0, 0.9)]
    write_csv(tmp_path / "t.csv", rows)
    assert read_csv(tmp_path / "t.csv", GeneralizationRow) == rows
    table = generalization_markdown(rows).splitlines()
    assert "| model | aesthetic | jpeg |" in table
    assert "| base model | 5.6900 | -98.9500 |" in table
    assert "| TailorPO | 6.2600 ± 0.0500 (81%) | -7.3200 ± 0.0000 (97%) |" in table
    assert "| TailorPO-G | 6.4500 ± 0.0000 (90%) | n/a |" in table  # not differentiable: never trained
    points = [CurvePoint("d3po", "jpeg", 0, -4.3, 0.01, 3)]
    write_csv(tmp_path / "c.csv", points)
    assert read_csv(tmp_path / "c.csv", CurvePoint) == points


def test_gpu_recipe_configs_load_and_it_stops_without_a_gpu(tmp_path):
    for reward in paper_sd15.TABLE3_REWARDS:
        cfg = load_config(paper_sd15.CONFIG, paper_sd15.reward_overrides(reward, "127.0.0.1:50051"))
        assert cfg.model.pretrained == "runwayml/stable-diffusion-v1-5" and cfg.model.resolution == 512
        assert cfg.train.total_samples == 10_000 and cfg.sampling.batch_size == 2
        assert cfg.algorithm.fine_tuned_steps == [20, 16, 12, 8, 4] and cfg.runtime.samplers == 0
        if reward == "jpeg":  # in process
            assert cfg.reward.name == "jpeg" and not cfg.reward.servers
        else:
            assert [s.addresses for s in cfg.reward.servers] == [["127.0.0.1:50051"]]
    if not torch.cuda.is_available():
        done = subprocess.run([sys.executable, "experiments/paper_sd15.py", "--out", str(tmp_path)],
                              capture_output=True, text=True, timeout=120)
        assert done.returncode == 2 and "needs a CUDA GPU" in done.stderr
        assert not any(tmp_path.iterdir())  # nothing started, nothing written


@pytest.mark.long
@pytest.mark.slow
def test_all_pieces_end_to_end_on_the_tiny_model(tmp_path):
    """One seed, a tiny budget, two methods: every file appears and every number is well-formed."""
    assert main(["all", "--config", "launch/tiny.yaml", "--set", "reward.name=colorfulness",
                 "--set", "eval.images_per_prompt=1", "--out", str(tmp_path), "--seeds", "0", "--samples", "8",
                 "--eval-every-samples", "4", "--methods", "tailorpo", "d3po", "--pairs", "4", "--continuations",
                 "2", "--branch-pairs", "2", "--noisy-samples", "8", "--images-per-prompt", "1",
                 "--lora-steps-images", "1"]) == 0
    for name in ("fig4_reward_curves.png", "fig2_order_inconsistency.png", "table1_guidance.md",
                 "table3_generalization.md", "lora_steps.md", "summary.md", "timings.json"):
        assert (tmp_path / name).stat().st_size > 0, name

    def rows(name):
        with open(tmp_path / name, newline="") as f:
            return list(csv.DictReader(f))

    curve = {(r["method"], int(r["samples"])) for r in rows("fig4_reward_curves.csv")}
    assert curve == {(m, s) for m in ("tailorpo", "d3po") for s in (0, 4, 8)}  # base, periodic eval, final
    for r in rows("fig2_order_inconsistency.csv"):
        assert r["comparison"] in ("trajectories", "branches_x0_hat", "branches_one_final")
        assert math.isnan(float(r["disagreement"])) or 0 <= float(r["disagreement"]) <= 1
    guidance = rows("table1_guidance.csv")
    assert [r["step"] for r in guidance] == [f"k={k}" for k in DEFAULT_STEPS] + ["all"]  # launch/tiny.yaml's
    assert guidance[-1]["samples"] == "8"
    steps = rows("lora_steps.csv")
    assert {(r["method"], r["active"]) for r in steps} == {(m, a) for m in ("tailorpo", "d3po") for a in LORA_STEP_SETS}
    assert all(0 <= float(r["win_rate"]) <= 1 and math.isfinite(float(r["gain"])) for r in steps)
    assert all(0 <= float(r[c]) <= 1 for r in guidance for c in ("raised", "final_raised", "final_lowered"))
    table = {r["method"]: r for r in rows("table3_generalization.csv")}
    assert set(table) == {"base", "tailorpo", "d3po"} and table["d3po"]["seeds"] == "1"
    assert all(math.isfinite(float(r["mean"])) for r in table.values())
    summary = (tmp_path / "summary.md").read_text()
    assert "![reward curves](fig4_reward_curves.png)" in summary and "## Table 3" in summary


def test_paired_bootstrap_collapses_on_a_constant_and_matches_the_normal_interval_for_one_seed():
    assert paired_bootstrap(torch.full((3, 50), 1.25)) == (1.25, 1.25, 1.25)
    values = 0.3 + torch.randn(1, 4000, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    mean, low, high = paired_bootstrap(values, draws=4000)
    assert mean == pytest.approx(float(values.mean()))
    half = 1.96 * float(values.std()) / math.sqrt(4000)  # the mean's normal 95% interval
    assert (high - low) / 2 == pytest.approx(half, rel=0.1)
    assert low < mean < high and (low + high) / 2 == pytest.approx(mean, abs=0.2 * half)


def test_paired_bootstrap_counts_the_spread_between_seeds():
    """Five seeds whose runs differ by far more than their images do: the interval is the seeds' (a bootstrap
    of five means), not the images' (which would be ~30x narrower)."""
    offsets = torch.tensor([-2.0, -1.0, 0.0, 1.0, 2.0], dtype=torch.float64)
    noise = 0.1 * torch.randn(5, 200, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    mean, low, high = paired_bootstrap(offsets[:, None] + noise)
    seed_half = 1.96 * float(offsets.std(unbiased=False)) / math.sqrt(5)
    assert (high - low) / 2 == pytest.approx(seed_half, rel=0.25)
    assert low < mean < high and mean == pytest.approx(float(noise.mean()))


def test_control_rows_pair_each_seed_with_the_references_same_seed_and_the_base_with_all():
    base = {"training": torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=torch.float64)}
    model = [{"training": base["training"] + torch.tensor([1.0, 1.0, 0.0, -1.0], dtype=torch.float64)},
             {"training": base["training"] + 2.0}]
    control = [{"training": base["training"]}, {"training": base["training"] + 3.0}]
    rows = {(r.model, r.reference): r for r in control_rows({"base": [base], "tailorpo": model,
                                                             "random_labels": control}, draws=500)}
    assert set(rows) == {("base", ""), ("tailorpo", ""), ("tailorpo", "base"), ("tailorpo", "random_labels"),
                         ("random_labels", ""), ("random_labels", "base")}
    vs_base = rows["tailorpo", "base"]
    assert vs_base.mean == pytest.approx((0.25 + 2.0) / 2) and vs_base.seeds == 2 and vs_base.images == 4
    assert vs_base.win_rate == pytest.approx((2.5 / 4 + 1.0) / 2)  # seed 0: two wins and a tie of four
    assert vs_base.seed_std == pytest.approx(math.sqrt(2) * 1.75 / 2)  # sample std of (0.25, 2.0)
    vs_control = rows["tailorpo", "random_labels"]
    assert vs_control.mean == pytest.approx((0.25 - 1.0) / 2)  # seed s against the control's seed s
    assert rows["tailorpo", ""].mean == pytest.approx(2.5 + 1.125)
    assert rows["base", ""].seeds == 1 and math.isnan(rows["base", ""].win_rate)
    text = controls_markdown(list(rows.values()), {"tailorpo": "TailorPO", "random_labels": "control"})
    assert "| TailorPO | 3.62 ± 1.24 | +1.12 [" in text and "Δ vs control" in text


def test_variants_parse_and_train_with_only_their_fields_changed(tmp_path):
    cfg = load_config("launch/shapes.yaml")
    gap = parse_variant("gap=algorithm.name=tailorpo_g;algorithm.branching.min_reward_gap=2")
    run = variant_run(cfg, gap, 3, 64, tmp_path)
    assert run.algorithm.name == "tailorpo_g" and run.algorithm.branching.min_reward_gap == 2.0
    assert run.seed == 3 and run.train.total_samples == 64 and run.eval.every == 0
    assert run.output_dir == str(tmp_path / "runs" / "gap" / "seed3")
    assert run.prompts == cfg.prompts and run.lora == cfg.lora
    with pytest.raises(ConfigError, match="NAME=key=value"):
        parse_variant("just-a-name")
    sets = prompt_sets(cfg, SHAPE_HELD_OUT, 2, 5)
    assert len(sets["training"].prompts) * sets["training"].images_per_prompt >= 150
    assert len(sets["held-out"].prompts) * sets["held-out"].images_per_prompt >= 75
    assert sets["training"].seed == sets["held-out"].seed == cfg.eval.seed


@pytest.mark.slow
def test_controls_end_to_end_on_the_tiny_model_reuses_runs_and_scores(tmp_path, capsys):
    args = ["--config", "launch/tiny.yaml", "--set", "reward.name=colorfulness", "--out", str(tmp_path),
            "--seeds", "0", "1", "--samples", "4", "--variants", "tailorpo", "random_labels", "--held-out", "eval",
            "--train-images", "1", "--held-out-images", "1"]
    assert controls_main(args) == 0
    with open(tmp_path / "controls.csv", newline="") as f:
        rows = {(r["prompts"], r["model"], r["reference"]): r for r in csv.DictReader(f)}
    assert ("held-out", "tailorpo", "random_labels") in rows and rows["training", "tailorpo", "base"]["seeds"] == "2"
    assert all(float(r["low"]) <= float(r["mean"]) <= float(r["high"]) for r in rows.values())
    assert (tmp_path / "runs" / "random_labels" / "seed1" / "lora").is_dir()
    assert "Δ vs base model" in (tmp_path / "controls.md").read_text()
    curve = training_curve(tmp_path / "runs" / "tailorpo" / "seed0", 8)
    assert curve.shape == (2,) and torch.isfinite(curve).all()  # 4 samples: two logged iterations, one per bin
    assert (tmp_path / "controls_training_reward.png").stat().st_size > 0
    scores = sorted(p.name for p in (tmp_path / "scores").iterdir())
    assert scores == ["base.json", *(f"{v}-seed{s}.json" for v in ("random_labels", "tailorpo") for s in (0, 1))]
    capsys.readouterr()
    stamps = {p: p.stat().st_mtime_ns for p in (tmp_path / "scores").iterdir()}
    assert controls_main(args) == 0
    assert capsys.readouterr().out.count("done before") == 4  # nothing retrained ...
    assert stamps == {p: p.stat().st_mtime_ns for p in (tmp_path / "scores").iterdir()}  # ... or re-rendered
