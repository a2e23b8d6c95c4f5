import pytest
import torch

from tailorpo.algorithms.branching import guidance_schedule, step_reward_fn
from tailorpo.algorithms.rollouts import trajectory_rollout
from tailorpo.config import GuidanceConfig
from tailorpo.core.guidance import (
    cosine_eta_schedule,
    guidance_gradient,
    guide,
    guide_in_sigma_units,
)
from tailorpo.rewards import build_reward


def test_cosine_eta_schedule_is_larger_for_smaller_t():
    eta = cosine_eta_schedule([20, 16, 12, 8, 4], 0.1, 0.2)
    assert eta[20] == pytest.approx(0.1) and eta[4] == pytest.approx(0.2)
    assert eta[12] == pytest.approx(0.15)
    values = [eta[k] for k in (20, 16, 12, 8, 4)]
    assert values == sorted(values)


def test_guidance_gradient_is_minus_two_delta_grad_r():
    """grad (r_high - r)^2 with r_high = r + delta held fixed equals -2 delta grad r."""
    target = torch.tensor([1.0, -2.0, 0.5])
    r = lambda x: -((x - target) ** 2).sum(dim=1)
    x = torch.tensor([[0.0, 0.0, 0.0], [1.0, 1.0, 1.0]])
    grad, reward = guidance_gradient(x, r, delta=0.5)
    torch.testing.assert_close(grad, -2 * 0.5 * (-2 * (x - target)))
    torch.testing.assert_close(reward, r(x))
    x_plus, _ = guide(x, r, eta=0.1, delta=0.5, increase=True)
    x_minus, _ = guide(x, r, eta=0.1, delta=0.5, increase=False)
    assert (r(x_plus) > r(x)).all() and (r(x_minus) < r(x)).all()


@pytest.mark.slow
def test_guidance_moves_the_step_reward_on_noisy_samples_table1(policy):
    """Paper Table 1: over 100 noisy samples x_{t-1}, r_t(x^+) > r_t(x) and r_t(x^-) < r_t(x) for nearly all,
    with the reward differentiated through x0_hat (UNet), the VAE decoder and the reward model."""
    reward = build_reward("colorfulness")
    prompts = ["a red apple", "a blue car", "a green field", "a yellow bird"] * 5
    embeds = policy.encode_prompts(prompts)
    raised = lowered = total = 0
    for seed, k in enumerate((20, 16, 12, 8, 4)):  # 5 fine-tuned steps x 20 samples = 100
        step_index = policy.num_steps - k
        traj = trajectory_rollout(policy, embeds, torch.Generator().manual_seed(seed), [k])
        x = traj.steps[0]["x_next"]  # noisy x_{t-1}
        r_t = step_reward_fn(policy, reward, step_index, embeds, prompts, fixed_eps=None)
        x_plus, r_x = guide(x, r_t, eta=0.2, delta=0.5, increase=True)
        x_minus, _ = guide(x, r_t, eta=0.2, delta=0.5, increase=False)
        with torch.no_grad():
            raised += int((r_t(x_plus) > r_x).sum())
            lowered += int((r_t(x_minus) < r_x).sum())
        total += len(prompts)
    assert total == 100
    assert raised >= 95 and lowered >= 95, (raised, lowered)


def test_step_reward_gradient_matches_finite_differences(policy):
    """d r_t / d x_{t-1} through the UNet at t-1, the VAE decoder and the reward, against central differences."""
    reward = build_reward("colorfulness")
    prompts = ["a red apple"]
    embeds = policy.encode_prompts(prompts)
    x = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0)) * 0.5
    r_t = step_reward_fn(policy, reward, 10, embeds, prompts)
    grad, _ = guidance_gradient(x, r_t, delta=0.5)  # = -2 delta grad r_t = -grad r_t
    direction = torch.randn(x.shape, generator=torch.Generator().manual_seed(1))
    h = 1e-3  # small: the decoder's clamp to [0, 1] puts kinks within larger steps
    with torch.no_grad():
        numeric = (r_t(x + h * direction) - r_t(x - h * direction)) / (2 * h)
    analytic = (-grad * direction).sum()
    assert analytic.item() == pytest.approx(numeric.item(), rel=0.05)


def test_sigma_units_push_is_a_fraction_of_sigma_whatever_the_reward_scale():
    """The push's per-dimension RMS is exactly f * sigma_t and its direction is grad r, so a reward 1000x larger
    moves x identically (in reward units it would move it 1000x further)."""
    target = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    x = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    x[2] = target[2]  # at the maximum: no gradient, no move
    small = lambda x: -((x - target) ** 2).sum(dim=(1, 2, 3))
    large = lambda x: 1000 * small(x)
    f, sigma = 0.3, 0.7
    push_small = guide_in_sigma_units(x, small, sigma, f)[0] - x
    push_large = guide_in_sigma_units(x, large, sigma, f)[0] - x
    rms = push_small.flatten(1).pow(2).mean(dim=1).sqrt()
    torch.testing.assert_close(rms[:2], torch.full((2,), f * sigma), rtol=1e-6, atol=0)
    assert torch.equal(push_small[2], torch.zeros_like(x[2]))
    torch.testing.assert_close(push_large, push_small, rtol=1e-6, atol=1e-7)
    grad_r = -2 * (x - target)  # d small / dx
    cosine = torch.nn.functional.cosine_similarity(push_small.flatten(1), grad_r.flatten(1), dim=1)
    torch.testing.assert_close(cosine[:2], torch.ones(2), rtol=0, atol=1e-6)
    lowered = guide_in_sigma_units(x, small, sigma, f, increase=False)[0] - x
    torch.testing.assert_close(lowered, -push_small)
    in_reward_units = [(guide(x, r, eta=0.1)[0] - x).flatten(1).norm(dim=1) for r in (small, large)]
    torch.testing.assert_close(in_reward_units[1][:2] / in_reward_units[0][:2], torch.full((2,), 1000.0))


def test_guidance_schedule_per_unit():
    steps = [20, 12, 4]
    assert guidance_schedule(GuidanceConfig(), steps) == cosine_eta_schedule(steps, 0.1, 0.2)
    assert guidance_schedule(GuidanceConfig(units="sigma", sigma_fraction=0.25), steps) == {20: 0.25, 12: 0.25, 4: 0.25}
