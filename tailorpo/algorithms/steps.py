"""Which steps of each trajectory branch and which train: a fixed list, every step, or m drawn per trajectory.

TailorPO (Ren et al., arXiv 2502.01667) branches and trains at k = 20, 16, 12, 8, 4 of a 20-step chain (our
default adds 3, 2, 1);
ddpo-pytorch (Black et al., arXiv 2305.13301) trains a random ``timestep_fraction`` of each trajectory's steps.
A ``StepPlan`` holds one rollout's choice as (rows, T) masks over step index i = T - k, a row per trajectory
(for D3PO, per prompt: its two trajectories share their steps, so their transitions pair up). Fixed lists draw
nothing from the rollout's generator, so the paper's setting samples exactly as before steps were selectable.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass

import torch

from tailorpo.config import AlgorithmConfig, RandomSteps, StepSelection, steps_k


def steps_mask(steps: Collection[int], num_steps: int) -> torch.Tensor:
    """(T,) bool over step index i: True where step k = T - i is in ``steps``."""
    return torch.tensor([num_steps - i in steps for i in range(num_steps)], dtype=torch.bool)


def random_subset(allowed: torch.Tensor, m: int, generator: torch.Generator) -> torch.Tensor:
    """(rows, T) bool: per row, m of its ``allowed`` steps uniformly at random (one draw of rows x T uniforms
    from ``generator``; each row needs at least m allowed steps)."""
    keys = torch.rand(allowed.shape, generator=generator, device=generator.device).cpu()
    chosen = keys.masked_fill(~allowed, 2.0).argsort(dim=1)[:, :m]  # the m smallest keys among the allowed
    return torch.zeros_like(allowed).scatter(1, chosen, True)


def select_steps(
    selection: StepSelection, num_steps: int, within: torch.Tensor, generator: torch.Generator
) -> torch.Tensor:
    """(rows, T) bool: the steps ``selection`` picks among ``within`` (a fixed list or 'all': the same for every
    row, drawing nothing; {random: m}: m per row from ``generator``)."""
    if isinstance(selection, RandomSteps):
        return random_subset(within, selection.random, generator)
    return within & steps_mask(steps_k(selection, num_steps), num_steps)


@dataclass(frozen=True)
class StepPlan:
    """Per trajectory row and step index i: does it branch (TailorPO) or record its transition (D3PO, DDPO), and
    does the learner train on that pair or transition. ``train`` lies within ``branch``."""

    branch: torch.Tensor  # (rows, T) bool, on the CPU
    train: torch.Tensor  # (rows, T) bool, on the CPU

    @classmethod
    def fixed(cls, steps: Collection[int], num_steps: int, rows: int) -> StepPlan:
        """Every row branches and trains at the steps k listed (the paper's fine-tuned steps)."""
        mask = steps_mask(steps, num_steps).expand(rows, -1)
        return cls(mask, mask)

    def recorded_steps(self) -> list[int]:
        """The steps k at which some row branches: where a trajectory sampler must record transitions."""
        num_steps = self.branch.shape[1]
        return [num_steps - i for i in self.branch.any(dim=0).nonzero().flatten().tolist()]


def step_plan(algorithm: AlgorithmConfig, num_steps: int, rows: int, generator: torch.Generator) -> StepPlan:
    """One rollout's plan from the config (``branch_steps``, ``train_steps``, else ``fine_tuned_steps``): the
    random selections draw from the rollout's generator before anything else, branch steps first."""
    _, branch_selection = algorithm.branch_selection
    branch = select_steps(branch_selection, num_steps, torch.ones(rows, num_steps, dtype=torch.bool), generator)
    if algorithm.train_steps is None:
        return StepPlan(branch, branch)
    return StepPlan(branch, select_steps(algorithm.train_steps, num_steps, branch, generator))


def as_plan(steps: Collection[int] | StepPlan, num_steps: int, rows: int) -> StepPlan:
    """A rollout's plan from either form its callers give: a plan, or a list of steps k for every row."""
    if not isinstance(steps, StepPlan):
        return StepPlan.fixed(steps, num_steps, rows)
    if tuple(steps.branch.shape) != (rows, num_steps):
        raise ValueError(f"a step plan of shape {tuple(steps.branch.shape)} for {rows} trajectories of {num_steps} "
                         "steps; draw it with step_plan for this rollout's rows")
    return steps
