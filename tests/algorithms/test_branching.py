import pytest
import torch

from tailorpo.algorithms.branching import (
    branch_pair,
    guidance_schedule,
    sample_children,
    tailorpo_rollout,
)
from tailorpo.algorithms.rollouts import d3po_rollout, ddpo_rollout, pair_stats_by_step
from tailorpo.config import BranchingConfig, ConfigError, GuidanceConfig, load_config
from tailorpo.core.ddim import ddim_sigma
from tailorpo.core.guidance import cosine_eta_schedule
from tailorpo.core.ranking import (
    best_and_worst,
    gap_is_valid,
    order_by_winner,
    select_winner,
)
from tailorpo.rewards import build_reward
from tailorpo.rewards.base import TorchReward
from tailorpo.rewards.colorfulness import colorfulness

PROMPTS = ["a cat", "a red car", "a bird"]


def test_children_share_one_x_t_and_one_eps(policy):
    gen = torch.Generator().manual_seed(0)
    x_t = torch.randn(2, 4, 16, 16, generator=gen)
    eps = torch.randn(2, 4, 16, 16, generator=gen)
    evals = policy.unet_evals
    children = sample_children(policy, 3, eps, x_t, torch.Generator().manual_seed(7))
    assert policy.unet_evals == evals  # the pair costs no UNet call: eps at x_t is given
    z = torch.randn((2, 2, 4, 16, 16), generator=torch.Generator().manual_seed(7))
    step = policy.step(3, eps, x_t, noise=z[0])
    torch.testing.assert_close(children[0], step.prev_sample)
    torch.testing.assert_close(children[1], step.mean + step.std * z[1])
    assert not torch.allclose(children[0], children[1])


def test_select_winner_and_ties():
    winner_is_1, tie = select_winner(torch.tensor([1.0, 2.0, 3.0]), torch.tensor([2.0, 1.0, 3.0]))
    assert winner_is_1.tolist() == [True, False, False] and tie.tolist() == [False, False, True]
    w, l = order_by_winner(winner_is_1, torch.tensor([[0.0], [0.0], [0.0]]), torch.tensor([[1.0], [1.0], [1.0]]))
    assert w.flatten().tolist() == [1.0, 0.0, 0.0] and l.flatten().tolist() == [0.0, 1.0, 1.0]


def test_tailorpo_reuses_the_winner_eps(policy):
    """20 steps + one extra (batched) UNet eval per branching step: the winner's eps at t-1 is never
    recomputed. A branch at k=1 needs none (x0_hat(x_0) = x_0), and x_0 is decoded once."""
    reward = build_reward("jpeg")
    policy.unet_evals = policy.vae_decodes = 0
    tailorpo_rollout(policy, reward, PROMPTS, torch.Generator().manual_seed(0), [20, 16, 12, 8, 4])
    assert policy.unet_evals == len(PROMPTS) * (20 + 5)
    assert policy.vae_decodes == len(PROMPTS) * (2 * 5 + 1)
    policy.unet_evals = policy.vae_decodes = 0
    tailorpo_rollout(policy, reward, PROMPTS, torch.Generator().manual_seed(0), [20, 1])
    assert policy.unet_evals == len(PROMPTS) * (20 + 1)
    assert policy.vae_decodes == len(PROMPTS) * 2 * 2


def _recomputed_step_reward(policy, reward, step_index, x_next):
    with torch.no_grad():
        embeds = policy.encode_prompts(PROMPTS)
        x0 = policy.predict_x0_after(step_index, x_next, policy.eps(x_next, step_index + 1, embeds))
        return reward.score(policy.decode(x0), PROMPTS).scores


def test_tailorpo_winner_continues_the_chain_and_has_the_higher_step_reward(policy):
    reward = build_reward("jpeg")
    rollout = tailorpo_rollout(policy, reward, PROMPTS, torch.Generator().manual_seed(1), [20, 19, 10])
    pairs, b = rollout.data, len(PROMPTS)
    assert pairs.shared_parent and pairs.x_t_l is pairs.x_t_w
    torch.testing.assert_close(pairs.x_t_w[b : 2 * b], pairs.x_next_w[:b])  # winner at k=20 = parent at k=19
    # both rewards are those of decode(x0_hat(x)), recomputed from scratch, and the winner's is higher
    i = int(pairs.step_index[0])
    r_w = _recomputed_step_reward(policy, reward, i, pairs.x_next_w[:b])
    r_l = _recomputed_step_reward(policy, reward, i, pairs.x_next_l[:b])
    torch.testing.assert_close(r_w, pairs.reward_w[:b])
    torch.testing.assert_close(r_l, pairs.reward_l[:b])
    assert ((r_w > r_l) | (r_w == r_l) & ~pairs.valid[:b]).all()


def test_tailorpo_g_moves_the_winner_and_continues_from_x_plus(policy):
    reward = build_reward("colorfulness")
    gen = lambda: torch.Generator().manual_seed(2)
    plain = tailorpo_rollout(policy, reward, PROMPTS, gen(), [20, 19])
    eta = cosine_eta_schedule([20, 19])
    guided = tailorpo_rollout(policy, reward, PROMPTS, gen(), [20, 19], guidance_eta=eta)
    b = len(PROMPTS)
    # same draws up to the first winner, which guidance then moves up the reward
    torch.testing.assert_close(guided.data.x_t_w[:b], plain.data.x_t_w[:b])
    x_plus = guided.data.x_next_w[:b]
    assert not torch.allclose(x_plus, plain.data.x_next_w[:b])
    torch.testing.assert_close(guided.data.x_t_w[b:], x_plus)  # x^+ is the next parent
    r_plus = _recomputed_step_reward(policy, reward, 0, x_plus)
    assert (r_plus > guided.data.reward_w[:b]).all()
    assert all(p.grad is None for p in policy.unet.parameters())  # guidance leaves no gradient on the LoRA


@pytest.mark.parametrize("through_unet", [True, False])
def test_guidance_in_chunks_of_rows_gives_the_same_x_plus(policy, through_unet):
    """guidance.chunk_size=1: one backward pass per prompt, a smaller peak, the same x^+ and chain."""
    reward, eta = build_reward("colorfulness"), cosine_eta_schedule([20, 12])
    whole, per_prompt = (
        tailorpo_rollout(policy, reward, PROMPTS, torch.Generator().manual_seed(2), [20, 12], guidance_eta=eta,
                         guidance=GuidanceConfig(through_unet=through_unet, chunk_size=chunk)).data
        for chunk in (None, 1)
    )
    assert len(PROMPTS) > 1
    # batch size changes the kernels' summation order: round-off of 1e-5, carried down the chain
    torch.testing.assert_close(per_prompt.x_next_w, whole.x_next_w, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(per_prompt.x_t_w, whole.x_t_w, rtol=1e-4, atol=1e-4)


def test_d3po_pairs_follow_their_own_trajectories(policy):
    reward = build_reward("jpeg")
    rollout = d3po_rollout(policy, reward, PROMPTS, torch.Generator().manual_seed(2), [20, 19])
    pairs, b = rollout.data, len(PROMPTS)
    assert not pairs.shared_parent and rollout.images.shape[0] == 2 * b
    # the winner's x_t at k=19 is the winner's own x_{t-1} at k=20, and likewise for the loser
    torch.testing.assert_close(pairs.x_t_w[b:], pairs.x_next_w[:b])
    torch.testing.assert_close(pairs.x_t_l[b:], pairs.x_next_l[:b])
    assert not torch.allclose(pairs.x_t_w[:b], pairs.x_t_l[:b])
    torch.testing.assert_close(pairs.reward_w[:b], torch.maximum(rollout.rewards[:b], rollout.rewards[b:]))
    assert pairs.valid[:b].tolist() == (rollout.rewards[b:] != rollout.rewards[:b]).tolist()


def test_ddpo_stores_the_sampling_policy_log_probs(policy):
    reward = build_reward("jpeg")
    rollout = ddpo_rollout(policy, reward, ["a cat", "a dog"], torch.Generator().manual_seed(3), [20, 4], 2)
    steps = rollout.data
    assert rollout.prompts == ["a cat", "a cat", "a dog", "a dog"] and steps.advantages is None
    with torch.no_grad():
        embeds = policy.encode_prompts(rollout.prompts)
        i = int(steps.step_index[0])
        again = policy.step(i, policy.eps(steps.x_t[:4], i, embeds), steps.x_t[:4], prev_sample=steps.x_next[:4])
    torch.testing.assert_close(again.log_prob, steps.old_log_prob[:4], atol=1e-4, rtol=1e-5)


class ScaledColorfulness(TorchReward):
    """factor * colorfulness, recording each batch of scores it returns."""

    name = "scaled_colorfulness"

    def __init__(self, factor: float = 1.0):
        self.factor = factor
        self.batches: list[torch.Tensor] = []

    def forward(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        scores = self.factor * colorfulness(images)
        self.batches.append(scores.detach().clone())
        return scores


def test_defaults_reproduce_the_paper_sampler(policy):
    """Fixed-seed sums of the rollout computed before n children, gap, continuation and labels were options:
    the defaults draw the same noise in the same order and pick the same children."""
    def sums(rollout):
        d = rollout.data
        tensors = (d.x_t_w, d.x_next_w, d.x_next_l, d.reward_w, d.reward_l, rollout.images, rollout.rewards)
        return [float(t.double().sum()) for t in tensors]

    plain = tailorpo_rollout(policy, build_reward("jpeg"), PROMPTS, torch.Generator().manual_seed(5), [20, 19, 1])
    assert sums(plain) == pytest.approx(
        [104.6566059688, 139.3727446599, 93.0721695637, -39.3200001717, -39.4899997711, 17307.8620294631,
         -13.111000061], rel=1e-5)
    assert plain.data.valid.all() and plain.stats == {"ties": 0.0}
    eta = cosine_eta_schedule([20, 10])
    guided = tailorpo_rollout(policy, build_reward("colorfulness"), PROMPTS, torch.Generator().manual_seed(6),
                              [20, 10], guidance_eta=eta)
    assert sums(guided) == pytest.approx(
        [511.0624351369, 618.6892742052, 674.088613092, 569.745300293, 564.1605072021, 17311.3852982819,
         282.3023452759], rel=1e-5)


def test_best_and_worst_match_a_brute_force():
    scores = torch.randint(0, 4, (5, 300), generator=torch.Generator().manual_seed(0)).float()  # many ties
    best, worst = best_and_worst(scores)
    for b in range(scores.shape[1]):
        column = scores[:, b].tolist()
        assert best[b] == column.index(max(column))  # the first maximum
        assert worst[b] == len(column) - 1 - column[::-1].index(min(column))  # the last minimum
    assert (best != worst).all()  # a column of equal scores still pairs two children
    two = torch.tensor([[1.0, 2.0, 3.0], [2.0, 1.0, 3.0]])  # n = 2: select_winner's rule, ties included
    winner_is_1, _ = select_winner(two[0], two[1])
    assert best_and_worst(two)[0].tolist() == winner_is_1.long().tolist()
    assert best_and_worst(two)[1].tolist() == (1 - winner_is_1.long()).tolist()


def test_k_children_pair_the_best_with_the_worst(policy):
    reward, b, n = ScaledColorfulness(), len(PROMPTS), 4
    policy.unet_evals = 0
    rollout = tailorpo_rollout(policy, reward, PROMPTS, torch.Generator().manual_seed(3), [20, 19],
                               branching=BranchingConfig(children=n))
    assert policy.unet_evals == b * (20 + 2 * (n - 1))  # each branch step evaluates n children at t-1
    pairs = rollout.data
    for step, scores in enumerate(reward.batches[:2]):
        columns = scores.view(n, b).T.tolist()
        assert pairs.reward_w[step * b : (step + 1) * b].tolist() == [max(c) for c in columns]
        assert pairs.reward_l[step * b : (step + 1) * b].tolist() == [min(c) for c in columns]
    torch.testing.assert_close(pairs.x_t_w[b:], pairs.x_next_w[:b])  # the best child continues
    r_w = _recomputed_step_reward(policy, reward, 0, pairs.x_next_w[:b])
    r_l = _recomputed_step_reward(policy, reward, 0, pairs.x_next_l[:b])
    torch.testing.assert_close(r_w, pairs.reward_w[:b])  # the stored latents are those children
    torch.testing.assert_close(r_l, pairs.reward_l[:b])


def test_min_reward_gap_drops_exactly_the_pairs_at_or_below_it(policy):
    # a tie, a gap at it, above it, and above it with the loser higher (the random-label control's pairs)
    assert gap_is_valid(torch.tensor([1.0, 1.5, 1.7, 0.0]), torch.tensor([1.0, 1.0, 1.0, 0.75]), 0.5).tolist() == [
        False, False, True, True]
    reward, gen = build_reward("colorfulness"), lambda: torch.Generator().manual_seed(4)
    steps = [20, 19, 18]
    plain = tailorpo_rollout(policy, reward, PROMPTS, gen(), steps).data
    gaps = (plain.reward_w - plain.reward_l).abs()
    min_gap = float(gaps.sort().values[4])  # the median pair sits exactly at the gap
    rollout = tailorpo_rollout(policy, reward, PROMPTS, gen(), steps, branching=BranchingConfig(min_reward_gap=min_gap))
    pairs = rollout.data
    assert torch.equal(pairs.x_next_w, plain.x_next_w)  # the filter changes no draw, only which pairs train
    assert pairs.valid.tolist() == (gaps > min_gap).tolist() and int((~pairs.valid).sum()) == 5
    assert rollout.stats["ties"] == float((gaps == 0).sum())
    stats = pair_stats_by_step(pairs)
    assert sorted(stats) == [0, 1, 2]
    for i, row in stats.items():
        rows = pairs.step_index == i
        assert row["reward_gap"] == pytest.approx(float(gaps[rows].mean()))
        assert row["dropped"] == pytest.approx(float((gaps[rows] <= min_gap).float().mean()))


def test_continue_from_random_continues_from_the_child_the_generator_picks(policy):
    reward, b, n = build_reward("colorfulness"), len(PROMPTS), 3
    branching = BranchingConfig(children=n, continue_from="random")
    run = lambda: tailorpo_rollout(policy, reward, PROMPTS, torch.Generator().manual_seed(0), [20, 19],
                                   branching=branching).data
    pairs = run()
    replay = torch.Generator().manual_seed(0)  # draws: x_T, the children's noise, then the child to continue
    with torch.no_grad():
        x_T = policy.initial_latents(b, replay)
        eps = policy.eps(x_T, 0, policy.encode_prompts(PROMPTS))
        children = sample_children(policy, 0, eps, x_T, replay, n)
    chosen = torch.randint(n, (b,), generator=replay)
    rows = torch.arange(b)
    torch.testing.assert_close(pairs.x_t_w[:b], x_T)
    torch.testing.assert_close(pairs.x_t_w[b:], children[chosen, rows])
    winner = torch.stack([(children[:, r] - pairs.x_next_w[r]).flatten(1).abs().amax(1).argmin() for r in rows])
    assert (chosen != winner).any()  # not the winner's chain
    again = run()
    assert all(torch.equal(getattr(pairs, f), getattr(again, f)) for f in ("x_t_w", "x_next_w", "x_next_l"))


def test_random_labels_are_a_fair_coin_independent_of_the_scores():
    scores = torch.randn(2, 4000, generator=torch.Generator().manual_seed(0))
    winner, loser = branch_pair(scores, "random", torch.Generator().manual_seed(1))
    best, worst = best_and_worst(scores)
    assert ((winner == best) & (loser == worst) | (winner == worst) & (loser == best)).all()  # the same pair
    winner_is_1 = winner == 1
    assert float(winner_is_1.float().mean()) == pytest.approx(0.5, abs=0.03)
    for one_higher in (scores[1] > scores[0], scores[1] < scores[0]):
        assert float(winner_is_1[one_higher].float().mean()) == pytest.approx(0.5, abs=0.04)
    for other in (-scores, torch.randn(2, 4000, generator=torch.Generator().manual_seed(2))):
        flipped = branch_pair(other, "random", torch.Generator().manual_seed(1))[0] != best_and_worst(other)[0]
        assert torch.equal(flipped, winner != best)  # the coin ignores the scores
    assert torch.equal(branch_pair(scores, "reward", torch.Generator())[0], best)


def test_random_label_control_swaps_only_the_labels(policy):
    reward = build_reward("colorfulness")
    gen = lambda: torch.Generator().manual_seed(1)
    ranked = tailorpo_rollout(policy, reward, PROMPTS, gen(), [20]).data
    control = tailorpo_rollout(policy, reward, PROMPTS, gen(), [20], branching=BranchingConfig(labels="random")).data
    flipped = control.reward_w < control.reward_l
    assert flipped.any() and (~flipped).any()
    torch.testing.assert_close(control.x_t_w, ranked.x_t_w)
    w, l = order_by_winner(flipped, ranked.x_next_w, ranked.x_next_l)
    assert torch.equal(control.x_next_w, w) and torch.equal(control.x_next_l, l)
    assert control.valid.all()  # a swapped pair still trains (|r_w - r_l| > 0)


def test_continuation_labels_rank_children_by_their_mean_final_reward(policy):
    """The exact-ranking bound: each child's label is the mean reward of `continuations` chains run on from it
    (checked against a step-by-step DDIM loop), the best of them wins; a child of the last step is x_0 itself."""
    reward, b, n, m = build_reward("colorfulness"), len(PROMPTS), 2, 3
    branching = BranchingConfig(labels="continuations", continuations=m)
    pairs = tailorpo_rollout(policy, reward, PROMPTS, torch.Generator().manual_seed(5), [20], branching=branching).data
    replay = torch.Generator().manual_seed(5)  # draws: x_T, the children's noise, then the continuations' noise
    with torch.no_grad():
        embeds = policy.encode_prompts(PROMPTS)
        x_T = policy.initial_latents(b, replay)
        children = sample_children(policy, 0, policy.eps(x_T, 0, embeds), x_T, replay, n)
        x = children.flatten(0, 1).repeat(m, 1, 1, 1)  # chains-major: chain c of child j of prompt p
        chain_embeds = embeds.repeat(n * m)
        for i in range(1, policy.num_steps):
            x = policy.step(i, policy.eps(x, i, chain_embeds), x, noise=policy.noise(x.shape, replay)).prev_sample
        finals = reward.score(policy.decode(x), PROMPTS * n * m).scores.view(m, n, b)
    expected = finals.mean(0)  # (n, b)
    torch.testing.assert_close(pairs.reward_w, expected.max(0).values)
    torch.testing.assert_close(pairs.reward_l, expected.min(0).values)
    torch.testing.assert_close(pairs.x_next_w, children[expected.argmax(0), torch.arange(b)])
    step_ranked = tailorpo_rollout(policy, reward, PROMPTS, torch.Generator().manual_seed(5), [20]).data
    assert not torch.equal(step_ranked.x_next_w, pairs.x_next_w)  # r(x0_hat) ranks some pair the other way
    policy.unet_evals = 0
    last = tailorpo_rollout(policy, reward, PROMPTS, torch.Generator().manual_seed(5), [1], branching=branching).data
    assert policy.unet_evals == b * 20  # at the last step the child is x_0: its reward is exact, nothing runs on
    plain = tailorpo_rollout(policy, reward, PROMPTS, torch.Generator().manual_seed(5), [1]).data
    assert torch.equal(last.reward_w, plain.reward_w) and torch.equal(last.x_next_w, plain.x_next_w)


def test_sigma_units_guidance_moves_the_winner_by_a_fraction_of_sigma_in_any_reward_scale(policy):
    b, steps = len(PROMPTS), [20]
    plain = tailorpo_rollout(policy, ScaledColorfulness(), PROMPTS, torch.Generator().manual_seed(2), steps).data
    in_sigma = GuidanceConfig(units="sigma", sigma_fraction=0.5)
    eta = guidance_schedule(in_sigma, steps)
    pushes = []
    for factor in (1.0, 1000.0):
        guided = tailorpo_rollout(policy, ScaledColorfulness(factor), PROMPTS, torch.Generator().manual_seed(2),
                                  steps, guidance_eta=eta, guidance=in_sigma).data
        pushes.append(guided.x_next_w - plain.x_next_w)
    expected = torch.full((b,), 0.5 * ddim_sigma(*policy.alphas[0], policy.eta))
    for push in pushes:
        torch.testing.assert_close(push.flatten(1).pow(2).mean(dim=1).sqrt(), expected)
    assert float(expected[0]) > 0.05  # float32 latents ~1 and a backward through UNet and decoder: atol 1e-5
    torch.testing.assert_close(pushes[1], pushes[0], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    "override, field",
    [("algorithm.branching.children=1", "algorithm.branching.children"),
     ("algorithm.branching.continue_from=best", "algorithm.branching.continue_from"),
     ("algorithm.branching.min_reward_gap=-1", "algorithm.branching.min_reward_gap"),
     ("algorithm.guidance.units=pixels", "algorithm.guidance.units")],
)
def test_bad_branching_fields_are_named(override, field):
    with pytest.raises(ConfigError, match=field):
        load_config(None, [override])
