"""Configs, reward models and the training runs the experiments share: every method trained per seed on the same
sample budget, finished runs reused, and ``reward.launch`` servers started as local processes."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from tailorpo.config import ALGORITHM_FACTS, Config, build_config, load_config, parse_override, set_dotted

if TYPE_CHECKING:
    from tailorpo.rewards import RewardModel

METHODS = ("ddpo", "d3po", "tailorpo", "tailorpo_g")  # Table 3's row order after the base model
LABELS = {"base": "base model", "ddpo": "DDPO", "d3po": "D3PO", "tailorpo": "TailorPO", "tailorpo_g": "TailorPO-G"}


def samples_per_update(cfg: Config) -> int:
    """Images sampled per optimizer update: D3PO and the pair objectives draw two images per prompt, TailorPO
    (one kept chain per prompt) and DDPO (``batch_size`` images) one per batch row; the run log counts images."""
    return cfg.sampling.batch_size * cfg.algorithm.facts.images_per_row * cfg.optim.gradient_accumulation_steps


def with_overrides(cfg: Config, overrides: list[str]) -> Config:
    """``cfg`` with ``a.b=value`` overrides applied and validated, as ``--set`` does on a file."""
    tree = cfg.model_dump(mode="json")
    for text in overrides:
        set_dotted(tree, *parse_override(text))
    return build_config(tree, "(paper_claims overrides)")


def reward_model(cfg: Config) -> RewardModel:
    """The config's reward (in process or a client of its servers) for measuring, whatever algorithm the config
    names: ``build_reward_model`` refuses TailorPO-G with a non-differentiable reward, which is for training."""
    from tailorpo.training.build import build_reward_model

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
    guided = [m for m in methods if ALGORITHM_FACTS[m].differentiable_reward]
    if guided and not reward_is_differentiable(cfg):
        print(f"skipping {', '.join(LABELS[m] for m in guided)}: the config's reward is not differentiable (they "
              "push the winner up the reward's gradient); use a differentiable reward to include them")
        return [m for m in methods if m not in guided]
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
    """Train each (method, seed), or reuse it (``train_or_reuse``)."""
    return {(method, seed): train_or_reuse(run_config(cfg, method, seed, samples, eval_every_samples, out),
                                           f"{method} seed {seed}")
            for method in methods for seed in seeds}


def train_or_reuse(run: Config, label: str) -> Path:
    """Train ``run`` into its output folder, unless a finished run of the same config is there already (so the
    pieces can be run one by one); a run left by another config is replaced. Returns the folder."""
    from tailorpo.training.loop import train

    folder = Path(run.output_dir)
    if (folder / "summary.json").exists() and same_run(load_config(folder / "config.yaml"), run):
        print(f"{label}: done before, reusing {folder}")
        return folder
    shutil.rmtree(folder, ignore_errors=True)  # stale events would mix into the curve
    summary = train(run, progress=False)
    print(summary.text().splitlines()[0].replace(summary.algorithm, label, 1))
    return folder


def cycled(prompts: list[str], count: int) -> list[str]:
    """``count`` prompts, the config's repeated in order (a measurement's sample size is its own setting)."""
    return [prompts[j % len(prompts)] for j in range(count)]


def chunks(count: int, size: int) -> list[range]:
    """Index ranges of at most ``size`` items covering ``count``: the batches a measurement runs in."""
    return [range(start, min(start + size, count)) for start in range(0, count, size)]
