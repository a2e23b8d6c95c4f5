import pytest
import torch

from tailorpo.algorithms.branching import tailorpo_rollout
from tailorpo.algorithms.learner import Learner
from tailorpo.algorithms.rollouts import d3po_rollout, ddpo_rollout, select_rows
from tailorpo.config import AlgorithmConfig, OptimConfig
from tailorpo.core.ddim import gaussian_log_prob
from tailorpo.core.objectives import dpo_logits
from tailorpo.diffusion.lora import reference_model
from tailorpo.rewards import build_reward
from tests.conftest import perturb_lora

PROMPTS = ["a cat", "a dog"]


def _step_group(rollout, step_k, policy):
    pairs = rollout.data
    return select_rows(pairs, pairs.step_index == policy.num_steps - step_k)


def test_one_trainable_and_one_reference_forward_serve_both_branches(policy):
    learner = Learner(policy, OptimConfig(), AlgorithmConfig())
    embeds = policy.encode_prompts(PROMPTS)
    rollout = tailorpo_rollout(policy, build_reward("jpeg"), PROMPTS, torch.Generator().manual_seed(0), [20, 12])
    pairs = _step_group(rollout, 12, policy)
    before = policy.unet_evals
    learner.pair_logits(pairs, embeds.index(pairs.prompt_index))
    assert policy.unet_evals - before == 2 * len(PROMPTS)  # N trainable + N reference rows

    d3po = d3po_rollout(policy, build_reward("jpeg"), PROMPTS, torch.Generator().manual_seed(0), [20, 12])
    d3po_pairs = _step_group(d3po, 12, policy)
    before = policy.unet_evals
    learner.pair_logits(d3po_pairs, embeds.index(d3po_pairs.prompt_index))
    assert policy.unet_evals - before == 4 * len(PROMPTS)  # different parents: twice the rows


def test_logits_against_log_probs_computed_by_hand(policy):
    """h = beta * [(log pi - log pi_ref)(x^w) - (log pi - log pi_ref)(x^l)], pi_ref = the adapter off."""
    rollout = tailorpo_rollout(policy, build_reward("jpeg"), PROMPTS, torch.Generator().manual_seed(1), [16])
    perturb_lora(policy.unet, seed=5, scale=0.05)
    pairs = rollout.data
    embeds = policy.encode_prompts(PROMPTS).index(pairs.prompt_index)
    i = int(pairs.step_index[0])
    learner = Learner(policy, OptimConfig(), AlgorithmConfig(beta=0.7, ratio_clip=None))
    with torch.no_grad():
        logits = learner.pair_logits(pairs, embeds)

        def by_hand():
            mean, sigma = policy.mean(i, policy.eps(pairs.x_t_w, i, embeds), pairs.x_t_w)
            return [gaussian_log_prob(x, mean, sigma, "mean") for x in (pairs.x_next_w, pairs.x_next_l)]

        lw, ll = by_hand()
        with reference_model(policy.unet):
            rw, rl = by_hand()
    torch.testing.assert_close(logits, dpo_logits(lw, ll, rw, rl, beta=0.7))
    assert logits.abs().max() > 0  # the perturbed LoRA really differs from the reference


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
    assert (margin() > before).all()


def test_gradient_accumulation_averages_rollouts(policy):
    perturb_lora(policy.unet, seed=2, scale=0.01)
    rollouts = [
        tailorpo_rollout(policy, build_reward("jpeg"), PROMPTS, torch.Generator().manual_seed(seed), [20])
        for seed in (3, 4)
    ]
    settings = OptimConfig(gradient_accumulation_steps=3), AlgorithmConfig(ratio_clip=None)
    grads = []
    for rollout in rollouts:
        single = Learner(policy, *settings)
        single.train_on(rollout)
        grads.append([p.grad.clone() for p in single.params])
        single.optimizer.zero_grad(set_to_none=True)
    learner = Learner(policy, *settings)
    for rollout in rollouts:
        learner.train_on(rollout)
    assert learner.updates == 0 and learner.pending_iterations == 2
    for p, g1, g2 in zip(learner.params, *grads, strict=True):  # each rollout contributes its loss / 3
        torch.testing.assert_close(p.grad, g1 + g2, atol=1e-6, rtol=1e-4)
    learner.train_on(rollouts[0])
    assert learner.updates == 1 and all(p.grad is None for p in learner.params)


def test_ddpo_surrogate_gradient_is_minus_mean_advantage_times_score(policy):
    """At the sampling policy ratio = 1, so L = -mean(A) and dL/dtheta = -mean(A * d log pi / d theta)."""
    perturb_lora(policy.unet, seed=3, scale=0.01)
    rollout = ddpo_rollout(policy, build_reward("jpeg"), PROMPTS, torch.Generator().manual_seed(4), [20], 2)
    steps = rollout.data
    steps.advantages = torch.tensor([2.0, 0.5, -1.0, 1.5])  # non-zero mean on purpose
    learner = Learner(policy, OptimConfig(gradient_accumulation_steps=2), AlgorithmConfig(name="ddpo"))
    stats = learner.train_on(rollout)
    assert stats["loss"] == pytest.approx(-0.75, abs=1e-4) and stats["clip_fraction"] == 0.0
    got = [p.grad.clone() for p in learner.params]
    learner.optimizer.zero_grad(set_to_none=True)
    (log_prob,) = learner.log_probs(steps.x_t, int(steps.step_index[0]), [steps.x_next],
                                    policy.encode_prompts(rollout.prompts).index(steps.prompt_index))
    (-(steps.advantages * log_prob).mean() / 2).backward()  # / 2: gradient_accumulation_steps
    for g, p in zip(got, learner.params, strict=True):
        torch.testing.assert_close(g, p.grad, atol=1e-6, rtol=1e-4)
    learner.optimizer.zero_grad(set_to_none=True)


def test_ddpo_refuses_steps_without_advantages(policy):
    rollout = ddpo_rollout(policy, build_reward("jpeg"), PROMPTS, torch.Generator().manual_seed(5), [20], 2)
    with pytest.raises(ValueError, match="advantages is unset"):
        Learner(policy, OptimConfig(), AlgorithmConfig(name="ddpo")).train_on(rollout)


def test_bf16_base_weights_with_fp32_lora_train():
    from tailorpo.diffusion.lora import add_lora, lora_parameters
    from tailorpo.diffusion.pipeline import load_pipeline
    from tailorpo.diffusion.policy import DiffusionPolicy

    pipe = load_pipeline("tiny-sd", dtype=torch.bfloat16)
    add_lora(pipe.unet, rank=4, alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"])
    policy = DiffusionPolicy(pipe, resolution=64)
    x = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    eps = policy.eps(x, 0, policy.encode_prompts(["a cat", "a dog"]))
    assert eps.dtype == torch.float32 and torch.isfinite(eps).all()
    eps.square().mean().backward()
    params = lora_parameters(pipe.unet)
    assert params and all(p.dtype == torch.float32 for p in params)
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in params)
