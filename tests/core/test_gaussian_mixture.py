"""The Gaussian-mixture test bed: closed forms against textbook Gaussian conditioning, importance sampling from
the prior and autograd, and the per-step ranking measurement on SD v1.5's DDIM schedule."""

import math

import pytest
import torch

from experiments.analytic_testbed import main, sd_schedule
from tailorpo.core.gaussian_mixture import (
    GaussianMixture,
    component_posterior,
    conditional_posteriors,
    denoise,
    exact_eps,
    expected_quadratic_reward,
    marginal_log_prob,
    measure_step_ranking,
    quadratic_reward,
    sample_data,
    sample_posterior,
)

F64 = torch.float64


def three_components(dim: int = 2) -> GaussianMixture:
    means = torch.tensor([[1.0, 0.5], [-1.0, 0.0], [0.2, -1.2]], dtype=F64)[:, :dim]
    return GaussianMixture(torch.tensor([0.5, 0.3, 0.2], dtype=F64), means, torch.tensor([0.2, 0.5, 0.3], dtype=F64))


def test_one_component_is_textbook_gaussian_conditioning():
    """K = 1: (x_0, x_t) is jointly Gaussian, so E[x_0|x_t] = mu + C_0t C_tt^{-1} (x_t - sqrt(a) mu) and
    Cov = C_00 - C_0t C_tt^{-1} C_t0, computed here with full matrices; p_t is N(sqrt(a) mu, C_tt)."""
    dim, a, s = 3, 0.3, 0.7
    mu = torch.tensor([0.5, -1.0, 2.0], dtype=F64)
    mixture = GaussianMixture(torch.ones(1, dtype=F64), mu[None], torch.tensor([s], dtype=F64))
    eye = torch.eye(dim, dtype=F64)
    c_00, c_0t, c_tt = s**2 * eye, math.sqrt(a) * s**2 * eye, (a * s**2 + 1 - a) * eye
    x_t = torch.randn(5, dim, generator=torch.Generator().manual_seed(0), dtype=F64)
    expected_mean = mu + (c_0t @ torch.linalg.solve(c_tt, (x_t - math.sqrt(a) * mu).T)).T
    expected_cov = c_00 - c_0t @ torch.linalg.solve(c_tt, c_0t.T)
    means, variances = conditional_posteriors(mixture, x_t, a)
    torch.testing.assert_close(denoise(mixture, x_t, a), expected_mean)
    torch.testing.assert_close(means[:, 0], expected_mean)
    torch.testing.assert_close(variances[0] * eye, expected_cov)
    marginal = torch.distributions.MultivariateNormal(math.sqrt(a) * mu, c_tt)
    torch.testing.assert_close(marginal_log_prob(mixture, x_t, a), marginal.log_prob(x_t))


def test_posterior_moments_and_expected_reward_match_importance_sampling_from_the_prior():
    """E[f(x_0) | x_t] = E_{x_0 ~ p}[f(x_0) N(x_t; sqrt(a) x_0, (1-a) I)] / E_p[N(...)]: a check that uses only
    the data distribution and the forward process, not the posterior formulas; the posterior sampler must
    reproduce the same mean, second moment and reward."""
    mixture, a, target = three_components(), 0.4, torch.tensor([0.3, 0.3], dtype=F64)
    generator = torch.Generator().manual_seed(0)
    x0 = sample_data(mixture, 400_000, generator)
    x_t = torch.tensor([[0.6, 0.3], [-0.5, 0.1], [0.0, -0.8]], dtype=F64)
    for point in x_t:
        log_w = -((point - math.sqrt(a) * x0) ** 2).sum(dim=1) / (2 * (1 - a))
        w = torch.softmax(log_w, dim=0)[:, None]
        draws = sample_posterior(mixture, point.expand(200_000, -1), a, generator)
        closed_mean = denoise(mixture, point[None], a)[0]
        closed_reward = expected_quadratic_reward(mixture, point[None], a, target)[0]
        torch.testing.assert_close(closed_mean, (w * x0).sum(dim=0), atol=0.01, rtol=0)
        torch.testing.assert_close(draws.mean(dim=0), closed_mean, atol=0.01, rtol=0)
        second_moment = (w[:, :, None] * x0[:, :, None] * x0[:, None, :]).sum(dim=0)
        torch.testing.assert_close(draws.T @ draws / len(draws), second_moment, atol=0.01, rtol=0)
        torch.testing.assert_close(closed_reward, (w[:, 0] * quadratic_reward(x0, target)).sum(), atol=0.02, rtol=0)
        torch.testing.assert_close(quadratic_reward(draws, target).mean(), closed_reward, atol=0.02, rtol=0)


def test_sample_data_has_the_mixture_moments():
    mixture = three_components()
    x0 = sample_data(mixture, 400_000, torch.Generator().manual_seed(1))
    mean = (mixture.weights[:, None] * mixture.means).sum(dim=0)
    second = (mixture.weights[:, None] * (mixture.means**2 + mixture.stds[:, None] ** 2)).sum(dim=0)
    torch.testing.assert_close(x0.mean(dim=0), mean, atol=0.01, rtol=0)
    torch.testing.assert_close((x0**2).mean(dim=0), second, atol=0.01, rtol=0)


def test_exact_eps_is_the_scaled_score_tweedie():
    """eps(x_t) = -sqrt(1 - a) grad log p_t(x_t): the denoiser (from the posterior) agrees with the marginal."""
    mixture, a = three_components(), 0.25
    x_t = torch.randn(6, 2, generator=torch.Generator().manual_seed(2), dtype=F64).requires_grad_(True)
    (score,) = torch.autograd.grad(marginal_log_prob(mixture, x_t, a).sum(), x_t)
    torch.testing.assert_close(exact_eps(mixture, x_t.detach(), a), -math.sqrt(1 - a) * score)


def test_expected_reward_is_reward_of_denoised_minus_posterior_spread():
    """E[-|x_0 - c|^2 | x_t] = -|x0_hat - c|^2 - trace Cov[x_0|x_t] <= r(x0_hat), with equality only as a -> 1."""
    mixture, target = three_components(), torch.tensor([0.0, 1.0], dtype=F64)
    x_t = torch.randn(50, 2, generator=torch.Generator().manual_seed(3), dtype=F64)
    for a in (0.05, 0.5, 0.95):
        means, variances = conditional_posteriors(mixture, x_t, a)
        weights = component_posterior(mixture, x_t, a)
        mean = denoise(mixture, x_t, a)
        spread = (weights * (2 * variances + ((means - mean[:, None]) ** 2).sum(dim=-1))).sum(dim=1)
        expected = expected_quadratic_reward(mixture, x_t, a, target)
        torch.testing.assert_close(expected, quadratic_reward(mean, target) - spread)
        assert (expected < quadratic_reward(mean, target)).all()


@pytest.mark.parametrize("fn", [denoise, exact_eps, marginal_log_prob])
def test_closed_forms_have_correct_gradients(fn):
    mixture = three_components()
    x_t = torch.randn(3, 2, generator=torch.Generator().manual_seed(4), dtype=F64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: fn(mixture, x, 0.3), (x_t,))


def test_expected_reward_has_correct_gradient():
    mixture, target = three_components(), torch.tensor([0.5, 0.0], dtype=F64)
    x_t = torch.randn(3, 2, generator=torch.Generator().manual_seed(5), dtype=F64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: expected_quadratic_reward(mixture, x, 0.3, target), (x_t,))


def test_invalid_mixture_names_the_field():
    means, stds = torch.zeros(2, 3), torch.ones(2)
    with pytest.raises(ValueError, match="weights must be positive and sum to 1"):
        GaussianMixture(torch.tensor([0.5, 0.6]), means, stds)
    with pytest.raises(ValueError, match="stds must be positive"):
        GaussianMixture(torch.tensor([0.5, 0.5]), means, torch.tensor([1.0, 0.0]))
    with pytest.raises(ValueError, match=r"means \(K, d\)"):
        GaussianMixture(torch.tensor([0.5, 0.5]), torch.zeros(3, 3), stds)


def test_ranking_agrees_less_at_high_noise_and_guidance_raises_the_step_reward():
    """On SD v1.5's 20-step schedule the last steps' children are nearly clean, so r(x0_hat) ranks them as the
    exact E[r|x] does; at the first steps the posterior spread differs between siblings and ranking errs more.
    One guidance step raises r(x0_hat) for nearly all winners (the paper's Table 1)."""
    schedule = sd_schedule(20)
    rows = measure_step_ranking(
        three_components(),
        torch.tensor([0.4, -0.4], dtype=F64),
        schedule,
        num_chains=2048,
        guidance_eta=[0.2] * len(schedule),
        generator=torch.Generator().manual_seed(0),
    )
    assert [r.step for r in rows] == list(range(20, 0, -1))
    high = sum(r.agree_x0_hat for r in rows[:5]) / 5
    low = sum(r.agree_x0_hat for r in rows[-3:]) / 3
    assert low > 0.99 and high < low - 0.03, (high, low)
    assert min(r.guided_proxy_up for r in rows) > 0.9 and sum(r.guided_proxy_up for r in rows) / 20 > 0.97
    # a single rollout is a noisy ranker where the sibling gap is small relative to the outcome's spread
    assert rows[0].agree_rollout < rows[0].agree_x0_hat
    with pytest.raises(ValueError, match="one per step"):
        measure_step_ranking(three_components(), torch.zeros(2, dtype=F64), schedule, 4, [0.2])


def test_experiment_writes_a_markdown_row_per_step(tmp_path, monkeypatch):
    out = tmp_path / "table.md"
    monkeypatch.setattr("sys.argv", ["analytic_testbed", "--out", str(out), "--dim", "2", "--chains", "64"])
    main()
    rows = [line for line in out.read_text().splitlines() if line.startswith("| ") and line[2].isdigit()]
    assert [int(line.split("|")[1]) for line in rows] == list(range(20, 0, -1))
