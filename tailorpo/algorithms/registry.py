"""Every training algorithm by name: how it samples, how its learner is built, what it needs.

The loops, the Ray workers and the CLI look an algorithm up here (``algorithm_of(cfg)``) instead of testing its
name. What config validation must know before any model loads (images per batch row, a differentiable reward, a
pair objective) is ``tailorpo.config.ALGORITHM_FACTS``; each entry here carries its facts. Adding an algorithm is
one module (its rollout, its learner or pair objective), one entry below and its facts in the config.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from tailorpo.algorithms.branching import guidance_schedule, tailorpo_rollout
from tailorpo.algorithms.learner import Learner, LoraLearner, RewardSource
from tailorpo.algorithms.pair_learner import (
    DIFF_CONTRAST,
    DIFFUSION_DPO,
    MAPO,
    PairObjective,
    build_pair_learner,
)
from tailorpo.algorithms.rollouts import (
    Rollout,
    d3po_rollout,
    ddpo_rollout,
    final_image_pair_rollout,
)
from tailorpo.algorithms.steps import step_plan
from tailorpo.config import ALGORITHM_FACTS, AlgorithmFacts, Config, steps_k
from tailorpo.core.objectives import PerPromptStatTracker
from tailorpo.diffusion.policy import DiffusionPolicy
from tailorpo.rewards import RewardModel

SampleFn = Callable[[Config, DiffusionPolicy, RewardModel, list[str], torch.Generator], Rollout]
LearnerFn = Callable[[Config, DiffusionPolicy, RewardSource], LoraLearner]
PrepareFn = Callable[[Config, Rollout, PerPromptStatTracker], None]


@dataclass(frozen=True)
class Algorithm:
    facts: AlgorithmFacts
    sample: SampleFn  # one iteration's rollout for the given prompts, from the (seed, iteration, slot) stream
    build_learner: LearnerFn  # the learner the online loop and the Ray learner train (given a lazy reward)
    prepare: PrepareFn | None = None  # before training on a rollout, with the driver's per-prompt statistics
    pair_objective: PairObjective | None = None  # the loss on pairs of final images, also for pairs.source

    @property
    def name(self) -> str:
        return self.facts.name


def sample_tailorpo(
    cfg: Config, policy: DiffusionPolicy, reward: RewardModel, prompts: list[str], generator: torch.Generator
) -> Rollout:
    """TailorPO's branch pairs; with ``facts.differentiable_reward`` (TailorPO-G) the winner is guided (on the
    cosine ramp over every step that may branch)."""
    algo = cfg.algorithm
    plan = step_plan(algo, policy.num_steps, len(prompts), generator)
    may_branch = steps_k(algo.branch_selection[1], policy.num_steps)
    eta = guidance_schedule(algo.guidance, may_branch) if algo.facts.differentiable_reward else None
    return tailorpo_rollout(
        policy, reward, prompts, generator, plan, guidance_eta=eta, guidance=algo.guidance, branching=algo.branching,
    )


def sample_d3po(
    cfg: Config, policy: DiffusionPolicy, reward: RewardModel, prompts: list[str], generator: torch.Generator
) -> Rollout:
    plan = step_plan(cfg.algorithm, policy.num_steps, len(prompts), generator)  # a row per prompt: its pair
    return d3po_rollout(policy, reward, prompts, generator, plan)


def sample_ddpo(
    cfg: Config, policy: DiffusionPolicy, reward: RewardModel, prompts: list[str], generator: torch.Generator
) -> Rollout:
    algo = cfg.algorithm
    plan = step_plan(algo, policy.num_steps, len(prompts) * algo.ddpo.samples_per_prompt, generator)  # per chain
    return ddpo_rollout(policy, reward, prompts, generator, plan, algo.ddpo.samples_per_prompt)


def sample_final_image_pairs(
    cfg: Config, policy: DiffusionPolicy, reward: RewardModel, prompts: list[str], generator: torch.Generator
) -> Rollout:
    return final_image_pair_rollout(policy, reward, prompts, generator)


def step_learner(cfg: Config, policy: DiffusionPolicy, reward: RewardSource) -> Learner:
    """The step-wise learner; it opens ``reward`` only for ``log.reward_gradient_cosine``."""
    return Learner(policy, cfg.optim, cfg.algorithm, reward if cfg.log.reward_gradient_cosine else None)


def ddpo_advantages(cfg: Config, rollout: Rollout, tracker: PerPromptStatTracker) -> None:
    """DDPO: per-sample advantages from the driver's per-prompt statistics, copied to each recorded step."""
    per_sample = tracker.advantages(rollout.prompts, rollout.rewards, cfg.algorithm.ddpo.adv_clip)
    rollout.data.advantages = per_sample[rollout.data.prompt_index]


def pair_algorithm(name: str, objective: PairObjective) -> Algorithm:
    """A pair objective trained on the policy's own samples (two per prompt, ranked by the reward); its learner
    takes pairs.source batches too (``training.pair_loop``)."""

    def build(cfg: Config, policy: DiffusionPolicy, reward: RewardSource) -> LoraLearner:
        return build_pair_learner(cfg, policy, objective)

    return Algorithm(ALGORITHM_FACTS[name], sample_final_image_pairs, build, pair_objective=objective)


ALGORITHMS: dict[str, Algorithm] = {
    spec.name: spec
    for spec in (
        Algorithm(ALGORITHM_FACTS["tailorpo"], sample_tailorpo, step_learner),
        Algorithm(ALGORITHM_FACTS["tailorpo_g"], sample_tailorpo, step_learner),
        Algorithm(ALGORITHM_FACTS["d3po"], sample_d3po, step_learner),
        Algorithm(ALGORITHM_FACTS["ddpo"], sample_ddpo, step_learner, prepare=ddpo_advantages),
        pair_algorithm("diffusion_dpo", DIFFUSION_DPO),
        pair_algorithm("mapo", MAPO),
        pair_algorithm("diff_contrast", DIFF_CONTRAST),
    )
}


def algorithm_of(cfg: Config) -> Algorithm:
    return ALGORITHMS[cfg.algorithm.name]

