import pytest
import torch

from tailorpo.algorithms.branching import tailorpo_rollout
from tailorpo.algorithms.learner import Learner, split_step_key, step_key
from tailorpo.algorithms.rollouts import d3po_rollout, ddpo_rollout, pair_stats_by_step, select_rows
from tailorpo.config import AlgorithmConfig, OptimConfig
from tailorpo.core.ddim import gaussian_log_prob
from tailorpo.core.diagnostics import clamp_fraction, mean_shift_in_sigma
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


def _per_step(stats: dict[str, float]) -> dict[int, dict[str, float]]:
    table: dict[int, dict[str, float]] = {}
    for key, value in stats.items():
        if (step := split_step_key(key)) is not None:
            table.setdefault(step[0], {})[step[1]] = value
    return table


def test_per_step_stats_of_a_fresh_lora_then_after_an_update(policy):
    """A fresh LoRA (B = 0) leaves the mean exactly where the reference puts it, so no ratio is clamped; after an
    update the mean has moved. Gap and dropped share are pair_stats_by_step's, keyed by paper step k."""
    rollout = tailorpo_rollout(policy, build_reward("jpeg"), PROMPTS, torch.Generator().manual_seed(6), [20, 12])
    learner = Learner(policy, OptimConfig(lr=1e-2), AlgorithmConfig())
    table = _per_step(learner.train_on(rollout))
    assert sorted(table) == [12, 20]
    by_index = pair_stats_by_step(rollout.data)
    for k, values in table.items():
        assert set(values) == {"reward_gap", "dropped", "grad_norm", "clamp_fraction", "mean_shift_sigma"}
        assert values["mean_shift_sigma"] == 0.0 and values["clamp_fraction"] == 0.0 and values["grad_norm"] > 0
        expected = by_index[policy.num_steps - k]
        assert (values["reward_gap"], values["dropped"]) == (expected["reward_gap"], expected["dropped"])
    after = _per_step(learner.train_on(rollout))
    assert all(after[k]["mean_shift_sigma"] > 0 for k in (12, 20))


def test_a_single_step_gradient_norm_is_the_update_norm(policy):
    """With one fine-tuned step and no accumulation, the step's gradient is the whole update's (before clipping)."""
    perturb_lora(policy.unet, seed=4, scale=0.01)
    rollout = tailorpo_rollout(policy, build_reward("jpeg"), PROMPTS, torch.Generator().manual_seed(7), [16])
    stats = Learner(policy, OptimConfig(max_grad_norm=1e-6), AlgorithmConfig()).train_on(rollout)
    assert stats[step_key(16, "grad_norm")] == pytest.approx(stats["grad_norm"], rel=1e-5)


@pytest.mark.parametrize("algorithm", ["tailorpo", "d3po"])
def test_mean_shift_and_clamp_fraction_against_forwards_by_hand(policy, algorithm):
    """The learner's diagnostics are those of the policy and reference forwards at the step's parents (D3PO:
    both trajectories' x_t), in units of that step's sigma_t."""
    sample = tailorpo_rollout if algorithm == "tailorpo" else d3po_rollout
    rollout = sample(policy, build_reward("jpeg"), PROMPTS, torch.Generator().manual_seed(8), [12])
    perturb_lora(policy.unet, seed=6, scale=0.05)
    settings = AlgorithmConfig(name=algorithm, ratio_clip=0.001)
    stats = Learner(policy, OptimConfig(gradient_accumulation_steps=2), settings).train_on(rollout)
    pairs = select_rows(rollout.data, rollout.data.valid)
    i = policy.num_steps - 12
    x_t = torch.cat([pairs.x_t_w, pairs.x_t_l])
    embeds = policy.encode_prompts(rollout.prompts).index(pairs.prompt_index).repeat(2)

    def by_hand():
        with torch.no_grad():
            mean, sigma = policy.mean(i, policy.eps(x_t, i, embeds), x_t)
        targets = torch.cat([pairs.x_next_w, pairs.x_next_l])
        return mean, sigma, gaussian_log_prob(targets, mean, sigma, "mean").chunk(2)

    mean, sigma, (log_prob_w, log_prob_l) = by_hand()
    with reference_model(policy.unet):
        ref_mean, _, (ref_w, ref_l) = by_hand()
    shift = float(mean_shift_in_sigma(mean, ref_mean, sigma).mean())
    clamped = clamp_fraction(log_prob_w - ref_w, log_prob_l - ref_l, 0.001)
    assert stats[step_key(12, "mean_shift_sigma")] == pytest.approx(shift, rel=1e-4) and shift > 0
    assert stats[step_key(12, "clamp_fraction")] == clamped and clamped > 0


def test_reward_gradient_cosine_is_optional_and_leaves_training_unchanged(policy):
    """With a differentiable reward the learner adds the cosine of the mean shift with d r_t / d x_{t-1}, without
    touching the LoRA's gradients; a reward without gradients (JPEG) gets none; a fresh LoRA's cosine is 0."""
    reward = build_reward("colorfulness")
    rollout = tailorpo_rollout(policy, reward, PROMPTS, torch.Generator().manual_seed(9), [20, 4])
    accumulate = OptimConfig(gradient_accumulation_steps=2)
    fresh = Learner(policy, accumulate, AlgorithmConfig(), reward=lambda: reward).train_on(rollout)
    assert fresh[step_key(20, "reward_gradient_cosine")] == 0.0
    policy.unet.zero_grad(set_to_none=True)  # the fresh learner's pending gradients

    perturb_lora(policy.unet, seed=7, scale=0.05)
    grads = []
    for source in (None, lambda: reward, lambda: build_reward("jpeg")):
        learner = Learner(policy, accumulate, AlgorithmConfig(), reward=source)
        stats = learner.train_on(rollout)
        grads.append([p.grad.clone() for p in learner.params])
        learner.optimizer.zero_grad(set_to_none=True)
        cosines = [value for key, value in stats.items() if key.endswith("/reward_gradient_cosine")]
        assert len(cosines) == (2 if source is not None and source().differentiable else 0)
        assert all(0 < abs(c) <= 1 for c in cosines)
    for with_cosine, without in zip(grads[1], grads[0], strict=True):
        assert torch.equal(with_cosine, without)


@pytest.mark.parametrize("model", ["tiny-sd", pytest.param("full-size sd15", marks=pytest.mark.long)])
def test_gradient_checkpointing_from_the_config_gives_the_same_gradients(model, tmp_path):
    """model.gradient_checkpointing recomputes activations in the backward pass: the learner's LoRA gradients,
    the guidance gradient through the VAE decoder, and TailorPO-G's gradient through the UNet at a step the LoRA
    is gated off (recomputed after the gate switched it back on) are those of the stored-activation pass, on the
    tiny model and on SD v1.5's published architecture (random weights, loaded from a local folder, at 64 px)."""
    from tailorpo.config import load_config
    from tailorpo.tiny.full_size import make_full_size_model
    from tailorpo.training.build import build_policy

    overrides = ["model.gradient_checkpointing=[unet, vae]"]
    if model != "tiny-sd":
        folder = make_full_size_model(tmp_path / "sd15", "sd15")
        overrides += [f"model.pretrained={folder}", "model.resolution=64",
                      "lora.target_modules=[to_q,to_k,to_v,to_out.0]"]
    cfg = load_config("launch/tiny.yaml", overrides)
    policy = build_policy(cfg, torch.device("cpu"))
    unet, vae = policy.pipe.unet, policy.pipe.vae
    assert unet.is_gradient_checkpointing and vae.is_gradient_checkpointing
    perturb_lora(unet, seed=3, scale=0.05)
    rollout = tailorpo_rollout(policy, build_reward("jpeg"), PROMPTS, torch.Generator().manual_seed(0), [16, 4])
    pairs = rollout.data
    embeds = policy.encode_prompts(PROMPTS).index(pairs.prompt_index)
    learner = Learner(policy, OptimConfig(), AlgorithmConfig(ratio_clip=None))
    latents = torch.randn(2, *policy.latent_shape, generator=torch.Generator().manual_seed(1))

    def gradients() -> list[torch.Tensor]:
        learner.optimizer.zero_grad(set_to_none=True)
        learner.pair_logits(pairs, embeds).sum().backward()
        x = latents.clone().requires_grad_(True)
        (policy.decode(x) ** 2).sum().backward()
        through_gated_unet = learner.step_reward_gradient(colorfulness, 0, latents, two_prompts, PROMPTS)
        return [p.grad.clone() for p in learner.params] + [x.grad, through_gated_unet]

    colorfulness, two_prompts = build_reward("colorfulness"), policy.encode_prompts(PROMPTS)
    assert 1 not in policy.lora_at  # the UNet at step index 1 (k = 19) runs as the base model
    checkpointed = gradients()
    unet.disable_gradient_checkpointing()
    vae.disable_gradient_checkpointing()
    stored = gradients()
    assert all(g.abs().sum() > 0 for g in stored[-2:]) and sum(g.abs().sum() for g in stored[:-2]) > 0
    for a, b in zip(checkpointed, stored, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
