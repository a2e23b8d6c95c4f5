import copy

import pytest
import torch

from tailorpo.config import AlgorithmConfig, OptimConfig
from tailorpo.learner import Learner, select_rows
from tailorpo.rewards import build_reward
from tailorpo.rollouts import d3po_rollout, ddpo_rollout, tailorpo_rollout
from tests.conftest import perturb_lora

PROMPTS = ["a cat", "a dog"]


def _learner(policy, **algorithm):
    return Learner(policy, OptimConfig(lr=1e-3), AlgorithmConfig(**algorithm))


def _step_pairs(rollout, step_k, policy):
    pairs = rollout.data
    return select_rows(pairs, pairs.step_index == policy.num_steps - step_k)


def test_one_trainable_and_one_reference_forward_serve_both_branches(policy):
    rollout = tailorpo_rollout(policy, build_reward("jpeg"), PROMPTS, torch.Generator().manual_seed(0), [20, 12])
    learner = _learner(policy)
    pairs = _step_pairs(rollout, 12, policy)
    embeds = policy.encode_prompts(PROMPTS).index(pairs.prompt_index)
    before = policy.unet_evals
    learner.pair_logits(pairs, embeds)
    assert policy.unet_evals - before == 2 * len(PROMPTS)  # N trainable + N reference rows

    d3po = d3po_rollout(policy, build_reward("jpeg"), PROMPTS, torch.Generator().manual_seed(0), [20, 12])
    d3po_pairs = _step_pairs(d3po, 12, policy)
    before = policy.unet_evals
    learner.pair_logits(d3po_pairs, embeds)
    assert policy.unet_evals - before == 4 * len(PROMPTS)  # different parents: twice the rows


def test_logits_vanish_when_the_policy_equals_the_reference(policy):
    rollout = tailorpo_rollout(policy, build_reward("jpeg"), PROMPTS, torch.Generator().manual_seed(1), [16])
    pairs = rollout.data
    logits = _learner(policy).pair_logits(pairs, policy.encode_prompts(PROMPTS).index(pairs.prompt_index))
    torch.testing.assert_close(logits, torch.zeros_like(logits))


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_an_update_raises_the_winner_over_the_loser(policy, reduction):
    """Eq. 11 end to end: a TailorPO step on the real UNet's LoRA increases log pi(x^w) - log pi(x^l)."""
    policy.logprob_reduction = reduction
    perturb_lora(policy.unet, seed=1, scale=0.01)
    rollout = tailorpo_rollout(policy, build_reward("jpeg"), PROMPTS, torch.Generator().manual_seed(2), [20, 8])
    learner = Learner(policy, OptimConfig(lr=1e-4), AlgorithmConfig(ratio_clip=None))
    pairs = select_rows(rollout.data, rollout.data.valid)
    group = select_rows(pairs, pairs.step_index == pairs.step_index[0])
    group_embeds = policy.encode_prompts(PROMPTS).index(group.prompt_index)

    def margin() -> torch.Tensor:
        with torch.no_grad():
            return learner.pair_logits(group, group_embeds)

    before = margin()
    stats = learner.train_on(rollout)
    assert learner.updates == 1 and stats["grad_norm"] > 0
    after = margin()
    assert (after > before).all(), (before, after)


def test_gradient_accumulation_steps_the_optimizer_every_n_rollouts(policy):
    rollout = tailorpo_rollout(policy, build_reward("jpeg"), PROMPTS, torch.Generator().manual_seed(3), [20])
    learner = Learner(policy, OptimConfig(lr=1e-3, gradient_accumulation_steps=2), AlgorithmConfig())
    weights = copy.deepcopy([p.detach().clone() for p in learner.params])
    learner.train_on(rollout)
    assert learner.updates == 0 and all(torch.equal(a, b) for a, b in zip(weights, learner.params))
    learner.train_on(rollout)
    assert learner.updates == 1 and not all(torch.equal(a, b) for a, b in zip(weights, learner.params))


def test_ddpo_loss_at_the_sampling_policy_is_minus_mean_advantage(policy):
    rollout = ddpo_rollout(policy, build_reward("jpeg"), PROMPTS, torch.Generator().manual_seed(4), [20, 4], 2, 5.0)
    stats = _learner(policy, name="ddpo").train_on(rollout)
    assert stats["loss"] == pytest.approx(-float(rollout.data.advantages.mean()), abs=1e-4)
    assert stats["clip_fraction"] == 0.0
