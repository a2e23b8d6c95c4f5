"""An exact test bed for step-level ranking: a Gaussian-mixture data distribution under the VP forward process.

TailorPO (Eq. 12) ranks two children x_{t-1}^0, x_{t-1}^1 of the same x_t by r(x0_hat(x_{t-1})), a stand-in for
the step-wise reward E[r(x_0) | x_{t-1}]; TailorPO-G (Eq. 14) moves the winner along
-grad (r_high - r(x0_hat))^2. With p(x_0) = sum_k w_k N(mu_k, s_k^2 I) and x_t = sqrt(a) x_0 + sqrt(1 - a) eps
(a = alpha_bar_t) everything either method needs is closed form:

    p_t(x_t)          = sum_k w_k N(x_t; sqrt(a) mu_k, v_k I),            v_k = a s_k^2 + 1 - a
    p(k | x_t)        ∝ w_k N(x_t; sqrt(a) mu_k, v_k I)
    p(x_0 | x_t, k)   = N(m_k, tau_k^2 I),  m_k = mu_k + sqrt(a) s_k^2 / v_k (x_t - sqrt(a) mu_k),
                                             tau_k^2 = s_k^2 (1 - a) / v_k
    E[x_0 | x_t]      = sum_k p(k | x_t) m_k            (the exact x0_hat; the exact eps follows from Eq. 2)

and for r(x) = -|x - target|^2, E[r(x_0) | x_t] = sum_k p(k | x_t) (-|m_k - target|^2 - d tau_k^2). A linear
reward would make the test trivial: E[a . x_0 | x_t] = a . x0_hat, so ranking by r(x0_hat) is exact.
All functions take a batch x_t of shape (B, d) and work in the dtype of their inputs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial

import torch

from tailorpo.core.ddim import ddim_mean, ddim_sigma
from tailorpo.core.guidance import guide
from tailorpo.core.ranking import order_by_winner, select_winner


@dataclass(frozen=True)
class GaussianMixture:
    """p(x_0) = sum_k weights[k] N(means[k], stds[k]^2 I) in d dims."""

    weights: torch.Tensor  # (K,), positive, sums to 1
    means: torch.Tensor  # (K, d)
    stds: torch.Tensor  # (K,), positive

    def __post_init__(self) -> None:
        k = self.weights.shape[0]
        if self.weights.ndim != 1 or self.stds.shape != (k,) or self.means.ndim != 2 or self.means.shape[0] != k:
            raise ValueError(
                f"GaussianMixture needs weights (K,), means (K, d), stds (K,); got {tuple(self.weights.shape)}, "
                f"{tuple(self.means.shape)}, {tuple(self.stds.shape)}"
            )
        if (self.weights <= 0).any() or not math.isclose(float(self.weights.sum()), 1.0, rel_tol=1e-6):
            raise ValueError("GaussianMixture.weights must be positive and sum to 1 (divide them by their sum)")
        if (self.stds <= 0).any():
            raise ValueError("GaussianMixture.stds must be positive (a zero std has no density)")

    @property
    def dim(self) -> int:
        return self.means.shape[1]


def marginal_components(mixture: GaussianMixture, alpha_bar: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Component k of p_t: mean sqrt(a) mu_k (K, d) and isotropic variance v_k = a s_k^2 + 1 - a (K,)."""
    return math.sqrt(alpha_bar) * mixture.means, alpha_bar * mixture.stds**2 + (1.0 - alpha_bar)


def joint_log_likelihood(mixture: GaussianMixture, x_t: torch.Tensor, alpha_bar: float) -> torch.Tensor:
    """log w_k + log N(x_t; sqrt(a) mu_k, v_k I), (B, K): the log joint p(x_t, k)."""
    means_t, variances_t = marginal_components(mixture, alpha_bar)
    squared = ((x_t[:, None, :] - means_t[None]) ** 2).sum(dim=-1)  # (B, K)
    log_normal = -0.5 * squared / variances_t - 0.5 * mixture.dim * torch.log(2 * math.pi * variances_t)
    return torch.log(mixture.weights) + log_normal


def marginal_log_prob(mixture: GaussianMixture, x_t: torch.Tensor, alpha_bar: float) -> torch.Tensor:
    """log p_t(x_t), (B,)."""
    return torch.logsumexp(joint_log_likelihood(mixture, x_t, alpha_bar), dim=1)


def component_posterior(mixture: GaussianMixture, x_t: torch.Tensor, alpha_bar: float) -> torch.Tensor:
    """p(k | x_t), (B, K): which component x_t came from."""
    return torch.softmax(joint_log_likelihood(mixture, x_t, alpha_bar), dim=1)


def conditional_posteriors(
    mixture: GaussianMixture, x_t: torch.Tensor, alpha_bar: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """p(x_0 | x_t, k) = N(m_k, tau_k^2 I): means m_k (B, K, d) and variances tau_k^2 (K,) (Gaussian conditioning
    of the jointly Gaussian (x_0, x_t) within one component)."""
    means_t, variances_t = marginal_components(mixture, alpha_bar)
    gain = math.sqrt(alpha_bar) * mixture.stds**2 / variances_t  # (K,)
    means = mixture.means[None] + gain[None, :, None] * (x_t[:, None, :] - means_t[None])
    return means, mixture.stds**2 * (1.0 - alpha_bar) / variances_t


def denoise(mixture: GaussianMixture, x_t: torch.Tensor, alpha_bar: float) -> torch.Tensor:
    """The exact x0_hat(x_t) = E[x_0 | x_t], (B, d)."""
    means, _ = conditional_posteriors(mixture, x_t, alpha_bar)
    return (component_posterior(mixture, x_t, alpha_bar)[..., None] * means).sum(dim=1)


def exact_eps(mixture: GaussianMixture, x_t: torch.Tensor, alpha_bar: float) -> torch.Tensor:
    """The eps-prediction whose x0_hat (paper Eq. 2) is the exact denoiser: (x_t - sqrt(a) E[x_0|x_t]) / sqrt(1-a),
    (B, d); it equals -sqrt(1 - a) grad log p_t(x_t) (Tweedie)."""
    return (x_t - math.sqrt(alpha_bar) * denoise(mixture, x_t, alpha_bar)) / math.sqrt(1.0 - alpha_bar)


def _sample_mixture(
    log_weights: torch.Tensor, means: torch.Tensor, variances: torch.Tensor, generator: torch.Generator | None
) -> torch.Tensor:
    """One draw per row from sum_k softmax(log_weights)_k N(means_k, variances_k I): log_weights (B, K),
    means (B, K, d), variances (K,) -> (B, d)."""
    component = torch.multinomial(torch.softmax(log_weights, dim=1), 1, generator=generator).squeeze(1)  # (B,)
    rows = torch.arange(means.shape[0])
    noise = torch.randn(means[:, 0].shape, generator=generator, dtype=means.dtype)
    return means[rows, component] + variances[component].sqrt()[:, None] * noise


def sample_data(mixture: GaussianMixture, num: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """x_0 ~ p(x_0), (num, d)."""
    log_weights = torch.log(mixture.weights).expand(num, -1)
    return _sample_mixture(log_weights, mixture.means.expand(num, -1, -1), mixture.stds**2, generator)


def sample_posterior(
    mixture: GaussianMixture, x_t: torch.Tensor, alpha_bar: float, generator: torch.Generator | None = None
) -> torch.Tensor:
    """x_0 ~ p(x_0 | x_t), one draw per row, (B, d): the true reverse process run to the end."""
    means, variances = conditional_posteriors(mixture, x_t, alpha_bar)
    return _sample_mixture(joint_log_likelihood(mixture, x_t, alpha_bar), means, variances, generator)


def quadratic_reward(x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """r(x) = -|x - target|^2, (B,)."""
    return -((x - target) ** 2).sum(dim=1)


def denoised_quadratic_reward(
    mixture: GaussianMixture, x_t: torch.Tensor, alpha_bar: float, target: torch.Tensor
) -> torch.Tensor:
    """TailorPO's step-wise reward r(x0_hat(x_t)) (Eq. 12) with the exact denoiser, (B,)."""
    return quadratic_reward(denoise(mixture, x_t, alpha_bar), target)


def expected_quadratic_reward(
    mixture: GaussianMixture, x_t: torch.Tensor, alpha_bar: float, target: torch.Tensor
) -> torch.Tensor:
    """E[r(x_0) | x_t] for r(x) = -|x - target|^2, (B,): sum_k p(k|x_t) (-|m_k - target|^2 - d tau_k^2).

    It equals r(x0_hat) - trace Cov[x_0 | x_t], so it never exceeds the reward of the predicted clean sample."""
    means, variances = conditional_posteriors(mixture, x_t, alpha_bar)
    per_component = -((means - target) ** 2).sum(dim=-1) - mixture.dim * variances  # (B, K)
    return (component_posterior(mixture, x_t, alpha_bar) * per_component).sum(dim=1)


def exact_ddim_step(
    mixture: GaussianMixture, x_t: torch.Tensor, alpha_t: float, alpha_prev: float, noise: torch.Tensor
) -> torch.Tensor:
    """x_{t-1} = mu(x_t) + sigma_t z with eta = 1 and the exact eps (the sampler a perfect model would run)."""
    mean, sigma, _ = ddim_mean(exact_eps(mixture, x_t, alpha_t), x_t, alpha_t, alpha_prev, eta=1.0)
    return mean + sigma * noise


@dataclass
class StepRanking:
    """How well the proxies rank sibling children x_{t-1}^0, x_{t-1}^1 at one DDIM step (rates over pairs)."""

    step: int  # k: x_k -> x_{k-1}, k = T..1
    alpha_prev: float  # alpha_bar of the children
    sigma: float  # DDIM sigma_t of the step (eta = 1)
    sibling_gap: float  # mean |E[r|x^1] - E[r|x^0]|: the reward difference a ranking has to resolve
    agree_x0_hat: float  # sign(r(x0_hat(x^1)) - r(x0_hat(x^0))) == sign(E[r|x^1] - E[r|x^0])
    agree_posterior_sample: float  # same with r of one draw from p(x_0 | x^i) per child
    agree_rollout: float  # same with r of the end of one exact-eps DDIM rollout per child
    guided_up: float  # fraction of winners whose E[r|x] one guidance step (Eq. 14) raised
    guided_gain: float  # mean change of E[r|x] over winners
    guided_proxy_up: float  # fraction whose r(x0_hat) it raised (the paper's Table 1 check)


def _agreement(proxy_0: torch.Tensor, proxy_1: torch.Tensor, exact_0: torch.Tensor, exact_1: torch.Tensor) -> float:
    return float((torch.sign(proxy_1 - proxy_0) == torch.sign(exact_1 - exact_0)).double().mean())


def _rollout(
    mixture: GaussianMixture,
    x: torch.Tensor,
    schedule: list[tuple[float, float]],
    generator: torch.Generator | None,
) -> torch.Tensor:
    """The end of an exact-eps DDIM (eta = 1) trajectory from x through the (alpha_t, alpha_prev) steps given."""
    for alpha_t, alpha_prev in schedule:
        noise = torch.randn(x.shape, generator=generator, dtype=x.dtype)
        x = exact_ddim_step(mixture, x, alpha_t, alpha_prev, noise)
    return x


def measure_step_ranking(
    mixture: GaussianMixture,
    target: torch.Tensor,
    schedule: list[tuple[float, float]],
    num_chains: int,
    guidance_eta: list[float],
    delta: float = 0.5,
    generator: torch.Generator | None = None,
) -> list[StepRanking]:
    """Per DDIM step, how often ranking siblings by r(x0_hat) (TailorPO Eq. 12), by one posterior draw, or by one
    rollout agrees with the exact step-wise reward E[r(x_0) | x_{t-1}], and whether one TailorPO-G step on the
    r(x0_hat) winner (Eq. 14, ``guide``) raises that exact reward.

    ``schedule`` lists (alpha_bar_t, alpha_bar_{t-1}) from the first step (k = T) to the last; ``guidance_eta``
    gives eta_t per step in the same order. The parents x_t follow plain exact-eps DDIM trajectories from
    N(0, I) (child 0 continues), so they are distributed as a perfect model's sampler visits them.
    """
    if len(guidance_eta) != len(schedule):
        raise ValueError(f"guidance_eta has {len(guidance_eta)} entries for {len(schedule)} steps: give one per step")
    dtype = mixture.means.dtype
    x = torch.randn(num_chains, mixture.dim, generator=generator, dtype=dtype)
    results = []
    for i, (alpha_t, alpha_prev) in enumerate(schedule):
        children = [
            exact_ddim_step(mixture, x, alpha_t, alpha_prev, torch.randn(x.shape, generator=generator, dtype=dtype))
            for _ in range(2)
        ]

        step_reward = partial(denoised_quadratic_reward, mixture, alpha_bar=alpha_prev, target=target)
        exact_reward = partial(expected_quadratic_reward, mixture, alpha_bar=alpha_prev, target=target)

        proxy = [step_reward(c) for c in children]
        exact = [exact_reward(c) for c in children]
        posterior = [quadratic_reward(sample_posterior(mixture, c, alpha_prev, generator), target) for c in children]
        rollout = [quadratic_reward(_rollout(mixture, c, schedule[i + 1 :], generator), target) for c in children]

        winner_is_1, _ = select_winner(proxy[0], proxy[1])
        winner, _ = order_by_winner(winner_is_1, children[0], children[1])
        guided, proxy_before = guide(winner, step_reward, eta=guidance_eta[i], delta=delta)
        gain = exact_reward(guided) - exact_reward(winner)
        results.append(
            StepRanking(
                step=len(schedule) - i,
                alpha_prev=alpha_prev,
                sigma=ddim_sigma(alpha_t, alpha_prev, eta=1.0),
                sibling_gap=float((exact[1] - exact[0]).abs().mean()),
                agree_x0_hat=_agreement(*proxy, *exact),
                agree_posterior_sample=_agreement(*posterior, *exact),
                agree_rollout=_agreement(*rollout, *exact),
                guided_up=float((gain > 0).double().mean()),
                guided_gain=float(gain.mean()),
                guided_proxy_up=float((step_reward(guided) > proxy_before).double().mean()),
            )
        )
        x = children[0]
    return results
