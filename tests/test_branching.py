import torch

from tailorpo.algorithms.branching import sample_children, tailorpo_rollout
from tailorpo.core.guidance import cosine_eta_schedule
from tailorpo.rewards import build_reward
from tailorpo.algorithms.rollouts import d3po_rollout, ddpo_rollout
from tailorpo.core.ranking import order_by_winner, select_winner

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
    gen = lambda: torch.Generator().manual_seed(2)  # noqa: E731
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
