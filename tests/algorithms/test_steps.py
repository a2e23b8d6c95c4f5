"""Where the sampler branches, where the learner trains, and where the LoRA acts: the step selectors, their
validation, the timestep-gated adapter and the warning for a LoRA acting at steps it never trained on."""

import warnings

import pytest
import torch

from tailorpo.algorithms.branching import tailorpo_rollout
from tailorpo.algorithms.registry import algorithm_of
from tailorpo.algorithms.rollouts import d3po_rollout, ddpo_rollout
from tailorpo.algorithms.steps import StepPlan, as_plan, random_subset, step_plan, steps_mask
from tailorpo.config import DEFAULT_STEPS, PAPER_STEPS, ConfigError, ConfigWarning, EvalConfig, load_config
from tailorpo.diffusion.lora import AdapterSteps, read_lora, reference_model, save_lora
from tailorpo.rewards import build_reward
from tailorpo.training.evaluation import lora_settings
from tailorpo.training.loop import compare_with_base
from tests.conftest import perturb_lora

PROMPTS = ["a cat", "a red car", "a bird"]
T = 20
PAPER = f"algorithm.fine_tuned_steps={list(PAPER_STEPS)}"  # pinned: the tests below are about mechanisms, not defaults


def plan_of(overrides: list[str], rows: int, seed: int = 0) -> StepPlan:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConfigWarning)
        cfg = load_config(None, overrides)
    return step_plan(cfg.algorithm, cfg.sampling.num_steps, rows, torch.Generator().manual_seed(seed))


def ks(mask_row: torch.Tensor) -> list[int]:
    return [T - i for i in mask_row.nonzero().flatten().tolist()]


def test_fixed_steps_and_all_are_the_same_for_every_row_and_draw_nothing():
    generator = torch.Generator().manual_seed(0)
    state = generator.get_state()
    cfg = load_config(None, [PAPER, "lora.active_steps=trained"])
    plan = step_plan(cfg.algorithm, T, 3, generator)
    assert torch.equal(generator.get_state(), state)  # the paper's setting samples as before: no extra draw
    assert all(ks(row) == [20, 16, 12, 8, 4] for row in plan.branch) and torch.equal(plan.train, plan.branch)
    assert plan.recorded_steps() == [20, 16, 12, 8, 4]
    default = step_plan(load_config(None).algorithm, T, 3, generator)  # the default list: fixed too, no draw
    assert torch.equal(generator.get_state(), state) and default.recorded_steps() == list(DEFAULT_STEPS)
    assert all(ks(row) == list(DEFAULT_STEPS) for row in default.branch) and torch.equal(default.train, default.branch)
    both = plan_of(["algorithm.branch_steps=all", "algorithm.train_steps=[20, 1]"], rows=2)
    assert plan.branch.shape == (3, T) and both.branch.all() and all(ks(row) == [20, 1] for row in both.train)
    assert torch.equal(steps_mask([20, 1], T), both.train[0])


def test_random_steps_are_m_per_trajectory_reproducible_per_seed_and_differ_across_trajectories():
    plan = plan_of(["algorithm.branch_steps={random: 5}", "algorithm.train_steps={random: 2}"], rows=64, seed=1)
    assert (plan.branch.sum(1) == 5).all() and (plan.train.sum(1) == 2).all()
    assert not (plan.train & ~plan.branch).any()  # training steps are each trajectory's own branch steps
    assert len({tuple(ks(row)) for row in plan.branch}) > 50  # of C(20, 5) = 15504 subsets
    again = plan_of(["algorithm.branch_steps={random: 5}", "algorithm.train_steps={random: 2}"], rows=64, seed=1)
    other = plan_of(["algorithm.branch_steps={random: 5}", "algorithm.train_steps={random: 2}"], rows=64, seed=2)
    assert torch.equal(plan.branch, again.branch) and torch.equal(plan.train, again.train)
    assert not torch.equal(plan.branch, other.branch)
    # m of the listed branch steps, uniformly: every listed step about 2/5 of the time, no other step ever
    fixed = plan_of([PAPER, "algorithm.train_steps={random: 2}"], rows=4000)
    assert (fixed.branch.sum(0)[steps_mask([20, 16, 12, 8, 4], T)] == 4000).all()
    share = fixed.train.float().mean(0)
    assert share[steps_mask([20, 16, 12, 8, 4], T)].tolist() == pytest.approx([0.4] * 5, abs=0.03)
    assert share[~steps_mask([20, 16, 12, 8, 4], T)].sum() == 0


def test_random_subset_is_uniform_over_the_allowed_steps():
    allowed = torch.tensor([[True, True, False, True]]).expand(6000, -1)
    picked = random_subset(allowed, 1, torch.Generator().manual_seed(0))
    assert (picked.sum(1) == 1).all() and not (picked & ~allowed).any()
    assert picked.float().mean(0).tolist() == pytest.approx([1 / 3, 1 / 3, 0, 1 / 3], abs=0.02)


def test_a_plan_must_fit_the_rollout():
    with pytest.raises(ValueError, match="for 3 trajectories of 20 steps"):
        as_plan(StepPlan.fixed([20], T, 2), T, 3)


@pytest.mark.parametrize(
    "overrides, message",
    [
        ([PAPER, "algorithm.train_steps=[20, 3]"], "algorithm.train_steps: steps [3] are not branch steps "
         "(algorithm.fine_tuned_steps=[20, 16, 12, 8, 4])"),
        (["algorithm.branch_steps=[20, 10]", "algorithm.train_steps=all"], "add them to algorithm.branch_steps"),
        ([PAPER, "algorithm.train_steps={random: 6}"], "{random: 6} draws more steps per trajectory than "
         "algorithm.fine_tuned_steps gives (5)"),
        (["algorithm.branch_steps={random: 3}", "algorithm.train_steps=[20]"],
         "algorithm.train_steps: fixed steps need fixed branch steps"),
        (["algorithm.branch_steps={random: 21}"], "algorithm.branch_steps: {random: 21} draws more than"),
        (["algorithm.branch_steps=[21]"], "algorithm.branch_steps: [21] not in 1..sampling.num_steps=20"),
        (["algorithm.train_steps=[4, 4]"], "algorithm.train_steps: [4, 4] repeats a step"),
        (["algorithm.train_steps=some"], "algorithm.train_steps: give a list of steps k, 'all', or {random: m}"),
        (["algorithm.train_steps={random: 0}"], "algorithm.train_steps.random.random: Input should be greater"),
        ([PAPER, "lora.active_steps=[20, 16]"], "lora.active_steps: misses the trained steps [12, 8, 4]"),
    ],
)
def test_bad_step_selections_name_the_field(overrides, message):
    with pytest.raises(ConfigError) as err:
        load_config(None, overrides)
    assert message in str(err.value)


def warnings_of(overrides: list[str]) -> list[str]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        load_config(None, overrides)
    return [str(w.message) for w in caught if issubclass(w.category, ConfigWarning)]


@pytest.mark.parametrize(
    "overrides, untrained",
    [
        # the paper's setting: its 5 of 20 steps with the LoRA at all 20
        ([PAPER, "lora.active_steps=all"], [19, 18, 17, 15, 14, 13, 11, 10, 9, 7, 6, 5, 3, 2, 1]),
        ([PAPER, "lora.active_steps=trained"], None),
        ([], None),  # the defaults: the paper's steps plus 3, 2, 1, with the LoRA only at those
        (["lora.active_steps=all"], [19, 18, 17, 15, 14, 13, 11, 10, 9, 7, 6, 5]),  # the default steps, ungated
        ([f"algorithm.fine_tuned_steps={list(range(20, 0, -1))}", "lora.active_steps=all"], None),
        (["algorithm.branch_steps=all", "lora.active_steps=all"], None),
        (["algorithm.branch_steps=all", "algorithm.train_steps={random: 5}", "lora.active_steps=all"],
         None),  # every step, over time
        (["algorithm.branch_steps={random: 5}", "lora.active_steps=all"], None),
        (["algorithm.branch_steps=all", "algorithm.train_steps=[20, 2]", "lora.active_steps=[20, 3, 2]"], [3]),
        (["algorithm.fine_tuned_steps=[20, 10]", "algorithm.train_steps={random: 1}", "lora.active_steps=all"],
         list(range(19, 10, -1)) + list(range(9, 0, -1))),
        (["algorithm.name=d3po", "algorithm.fine_tuned_steps=[20, 1]", "lora.active_steps=all"],
         list(range(19, 1, -1))),
        # pair objectives train at random noise levels: every step
        (["algorithm.name=diffusion_dpo", "lora.active_steps=all"], None),
    ],
)
def test_the_warning_fires_exactly_when_the_lora_acts_at_a_step_never_trained(overrides, untrained):
    messages = warnings_of(overrides)
    if untrained is None:
        assert messages == []
        return
    (message,) = messages
    assert f"the LoRA acts at steps k = {untrained}, which are never trained" in message
    assert "lora.active_steps: trained" in message and "algorithm.branch_steps: all" in message


@pytest.mark.parametrize("steps", [PAPER_STEPS, DEFAULT_STEPS], ids=["paper", "default"])
def test_the_registry_samples_the_listed_steps_as_the_explicit_list(policy, steps):
    """The config path (the step plan from algorithm.fine_tuned_steps) gives the very rollout the explicit list
    gives, for the paper's steps and for the default ones (launch/tiny.yaml's)."""
    overrides = [] if steps == DEFAULT_STEPS else [f"algorithm.fine_tuned_steps={list(steps)}"]
    cfg = load_config("launch/tiny.yaml", overrides)
    assert cfg.algorithm.fine_tuned_steps == list(steps)
    reward = build_reward("jpeg")
    via_config = algorithm_of(cfg).sample(cfg, policy, reward, PROMPTS, torch.Generator().manual_seed(5))
    direct = tailorpo_rollout(policy, reward, PROMPTS, torch.Generator().manual_seed(5), list(steps))
    assert sorted(set(via_config.data.step_index.tolist())) == [T - k for k in steps]
    for name in ("step_index", "prompt_index", "x_t_w", "x_next_w", "x_next_l", "reward_w", "reward_l"):
        assert torch.equal(getattr(via_config.data, name), getattr(direct.data, name)), name
    assert torch.equal(via_config.images, direct.images) and torch.equal(via_config.rewards, direct.rewards)


def test_tailorpo_branches_each_row_at_its_own_steps_and_keeps_the_trained_pairs(policy):
    b = len(PROMPTS)
    branch = torch.zeros(b, T, dtype=torch.bool)
    branch[0, [0, 5]] = branch[1, [5, 19]] = branch[2, 19] = True  # row 2 branches only at the last step
    train = branch.clone()
    train[0, 0] = train[1, 19] = False
    reward = build_reward("jpeg")
    policy.unet_evals = policy.vae_decodes = 0
    rollout = tailorpo_rollout(policy, reward, PROMPTS, torch.Generator().manual_seed(0), StepPlan(branch, train))
    assert policy.unet_evals == b * T + 3  # one extra eval per branch, none at the last step (x0_hat = x_0)
    assert policy.vae_decodes == 2 * 5 + 1  # two children per branch; x_0 once, for row 0 only
    pairs = rollout.data
    assert sorted(zip(pairs.prompt_index.tolist(), pairs.step_index.tolist(), strict=True)) == [(0, 5), (1, 5),
                                                                                                (2, 19)]
    # every chain ends in an image; row 2's final reward is its winner's at the last step (x_0 itself)
    assert rollout.images.shape[0] == b and torch.isfinite(rollout.rewards).all()
    assert torch.equal(pairs.reward_w[pairs.step_index == 19], rollout.rewards[2:])


def test_random_plans_reach_every_step_of_the_trajectory_samplers(policy):
    reward, rows = build_reward("jpeg"), 2 * 2
    plan = plan_of(["algorithm.name=ddpo", "algorithm.branch_steps=all", "algorithm.train_steps={random: 3}"],
                   rows=rows)
    steps = ddpo_rollout(policy, reward, ["a cat", "a dog"], torch.Generator().manual_seed(3), plan, 2).data
    got = torch.zeros(rows, T, dtype=torch.bool)
    got[steps.prompt_index, steps.step_index] = True
    assert torch.equal(got, plan.train) and len(steps.step_index) == 3 * rows
    d3po_plan = plan_of(["algorithm.name=d3po", "algorithm.branch_steps={random: 2}"], rows=len(PROMPTS), seed=4)
    pairs = d3po_rollout(policy, reward, PROMPTS, torch.Generator().manual_seed(2), d3po_plan).data
    got = torch.zeros(len(PROMPTS), T, dtype=torch.bool)
    got[pairs.prompt_index, pairs.step_index] = True
    assert torch.equal(got, d3po_plan.branch) and len(pairs.step_index) == 2 * len(PROMPTS)


def _eps(policy, step_index, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(2, *policy.latent_shape, generator=gen)
    with torch.no_grad():
        return policy.eps(x, step_index, policy.encode_prompts(["a cat", "a dog"]))


def test_the_gated_adapter_is_the_base_model_at_ungated_steps_and_the_lora_at_gated_ones(policy):
    perturb_lora(policy.unet)
    with reference_model(policy.unet):
        base = [_eps(policy, i) for i in (0, 7)]
    lora = [_eps(policy, i) for i in (0, 7)]
    assert not torch.allclose(base[1], lora[1])
    policy.lora_at = frozenset({0})
    assert torch.equal(_eps(policy, 0), lora[0]) and torch.equal(_eps(policy, 7), base[1])
    with reference_model(policy.unet):  # nested in a gated-off step, the base model stays the base model
        assert torch.equal(_eps(policy, 7), base[1]) and torch.equal(_eps(policy, 0), base[0])
    assert torch.equal(_eps(policy, 7), base[1]) and torch.equal(_eps(policy, 0), lora[0])
    with policy.lora_only_at({7}):
        assert torch.equal(_eps(policy, 7), lora[1]) and torch.equal(_eps(policy, 0), base[0])
    assert policy.lora_at == {0} and policy.adapter_steps == AdapterSteps((20,), T)


def test_evaluation_samples_with_the_gate_and_the_base_model_without_the_lora(policy):
    perturb_lora(policy.unet)
    settings, reward = EvalConfig(prompts=["a cat"], images_per_prompt=2), build_reward("jpeg")
    base, ungated = compare_with_base(policy, reward, settings)
    policy.lora_at = frozenset(range(10))
    base_again, gated = compare_with_base(policy, reward, settings)
    assert torch.equal(base.scores["jpeg"], base_again.scores["jpeg"])  # the base model: no LoRA at any step
    assert not torch.equal(gated.scores["jpeg"], ungated.scores["jpeg"])
    policy.lora_at = frozenset(range(T))  # a gate that opens every step is no gate
    assert torch.equal(compare_with_base(policy, reward, settings)[1].scores["jpeg"], ungated.scores["jpeg"])


def test_the_saved_lora_records_its_gate_and_tailorpo_eval_applies_it(tiny_pipe, tmp_path):
    steps = AdapterSteps((20, 16, 12, 8, 4), T)
    save_lora(tiny_pipe.unet, tmp_path / "lora", steps)
    saved = read_lora(tmp_path / "lora")
    assert saved.steps == steps
    with pytest.warns(ConfigWarning):  # the config's own LoRA acts at every step; the saved gate overrides it
        cfg = load_config("launch/tiny.yaml", ["lora.active_steps=all"])
    assert cfg.lora.active_steps == "all" and lora_settings(cfg, saved).adapter_steps() == [20, 16, 12, 8, 4]
    # and over the config's own gate (tiny.yaml's: the default steps, not the saved ones)
    gated = load_config("launch/tiny.yaml")
    assert gated.adapter_steps() == list(DEFAULT_STEPS) and lora_settings(gated, saved).adapter_steps() == [
        20, 16, 12, 8, 4]
    with pytest.raises(ConfigError, match="sampling.num_steps: .* of a 20-step chain; evaluate it with "
                                          "sampling.num_steps=20"):
        lora_settings(load_config("launch/tiny.yaml", ["sampling.num_steps=10", "algorithm.fine_tuned_steps=[10]"]),
                      saved)
    save_lora(tiny_pipe.unet, tmp_path / "lora")  # saved again ungated: the old gate must not linger
    assert read_lora(tmp_path / "lora").steps is None
    assert lora_settings(gated, read_lora(tmp_path / "lora")).adapter_steps() is None
