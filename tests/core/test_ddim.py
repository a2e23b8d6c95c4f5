import math

import pytest
import torch
from diffusers import DDIMScheduler

from tailorpo.core.ddim import ddim_sigma, ddim_step, gaussian_log_prob, predict_x0
from tailorpo.diffusion.policy import step_alphas


@pytest.fixture
def scheduler():
    sched = DDIMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
        set_alpha_to_one=False, steps_offset=1, timestep_spacing="leading",
    )
    sched.set_timesteps(20)
    return sched


def test_step_matches_diffusers_for_every_timestep(scheduler):
    gen = torch.Generator().manual_seed(0)
    for t in scheduler.timesteps.tolist():
        x = torch.randn(2, 4, 8, 8, generator=gen)
        eps = torch.randn(2, 4, 8, 8, generator=gen)
        z = torch.randn(2, 4, 8, 8, generator=gen)
        expected = scheduler.step(eps, t, x, eta=1.0, variance_noise=z)
        ours = ddim_step(eps, x, *step_alphas(scheduler, t), eta=1.0, noise=z)
        torch.testing.assert_close(ours.prev_sample, expected.prev_sample, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(ours.pred_original_sample, expected.pred_original_sample, atol=1e-5, rtol=1e-5)


def test_last_step_uses_final_alpha(scheduler):
    t = scheduler.timesteps[-1].item()  # 1 for SD's leading spacing: prev timestep -49 < 0
    _, alpha_prev = step_alphas(scheduler, t)
    assert alpha_prev == pytest.approx(float(scheduler.alphas_cumprod[0]))


def test_log_prob_is_the_closed_form_gaussian(scheduler):
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(3, 4, 8, 8, generator=gen)
    eps = torch.randn(3, 4, 8, 8, generator=gen)
    alpha_t, alpha_prev = step_alphas(scheduler, scheduler.timesteps[5].item())
    step = ddim_step(eps, x, alpha_t, alpha_prev, noise=torch.randn(x.shape, generator=gen), reduction="sum")
    sigma = math.sqrt((1 - alpha_prev) / (1 - alpha_t) * (1 - alpha_t / alpha_prev))
    assert step.std == pytest.approx(sigma)
    closed = torch.distributions.Normal(step.mean, sigma).log_prob(step.prev_sample).sum(dim=(1, 2, 3))
    torch.testing.assert_close(step.log_prob, closed, atol=1e-3, rtol=1e-6)
    mean_reduced = gaussian_log_prob(step.prev_sample, step.mean, sigma, "mean")
    torch.testing.assert_close(mean_reduced, closed / (4 * 8 * 8), atol=1e-5, rtol=1e-6)


def test_x0_hat_inverts_the_forward_process():
    gen = torch.Generator().manual_seed(2)
    x0, eps = torch.randn(2, 4, 8, 8, generator=gen), torch.randn(2, 4, 8, 8, generator=gen)
    alpha = 0.3
    x_t = math.sqrt(alpha) * x0 + math.sqrt(1 - alpha) * eps  # Eq. 1
    torch.testing.assert_close(predict_x0(x_t, eps, alpha), x0)


def test_sigma_is_zero_for_eta_zero_and_step_rejects_it():
    assert ddim_sigma(0.5, 0.6, 0.0) == 0.0
    with pytest.raises(ValueError, match="eta"):
        ddim_step(torch.zeros(1, 1), torch.zeros(1, 1), 0.5, 0.6, eta=0.0)
