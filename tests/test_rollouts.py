import torch

from tailorpo.rewards import build_reward
from tailorpo.rollouts import (
    d3po_rollout,
    ddpo_rollout,
    pick,
    sample_branch_pair,
    select_winner,
    tailorpo_rollout,
)

PROMPTS = ["a cat", "a red car", "a bird"]


def test_branch_pair_shares_one_x_t_and_one_eps(policy):
    gen = torch.Generator().manual_seed(0)
    x_t = torch.randn(2, 4, 16, 16, generator=gen)
    eps = torch.randn(2, 4, 16, 16, generator=gen)
    evals = policy.unet_evals
    child_0, child_1 = sample_branch_pair(policy, 3, eps, x_t, torch.Generator().manual_seed(7))
    assert policy.unet_evals == evals  # the pair costs no UNet call: eps at x_t is given
    z = torch.randn((2, 2, 4, 16, 16), generator=torch.Generator().manual_seed(7))
    step = policy.step(3, eps, x_t, prev_sample=x_t)
    torch.testing.assert_close(child_0, step.mean + step.std * z[0])
    torch.testing.assert_close(child_1, step.mean + step.std * z[1])
    assert not torch.allclose(child_0, child_1)


def test_select_winner_and_ties():
    winner_is_1, tie = select_winner(torch.tensor([1.0, 2.0, 3.0]), torch.tensor([2.0, 1.0, 3.0]))
    assert winner_is_1.tolist() == [True, False, False] and tie.tolist() == [False, False, True]
    picked = pick(winner_is_1, torch.tensor([[1.0], [1.0], [1.0]]), torch.tensor([[0.0], [0.0], [0.0]]))
    assert picked.flatten().tolist() == [1.0, 0.0, 0.0]


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


def test_tailorpo_winner_continues_the_chain_and_has_the_higher_step_reward(policy):
    reward = build_reward("jpeg")
    rollout = tailorpo_rollout(policy, reward, PROMPTS, torch.Generator().manual_seed(1), [20, 19, 10])
    pairs = rollout.data
    assert pairs.shared_parent
    b = len(PROMPTS)
    # the winner at k=20 is the parent x_t at k=19
    torch.testing.assert_close(pairs.x_t_w[b : 2 * b], pairs.x_next_w[:b])
    assert (pairs.reward_w[pairs.valid] > pairs.reward_l[pairs.valid]).all()
    # r_w is the reward of decode(x0_hat(x_w)), recomputed from scratch
    with torch.no_grad():
        i = int(pairs.step_index[0])
        embeds = policy.encode_prompts(PROMPTS)
        x0 = policy.predict_x0_after(i, pairs.x_next_w[:b], policy.eps(pairs.x_next_w[:b], i + 1, embeds))
        again = reward.score(policy.decode(x0), PROMPTS).scores
    torch.testing.assert_close(again, pairs.reward_w[:b])


def test_d3po_pairs_come_from_two_trajectories_ranked_by_the_final_image(policy):
    reward = build_reward("jpeg")
    rollout = d3po_rollout(policy, reward, PROMPTS, torch.Generator().manual_seed(2), [20, 4])
    pairs, b = rollout.data, len(PROMPTS)
    assert not pairs.shared_parent and rollout.images.shape[0] == 2 * b
    assert not torch.allclose(pairs.x_t_w[b:], pairs.x_t_l[b:])  # different parents at k=4
    torch.testing.assert_close(pairs.reward_w[:b], torch.maximum(rollout.rewards[:b], rollout.rewards[b:]))
    assert pairs.valid[:b].tolist() == (rollout.rewards[b:] != rollout.rewards[:b]).tolist()


def test_ddpo_stores_old_log_probs_and_per_prompt_advantages(policy):
    reward = build_reward("jpeg")
    rollout = ddpo_rollout(policy, reward, ["a cat", "a dog"], torch.Generator().manual_seed(3), [20, 4], 2, 5.0)
    steps = rollout.data
    assert rollout.prompts == ["a cat", "a cat", "a dog", "a dog"]
    adv = steps.advantages[:4]
    torch.testing.assert_close(adv[0], -adv[1], atol=1e-3, rtol=0)  # a pair: +-1 around its own mean
    assert abs(adv[0].abs().item() - 1) < 1e-3 or rollout.rewards[0] == rollout.rewards[1]
    # the stored log-prob is that of the sampling policy: recomputing it gives the same value
    with torch.no_grad():
        embeds = policy.encode_prompts(rollout.prompts)
        i = int(steps.step_index[0])
        again = policy.step(i, policy.eps(steps.x_t[:4], i, embeds), steps.x_t[:4], prev_sample=steps.x_next[:4])
    torch.testing.assert_close(again.log_prob, steps.old_log_prob[:4], atol=1e-4, rtol=1e-5)
