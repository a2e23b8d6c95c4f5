import math

import torch
import torch.nn.functional as F

from tailorpo.ddim import gaussian_log_prob
from tailorpo.objectives import (
    PerPromptStatTracker,
    ddpo_loss,
    dpo_logits,
    normalized_advantages,
    preference_accuracy,
    step_dpo_loss,
)


def test_dpo_logits_and_loss_by_hand():
    lw, ll = torch.tensor([-1.0, -2.0]), torch.tensor([-1.5, -1.0])
    rw, rl = torch.tensor([-1.2, -2.0]), torch.tensor([-1.5, -1.2])
    logits = dpo_logits(lw, ll, rw, rl, beta=2.0)
    # row 0: 2 * ((-1 + 1.2) - (-1.5 + 1.5)) = 0.4 ; row 1: 2 * (0 - 0.2) = -0.4
    torch.testing.assert_close(logits, torch.tensor([0.4, -0.4]))
    expected = -(math.log(1 / (1 + math.exp(-0.4))) + math.log(1 / (1 + math.exp(0.4)))) / 2
    assert step_dpo_loss(logits).item() == torch.tensor(expected).item()
    assert preference_accuracy(logits) == 0.5


def test_ratio_clip_bounds_each_log_ratio_like_d3po():
    lw, ll = torch.tensor([5.0]), torch.tensor([-5.0])
    zero = torch.zeros(1)
    logits = dpo_logits(lw, ll, zero, zero, beta=1.0, ratio_clip=0.1)
    torch.testing.assert_close(logits, torch.tensor([math.log(1.1) - math.log(0.9)]))


def test_ties_are_dropped_from_the_loss():
    logits = torch.tensor([1.0, -3.0, 0.5])
    valid = torch.tensor([True, False, True])
    expected = -(F.logsigmoid(torch.tensor(1.0)) + F.logsigmoid(torch.tensor(0.5))) / 2
    torch.testing.assert_close(step_dpo_loss(logits, valid), expected)
    assert step_dpo_loss(logits, torch.zeros(3, dtype=torch.bool)).item() == 0.0


def test_tailorpo_gradient_points_toward_the_winner_eq11():
    """With both children drawn from one x_t, dL/dmu = -(f/sigma^2)(x^w - x^l) (Eq. 11, 'sum' log-probs)."""
    gen = torch.Generator().manual_seed(0)
    mean_ref = torch.randn(1, 4, 4, 4, generator=gen)
    mu = (mean_ref + 0.01 * torch.randn(1, 4, 4, 4, generator=gen)).requires_grad_(True)
    sigma, beta = 0.3, 0.5
    x_w = mean_ref + sigma * torch.randn(1, 4, 4, 4, generator=gen)
    x_l = mean_ref + sigma * torch.randn(1, 4, 4, 4, generator=gen)
    log_p = lambda x, mean: gaussian_log_prob(x, mean, sigma, "sum")  # noqa: E731
    logits = dpo_logits(log_p(x_w, mu), log_p(x_l, mu), log_p(x_w, mean_ref), log_p(x_l, mean_ref), beta)
    (grad,) = torch.autograd.grad(step_dpo_loss(logits), mu)
    f = beta * (1 - torch.sigmoid(logits.detach()))
    torch.testing.assert_close(grad, -(f / sigma**2) * (x_w - x_l), atol=1e-4, rtol=1e-4)
    # one descent step moves mu toward x^w and away from x^l
    moved = mu.detach() - 1e-3 * grad
    assert (moved - x_w).norm() < (mu.detach() - x_w).norm()
    assert (moved - x_l).norm() > (mu.detach() - x_l).norm()


def test_ddpo_loss_by_hand():
    adv = torch.tensor([1.0, -2.0])
    old = torch.tensor([0.0, 0.0])
    new = torch.tensor([math.log(1.5), math.log(0.5)])
    # ratio 1.5 with A=1: max(-1.5, -1.1) = -1.1 ; ratio 0.5 with A=-2: max(1.0, 1.8) = 1.8
    torch.testing.assert_close(ddpo_loss(new, old, adv, clip_range=0.1), torch.tensor((-1.1 + 1.8) / 2))
    # at ratio 1 the surrogate is -mean(A)
    torch.testing.assert_close(ddpo_loss(old, old, adv, 0.1), -adv.mean())


def test_per_prompt_stat_tracker_like_ddpo_pytorch():
    tracker = PerPromptStatTracker(buffer_size=4, min_count=3)
    prompts = ["cat", "cat", "dog"]
    first = torch.tensor([1.0, 3.0, 5.0])
    # fewer than min_count rewards per prompt: the batch's statistics stand in
    batch_mean, batch_std = first.mean(), first.std(unbiased=False)
    torch.testing.assert_close(tracker.advantages(prompts, first, clip=5.0), (first - batch_mean) / batch_std,
                               atol=1e-5, rtol=0)
    second = torch.tensor([2.0, 6.0, 5.0])
    adv = tracker.advantages(prompts, second, clip=5.0)
    cat_history = torch.tensor([1.0, 3.0, 2.0, 6.0])  # 4 >= min_count: the prompt's own history
    expected_cat = (second[:2] - cat_history.mean()) / cat_history.std(unbiased=False)
    torch.testing.assert_close(adv[:2], expected_cat, atol=1e-5, rtol=0)
    assert len(tracker.history["dog"]) == 2  # dog still uses the batch statistics
    torch.testing.assert_close(adv[2], (5.0 - second.mean()) / second.std(unbiased=False), atol=1e-5, rtol=0)
    tracker.advantages(["cat"] * 3, torch.tensor([0.0, 0.0, 0.0]), clip=5.0)
    assert list(tracker.history["cat"]) == [6.0, 0.0, 0.0, 0.0]  # the buffer keeps the last 4


def test_normalized_advantages_clip():
    adv = normalized_advantages(torch.tensor([0.0, 100.0]), mean=0.0, std=1.0, clip=5.0)
    torch.testing.assert_close(adv, torch.tensor([0.0, 5.0]))
