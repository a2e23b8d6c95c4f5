import inspect
import math

import torch
import torch.nn.functional as F

from tailorpo.core.ddim import gaussian_log_prob
from tailorpo.core.objectives import (
    PerPromptStatTracker,
    clip_joint_embedding,
    ddpo_loss,
    diff_contrast_logits,
    diff_contrast_loss,
    diff_contrast_weights,
    diffusion_dpo_logits,
    dpo_logits,
    mapo_log_odds,
    mapo_loss,
    mapo_score,
    noise_prediction_error,
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

    def log_p(x, mean):
        return gaussian_log_prob(x, mean, sigma, "sum")

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
    torch.testing.assert_close(
        tracker.advantages(prompts, first, clip=5.0), (first - batch_mean) / batch_std, atol=1e-5, rtol=0
    )
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


def log_sigmoid(z: float) -> float:
    """log sigma(z) in plain python, for the hand computations below."""
    return -math.log1p(math.exp(-z))


def test_preference_accuracy_counts_ties_as_half_like_diffusers():
    assert preference_accuracy(torch.tensor([0.0, 1.0, 2.0, -1.0])) == 0.625  # (1/2 + 1 + 1 + 0) / 4
    assert preference_accuracy(torch.tensor([0.0, -1.0, 2.0]), torch.tensor([True, False, False])) == 0.5


def test_noise_prediction_error_by_hand():
    eps = torch.tensor([[[[0.0, 1.0]]], [[[2.0, -1.0]]]])  # (2, 1, 1, 2)
    eps_pred = torch.tensor([[[[1.0, -1.0]]], [[[2.5, -1.0]]]])
    # sample 0: (1^2 + 2^2) / 2 = 2.5 ; sample 1: (0.5^2 + 0^2) / 2 = 0.125
    torch.testing.assert_close(noise_prediction_error(eps_pred, eps), torch.tensor([2.5, 0.125]))
    assert noise_prediction_error(eps_pred.half(), eps.half()).dtype == torch.float32
    assert noise_prediction_error(eps_pred.double(), eps.double()).dtype == torch.float64


def test_noise_prediction_error_gradient_matches_finite_differences():
    gen = torch.Generator().manual_seed(0)
    eps_pred = torch.randn(3, 2, 2, 2, generator=gen, dtype=torch.float64, requires_grad=True)
    eps = torch.randn(3, 2, 2, 2, generator=gen, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda p: noise_prediction_error(p, eps), (eps_pred,))


def test_diffusion_dpo_by_hand():
    err_w, ref_err_w = torch.tensor([0.30, 0.50]), torch.tensor([0.32, 0.48])
    err_l, ref_err_l = torch.tensor([0.40, 0.45]), torch.tensor([0.40, 0.46])
    logits = diffusion_dpo_logits(err_w, err_l, ref_err_w, ref_err_l, beta=100.0)
    # row 0: -50 * ((0.30 - 0.32) - (0.40 - 0.40)) = 1.0 ; row 1: -50 * ((0.50 - 0.48) - (0.45 - 0.46)) = -1.5
    torch.testing.assert_close(logits, torch.tensor([1.0, -1.5]))
    expected = -(log_sigmoid(1.0) + log_sigmoid(-1.5)) / 2
    torch.testing.assert_close(step_dpo_loss(logits), torch.tensor(expected))
    assert preference_accuracy(logits) == 0.5
    # a fresh LoRA equals the reference: every h is 0, the loss log 2 and the accuracy chance
    at_init = diffusion_dpo_logits(err_w, err_l, err_w, err_l, beta=100.0)
    torch.testing.assert_close(step_dpo_loss(at_init), torch.tensor(math.log(2)))
    assert preference_accuracy(at_init) == 0.5


def test_diffusion_dpo_gradient_lowers_winner_error_and_matches_finite_differences():
    gen = torch.Generator().manual_seed(0)
    err_w, err_l = (torch.rand(4, generator=gen, dtype=torch.float64).requires_grad_(True) for _ in range(2))
    ref_err_w, ref_err_l = (torch.rand(4, generator=gen, dtype=torch.float64) for _ in range(2))

    def loss(e_w, e_l):
        return step_dpo_loss(diffusion_dpo_logits(e_w, e_l, ref_err_w, ref_err_l, beta=3.0))

    assert torch.autograd.gradcheck(loss, (err_w, err_l))
    grad_w, grad_l = torch.autograd.grad(loss(err_w, err_l), (err_w, err_l))
    assert (grad_w > 0).all() and (grad_l < 0).all()  # descent lowers e^w and raises e^l


def test_mapo_score_by_hand_and_safe_at_zero():
    s = 0.5
    err = torch.tensor([0.0, 0.5, 2.0, 10.0], dtype=torch.float64, requires_grad=True)
    expected = [1.0] + [s * e / math.expm1(s * e) for e in (0.5, 2.0, 10.0)]
    g = mapo_score(err, s)
    torch.testing.assert_close(g, torch.tensor(expected, dtype=torch.float64), atol=1e-14, rtol=0)
    assert g[0].item() == 1.0  # the limit of x / (e^x - 1) at 0, not NaN
    (grad,) = torch.autograd.grad(g.sum(), err)
    assert grad[0].item() == -s / 2  # d/de g(s e) at 0 = s * (-1/2)
    # either side of the switch to the series, the value matches the closed form
    for x in (0.999e-2, 1.001e-2):
        torch.testing.assert_close(
            mapo_score(torch.tensor([x / s], dtype=torch.float64), s),
            torch.tensor([x / math.expm1(x)], dtype=torch.float64),
            atol=1e-15,
            rtol=0,
        )


def test_mapo_score_gradients_finite_in_float32():
    err = torch.tensor([0.0, 1e-8, 1e-6, 1e3, 1e12], requires_grad=True)
    g = mapo_score(err, 0.5)
    (grad,) = torch.autograd.grad(g.sum(), err)
    assert torch.isfinite(g).all() and torch.isfinite(grad).all()
    # near 0 the slope is -s/2; the closed form's autograd gives garbage there in float32
    torch.testing.assert_close(grad[:3], torch.full((3,), -0.25), atol=1e-6, rtol=0)
    torch.testing.assert_close(g[3:], torch.zeros(2), atol=1e-30, rtol=0)


def test_mapo_loss_by_hand():
    s, beta_mapo, steps = 0.5, 0.1, 1000
    err_w, err_l = [0.200, 0.300], [0.202, 0.297]
    g = [[s * e / math.expm1(s * e) for e in pair] for pair in zip(err_w, err_l, strict=True)]
    margins = [g_w - g_l for g_w, g_l in g]
    expected = sum(err_w) / 2 - beta_mapo * sum(log_sigmoid(steps * m) for m in margins) / 2
    log_odds = mapo_log_odds(torch.tensor(err_w), torch.tensor(err_l), s)
    torch.testing.assert_close(log_odds, torch.tensor(margins))
    torch.testing.assert_close(mapo_loss(torch.tensor(err_w), log_odds, beta_mapo, steps), torch.tensor(expected))
    assert log_odds[0] > 0 > log_odds[1]  # pair 0's winner has the lower error, pair 1's the higher


def test_mapo_gradient_matches_finite_differences_including_zero_error():
    err_w = torch.tensor([0.0, 1e-4, 0.3, 2.0, 50.0], dtype=torch.float64, requires_grad=True)
    err_l = torch.tensor([0.5, 0.0, 0.31, 1.9, 60.0], dtype=torch.float64, requires_grad=True)

    def loss(e_w, e_l):
        return mapo_loss(e_w, mapo_log_odds(e_w, e_l, 0.5), 0.1, 1000)

    assert torch.autograd.gradcheck(loss, (err_w, err_l))
    grad_w, grad_l = torch.autograd.grad(loss(err_w, err_l), (err_w, err_l))
    assert torch.isfinite(grad_w).all() and torch.isfinite(grad_l).all()
    assert (grad_w > 0).all() and (grad_l <= 0).all()  # descent lowers e^w and never lowers e^l


def test_mapo_takes_no_reference():
    for fn in (mapo_score, mapo_log_odds, mapo_loss):
        params = inspect.signature(fn).parameters
        assert not [name for name in params if "ref" in name], fn.__name__
    assert list(inspect.signature(mapo_log_odds).parameters) == ["err_w", "err_l", "snr_value"]


def test_clip_joint_embedding_by_hand():
    image, text = torch.tensor([[3.0, 4.0]]), torch.tensor([[0.0, 2.0]])
    # (0.6, 0.8) + (0, 1) = (0.6, 1.8), norm sqrt(3.6)
    expected = torch.tensor([[0.6, 1.8]]) / math.sqrt(3.6)
    torch.testing.assert_close(clip_joint_embedding(image, text), expected)
    torch.testing.assert_close(clip_joint_embedding(image, 100 * text), expected)  # no modality wins by norm


def test_diff_contrast_weights_by_hand():
    emb_w = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    emb_l = torch.tensor([[1.0, 1.0], [0.0, 2.0]])  # unnormalised on purpose
    tau = 0.5
    cos = [[1 / math.sqrt(2), 0.0], [1 / math.sqrt(2), 1.0]]
    w_tilde = [[math.exp(-(1 - c) / tau) for c in row] for row in cos]
    expected = torch.tensor([[w / sum(row) for w in row] for row in w_tilde])
    torch.testing.assert_close(diff_contrast_weights(emb_w, emb_l, tau), expected)


def test_diff_contrast_weights_rows_sum_to_one_and_tau_limits():
    gen = torch.Generator().manual_seed(0)
    m = 5
    emb_w = torch.randn(m, 8, generator=gen)
    perm = torch.tensor([2, 0, 4, 1, 3])
    emb_l = emb_w[perm] + 0.05 * torch.randn(m, 8, generator=gen)  # loser j is a near copy of winner perm[j]
    for tau in (1e-3, 0.01, 1.0, 100.0):
        torch.testing.assert_close(diff_contrast_weights(emb_w, emb_l, tau).sum(dim=1), torch.ones(m))
    torch.testing.assert_close(diff_contrast_weights(emb_w, emb_l, 1e6), torch.full((m, m), 1 / m))
    sharp = diff_contrast_weights(emb_w, emb_l, 1e-3)
    nearest_loser = torch.argsort(perm)  # winner i's near copy sits at the j with perm[j] = i
    assert torch.equal(sharp.argmax(dim=1), nearest_loser)
    assert (sharp.max(dim=1).values > 0.99).all()


def test_diff_contrast_loss_by_hand():
    beta = 10.0
    err_w, ref_err_w = [0.30, 0.50], [0.35, 0.45]
    err_l, ref_err_l = [0.40, 0.20], [0.38, 0.30]
    weights = [[0.75, 0.25], [0.4, 0.6]]
    h = [[-beta / 2 * ((err_w[i] - ref_err_w[i]) - (err_l[j] - ref_err_l[j])) for j in range(2)] for i in range(2)]
    expected = -sum(weights[i][j] * log_sigmoid(h[i][j]) for i in range(2) for j in range(2)) / 2
    logits = diff_contrast_logits(*map(torch.tensor, (err_w, err_l, ref_err_w, ref_err_l)), beta)
    torch.testing.assert_close(logits, torch.tensor(h))
    torch.testing.assert_close(diff_contrast_loss(logits, torch.tensor(weights)), torch.tensor(expected))


def test_diff_contrast_reduces_to_diffusion_dpo():
    gen = torch.Generator().manual_seed(0)
    errs = [torch.rand(3, generator=gen) for _ in range(4)]  # err_w, err_l, ref_err_w, ref_err_l
    dpo = diffusion_dpo_logits(*errs, beta=5.0)
    contrast = diff_contrast_logits(*errs, beta=5.0)
    torch.testing.assert_close(contrast.diagonal(), dpo)
    # M = 1: one winner, one loser, weight 1
    one = [e[:1] for e in errs]
    weight = diff_contrast_weights(torch.randn(1, 4, generator=gen), torch.randn(1, 4, generator=gen), tau=0.01)
    torch.testing.assert_close(
        diff_contrast_loss(diff_contrast_logits(*one, beta=5.0), weight),
        step_dpo_loss(diffusion_dpo_logits(*one, beta=5.0)),
    )
    # small tau with each winner nearest its own loser: W = I and the batch loss is Diffusion-DPO's mean
    emb = torch.randn(3, 4, generator=gen)
    weights = diff_contrast_weights(emb, emb + 0.01 * torch.randn(3, 4, generator=gen), tau=1e-3)
    torch.testing.assert_close(weights, torch.eye(3), atol=1e-6, rtol=0)
    torch.testing.assert_close(diff_contrast_loss(contrast, weights), step_dpo_loss(dpo))


def test_diff_contrast_gradient_matches_finite_differences():
    gen = torch.Generator().manual_seed(0)
    errs = [torch.rand(3, generator=gen, dtype=torch.float64).requires_grad_(True) for _ in range(4)]
    image, text = (torch.randn(2, 3, 4, generator=gen, dtype=torch.float64) for _ in range(2))
    image.requires_grad_(True)

    def loss(err_w, err_l, ref_err_w, ref_err_l, image):
        f_w, f_l = clip_joint_embedding(image, text)
        weights = diff_contrast_weights(f_w, f_l, tau=0.5)
        return diff_contrast_loss(diff_contrast_logits(err_w, err_l, ref_err_w, ref_err_l, beta=4.0), weights)

    assert torch.autograd.gradcheck(loss, (*errs, image))
