import pytest
import torch

from tailorpo.algorithms.branching import step_reward_fn
from tailorpo.core.guidance import cosine_eta_schedule, guidance_gradient, guide
from tailorpo.rewards import build_reward
from tailorpo.algorithms.rollouts import trajectory_rollout


def test_cosine_eta_schedule_is_larger_for_smaller_t():
    eta = cosine_eta_schedule([20, 16, 12, 8, 4], 0.1, 0.2)
    assert eta[20] == pytest.approx(0.1) and eta[4] == pytest.approx(0.2)
    assert eta[12] == pytest.approx(0.15)
    values = [eta[k] for k in (20, 16, 12, 8, 4)]
    assert values == sorted(values)


def test_guidance_gradient_is_minus_two_delta_grad_r():
    """grad (r_high - r)^2 with r_high = r + delta held fixed equals -2 delta grad r."""
    target = torch.tensor([1.0, -2.0, 0.5])
    r = lambda x: -((x - target) ** 2).sum(dim=1)  # noqa: E731
    x = torch.tensor([[0.0, 0.0, 0.0], [1.0, 1.0, 1.0]])
    grad, reward = guidance_gradient(x, r, delta=0.5)
    torch.testing.assert_close(grad, -2 * 0.5 * (-2 * (x - target)))
    torch.testing.assert_close(reward, r(x))
    x_plus, _ = guide(x, r, eta=0.1, delta=0.5, increase=True)
    x_minus, _ = guide(x, r, eta=0.1, delta=0.5, increase=False)
    assert (r(x_plus) > r(x)).all() and (r(x_minus) < r(x)).all()


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
