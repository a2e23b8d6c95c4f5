"""The single controller of a Ray run: it owns the loop and moves data between the roles.

Per iteration: every sampler actor draws one rollout (its own prompts, the current LoRA version, the noise
stream of (seed, iteration, slot)); the learner trains on them in slot order and publishes the new LoRA
weights to the object store, from where the samplers fetch them. Rollouts and weights travel sampler ->
learner -> sampler through the object store; the driver only passes references and logs.
"""

from __future__ import annotations

import time

import ray
import torch

from tailorpo.checkpoint import Progress
from tailorpo.config import ActorResources, Config, ConfigError, RewardServerConfig
from tailorpo.runtime.reward_actors import RewardServerOwner
from tailorpo.runtime.workers import LearnerWorker, SamplerWorker
from tailorpo.trainer import RunLog, RunSummary, pick_prompts, prepare_output

SAMPLER_NAME = "tailorpo-sampler"


def actor_options(resources: ActorResources) -> dict:
    return {"num_cpus": resources.num_cpus, "num_gpus": resources.num_gpus, "resources": resources.resources}


def check_cluster_fits(cfg: Config) -> None:
    """Fail fast, naming the fields, when the cluster cannot place every actor (Ray would wait forever)."""
    available = ray.cluster_resources()
    n, sampler, learner = cfg.runtime.samplers, cfg.runtime.sampler, cfg.runtime.learner
    servers = [spec.resources for spec in cfg.reward.launch]
    needs = {
        "CPU": n * sampler.num_cpus + learner.num_cpus + sum(r.num_cpus for r in servers),
        "GPU": n * sampler.num_gpus + learner.num_gpus + sum(r.num_gpus for r in servers),
    }
    for name in {*sampler.resources, *learner.resources, *(k for r in servers for k in r.resources)}:
        needs[name] = (n * sampler.resources.get(name, 0) + learner.resources.get(name, 0)
                       + sum(r.resources.get(name, 0) for r in servers))
    short = {k: (v, available.get(k, 0)) for k, v in needs.items() if v > available.get(k, 0) + 1e-9}
    if short:
        detail = ", ".join(f"{k}: needs {v:g}, cluster has {have:g}" for k, (v, have) in short.items())
        raise ConfigError(
            f"runtime: {n} samplers + 1 learner + {len(servers)} launched reward servers do not fit the cluster "
            f"({detail}); lower runtime.samplers or runtime.sampler / runtime.learner / reward.launch resources, "
            "or add nodes"
        )


def train_on_ray(cfg: Config, progress: bool = True, resume: bool = False) -> RunSummary:
    """``tailorpo train`` with ``runtime.samplers > 0``: joins the cluster at ``runtime.address`` (or the
    job's cluster under ``ray job submit``) or starts a local Ray."""
    start = time.perf_counter()
    out = prepare_output(cfg)
    if not ray.is_initialized():
        ray.init(address=cfg.runtime.address, include_dashboard=False, log_to_driver=False)
    check_cluster_fits(cfg)
    owners, cfg = launch_reward_servers(cfg)
    payload = cfg.model_dump(mode="json")
    learner = ray.remote(LearnerWorker).options(**actor_options(cfg.runtime.learner)).remote(payload)
    samplers = [
        ray.remote(SamplerWorker)
        .options(**actor_options(cfg.runtime.sampler), max_restarts=cfg.runtime.max_restarts,
                 name=f"{SAMPLER_NAME}-{slot}")
        .remote(payload)
        for slot in range(cfg.runtime.samplers)
    ]
    try:
        return _drive(cfg, learner, samplers, out, progress, resume, start)
    finally:
        ray.get([owner.stop.remote() for owner in owners])
        for actor in [learner, *samplers, *owners]:
            ray.kill(actor)


def launch_reward_servers(cfg: Config) -> tuple[list, Config]:
    """Start ``reward.launch`` servers as actors, wait until each answers health, and return them with a
    config whose ``reward.servers`` lists their addresses (what the samplers and the learner connect to)."""
    if not cfg.reward.launch:
        return [], cfg
    owners = [
        ray.remote(RewardServerOwner).options(**actor_options(spec.resources), max_restarts=cfg.runtime.max_restarts)
        .remote(spec.model_dump(mode="json"))
        for spec in cfg.reward.launch
    ]
    addresses = ray.get([owner.address.remote() for owner in owners])
    if not all(ray.get([owner.serving.remote() for owner in owners])):
        raise RuntimeError(f"reward.launch: a server at {addresses} does not report SERVING")
    servers = [*cfg.reward.servers] + [
        RewardServerConfig(addresses=[address], weight=spec.weight) for address, spec in zip(addresses, cfg.reward.launch)
    ]
    reward = cfg.reward.model_copy(update={"servers": servers, "launch": []})
    return owners, cfg.model_copy(update={"reward": reward})


def draw_rollouts(
    cfg: Config, samplers: list, lora: ray.ObjectRef, version: int, prompts: list[list[str]], iteration: int
) -> list[ray.ObjectRef]:
    """One rollout per sampler. A sampler that dies mid-rollout is restarted by Ray (``max_restarts``) and
    its rollout redrawn from the same (seed, iteration, slot) noise stream: the same samples, none lost and
    none counted twice."""
    refs = [s.sample.remote(lora, version, prompts[slot], iteration, slot) for slot, s in enumerate(samplers)]
    for slot, sampler in enumerate(samplers):
        for attempt in range(cfg.runtime.max_restarts + 1):
            try:
                ray.get(refs[slot])
                break
            except ray.exceptions.RayActorError:
                if attempt == cfg.runtime.max_restarts:
                    raise
                refs[slot] = sampler.sample.remote(lora, version, prompts[slot], iteration, slot)
    return refs


def _drive(cfg: Config, learner, samplers: list, out, progress: bool, resume: bool, start: float) -> RunSummary:
    prompt_generator = torch.Generator().manual_seed(cfg.seed)
    state = Progress(samples=0, iteration=0)
    if resume:
        state, prompt_state = ray.get(learner.resume.remote())
        prompt_generator.set_state(prompt_state)
    lora = learner.lora_state.remote()
    version = state.iteration
    log = RunLog(cfg, out, progress, state.samples)
    while state.samples < cfg.train.total_samples:
        tick = time.perf_counter()
        prompts = [pick_prompts(cfg, prompt_generator) for _ in samplers]
        rollouts = draw_rollouts(cfg, samplers, lora, version, prompts, state.iteration)
        results, lora = learner.train.options(num_returns=2).remote(*rollouts)
        version += 1
        for images, stats in ray.get(results):
            log.record(images, stats | {"step_time": time.perf_counter() - tick})
        state = Progress(samples=log.samples, iteration=state.iteration + 1)
        learner.checkpoint_if_due.remote(state, prompt_generator.get_state())
    log.close()
    return ray.get(learner.finish.remote(log.samples, time.perf_counter() - start))
