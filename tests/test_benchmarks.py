"""benchmarks/run_all.py: the table it builds from the benchmarks' figures, how a failing benchmark shows, and one
real benchmark through it in quick mode."""

from __future__ import annotations

import ast
import math
import os
import subprocess
import sys
from pathlib import Path

import iteration_cost
import memory
import pytest
import run_all  # benchmarks/ is on pytest's pythonpath (pyproject.toml), as it is first on sys.path for a script
import torch
import yaml

from common import Figure, MiB, in_spawned_process, peak_memory_growth, read_figures, write_figures
from tailorpo.config import load_config

ROOT = Path(__file__).resolve().parents[1]


def test_rows_and_markdown_name_each_benchmark_once_and_show_failures():
    outcomes = [
        run_all.Outcome("iteration_cost", [Figure("time per pair, TailorPO/D3PO", 0.7012, "< 1"),
                                           Figure("counts off their minimum", 0.0, "0", digits=0)], 12.0),
        run_all.Outcome("reward_load", [Figure("lost | mismatched", 3.0, "0", digits=0)], 5.0, "exit code 1"),
        run_all.Outcome("ray_scaling", [], 1.0, "exit code 1: RuntimeError: no Ray"),
    ]
    assert run_all.table_rows(outcomes) == [
        ("iteration_cost", "time per pair, TailorPO/D3PO", "0.70", "< 1"),
        ("", "counts off their minimum", "0", "0"),
        ("reward_load", "lost | mismatched", "3", "0"),
        ("", "FAILED", "-", "exit code 1"),
        ("ray_scaling", "FAILED", "-", "exit code 1: RuntimeError: no Ray"),
    ]
    markdown = run_all.markdown_table(run_all.table_rows(outcomes)).splitlines()
    assert markdown[:3] == ["| benchmark | figure | value | how to read it |", "|---|---|--:|---|",
                            "| iteration_cost | time per pair, TailorPO/D3PO | 0.70 | < 1 |"]
    assert markdown[3] == "|  | counts off their minimum | 0 | 0 |"
    assert markdown[4] == "| reward_load | lost \\| mismatched | 3 | 0 |"  # a "|" in a cell is escaped
    assert markdown[-1] == "| ray_scaling | FAILED | - | exit code 1: RuntimeError: no Ray |"


def test_figures_round_trip_through_json_and_show_nan(tmp_path):
    figures = [Figure("ratio", 0.5, "< 1"), Figure("idle", math.nan, "n/a", digits=1)]
    write_figures(str(tmp_path / "f.json"), figures)
    assert [f.name for f in read_figures(tmp_path / "f.json")] == ["ratio", "idle"]
    assert [f.shown() for f in figures] == ["0.50", "nan"]


def test_benchmarks_share_helpers_only_through_common():
    """A benchmark importing another benchmark's names ties the two together; shared helpers go in common.py."""
    scripts = {path.stem: path for path in (ROOT / "benchmarks").glob("*.py")}
    assert "common" in scripts and set(run_all.BENCHMARKS) < set(scripts)
    for name, path in scripts.items():
        imported = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                imported |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module:
                imported.add(node.module.split(".")[0])
        assert not imported & (set(scripts) - {"common"}), (name, imported & set(scripts))


def growth_of_a_block() -> tuple[int, str]:
    with peak_memory_growth(torch.device("cpu")) as growth:
        block = torch.ones(64 * MiB // 4)  # 64 MiB of float32, touched
        del block
    return growth.bytes, growth.kind


def test_peak_memory_growth_sees_a_block_allocation_on_cpu():
    # in a fresh process: in this one, freed pages that are still resident can take the block without RSS growth
    grown, kind = in_spawned_process(growth_of_a_block)
    assert grown >= 60 * MiB and kind.startswith("CPU peak RSS")


@pytest.mark.parametrize(
    ("source", "timeout_s", "error"),
    [
        ("raise RuntimeError('boom')", 60.0, "exit code 1: RuntimeError: boom"),
        ("print('done')", 60.0, "wrote no figures"),
        ("import sys\nsys.exit(3)", 60.0, "exit code 3"),
        ("import time\ntime.sleep(60)", 1.0, "timed out after 1 s"),
    ],
)
def test_a_crashing_silent_or_hung_benchmark_is_failed_with_its_error(tmp_path, source, timeout_s, error):
    script = tmp_path / "broken.py"
    script.write_text(source)
    outcome = run_all.run_benchmark(script, [], tmp_path / "broken.log", timeout_s)
    assert (outcome.benchmark, outcome.figures, outcome.error) == ("broken", [], error)


@pytest.mark.parametrize(
    ("overrides", "sample_unet", "sample_vae"),
    [
        # B * (T + 7): the branch at k=1 gives x_0, so it needs no next eps; 2 decodes per branch, x_0 among them
        (["algorithm.fine_tuned_steps=[20, 16, 12, 8, 4, 3, 2, 1]"], 2 * (20 + 7), 2 * (2 * 8 + 0)),
        (["algorithm.fine_tuned_steps=[20, 16, 12, 8, 4]"], 2 * (20 + 5), 2 * (2 * 5 + 1)),  # + the final image
        (["algorithm.branch_steps=all"], 2 * (20 + 19), 2 * (2 * 20 + 0)),  # branch_steps over fine_tuned_steps
        (["algorithm.fine_tuned_steps=[8, 4]", "algorithm.branching.children=4"], 2 * (20 + 3 * 2), 2 * (4 * 2 + 1)),
    ],
)
def test_iteration_cost_minimum_counts_follow_the_branch_steps(overrides, sample_unet, sample_vae):
    cfg = load_config("launch/tiny.yaml", [*overrides, "lora.active_steps=trained"])  # B=2, T=20
    assert iteration_cost.expected(cfg, 9) == iteration_cost.Counts(9, sample_unet, 2 * 9, sample_vae, 0)
    d3po = load_config("launch/tiny.yaml", [*overrides, "lora.active_steps=trained", "algorithm.name=d3po"])
    assert iteration_cost.expected(d3po, 9) == iteration_cost.Counts(9, 2 * 2 * 20, 4 * 9, 2 * 2, 0)


def test_iteration_cost_has_no_fixed_minimum_for_random_branch_steps():
    """{random: m} branch steps: whether a trajectory draws k=1 changes its count, so the check reads n/a."""
    overrides = ["algorithm.branch_steps={random: 3}", "lora.active_steps=trained"]
    assert iteration_cost.expected(load_config("launch/tiny.yaml", overrides), 6) is None
    d3po = load_config("launch/tiny.yaml", [*overrides, "algorithm.name=d3po"])
    assert iteration_cost.expected(d3po, 6) == iteration_cost.Counts(6, 80, 24, 4, 0)


def test_iteration_cost_paper_column_keeps_the_paper_steps_that_fit():
    def paper(num_steps: int) -> list[str]:
        return [s.overrides for s in iteration_cost.setups(num_steps) if s.key == "paper"]

    assert "algorithm.fine_tuned_steps=[20, 16, 12, 8, 4]" in paper(50)[0]
    assert "algorithm.fine_tuned_steps=[4]" in paper(4)[0]
    assert paper(3) == [] and [s.key for s in iteration_cost.setups(3)] == ["tailorpo", "d3po"]


@pytest.mark.slow
def test_quick_run_all_tables_iteration_cost_with_finite_figures(tmp_path):
    cfg = yaml.safe_load((ROOT / "launch" / "tiny.yaml").read_text())
    cfg["sampling"]["num_steps"], cfg["algorithm"]["fine_tuned_steps"] = 4, [4, 2]  # a shorter chain: cheaper
    (tmp_path / "short.yaml").write_text(yaml.safe_dump(cfg))
    out = tmp_path / "table.md"
    code = run_all.main(["--quick", "--only", "iteration_cost", "--config", str(tmp_path / "short.yaml"),
                         "--out", str(out), "--logs", str(tmp_path / "logs")])
    assert code == 0, (tmp_path / "logs" / "iteration_cost.log").read_text()[-3000:]
    cells = [[c.strip() for c in line.strip("|").split("|")] for line in out.read_text().splitlines()[2:]]
    rows = {figure: value for _, figure, value, _ in cells}
    assert rows["UNet/VAE counts off their minimum"] == "0"
    assert math.isfinite(float(rows["time per pair, TailorPO/D3PO"]))
    assert math.isfinite(float(rows["time per pair, TailorPO/paper steps"]))  # the paper's steps <= 4: [4]


def test_memory_model_recovers_a_linear_phase_and_sizes_the_gpu():
    """memory.py's model a + B * b * px^2 through two batch-1 points gives back a phase that is exactly that (the
    eval's batch is eval.batch_size, whatever B); measurements at the target resolution take over from the fit,
    linear in the batch; the GPU total adds the weights, the allocator margin and a CUDA context per process."""
    a, b = 0.3 * memory.GiB, 2e-5 * memory.GiB

    def point(resolution: int, batch: int, extra: float = 0.0) -> memory.Measured:
        value = {p: a + (1 if p == "eval" else batch) * b * resolution**2 + extra for p in memory.PHASES}
        return memory.Measured("s", resolution, batch, value, policy_weights=4e9, reward_weights=1.7e9)

    coefficients = memory.fit(point(256, 1), point(384, 1))
    for batch in (1, 2):
        errors = memory.relative_errors(memory.predict(coefficients, 512, batch), point(512, batch))
        assert all(e == pytest.approx(0, abs=1e-12) for e in errors.values())
    measured = {(512, 1): point(512, 1, extra=1e8), (512, 2): point(512, 2, extra=3e8)}  # the fit was off
    at_16 = memory.at_batch(measured, coefficients, 512, 16)
    assert at_16["learn"] == pytest.approx(point(512, 1).phases["learn"] + 1e8 + 15 * (b * 512**2 + 2e8))
    assert at_16["eval"] == pytest.approx(a + b * 512**2 + 1e8 + 15 * 2e8)
    recipe = memory.RECIPES[0]
    assert recipe.with_reward and "guidance" in recipe.phases
    two = memory.predict(coefficients, 512, 2)
    expected = 4e9 + 1.7e9 + two["guidance"] * (1 + memory.ALLOCATOR_MARGIN) + 2 * memory.CONTEXT_GIB * memory.GiB
    assert memory.gpu_total(point(256, 1), two, recipe) == pytest.approx(expected)
    assert memory.smallest_gpu(23.9e9) == "24 GB" and memory.smallest_gpu(81e9) == "> 80 GB"


@pytest.mark.slow
def test_memory_phases_run_and_the_guidance_graph_grows_with_the_batch():
    """Every phase runs through the real code on the tiny model (with the real-size aesthetic reward), and the
    guidance phase, which holds a graph per prompt, holds about twice as much at batch 2 as at batch 1."""
    setting = memory.SETTINGS["bf16 + checkpointing"]
    one, two = (in_spawned_process(memory.measure, setting, 64, batch, "tiny-sd", 1) for batch in (1, 2))
    assert set(one.phases) == set(memory.PHASES) and all(v > 0 for v in one.phases.values())
    assert 1.6 < two.phases["guidance"] / one.phases["guidance"] < 2.4
    assert one.reward_weights == pytest.approx(4 * (427.6e6 + 0.93e6), rel=0.01)  # CLIP-L and its head, float32


@pytest.mark.long
def test_memory_quick_mode_at_real_size_predicts_the_recipes(tmp_path):
    """``benchmarks/memory.py --quick`` end to end on SD v1.5's published architecture (written to a temp dir):
    every recipe gets a GPU total above its weights, and the fit's error at the check resolution is reported."""
    figures = tmp_path / "figures.json"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "memory.py"), "--quick", "--figures",
                           str(figures)], capture_output=True, text=True, timeout=1800, cwd=tmp_path,
                          env=os.environ | {"TMPDIR": str(tmp_path)})  # the 2 GB model folder goes in tmp_path
    assert proc.returncode == 0, proc.stderr[-3000:]
    by_name = {f.name: f.value for f in read_figures(figures)}
    total = by_name["TailorPO-G, one GPU with the reward server, bf16 + checkpointing (GB)"]
    assert 2.14 + 1.71 + 2 * memory.CONTEXT_GIB < total < 24  # weights + contexts + activations; fits 24 GB
    assert math.isfinite(by_name["fit error at 128 px (%)"])
    assert "What GPU a recipe needs at 512 px" in proc.stdout and "launch/dpo_sd15.yaml, B=16" in proc.stdout
