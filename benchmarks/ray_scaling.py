"""How the Ray runtime scales, and where a sampler's time goes. Prints, in one run:

- samples/s of the training loop with 1, 2, 4 sampler actors (on-policy) and the ratio to linear scaling,
  samples/s(n) / (n * samples/s(1)). Each actor is one logical Ray CPU with one thread; the machine's physical
  cores are printed next to it, because past that count actors share cores and the ratio must fall.
- the samplers' idle fraction (share of sampler time spent waiting for the learner) with 2 samplers, on-policy
  and with ``runtime.pipeline``.
- one rollout's time split: guided UNet forwards, VAE decodes, reward calls (the tiny aesthetic model served
  by a real ``tailorpo serve-reward`` process on loopback, called over gRPC), and the rest (DDIM math,
  guidance, ranking). These are the per-call costs the README's scaling estimate starts from.

The tiny model makes the UNet cheap relative to fixed costs (Python, gRPC, Ray transfers), so the ratios here
are a regression guard for the runtime's overheads, not a prediction of SD v1.5 on GPUs.

Usage: python benchmarks/ray_scaling.py [--config launch/tiny.yaml] [--iterations 4] [--samplers 1 2 4] [--quick]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from collections import defaultdict
from contextlib import contextmanager

import ray
import torch

from common import Figure, add_figures_argument, write_figures
from tailorpo.config import Config, load_config
from tailorpo.rewards.grpc_client import GrpcReward
from tailorpo.runtime.driver import train_on_ray
from tailorpo.runtime.reward_actors import RewardServerOwner
from tailorpo.training.build import build_policy, resolve_device, rollout_generator, seed_everything
from tailorpo.training.loop import collect_rollout
from tailorpo.training.run_log import RunSummary


def ray_run(config: str, overrides: list[str], samplers: int, iterations: int, pipeline: bool) -> RunSummary:
    """One training run on a fresh local Ray with one logical CPU per actor."""
    cfg = load_config(config, overrides)
    total = samplers * cfg.sampling.batch_size * iterations
    with tempfile.TemporaryDirectory() as out:
        cfg = load_config(config, [*overrides, f"runtime.samplers={samplers}", f"runtime.pipeline={pipeline}",
                                   "runtime.sampler.num_cpus=1", "runtime.learner.num_cpus=1",
                                   f"train.total_samples={total}", "eval.images_per_prompt=1", f"output_dir={out}"])
        ray.init(num_cpus=samplers + 1, include_dashboard=False, log_to_driver=False)
        try:
            return train_on_ray(cfg, progress=False)
        finally:
            ray.shutdown()


@contextmanager
def timed_calls(module: torch.nn.Module, seconds: dict[str, float], key: str):
    """Adds the wall time of every forward of ``module`` to ``seconds[key]`` (forward hooks)."""
    starts: list[float] = []
    handles = [
        module.register_forward_pre_hook(lambda *_: starts.append(time.perf_counter())),
        module.register_forward_hook(lambda *_: seconds.__setitem__(key, seconds[key] + time.perf_counter()
                                                                     - starts.pop())),
    ]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def rollout_time_split(cfg: Config, rollouts: int) -> dict[str, float]:
    """Seconds per rollout in the UNet, the VAE decoder, reward calls over gRPC, and the rest."""
    seed_everything(cfg.seed)
    policy = build_policy(cfg, resolve_device(cfg.device))
    owner = RewardServerOwner({"name": "aesthetic", "tiny": True})
    reward = GrpcReward([owner.address()])
    seconds: dict[str, float] = defaultdict(float)
    try:
        collect_rollout(cfg, policy, reward, cfg.prompts[: cfg.sampling.batch_size], rollout_generator(0, 0, 0))
        reward.seconds = 0.0  # the warm-up rollout is not timed
        with timed_calls(policy.unet, seconds, "unet"), timed_calls(policy.pipe.vae.decoder, seconds, "vae"):
            start = time.perf_counter()
            for i in range(rollouts):
                prompts = cfg.prompts[: cfg.sampling.batch_size]
                collect_rollout(cfg, policy, reward, prompts, rollout_generator(0, i + 1, 0))
            seconds["total"] = time.perf_counter() - start
        seconds["reward"] = reward.seconds
    finally:
        reward.close()
        owner.stop()
    seconds["other"] = seconds["total"] - seconds["unet"] - seconds["vae"] - seconds["reward"]
    return {k: v / rollouts for k, v in seconds.items()}


def headline(linear: dict[int, float], idle: dict[bool, float], split: dict[str, float]) -> list[Figure]:
    """Scaling against linear per sampler count, what pipelining saves in idle time, and the rollout's split."""
    cores = os.cpu_count()
    figures = [Figure(f"samples/s ratio to linear, {n} samplers", ratio,
                      f"1.00 is linear; falls once the actors outnumber the {cores} cores")
               for n, ratio in linear.items() if n > 1]
    figures += [Figure(f"sampler idle fraction, 2 samplers {'pipelined' if pipelined else 'on-policy'}",
                       fraction,
                       "below on-policy: samplers draw while the learner trains" if pipelined
                       else "~ 2L / (S + 2L): waiting while the learner trains on both rollouts")
                for pipelined, fraction in idle.items()]
    figures += [Figure("reward / UNet time in a rollout", split["reward"] / split["unet"],
                       "<< 1: reward calls over gRPC are not the sampler's bottleneck (tiny model ~0.2)")]
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="launch/tiny.yaml")
    parser.add_argument("--iterations", type=int, help="iterations per run, each sampler: one rollout "
                        "(default 4, --quick 2)")
    parser.add_argument("--samplers", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--quick", action="store_true", help="2 iterations per run, 1 timed rollout in the split")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    add_figures_argument(parser)
    args = parser.parse_args()
    iterations = args.iterations or (2 if args.quick else 4)
    cfg = load_config(args.config, args.overrides)

    print(f"physical CPU cores: {os.cpu_count()}; one logical Ray CPU and one thread per actor")
    print("\nsamplers  samples/s  ratio to linear  idle fraction  s/rollout sampling  s/rollout training")
    base, linear = None, {}
    for n in args.samplers:
        summary = ray_run(args.config, args.overrides, n, iterations, pipeline=False)
        base = base or summary.samples_per_second / n
        linear[n] = summary.samples_per_second / (n * base)
        print(f"{n:>8}  {summary.samples_per_second:>9.2f}  {linear[n]:>15.2f}  "
              f"{summary.sampler_idle_fraction:>13.2f}  {summary.sample_seconds_per_rollout:>18.2f}  "
              f"{summary.train_seconds_per_rollout:>18.2f}")

    print("\n2 samplers   samples/s  idle fraction")
    idle: dict[bool, float] = {}
    for pipeline in (False, True):
        summary = ray_run(args.config, args.overrides, 2, iterations, pipeline)
        idle[pipeline] = summary.sampler_idle_fraction
        print(f"{'pipelined' if pipeline else 'on-policy':<11}  {summary.samples_per_second:>9.2f}  "
              f"{summary.sampler_idle_fraction:>13.2f}")

    torch.set_num_threads(1)
    split = rollout_time_split(cfg, rollouts=1 if args.quick else 3)
    print(f"\none rollout ({cfg.algorithm.name}, batch {cfg.sampling.batch_size}, 1 thread): "
          f"{split['total']:.2f}s")
    for key in ("unet", "vae", "reward", "other"):
        print(f"  {key:<7} {split[key]:>7.3f}s  {split[key] / split['total']:>5.0%}")
    print(f"  reward / UNet time: {split['reward'] / split['unet']:.3f}")
    write_figures(args.figures, headline(linear, idle, split))


if __name__ == "__main__":
    main()
