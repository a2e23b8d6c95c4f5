"""The TailorPO paper's evidence, regenerated with this framework's own sampler, trainer and eval:

- Fig. 4, reward vs samples: every method trained per seed on the same sample budget, the fixed-noise eval
  reward read back from each run's TensorBoard log (steps are sample counts), mean and std across seeds.
- Fig. 2, order inconsistency: for pairs of independent base-model trajectories, how often the order of the
  step-wise rewards r(c, decode(x0_hat(x_{t-1}))) at a fine-tuned step disagrees with the order of the final
  rewards. Optionally, for two branches of ONE x_t, the x0_hat order against the order of each branch's
  expected final reward (the mean over K - 1 continuations), next to what one continuation's final reward
  (D3PO's ranking signal) gets: the paper's claim is that the step-wise reward estimates the expected one.
- Table 1, guidance: over noisy base-model samples x_{t-1}, the share with r_t(x^+) > r_t(x) and with
  r_t(x^-) < r_t(x) (Eq. 14, fixed eta_t and delta).
- Table 3, prompt generalization: each trained LoRA on held-out prompts, five images per prompt, the mean
  reward per method (mean and std across seeds) and its win rate over the base model on the same noise.
- Beyond the paper, where a LoRA acts: each trained LoRA switched on only at the fine-tuned steps, only at
  the other steps, or at all steps, every chain on the same noise, against the base model. A method trained
  on 5 of 20 steps still changes the other 15.

``experiments/paper_claims.py`` is the command line. The math (disagreement, success rates, seed bands) is in
the small pure functions at the top; everything else runs the package's pieces.
"""

from __future__ import annotations

import argparse
import csv
import json
import shutil
import time
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from tailorpo.config import (
    PAIR_ALGORITHMS,
    Config,
    ConfigError,
    EvalConfig,
    build_config,
    load_config,
    parse_override,
    set_dotted,
)
from tailorpo.training.evaluation import mean_std, win_rate

if TYPE_CHECKING:
    from tailorpo.diffusion.policy import DiffusionPolicy, PromptEmbeds
    from tailorpo.rewards import RewardModel

METHODS = ("ddpo", "d3po", "tailorpo", "tailorpo_g")  # Table 3's row order after the base model
LABELS = {"base": "base model", "ddpo": "DDPO", "d3po": "D3PO", "tailorpo": "TailorPO", "tailorpo_g": "TailorPO-G"}
PAPER_ETA, PAPER_DELTA = 0.2, 0.5  # Table 1's guidance settings (Sec. 3.4)
FILES = {  # piece -> the files it writes into --out; summary.md embeds them in this order
    "curves": ("fig4_reward_curves.png", "fig4_reward_curves.csv", "fig4_reward_curves.md"),
    "inconsistency": ("fig2_order_inconsistency.png", "fig2_order_inconsistency.csv", "fig2_order_inconsistency.md"),
    "guidance": ("table1_guidance.csv", "table1_guidance.md"),
    "generalization": ("table3_generalization.csv", "table3_generalization.md"),
    "lora-steps": ("lora_steps.csv", "lora_steps.md"),
}
LORA_STEP_SETS = ("fine-tuned steps only", "other steps only", "all steps")


# ---------------------------------------------------------------- the math: pure functions of tensors


def order_disagreement(
    step_a: torch.Tensor, step_b: torch.Tensor, final_a: torch.Tensor, final_b: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per step, the share of pairs (a, b) whose step-wise order disagrees with their final order.

    step_a, step_b: (S, N) step-wise rewards of the two samples of N pairs at S steps; final_a, final_b: (N,)
    or (S, N). A pair tied in either reward has no order and is left out. Returns (rates (S,), counted (S,));
    a step with nothing counted has rate NaN."""
    step_sign = torch.sign(step_a - step_b)  # (S, N)
    final_sign = torch.sign(final_a - final_b).expand_as(step_sign)
    counted = (step_sign != 0) & (final_sign != 0)
    disagree = counted & (step_sign != final_sign)
    return disagree.sum(1) / counted.sum(1), counted.sum(1)


def success_rates(r_x: torch.Tensor, r_plus: torch.Tensor, r_minus: torch.Tensor) -> tuple[float, float]:
    """Table 1: (share with r(x^+) > r(x), share with r(x^-) < r(x)) over samples (N,); strict, so an
    unmoved sample counts as a failure."""
    return float((r_plus > r_x).float().mean()), float((r_minus < r_x).float().mean())


def seed_band(curves: list[dict[int, float]]) -> tuple[list[int], torch.Tensor, torch.Tensor]:
    """Fig. 4's band: the sample counts every seed's curve has, and the mean and (population) std of the
    reward across seeds at each of them: (steps, mean (K,), std (K,))."""
    steps = sorted(set.intersection(*(set(c) for c in curves)))
    values = torch.tensor([[c[s] for c in curves] for s in steps], dtype=torch.float64)  # (K, seeds)
    mean, std = mean_std(values)
    return steps, mean, std


def samples_per_update(cfg: Config) -> int:
    """Images sampled per optimizer update: D3PO and the pair objectives draw two images per prompt, TailorPO
    (one kept chain per prompt) and DDPO (``batch_size`` images) one per batch row; the run log counts images."""
    images = cfg.sampling.batch_size * (2 if cfg.algorithm.name in ("d3po", *PAIR_ALGORITHMS) else 1)
    return images * cfg.optim.gradient_accumulation_steps


# ---------------------------------------------------------------- configs and training runs


def with_overrides(cfg: Config, overrides: list[str]) -> Config:
    """``cfg`` with ``a.b=value`` overrides applied and validated, as ``--set`` does on a file."""
    tree = cfg.model_dump(mode="json")
    for text in overrides:
        set_dotted(tree, *parse_override(text))
    return build_config(tree, "(paper_claims overrides)")


def reward_model(cfg: Config) -> RewardModel:
    """The config's reward (in process or a client of its servers) for measuring, whatever algorithm the config
    names: ``build_reward_model`` refuses TailorPO-G with a non-differentiable reward, which is for training."""
    from tailorpo.training.loop import build_reward_model

    return build_reward_model(with_overrides(cfg, ["algorithm.name=tailorpo"]))


def reward_is_differentiable(cfg: Config) -> bool:
    """Whether TailorPO-G and Table 1 can run: asks the configured servers (their Info) or the in-process
    reward's class."""
    from tailorpo.rewards import is_differentiable

    if not cfg.reward.servers:
        return is_differentiable(cfg.reward.name)
    reward = reward_model(cfg)
    try:
        return reward.differentiable
    finally:
        reward.close()


def runnable_methods(cfg: Config, methods: list[str]) -> list[str]:
    if "tailorpo_g" in methods and not reward_is_differentiable(cfg):
        print("skipping TailorPO-G: the config's reward is not differentiable (TailorPO-G pushes the winner up "
              "the reward's gradient); use a differentiable reward to include it")
        return [m for m in methods if m != "tailorpo_g"]
    return list(methods)


def run_config(cfg: Config, method: str, seed: int, samples: int, eval_every_samples: int, out: Path) -> Config:
    """One training run of the sweep: the same budget for every method, the eval reward logged every
    ``eval_every_samples`` images (``eval.every`` counts updates, whose size differs between methods)."""
    run = with_overrides(cfg, [f"algorithm.name={method}", f"seed={seed}", f"train.total_samples={samples}",
                               f"output_dir={out / 'runs' / method / f'seed{seed}'}", "runtime.samplers=0"])
    every = max(1, eval_every_samples // samples_per_update(run))
    return with_overrides(run, [f"eval.every={every}"])


def same_run(saved: Config, run: Config) -> bool:
    """Whether a finished run was trained with this config. Reward server addresses may differ: servers started
    for each invocation take new ports; the sweep's output folder, not an address, says which reward it is."""
    ignore = {"reward": {"servers"}}
    return saved.model_dump(exclude=ignore) == run.model_dump(exclude=ignore)


@contextmanager
def launched_rewards(cfg: Config) -> Iterator[Config]:
    """The config with its ``reward.launch`` servers (meant for a Ray job) started here as local processes, by
    the owner a Ray job uses, and listed in ``reward.servers``; they stop on exit."""
    if not cfg.reward.launch:
        yield cfg
        return
    from tailorpo.runtime.reward_actors import RewardServerOwner

    r = cfg.reward
    owners = []
    try:
        for spec in r.launch:
            owners.append(RewardServerOwner(spec.model_dump(), r.token_env, r.tls_ca, r.tls_client_cert,
                                            r.tls_client_key))
        servers = [s.model_dump() for s in r.servers]
        servers += [{"addresses": [owner.address()], "weight": spec.weight}
                    for owner, spec in zip(owners, r.launch, strict=True)]
        yield with_overrides(cfg, ["reward.launch=[]", "runtime.samplers=0", f"reward.servers={json.dumps(servers)}"])
    finally:
        for owner in owners:
            owner.stop()


def train_runs(cfg: Config, methods: list[str], seeds: list[int], samples: int, eval_every_samples: int,
               out: Path) -> dict[tuple[str, int], Path]:
    """Train each (method, seed), skipping runs already finished with the same config (so the pieces can be
    run one by one); a run left by another config is replaced."""
    from tailorpo.training.loop import train

    runs = {}
    for method in methods:
        for seed in seeds:
            run = run_config(cfg, method, seed, samples, eval_every_samples, out)
            folder = Path(run.output_dir)
            runs[method, seed] = folder
            if (folder / "summary.json").exists() and same_run(load_config(folder / "config.yaml"), run):
                print(f"{method} seed {seed}: done before, reusing {folder}")
                continue
            shutil.rmtree(folder, ignore_errors=True)  # stale events would mix into the curve
            summary = train(run, progress=False)
            print(summary.text().splitlines()[0].replace(summary.algorithm, f"{method} seed {seed}", 1))
    return runs


# ---------------------------------------------------------------- Fig. 4: reward curves


@dataclass
class CurvePoint:
    method: str
    reward: str
    samples: int
    mean: float
    std: float
    seeds: int


def read_curve(run_dir: Path) -> dict[int, float]:
    """Eval reward by sample count: the base model at 0 and the final eval (summary.json), and the periodic
    evals (TensorBoard ``eval/reward_mean``, whose steps are sample counts)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    summary = json.loads((run_dir / "summary.json").read_text())
    events = EventAccumulator(str(run_dir / "tensorboard")).Reload()
    curve = {0: summary["eval_reward_base"]}
    if "eval/reward_mean" in events.Tags()["scalars"]:
        curve |= {e.step: e.value for e in events.Scalars("eval/reward_mean")}
    return curve | {summary["samples"]: summary["eval_reward_trained"]}


def curve_points(runs: dict[tuple[str, int], Path]) -> list[CurvePoint]:
    """Each method's band across its seeds' runs (one reward: the sweep's)."""
    by_method = defaultdict(list)
    for (method, _), folder in runs.items():
        by_method[method].append(read_curve(folder))
    reward = json.loads((next(iter(runs.values())) / "summary.json").read_text())["reward"]
    points = []
    for method, curves in by_method.items():
        steps, mean, std = seed_band(curves)
        points += [CurvePoint(method, reward, s, float(m), float(d), len(curves))
                   for s, m, d in zip(steps, mean, std, strict=True)]
    return points


def plot_curves(points: list[CurvePoint], path: Path) -> None:
    """Fig. 4's shape: one panel per reward, a line per method with a mean +- std band across seeds."""
    plt = pyplot()
    rewards = sorted({p.reward for p in points})
    fig, axes = plt.subplots(1, len(rewards), figsize=(4.5 * len(rewards), 3.6), squeeze=False)
    for ax, reward in zip(axes[0], rewards, strict=True):
        for method in [m for m in METHODS if any(p.method == m and p.reward == reward for p in points)]:
            rows = [p for p in points if p.method == method and p.reward == reward]
            x = [p.samples for p in rows]
            mean, std = torch.tensor([p.mean for p in rows]), torch.tensor([p.std for p in rows])
            (line,) = ax.plot(x, mean, label=f"{LABELS[method]} ({rows[0].seeds} seeds)")
            ax.fill_between(x, mean - std, mean + std, color=line.get_color(), alpha=0.2)
        ax.set(xlabel="Number of samples", ylabel=f"eval reward ({reward})", title=reward)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def curves_markdown(points: list[CurvePoint]) -> str:
    lines = ["## Fig. 4: reward vs number of samples", "", "![reward curves](fig4_reward_curves.png)", "",
             "| method | reward | samples | mean | std (seeds) | seeds |", "|---|---|---:|---:|---:|---:|"]
    for method in METHODS:
        rows = [p for p in points if p.method == method]
        if rows:
            first, last = rows[0], rows[-1]
            for p in (first, last):
                lines.append(f"| {LABELS[method]} | {p.reward} | {p.samples} | {p.mean:.4f} | {p.std:.4f} | "
                             f"{p.seeds} |")
    return "\n".join(lines)


# ---------------------------------------------------------------- Fig. 2: order inconsistency


@torch.no_grad()
def step_rewards(policy: DiffusionPolicy, reward: RewardModel, step_index: int, x_prev: torch.Tensor,
                 embeds: PromptEmbeds, prompts: list[str]) -> torch.Tensor:
    """r_t(c, x_{t-1}) = r(c, decode(x0_hat(x_{t-1}))) (Eq. 12) for samples produced by step ``step_index``,
    without gradients, so any reward works (the sampler's ``step_reward_fn`` needs a differentiable one)."""
    last = step_index + 1 == policy.num_steps
    eps = None if last else policy.eps(x_prev, step_index + 1, embeds)
    return reward.score(policy.decode(policy.predict_x0_after(step_index, x_prev, eps)), prompts).scores.cpu()


@torch.no_grad()
def denoise(policy: DiffusionPolicy, x: torch.Tensor, embeds: PromptEmbeds, generator: torch.Generator, start: int,
            stop: int | None = None, lora_at: set[int] | None = None) -> torch.Tensor:
    """Run the DDIM chain from x (the input of step index ``start``) up to step index ``stop`` (default: x_0);
    with ``lora_at``, the UNet's LoRA is on only at those step indices (the base model at the others)."""
    from tailorpo.diffusion.lora import reference_model

    for i in range(start, policy.num_steps if stop is None else stop):
        with nullcontext() if lora_at is None or i in lora_at else reference_model(policy.unet):
            eps = policy.eps(x, i, embeds)
        x = policy.step(i, eps, x, noise=policy.noise(x.shape, generator)).prev_sample
    return x


def cycled(prompts: list[str], count: int) -> list[str]:
    return [prompts[j % len(prompts)] for j in range(count)]


def chunks(count: int, size: int) -> list[range]:
    return [range(start, min(start + size, count)) for start in range(0, count, size)]


@torch.no_grad()
def trajectory_pair_rewards(policy: DiffusionPolicy, reward: RewardModel, prompts: list[str],
                            generator: torch.Generator, fine_tuned_steps: list[int]) -> tuple[torch.Tensor, ...]:
    """Two independent chains per prompt: the step-wise rewards of each at the fine-tuned steps (k descending),
    (S, B) twice, and their final rewards, (B,) twice."""
    from tailorpo.algorithms.rollouts import trajectory_rollout

    batch = prompts * 2
    embeds = policy.encode_prompts(batch)
    traj = trajectory_rollout(policy, embeds, generator, fine_tuned_steps)
    steps = torch.stack([step_rewards(policy, reward, int(s["step"][0]), s["x_next"], embeds, batch)
                         for s in traj.steps])  # (S, 2B): rows i and B + i are prompt i's pair
    final = reward.score(traj.images, batch).scores.cpu()
    return (*steps.chunk(2, dim=1), *final.chunk(2))


@torch.no_grad()
def branch_pair_rewards(policy: DiffusionPolicy, reward: RewardModel, prompts: list[str], generator: torch.Generator,
                        k: int, continuations: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Two children of ONE x_k per prompt (TailorPO's branches): their step-wise rewards (2, B) and the final
    rewards of ``continuations`` independent chains from each child (K, 2, B)."""
    from tailorpo.algorithms.branching import sample_children

    i, batch = policy.num_steps - k, len(prompts)
    embeds = policy.encode_prompts(prompts)
    x = denoise(policy, policy.initial_latents(batch, generator), embeds, generator, 0, i)  # x_k
    children = sample_children(policy, i, policy.eps(x, i, embeds), x, generator).flatten(0, 1)  # (2B, C, h, w)
    step = step_rewards(policy, reward, i, children, embeds.repeat(2), prompts * 2).view(2, batch)
    repeats = 2 * continuations
    finals = denoise(policy, children.repeat(continuations, 1, 1, 1), embeds.repeat(repeats), generator, i + 1)
    final = reward.score(policy.decode(finals), prompts * repeats).scores.cpu().view(continuations, 2, batch)
    return step, final


@dataclass
class InconsistencyRow:
    reward: str
    step: int  # k: the fine-tuned step x_k -> x_{k-1}
    comparison: str
    pairs: int  # pairs with an order in both rankings
    disagreement: float


COMPARISONS = {
    "trajectories": "independent trajectories: x0_hat order vs final order",
    "branches_x0_hat": "branches of one x_t: x0_hat order vs expected final order",
    "branches_one_final": "branches of one x_t: one continuation's final order vs expected final order",
}


def order_inconsistency(cfg: Config, pairs: int, continuations: int, branch_pairs: int) -> list[InconsistencyRow]:
    """Fig. 2 on the base model (see the module docstring); ``continuations`` < 2 skips the branch part."""
    from tailorpo.diffusion.lora import reference_model
    from tailorpo.training.loop import build_policy, resolve_device

    reward = reward_model(cfg)
    policy = build_policy(cfg, resolve_device(cfg.device))
    generator = torch.Generator().manual_seed(cfg.seed)
    steps_k = sorted(cfg.algorithm.fine_tuned_steps, reverse=True)
    size = cfg.eval.batch_size
    rows = []
    try:
        with reference_model(policy.unet):
            prompts = cycled(cfg.prompts, pairs)
            parts = [trajectory_pair_rewards(policy, reward, prompts[c.start:c.stop], generator, steps_k)
                     for c in chunks(pairs, size)]
            a_step, b_step, a_final, b_final = (torch.cat(p, dim=-1) for p in zip(*parts, strict=True))
            rates, counted = order_disagreement(a_step, b_step, a_final, b_final)
            rows += [InconsistencyRow(reward.name, k, "trajectories", int(n), float(r))
                     for k, r, n in zip(steps_k, rates, counted, strict=True)]
            if continuations >= 2:
                prompts = cycled(cfg.prompts, branch_pairs)
                per_chunk = max(1, size // continuations)  # 2 x continuations chains per pair: keep batches ~2 size
                for k in steps_k:
                    step, final = zip(*[branch_pair_rewards(policy, reward, prompts[c.start:c.stop], generator, k,
                                                            continuations) for c in chunks(branch_pairs, per_chunk)],
                                      strict=True)
                    step, final = torch.cat(step, 1), torch.cat(final, 2)  # (2, N), (K, 2, N)
                    expected = final[1:].mean(0)  # (2, N): held out from the single continuation below
                    for name, ranking in (("branches_x0_hat", step), ("branches_one_final", final[0])):
                        rate, n = order_disagreement(ranking[:1], ranking[1:], expected[0], expected[1])
                        rows.append(InconsistencyRow(reward.name, k, name, int(n), float(rate)))
    finally:
        reward.close()
    return rows


def plot_inconsistency(rows: list[InconsistencyRow], path: Path) -> None:
    """Fig. 2's shape: disagreement rate per fine-tuned step, one bar per comparison."""
    plt = pyplot()
    steps = sorted({r.step for r in rows}, reverse=True)
    names = [c for c in COMPARISONS if any(r.comparison == c for r in rows)]
    fig, ax = plt.subplots(figsize=(7, 4.4))
    width = 0.8 / len(names)
    for j, name in enumerate(names):
        rate = {r.step: r.disagreement for r in rows if r.comparison == name}
        ax.bar([s + (j - (len(names) - 1) / 2) * width for s in range(len(steps))],
               [rate.get(k, float("nan")) for k in steps], width, label=COMPARISONS[name])
    ax.set_xticks(range(len(steps)), [f"k={k}" for k in steps])
    ax.set(xlabel="fine-tuned step (x_k -> x_{k-1})", ylabel="order disagreement rate",
           title=f"order inconsistency ({rows[0].reward})")
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.18))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def inconsistency_markdown(rows: list[InconsistencyRow], pairs: int, continuations: int, branch_pairs: int) -> str:
    steps = sorted({r.step for r in rows}, reverse=True)
    names = [c for c in COMPARISONS if any(r.comparison == c for r in rows)]
    table = {(r.comparison, r.step): r for r in rows}
    lines = ["## Fig. 2: order inconsistency of intermediate vs final rankings", "",
             "![order inconsistency](fig2_order_inconsistency.png)", "",
             f"Base model, reward `{rows[0].reward}`; {pairs} trajectory pairs"
             + (f"; {branch_pairs} branch pairs per step, {continuations} continuations of each branch (expected "
                f"= mean of the last {continuations - 1})" if "branches_x0_hat" in names else "")
             + ". Disagreement rate (pairs counted):",
             "", "| comparison | " + " | ".join(f"k={k}" for k in steps) + " |",
             "|---|" + "---:|" * len(steps)]
    for name in names:
        cells = [table[name, k] for k in steps]
        lines.append(f"| {COMPARISONS[name]} | " + " | ".join(f"{c.disagreement:.2f} ({c.pairs})" for c in cells)
                     + " |")
    return "\n".join(lines)


# ---------------------------------------------------------------- Table 1: guidance success rates


@dataclass
class GuidanceRow:
    reward: str
    step: str  # "k=20", ..., or "all"
    eta: float
    delta: float
    samples: int
    raised: float  # share with r_t(x^+) > r_t(x)
    lowered: float  # share with r_t(x^-) < r_t(x)
    mean_gain_plus: float  # mean r_t(x^+) - r_t(x)
    mean_gain_minus: float  # mean r_t(x^-) - r_t(x)
    final_raised: float  # the same for the final images of x, x^+, x^- continued on shared noise
    final_lowered: float
    mean_final_gain_plus: float
    mean_final_gain_minus: float


def guidance_success(cfg: Config, noisy_samples: int, eta: float, delta: float) -> list[GuidanceRow]:
    """Table 1: noisy base-model samples x_{t-1} at each fine-tuned step (``noisy_samples`` in all), moved to
    x^+ and x^- by the package's guidance (reward differentiated through the UNet at t-1, the VAE decoder and
    the reward), batched as training batches them (``sampling.batch_size``). Beyond the paper: x, x^+ and x^-
    are each denoised to an image on the same noise, so the final rewards show whether raising r(x0_hat)
    raises the reward of the image the chain ends in."""
    from tailorpo.algorithms.branching import step_reward_fn
    from tailorpo.core.guidance import guide
    from tailorpo.diffusion.lora import reference_model
    from tailorpo.algorithms.rollouts import trajectory_rollout
    from tailorpo.training.loop import build_policy, resolve_device

    reward = reward_model(cfg)
    policy = build_policy(cfg, resolve_device(cfg.device))
    generator = torch.Generator().manual_seed(cfg.seed)
    steps_k = sorted(cfg.algorithm.fine_tuned_steps, reverse=True)
    per_step = max(1, noisy_samples // len(steps_k))
    prompts = cycled(cfg.prompts, per_step)
    results: dict[int, list[torch.Tensor]] = {}
    try:
        with reference_model(policy.unet):
            for k in steps_k:
                i, r_x, r_plus, r_minus, finals = policy.num_steps - k, [], [], [], []
                for c in chunks(per_step, cfg.sampling.batch_size):
                    batch = prompts[c.start:c.stop]
                    embeds = policy.encode_prompts(batch)
                    x = trajectory_rollout(policy, embeds, generator, [k]).steps[0]["x_next"]  # noisy x_{t-1}
                    r_t = step_reward_fn(policy, reward, i, embeds, batch)
                    x_plus, r = guide(x, r_t, eta, delta, increase=True)
                    x_minus, _ = guide(x, r_t, eta, delta, increase=False)
                    with torch.no_grad():
                        r_x.append(r.cpu())
                        r_plus.append(r_t(x_plus).cpu())
                        r_minus.append(r_t(x_minus).cpu())
                        finals.append(final_rewards_on_shared_noise(policy, reward, [x, x_plus, x_minus], embeds,
                                                                    batch, generator, i + 1))
                results[k] = [torch.cat(r_x), torch.cat(r_plus), torch.cat(r_minus),
                              *(torch.cat(f) for f in zip(*finals, strict=True))]
    finally:
        reward.close()
    groups = [(f"k={k}", results[k]) for k in steps_k]
    groups.append(("all", [torch.cat([results[k][j] for k in steps_k]) for j in range(6)]))
    return [GuidanceRow(reward.name, name, eta, delta, len(r[0]), *guidance_figures(*r[:3]), *guidance_figures(*r[3:]))
            for name, r in groups]


def guidance_figures(r_x: torch.Tensor, r_plus: torch.Tensor, r_minus: torch.Tensor) -> tuple[float, ...]:
    """(raised share, lowered share, mean gain of x^+, mean gain of x^-) over samples (N,)."""
    return (*success_rates(r_x, r_plus, r_minus), float((r_plus - r_x).mean()), float((r_minus - r_x).mean()))


@torch.no_grad()
def final_rewards_on_shared_noise(policy: DiffusionPolicy, reward: RewardModel, starts: list[torch.Tensor],
                                  embeds: PromptEmbeds, prompts: list[str], generator: torch.Generator,
                                  start: int) -> list[torch.Tensor]:
    """The final-image reward of each batch in ``starts`` (inputs of step index ``start``), all denoised with
    the same noise draws, so their differences come from the starting points alone."""
    state, finals = generator.get_state(), []
    for x in starts:
        generator.set_state(state)
        finals.append(reward.score(policy.decode(denoise(policy, x, embeds, generator, start)), prompts).scores.cpu())
    return finals


def guidance_markdown(rows: list[GuidanceRow]) -> str:
    r = rows[0]
    lines = ["## Table 1: gradient guidance on noisy samples", "",
             f"Base model, reward `{r.reward}`, eta_t = {r.eta:g}, delta = {r.delta:g}; r_t = r(decode(x0_hat(x))) "
             "differentiated through the UNet at t-1, the VAE decoder and the reward. Step-wise: r_t of x+ / x- "
             "against x (the paper's Table 1). Final: the reward of the image that x+ / x- ends in against x's, "
             "all three denoised on the same noise.", "",
             "| step | samples | r_t(x+) > r_t(x) | r_t(x-) < r_t(x) | mean r_t(x+) - r_t(x) | mean r_t(x-) - r_t(x) "
             "| final: x+ > x | final: x- < x | mean final gain x+ | mean final gain x- |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    lines += [f"| {r.step} | {r.samples} | {r.raised:.0%} | {r.lowered:.0%} | {r.mean_gain_plus:+.4f} | "
              f"{r.mean_gain_minus:+.4f} | {r.final_raised:.0%} | {r.final_lowered:.0%} | "
              f"{r.mean_final_gain_plus:+.4f} | {r.mean_final_gain_minus:+.4f} |" for r in rows]
    return "\n".join(lines)


# ---------------------------------------------------------------- Table 3: prompt generalization


@dataclass
class GeneralizationRow:
    method: str  # "base" or an algorithm name
    reward: str
    prompts: int
    images: int  # per model
    seeds: int  # LoRAs averaged (0 for the base model)
    mean: float  # mean reward over all images, averaged over seeds
    std: float  # std of that mean across seeds
    win_rate: float  # share of images beating the base model's twin (same noise), ties 1/2, mean over seeds


def held_out_prompts(cfg: Config, spec: str) -> list[str]:
    """``eval``: the config's eval prompts; ``shapes``: the tiny-shapes captions never seen in pretraining;
    anything else: a text file with one prompt per line."""
    from tailorpo.prompts import SHAPE_HELD_OUT

    if spec == "eval":
        return list(cfg.eval.prompts)
    if spec == "shapes":
        return list(SHAPE_HELD_OUT)
    path = Path(spec)
    if not path.is_file():
        raise ConfigError(f"--held-out {spec!r}: not 'eval', 'shapes' or a prompt file")
    return [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def generalization(cfg: Config, runs: dict[tuple[str, int], Path], prompts: list[str],
                   images_per_prompt: int) -> list[GeneralizationRow]:
    """Every run's LoRA and the base model on ``prompts`` with the same noise per (prompt, image): the base
    model once, each LoRA loaded into the same pipeline in turn (``trainer.evaluate``, as ``tailorpo eval``)."""
    from tailorpo.diffusion.lora import load_lora, read_lora, reference_model
    from tailorpo.training.loop import build_policy, evaluate, resolve_device

    settings = EvalConfig(**(cfg.eval.model_dump() | {"prompts": prompts, "images_per_prompt": images_per_prompt,
                                                      "every": 0}))
    reward = reward_model(cfg)
    policy = build_policy(cfg, resolve_device(cfg.device))
    try:
        with reference_model(policy.unet):
            base = evaluate(policy, reward, settings).scores
        by_method: dict[str, list[dict[str, torch.Tensor]]] = defaultdict(list)
        for (method, _), folder in runs.items():
            load_lora(policy.unet, read_lora(folder / "lora"))
            by_method[method].append(evaluate(policy, reward, settings).scores)
    finally:
        reward.close()
    images = len(prompts) * images_per_prompt
    rows = [GeneralizationRow("base", name, len(prompts), images, 0, float(s.mean()), 0.0, 0.5)
            for name, s in base.items()]
    for method in [m for m in METHODS if m in by_method]:
        for name, base_scores in base.items():
            seed_means = torch.stack([s[name].mean() for s in by_method[method]])
            wins = torch.stack([win_rate(s[name], base_scores) for s in by_method[method]])
            mean, std = mean_std(seed_means)
            rows.append(GeneralizationRow(method, name, len(prompts), images, len(seed_means), float(mean),
                                          float(std), float(wins.mean())))
    return rows


def generalization_markdown(rows: list[GeneralizationRow]) -> str:
    """Table 3's layout: a row per model, a column per reward; mean +- std across seeds (LoRA win rate)."""
    rewards = list(dict.fromkeys(r.reward for r in rows))
    cell = {(r.method, r.reward): r for r in rows}
    first = rows[0]
    lines = ["## Table 3: prompt generalization (held-out prompts)", "",
             f"{first.prompts} held-out prompts x {first.images // first.prompts} images, each model on the same "
             "noise; mean reward of all images, mean +- std across seeds (win rate of the LoRA's image over the "
             "base model's twin).", "",
             "| model | " + " | ".join(rewards) + " |", "|---|" + "---:|" * len(rewards)]
    for method in ["base", *METHODS]:
        if not any((method, reward) in cell for reward in rewards):
            continue
        cells = []
        for reward in rewards:
            r = cell.get((method, reward))
            cells.append("n/a" if r is None else f"{r.mean:.4f}" if method == "base"
                         else f"{r.mean:.4f} ± {r.std:.4f} ({r.win_rate:.0%})")
        lines.append(f"| {LABELS[method]} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


# ---------------------------------------------------------------- beyond the paper: where a LoRA acts


@torch.no_grad()
def final_rewards_with_lora_at(policy: DiffusionPolicy, reward: RewardModel, prompts: list[str], active: set[int],
                               seed: int, batch_size: int) -> torch.Tensor:
    """Final-image rewards (N,) of plain DDIM chains whose UNet has its LoRA on only at step indices ``active``
    (the base model elsewhere); batch j draws its noise from seed + j, so any two calls pair image by image."""
    scores = []
    for j, c in enumerate(chunks(len(prompts), batch_size)):
        batch = prompts[c.start:c.stop]
        embeds, generator = policy.encode_prompts(batch), torch.Generator().manual_seed(seed + j)
        x = denoise(policy, policy.initial_latents(len(batch), generator), embeds, generator, 0, lora_at=active)
        scores.append(reward.score(policy.decode(x), batch).scores.cpu())
    return torch.cat(scores)


@dataclass
class LoraStepsRow:
    method: str
    reward: str
    active: str  # one of LORA_STEP_SETS
    images: int
    seeds: int
    gain: float  # mean over seeds of (mean LoRA reward - mean base reward)
    gain_std: float  # across seeds
    win_rate: float  # mean over seeds, paired with the base model's image


def lora_steps(cfg: Config, runs: dict[tuple[str, int], Path], prompts: list[str],
               images_per_prompt: int) -> list[LoraStepsRow]:
    """Each run's LoRA at the fine-tuned steps only, the other steps only, and all steps, against the base
    model on the same noise (the training prompts, ``images_per_prompt`` each)."""
    from tailorpo.diffusion.lora import load_lora, read_lora
    from tailorpo.training.loop import build_policy, resolve_device

    reward, batch = reward_model(cfg), [p for p in prompts for _ in range(images_per_prompt)]
    policy = build_policy(cfg, resolve_device(cfg.device))
    steps = set(range(policy.num_steps))
    fine = {policy.num_steps - k for k in cfg.algorithm.fine_tuned_steps}
    step_sets = dict(zip(LORA_STEP_SETS, (fine, steps - fine, steps), strict=True))

    def rewards(active: set[int]) -> torch.Tensor:
        return final_rewards_with_lora_at(policy, reward, batch, active, cfg.eval.seed, cfg.eval.batch_size)

    try:
        base = rewards(set())
        results: dict[tuple[str, str], list[torch.Tensor]] = defaultdict(list)
        for (method, _), folder in runs.items():
            load_lora(policy.unet, read_lora(folder / "lora"))
            for name, active in step_sets.items():
                results[method, name].append(rewards(active))
    finally:
        reward.close()
    rows = []
    for (method, name), per_seed in results.items():
        gain_mean, gain_std = mean_std(torch.stack([s.mean() - base.mean() for s in per_seed]))
        wins = torch.stack([win_rate(s, base) for s in per_seed]).mean()
        rows.append(LoraStepsRow(method, reward.name, name, len(batch), len(per_seed), float(gain_mean),
                                 float(gain_std), float(wins)))
    return rows


def lora_steps_markdown(rows: list[LoraStepsRow]) -> str:
    first = rows[0]
    lines = ["## Where the LoRA acts: fine-tuned steps, other steps, all steps", "",
             f"Reward `{first.reward}` of final images, {first.images} images on the training prompts, every chain on "
             "the same noise; the change against the base model (mean +- std across seeds) and the LoRA's win rate "
             "over the base model's image.", "",
             "| method | " + " | ".join(LORA_STEP_SETS) + " |", "|---|" + "---:|" * len(LORA_STEP_SETS)]
    cell = {(r.method, r.active): r for r in rows}
    for method in [m for m in METHODS if any(r.method == m for r in rows)]:
        cells = [f"{c.gain:+.4f} ± {c.gain_std:.4f} ({c.win_rate:.0%})"
                 for c in (cell[method, name] for name in LORA_STEP_SETS)]
        lines.append(f"| {LABELS[method]} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


# ---------------------------------------------------------------- files


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


# ---------------------------------------------------------------- command line


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="paper_claims", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("piece", choices=[*FILES, "all", "merge"],
                        help="one figure/table, all of them (plus summary.md), or merge the CSVs of --from dirs")
    parser.add_argument("--config", default="launch/tiny.yaml", help="training YAML (default launch/tiny.yaml)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config field (repeatable), as tailorpo train --set")
    parser.add_argument("--out", default="outputs/paper_claims", help="output folder (runs go to OUT/runs)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--samples", type=int, help="training budget per run (default: train.total_samples)")
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--eval-every-samples", type=int,
                        help="eval reward every N sampled images during training (default: samples / 8)")
    parser.add_argument("--pairs", type=int, default=100, help="Fig. 2: trajectory pairs")
    parser.add_argument("--continuations", type=int, default=4,
                        help="Fig. 2: chains continued from each branch (< 2 skips the branch comparison)")
    parser.add_argument("--branch-pairs", type=int, default=64,
                        help="Fig. 2: branch pairs per fine-tuned step (64: a rate's standard error <= 0.06)")
    parser.add_argument("--noisy-samples", type=int, default=100, help="Table 1: noisy samples over all steps")
    parser.add_argument("--eta", type=float, default=PAPER_ETA, help="Table 1: eta_t")
    parser.add_argument("--delta", type=float, default=PAPER_DELTA, help="Table 1: r_high = r + delta")
    parser.add_argument("--held-out", default="eval",
                        help="Table 3 prompts: 'eval' (the config's eval prompts), 'shapes', or a prompt file")
    parser.add_argument("--images-per-prompt", type=int, default=5, help="Table 3: images per prompt (paper: 5)")
    parser.add_argument("--lora-steps-images", type=int, default=2,
                        help="lora-steps: images per training prompt, for each LoRA and each set of steps")
    parser.add_argument("--from", dest="sources", nargs="+", default=[], help="merge: output folders to combine")
    return parser.parse_args(argv)


def run_piece(piece: str, cfg: Config, args: argparse.Namespace, out: Path) -> float:
    """Run one piece and write its files into ``out`` (a skipped piece: only its markdown, saying why);
    returns its seconds."""
    from tailorpo.training.loop import resolve_device

    tick = time.perf_counter()
    samples = args.samples or cfg.train.total_samples
    every = args.eval_every_samples or max(1, samples // 8)
    if piece in ("curves", "generalization", "lora-steps"):
        runs = train_runs(cfg, runnable_methods(cfg, args.methods), args.seeds, samples, every, out)
    written = FILES[piece]
    if piece == "curves":
        points = curve_points(runs)
        write_csv(out / FILES[piece][1], points)
        plot_curves(points, out / FILES[piece][0])
        text = curves_markdown(points)
    elif piece == "inconsistency":
        rows = order_inconsistency(cfg, args.pairs, args.continuations, args.branch_pairs)
        write_csv(out / FILES[piece][1], rows)
        plot_inconsistency(rows, out / FILES[piece][0])
        text = inconsistency_markdown(rows, args.pairs, args.continuations, args.branch_pairs)
    elif piece == "guidance" and not reward_is_differentiable(cfg):
        text = ("## Table 1: gradient guidance on noisy samples\n\nSkipped: the reward is not differentiable, so "
                "there is no gradient to guide by.")
        print("skipping Table 1: the config's reward is not differentiable")
        written = FILES[piece][-1:]
    elif piece == "guidance":
        rows = guidance_success(cfg, args.noisy_samples, args.eta, args.delta)
        write_csv(out / FILES[piece][0], rows)
        text = guidance_markdown(rows)
    elif piece == "lora-steps":
        rows = lora_steps(cfg, runs, cfg.prompts, args.lora_steps_images)
        write_csv(out / FILES[piece][0], rows)
        text = lora_steps_markdown(rows)
    else:
        rows = generalization(cfg, runs, held_out_prompts(cfg, args.held_out), args.images_per_prompt)
        write_csv(out / FILES[piece][0], rows)
        text = generalization_markdown(rows)
    seconds = time.perf_counter() - tick
    device = resolve_device(cfg.device).type
    (out / FILES[piece][-1]).write_text(f"{text}\n\n_{piece}: {seconds / 60:.1f} min on {device}._\n")
    print(f"{piece}: wrote {', '.join(written)} to {out} in {seconds:.0f}s")
    return seconds


def merge(out: Path, sources: list[Path]) -> None:
    """One Fig. 4 (a panel per reward) and one Table 3 (a column per reward) from per-reward output folders."""
    points = [p for s in sources if (s / FILES["curves"][1]).exists()
              for p in read_csv(s / FILES["curves"][1], CurvePoint)]
    if points:
        write_csv(out / FILES["curves"][1], points)
        plot_curves(points, out / FILES["curves"][0])
        (out / FILES["curves"][-1]).write_text(curves_markdown(points) + "\n")
    rows = [r for s in sources if (s / FILES["generalization"][0]).exists()
            for r in read_csv(s / FILES["generalization"][0], GeneralizationRow)]
    if rows:
        write_csv(out / FILES["generalization"][0], rows)
        (out / FILES["generalization"][-1]).write_text(generalization_markdown(rows) + "\n")
    print(f"merged {len(points)} curve points and {len(rows)} table rows from {len(sources)} folders into {out}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.piece == "merge":
        merge(out, [Path(s) for s in args.sources])
        return 0
    pieces = list(FILES) if args.piece == "all" else [args.piece]
    with launched_rewards(load_config(args.config, args.overrides)) as cfg:
        seconds = {piece: run_piece(piece, cfg, args, out) for piece in pieces}
    if args.piece == "all":
        header = (f"# Paper claims: `{args.config}` {' '.join(f'--set {o}' for o in args.overrides)}\n\n"
                  f"Seeds {args.seeds}, {args.samples or cfg.train.total_samples} samples per run. Wall time: "
                  + ", ".join(f"{p} {s / 60:.1f} min" for p, s in seconds.items()) + ".")
        print(f"wrote {write_summary(out, header)}")
    timings = out / "timings.json"  # seconds per piece, kept across separate invocations
    previous = json.loads(timings.read_text()) if timings.exists() else {}
    timings.write_text(json.dumps(previous | seconds, indent=2))
    return 0

