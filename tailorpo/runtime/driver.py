"""The single controller of a Ray run: it owns the loop and moves data between the roles.

Per iteration: every sampler actor draws one rollout (its own prompts, the current LoRA version, the noise
stream of (seed, iteration, slot)); the learner trains on them in slot order and publishes the new LoRA
weights to the object store, from where the samplers fetch them. Rollouts and weights travel sampler ->
learner -> sampler through the object store; the driver only passes references and logs.

With ``runtime.pipeline`` the samplers start the next batch as soon as the learner has this one, with the
LoRA the learner is updating (one version stale), so they do not idle while it trains.

Faults: a sampler that dies is restarted by Ray and its rollout redrawn from the same noise stream; a learner
that dies, or an object lost with a node (LoRA weights, a finished rollout), makes the driver start a new
learner from the newest checkpoint and replay the iterations after it. Either way ``ledger.jsonl`` lists each
sample once. A lost node is both at once: its actors are rebuilt on the remaining nodes.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import ray
import torch

from tailorpo.config import ActorResources, Config, ConfigError, RewardServerConfig
from tailorpo.runtime.reward_actors import RewardServerOwner
from tailorpo.runtime.workers import LearnerWorker, SamplerWorker
from tailorpo.training.checkpoint import Progress
from tailorpo.training.loop import pick_prompts, prepare_output
from tailorpo.training.run_log import RunLog, RunSummary

SAMPLER_NAME = "tailorpo-sampler"
LEARNER_NAME = "tailorpo-learner"
REWARD_NAME = "tailorpo-reward"


class LearnerDied(RuntimeError):
    """The learner actor is gone, or an object the loop needs (LoRA weights, a rollout) was lost with the node
    that held it; either way the driver replaces the learner from the newest checkpoint and replays from there."""


LOST = (ray.exceptions.RayActorError, ray.exceptions.ObjectLostError)  # a task's error is also its cause's type


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
    samplers = [
        ray.remote(SamplerWorker)
        .options(**actor_options(cfg.runtime.sampler), max_restarts=cfg.runtime.max_restarts,
                 name=f"{SAMPLER_NAME}-{slot}")
        .remote(cfg.model_dump(mode="json"))
        for slot in range(cfg.runtime.samplers)
    ]
    driver = Driver(cfg, samplers, out, progress)
    try:
        ray.get([actor.__ray_ready__.remote() for actor in [driver.learner, *samplers]])  # models loaded: the
        # loop's clock (samples/s, idle fraction) starts here, and a model that cannot load fails here
        return driver.run(resume, start)
    finally:
        ray.get([owner.stop.remote() for owner in owners])
        for actor in [driver.learner, *samplers, *owners]:
            ray.kill(actor)


def launch_reward_servers(cfg: Config) -> tuple[list, Config]:
    """Start ``reward.launch`` servers as actors, wait until each answers health, and return them with a
    config whose ``reward.servers`` lists their addresses (what the samplers and the learner connect to)."""
    if not cfg.reward.launch:
        return [], cfg
    owners = [
        ray.remote(RewardServerOwner)
        .options(**actor_options(spec.resources), max_restarts=cfg.runtime.max_restarts, name=f"{REWARD_NAME}-{i}")
        .remote(spec.model_dump(mode="json"), cfg.reward.token_env, cfg.reward.tls_ca, cfg.reward.tls_client_cert,
                cfg.reward.tls_client_key)
        for i, spec in enumerate(cfg.reward.launch)
    ]
    addresses = ray.get([owner.address.remote() for owner in owners])
    if not all(ray.get([owner.serving.remote() for owner in owners])):
        raise RuntimeError(f"reward.launch: a server at {addresses} does not report SERVING")
    servers = [*cfg.reward.servers] + [
        RewardServerConfig(addresses=[address], weight=spec.weight)
        for address, spec in zip(addresses, cfg.reward.launch, strict=True)
    ]
    reward = cfg.reward.model_copy(update={"servers": servers, "launch": []})
    return owners, cfg.model_copy(update={"reward": reward})


@dataclass
class Batch:
    """One iteration's rollouts in flight: per sampler slot a ref to its summary and one to its rollout."""

    iteration: int
    prompts: list[list[str]]
    lora: ray.ObjectRef
    version: int
    summaries: list[ray.ObjectRef]
    rollouts: list[ray.ObjectRef]


class Driver:
    """Owns the loop, the prompt stream and the log; holds the actors' handles, never their data."""

    def __init__(self, cfg: Config, samplers: list, out: Path, progress: bool) -> None:
        self.cfg = cfg
        self.samplers = samplers
        self.out = out
        self.progress = progress
        self.learner = self._start_learner()
        self.version = 0  # LoRA publications so far; never rewinds, so a sampler never keeps a stale copy
        self.redraws = 0  # rollouts redrawn after their sampler died
        self.restarts = 0  # learners replaced from the newest checkpoint

    def _start_learner(self):
        return (ray.remote(LearnerWorker).options(**actor_options(self.cfg.runtime.learner), name=LEARNER_NAME)
                .remote(self.cfg.model_dump(mode="json")))

    def _get(self, ref):
        """A learner result; its death, or its input lost with a node, becomes ``LearnerDied``."""
        try:
            return ray.get(ref)
        except LOST as err:
            raise LearnerDied(str(err)) from err

    def run(self, resume: bool, start: float) -> RunSummary:
        """The training loop, restarted from the newest checkpoint each time the learner dies (up to
        ``runtime.max_restarts`` times)."""
        while True:
            try:
                return self._run(resume, start, fresh_if_none=self.restarts > 0)
            except LearnerDied as err:
                self.restarts += 1
                if self.restarts > self.cfg.runtime.max_restarts:
                    raise RuntimeError(f"the learner died {self.restarts} times (runtime.max_restarts): {err}") from err
                ray.kill(self.learner)
                self.learner = self._start_learner()
                resume = True

    def _next_version(self) -> int:
        self.version += 1
        return self.version

    def submit(self, lora: ray.ObjectRef, version: int, prompt_generator: torch.Generator, iteration: int) -> Batch:
        prompts = [pick_prompts(self.cfg, prompt_generator) for _ in self.samplers]
        batch = Batch(iteration, prompts, lora, version, [], [])
        for slot in range(len(self.samplers)):
            summary, rollout = self._draw(batch, slot)
            batch.summaries.append(summary)
            batch.rollouts.append(rollout)
        return batch

    def _draw(self, batch: Batch, slot: int) -> tuple[ray.ObjectRef, ray.ObjectRef]:
        return self.samplers[slot].sample.options(num_returns=2).remote(
            batch.lora, batch.version, batch.prompts[slot], batch.iteration, slot
        )

    def collect(self, batch: Batch) -> list[dict[str, float]]:
        """Wait for every rollout of the batch (without fetching it). A sampler that dies mid-rollout is
        restarted by Ray (``max_restarts``) and the rollout redrawn from the same (seed, iteration, slot)
        noise stream: the same samples, none lost and none counted twice. LoRA weights lost with the learner's
        node fail the draw with ObjectLostError: the learner is replaced (``LearnerDied``)."""
        summaries = []
        for slot in range(len(self.samplers)):
            for attempt in range(self.cfg.runtime.max_restarts + 1):
                try:
                    summaries.append(ray.get(batch.summaries[slot]))
                    break
                except ray.exceptions.ObjectLostError as err:
                    raise LearnerDied(f"sampler {slot}'s input was lost: {err}") from err
                except ray.exceptions.RayActorError:
                    if attempt == self.cfg.runtime.max_restarts:
                        raise
                    self._wait_until_restarted(slot)
                    batch.summaries[slot], batch.rollouts[slot] = self._draw(batch, slot)
                    self.redraws += 1
        return summaries

    def _wait_until_restarted(self, slot: int, timeout_s: float = 600.0) -> None:
        """Block until Ray has restarted the sampler (its model loaded): calls made while it restarts fail
        with ActorUnavailableError and would use up the retries in a moment. A sampler out of restarts
        raises RayActorError here."""
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                ray.get(self.samplers[slot].__ray_ready__.remote(), timeout=max(deadline - time.monotonic(), 1))
                return
            except ray.exceptions.ActorUnavailableError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)

    def _run(self, resume: bool, start: float, fresh_if_none: bool) -> RunSummary:
        cfg, learner = self.cfg, self.learner
        prompt_generator = torch.Generator().manual_seed(cfg.seed)
        state = Progress(samples=0, iteration=0)
        if resume:
            state, prompt_state = self._get(learner.resume.remote(fresh_if_none))
            if prompt_state is not None:
                prompt_generator.set_state(prompt_state)
        lora, version = learner.lora_state.remote(), self._next_version()
        log = RunLog(cfg, self.out, self.progress, state.samples)
        try:
            batch = self.submit(lora, version, prompt_generator, state.iteration)
            tick = time.perf_counter()
            while batch is not None:
                summaries = self.collect(batch)
                results, new_lora = learner.train.options(num_returns=2).remote(*batch.rollouts)
                lag = float(self.version - batch.version)  # updates between drawing and training: 0 on-policy
                images = sum(s["images"] for s in summaries)
                state = Progress(samples=state.samples + images, iteration=batch.iteration + 1)
                due = learner.end_iteration.remote(state, prompt_generator.get_state())  # checkpoint, eval, save
                more = state.samples < cfg.train.total_samples
                batch = None
                if cfg.runtime.pipeline and more:  # drawn while the learner trains: one version stale
                    batch = self.submit(lora, version, prompt_generator, state.iteration)
                lora, version = new_lora, self._next_version()
                for rollout_images, stats in self._get(results):
                    log.record(rollout_images, stats | {"policy_lag": lag})
                if snapshot := self._get(due):  # a failed write (disk full) stops the run with its cause
                    log.record_eval(snapshot)
                now = time.perf_counter()
                log.record_iteration(images, now - tick, [s["sample_time"] for s in summaries])
                tick = now
                if batch is None and more:
                    batch = self.submit(lora, version, prompt_generator, state.iteration)
        finally:
            log.close()
        recoveries = {"sampler_redraws": self.redraws, "learner_restarts": self.restarts}
        return self._get(learner.finish.remote(log.samples, time.perf_counter() - start, log.figures() | recoveries))
