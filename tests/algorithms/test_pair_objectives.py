"""The pair objectives (Diffusion-DPO, MaPO, Diff-contrast) in the framework: the pair learner against hand
computations on the tiny model, MaPO's reference-free path, Diff-contrast's CLIP embeddings and their cache,
SDXL, the training loop (outputs, CLI dispatch, resume), online pairs of the policy's own samples and the
Pick-Style builder."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from transformers import CLIPModel, CLIPTokenizer

from tailorpo.algorithms import pair_learner as pair_learner_module
from tailorpo.algorithms.pair_learner import DIFF_CONTRAST, DIFFUSION_DPO, MAPO, PairLearner
from tailorpo.algorithms.registry import ALGORITHMS
from tailorpo.algorithms.rollouts import final_image_pair_rollout
from tailorpo.cli import main
from tailorpo.config import ConfigError, OptimConfig, PairsConfig, load_config
from tailorpo.pairs.data import PairDataError, PairDataset, collate_pairs, export_pairs, read_pairs, write_pairs
from tailorpo.pairs.embeddings import ClipPairEmbedder, EmbeddingCache
from tailorpo.rewards import TorchReward
from tailorpo.rewards.clip import tiny_clip_config
from tailorpo.tiny.tokenizer import write_clip_tokenizer_files
from tailorpo.training.pair_loop import pair_batches, train_pairs
from tests.conftest import fresh_policy, lora_pipeline, perturb_lora

RESOLUTION = 64
PROMPTS = ["a cat", "a dog", "a red car", "a horse", "a bird", "a tree"]


def write_bright_dark_pairs(folder, count: int, seed: int = 0) -> None:
    """``count`` pairs: a bright textured winner and a dark textured loser per prompt."""
    gen = torch.Generator().manual_seed(seed)
    shape = (count, 3, RESOLUTION, RESOLUTION)
    bright = 0.6 + 0.4 * torch.rand(shape, generator=gen)
    dark = 0.4 * torch.rand(shape, generator=gen)
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(count)]
    write_pairs(folder, prompts, bright, dark, [{"made_by": "test"}] * count)


@pytest.fixture(scope="module")
def pair_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("pairs")
    write_bright_dark_pairs(folder, 6)
    return folder


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    """A tiny transformers CLIPModel (random weights, 224 px input) in hub folder layout, with CLIP's BPE."""
    folder = tmp_path_factory.mktemp("clip")
    with torch.random.fork_rng():
        torch.manual_seed(0)
        CLIPModel(tiny_clip_config(32)).save_pretrained(folder)
    write_clip_tokenizer_files(folder)
    return folder


def batch_of(folder, rows: list[int]):
    items = {item["index"]: item for item in PairDataset(read_pairs(folder), RESOLUTION)}
    return collate_pairs([items[r] for r in rows])


def by_hand_errors(policy, batch, noised, reference: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """e^w, e^l straight from the pipeline's text encoder and UNet (adapter off for the reference)."""
    pipe = policy.pipe
    ids = pipe.tokenizer(batch.prompts, padding="max_length", max_length=77, truncation=True,
                         return_tensors="pt").input_ids
    with torch.no_grad():
        states = pipe.text_encoder(ids)[0].repeat(2, 1, 1)
        if reference:
            pipe.unet.disable_adapters()
        try:
            eps = pipe.unet(noised.noisy, noised.timesteps, encoder_hidden_states=states).sample
        finally:
            pipe.unet.enable_adapters()
    errors = ((eps - noised.noise) ** 2).mean(dim=(1, 2, 3))
    return errors.chunk(2)


def test_noising_and_dpo_loss_match_a_hand_computation(policy, pair_folder):
    """VAE sample, t and eps* are drawn in the documented order, shared by w and l; x_t is the forward process;
    the loss is Diffusion-DPO's closed form on errors computed without the learner."""
    perturb_lora(policy.unet, seed=3, scale=0.05)
    beta = 700.0
    learner = PairLearner(policy, OptimConfig(), DIFFUSION_DPO, PairsConfig(beta=beta))
    batch = batch_of(pair_folder, [0, 1, 2])
    noised = learner.noise_pair(batch, torch.Generator().manual_seed(7))

    vae, gen = policy.pipe.vae, torch.Generator().manual_seed(7)
    with torch.no_grad():
        posterior = vae.encode(torch.cat([batch.image_w, batch.image_l])).latent_dist
    latents = (posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=gen)) * 0.18215
    t = torch.randint(0, 1000, (3,), generator=gen)
    eps = torch.randn((3, 4, 16, 16), generator=gen)
    torch.testing.assert_close(noised.latents, latents)
    assert torch.equal(noised.timesteps, t.repeat(2)) and torch.equal(noised.noise, eps.repeat(2, 1, 1, 1))
    alpha_bar = policy.pipe.scheduler.alphas_cumprod[t.repeat(2)].view(-1, 1, 1, 1)
    x_t = alpha_bar.sqrt() * latents + (1 - alpha_bar).sqrt() * eps.repeat(2, 1, 1, 1)  # forward process
    torch.testing.assert_close(noised.noisy, x_t)

    err_w, err_l = by_hand_errors(policy, batch, noised, reference=False)
    ref_w, ref_l = by_hand_errors(policy, batch, noised, reference=True)
    h = -beta / 2 * ((err_w - ref_w) - (err_l - ref_l))
    loss, stats = learner.loss(batch, noised)
    torch.testing.assert_close(loss, -F.logsigmoid(h).mean(), atol=1e-5, rtol=1e-5)
    assert h.abs().min() > 1e-3  # the perturbed LoRA differs from the reference on every pair
    assert stats["preference_accuracy"] == pytest.approx(float((h > 0).float().mean()))
    assert stats["model_gap"] == pytest.approx(float((err_w - err_l).mean()), abs=1e-6)
    assert stats["ref_gap"] == pytest.approx(float((ref_w - ref_l).mean()), abs=1e-6)


@contextmanager
def unet_calls(policy) -> Iterator[list[int]]:
    """Rows of every UNet forward inside the block (a forward hook, removed after it)."""
    rows: list[int] = []
    handle = policy.unet.register_forward_hook(lambda module, args, out: rows.append(args[0].shape[0]))
    try:
        yield rows
    finally:
        handle.remove()


def test_mapo_runs_one_unet_forward_and_never_the_reference(policy, pair_folder, monkeypatch):
    """MaPO's loss (closed form) from ONE trainable forward on [w; l]: no reference forward, no adapter toggle."""
    perturb_lora(policy.unet, seed=4, scale=0.05)

    def forbidden(*args, **kwargs):
        raise AssertionError("MaPO touched the reference model")

    monkeypatch.setattr(pair_learner_module, "reference_model", forbidden)
    monkeypatch.setattr(policy.unet, "disable_adapters", forbidden)
    pairs = PairsConfig(mapo={"beta_mapo": 0.3, "snr_value": 0.7})
    learner = PairLearner(policy, OptimConfig(lr=1e-3), MAPO, pairs)
    batch = batch_of(pair_folder, [0, 1, 2, 3])
    noised = learner.noise_pair(batch, torch.Generator().manual_seed(1))
    with unet_calls(policy) as rows:
        loss, stats = learner.loss(batch, noised)
    assert rows == [8]  # one call, 2B rows

    err_w, err_l = by_hand_errors(policy, batch, noised, reference=False)
    g = lambda e: 0.7 * e / torch.expm1(0.7 * e)  # noqa: E731 - MaPO's score, closed form
    expected = err_w.mean() - 0.3 * F.logsigmoid(1000 * (g(err_w) - g(err_l))).mean()
    torch.testing.assert_close(loss, expected, atol=1e-5, rtol=1e-5)
    assert stats["win_score"] == pytest.approx(float(g(err_w).mean()), rel=1e-5)
    assert stats["lose_score"] == pytest.approx(float(g(err_l).mean()), rel=1e-5)

    before = [p.detach().clone() for p in learner.params]
    with unet_calls(policy) as rows:
        out = learner.train_on(batch, torch.Generator().manual_seed(2))
    assert rows == [8] and learner.updates == 1 and out["grad_norm"] > 0
    assert any(not torch.equal(p, b) for p, b in zip(learner.params, before, strict=True))


def test_diffusion_dpo_runs_a_reference_and_a_trainable_forward(policy, pair_folder):
    learner = PairLearner(policy, OptimConfig(), DIFFUSION_DPO, PairsConfig())
    batch = batch_of(pair_folder, [0, 1])
    with unet_calls(policy) as rows:
        learner.train_on(batch, torch.Generator().manual_seed(0))
    assert rows == [4, 4]  # reference (no grad), then trainable, each on 2B rows


def independent_joint_embedding(clip_dir, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
    """f(y, x) = normalise(normalise(image features) + normalise(text features)), computed from the model."""
    model, tokenizer = CLIPModel.from_pretrained(clip_dir), CLIPTokenizer.from_pretrained(clip_dir)
    pixels = F.interpolate((images + 1) / 2, size=(224, 224), mode="bicubic", antialias=True, align_corners=False)
    mean = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(1, 3, 1, 1)
    std = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(1, 3, 1, 1)
    tokens = tokenizer(prompts, padding=True, return_tensors="pt")
    with torch.no_grad():
        image = model.get_image_features(pixel_values=(pixels - mean) / std)
        text = model.get_text_features(**tokens)
    image, text = (getattr(x, "pooler_output", x) for x in (image, text))  # transformers 5 returns an output
    return F.normalize(F.normalize(image, dim=-1) + F.normalize(text, dim=-1), dim=-1)


def test_clip_embeddings_are_computed_once_and_cached_on_disk(clip_dir, pair_folder, tmp_path):
    tag = {"pairs_source": "test"}
    embedder = ClipPairEmbedder.load(str(clip_dir), "cpu", tmp_path / "cache", tag)
    batch = batch_of(pair_folder, [2, 0, 2])  # a row twice in one batch is embedded once
    emb_w, emb_l = embedder(batch)
    assert embedder.computed == 2 and emb_w.shape == (3, 32)
    torch.testing.assert_close(emb_w, independent_joint_embedding(clip_dir, batch.image_w, batch.prompts),
                               atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(emb_l, independent_joint_embedding(clip_dir, batch.image_l, batch.prompts),
                               atol=1e-5, rtol=1e-5)

    def no_clip(*args, **kwargs):
        raise AssertionError("a cached pair went through CLIP again")

    embedder.model.get_image_features = no_clip
    again_w, _ = embedder(batch_of(pair_folder, [0, 2]))
    assert torch.equal(again_w, emb_w[[1, 0]]) and embedder.computed == 2

    embedder.cache.flush()
    embedder.cache.flush()  # nothing new: no second shard
    assert [p.name for p in (tmp_path / "cache").iterdir()] == ["shard-000000.safetensors"]
    reread = EmbeddingCache(tmp_path / "cache", {"clip_model": str(clip_dir), **tag})
    assert len(reread) == 2 and torch.equal(reread.get([0, 2]), embedder.cache.get([0, 2]))
    with pytest.raises(ConfigError, match="pairs.diff_contrast.embedding_cache: .* was computed for"):
        EmbeddingCache(tmp_path / "cache", {"clip_model": "another/clip", **tag})


def loss_and_grads(learner, batch, noised) -> tuple[torch.Tensor, list[torch.Tensor]]:
    for p in learner.params:
        p.grad = None
    loss, _ = learner.loss(batch, noised)
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in learner.params]


def test_diff_contrast_with_one_pair_is_diffusion_dpo_and_weights_several(policy, pair_folder, clip_dir, tmp_path):
    """M = 1: W = [[1]], the same loss and gradient as Diffusion-DPO. M = 3: Eq. 9 with W from CLIP."""
    perturb_lora(policy.unet, seed=5, scale=0.05)
    pairs = PairsConfig(beta=900.0, diff_contrast={"tau": 0.5})
    embedder = ClipPairEmbedder.load(str(clip_dir), "cpu", tmp_path / "cache", {})
    contrast = PairLearner(policy, OptimConfig(), DIFF_CONTRAST, pairs, embedder)
    dpo = PairLearner(policy, OptimConfig(), DIFFUSION_DPO, pairs)
    one = batch_of(pair_folder, [4])
    noised = dpo.noise_pair(one, torch.Generator().manual_seed(3))
    dpo_loss, dpo_grads = loss_and_grads(dpo, one, noised)
    contrast_loss, contrast_grads = loss_and_grads(contrast, one, noised)
    assert dpo_loss > 0 and torch.equal(contrast_loss, dpo_loss)
    for a, b in zip(contrast_grads, dpo_grads, strict=True):
        torch.testing.assert_close(a, b, atol=0, rtol=1e-6)

    three = batch_of(pair_folder, [0, 1, 2])
    noised = dpo.noise_pair(three, torch.Generator().manual_seed(4))
    err_w, err_l = by_hand_errors(policy, three, noised, reference=False)
    ref_w, ref_l = by_hand_errors(policy, three, noised, reference=True)
    f_w = independent_joint_embedding(clip_dir, three.image_w, three.prompts)
    f_l = independent_joint_embedding(clip_dir, three.image_l, three.prompts)
    weights = torch.softmax(-(1 - f_w @ f_l.T) / 0.5, dim=1)  # W_ij, rows sum to 1
    h = -900.0 / 2 * ((err_w - ref_w)[:, None] - (err_l - ref_l)[None, :])  # (3, 3) winner i vs loser j
    loss, stats = contrast.loss(three, noised)
    torch.testing.assert_close(loss, -(weights * F.logsigmoid(h)).sum(dim=1).mean(), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(loss, dpo.loss(three, noised)[0])  # the off-diagonal terms count
    assert stats["diagonal_weight"] == pytest.approx(float(weights.diagonal().mean()), abs=1e-5)


@pytest.mark.parametrize("objective", ["mapo", "diffusion_dpo", "diff_contrast"])
def test_each_pair_objective_trains_the_sdxl_lora(sdxl_policy, pair_folder, clip_dir, tmp_path, objective):
    """On the SDXL-shaped pipeline (pooled text and size ids reach the UNet): one step moves the LoRA."""
    embedder = ClipPairEmbedder.load(str(clip_dir), "cpu", tmp_path, {}) if objective == "diff_contrast" else None
    learner = PairLearner(
        sdxl_policy, OptimConfig(lr=1e-3), ALGORITHMS[objective].pair_objective, PairsConfig(beta=5000.0), embedder
    )
    batch = batch_of(pair_folder, [0, 1])
    assert sdxl_policy.encode_prompts(batch.prompts).time_ids is not None
    before = [p.detach().clone() for p in learner.params]
    with unet_calls(sdxl_policy) as rows:
        stats = learner.train_on(batch, torch.Generator().manual_seed(0))
    assert rows == ([4] if objective == "mapo" else [4, 4])
    assert learner.updates == 1 and stats["grad_norm"] > 0 and torch.isfinite(torch.tensor(stats["loss"]))
    assert any(not torch.equal(p, b) for p, b in zip(learner.params, before, strict=True))


def test_pair_batches_cycle_the_source_skip_on_resume_and_refuse_an_empty_one(pair_folder, tmp_path):
    dataset = PairDataset(read_pairs(pair_folder), RESOLUTION)
    batches = pair_batches(dataset, batch_size=4, skip=5)
    assert [next(batches).index.tolist() for _ in range(3)] == [[5, 0, 1, 2], [3, 4, 5, 0], [1, 2, 3, 4]]
    (tmp_path / "pairs.jsonl").write_text(json.dumps({"prompt": "x", "image_w": "a.png", "image_l": "b.png"}))
    with pytest.raises(PairDataError, match="no usable pair .*1 bad rows skipped"):
        next(pair_batches(PairDataset(read_pairs(tmp_path), RESOLUTION), batch_size=2))


@pytest.mark.slow
def test_dpo_raises_the_winners_relative_likelihood_on_bright_over_dark(tmp_path):
    """A few dozen Diffusion-DPO steps on bright-over-dark pairs raise the implicit accuracy, on fresh (t, eps*)
    draws, from chance (0.5: a fresh LoRA is the reference) to well above, and make the mean logit h clearly
    positive, i.e. the winners' error fell relative to the reference more than the losers'.

    The tiny random VAE's posterior is as wide as the prior (logvar ~ 0) and its means differ by ~0.03 between
    any two images, so its samples carry almost no image content and nothing could be learnt. Here it is made
    SD-like: a sharp posterior (logvar - 20) and a scaling factor that gives the content unit scale."""
    pipe = lora_pipeline("tiny-sd")  # its own copy: the VAE is changed below
    with torch.no_grad():
        pipe.vae.quant_conv.bias[4:] -= 20  # the logvar channels of the posterior
    pipe.vae.register_to_config(scaling_factor=5.0)
    policy = fresh_policy(pipe, RESOLUTION)
    write_bright_dark_pairs(tmp_path, 8, seed=1)
    batch = batch_of(tmp_path, list(range(8)))
    learner = PairLearner(policy, OptimConfig(lr=1e-2), DIFFUSION_DPO, PairsConfig(beta=2000.0))

    def held_out_logits() -> torch.Tensor:
        generator, logits = torch.Generator().manual_seed(123), []
        embeds = policy.encode_prompts(batch.prompts).repeat(2)
        with torch.no_grad():
            for _ in range(16):
                noised = learner.noise_pair(batch, generator)
                ref_w, ref_l = learner.reference_errors(noised, embeds)
                err_w, err_l = learner.errors(noised, embeds)
                logits.append(-1000.0 * ((err_w - ref_w) - (err_l - ref_l)))
        return torch.cat(logits)  # (128,)

    assert torch.equal(held_out_logits(), torch.zeros(128))
    generator = torch.Generator().manual_seed(0)
    for _ in range(12):
        learner.train_on(batch, generator)
    h = held_out_logits()
    standard_error = h.std() / len(h) ** 0.5
    assert (h > 0).float().mean() >= 0.6, h
    assert h.mean() > 3 * standard_error, (h.mean(), standard_error)


def train_args(out, objective: str, source, clip_dir, *extra: str) -> list[str]:
    sets = [f"output_dir={out}", f"algorithm.name={objective}", f"pairs.source={source}", "pairs.batch_size=2",
            "train.total_samples=8", f"pairs.diff_contrast.clip_model={clip_dir}", "eval.prompts=[a cat]",
            "eval.images_per_prompt=1", *extra]
    return [arg for s in sets for arg in ("--set", s)]


def scalars(out, tag: str) -> dict[int, float]:
    return {e.step: e.value for e in EventAccumulator(str(out / "tensorboard")).Reload().Scalars(tag)}


@pytest.mark.slow
@pytest.mark.parametrize(
    "objective, tags",
    [
        ("diffusion_dpo", ["model_gap", "ref_gap"]),
        ("mapo", ["win_score", "lose_score", "margin"]),
        ("diff_contrast", ["model_gap", "ref_gap", "diagonal_weight"]),
    ],
)
def test_tailorpo_train_runs_each_pair_objective_end_to_end(tmp_path, pair_folder, clip_dir, objective, tags):
    """`tailorpo train` dispatches on algorithm.name and writes the online trainer's outputs; 8 pairs from a
    6-pair folder in batches of 2 are 4 updates (the second pass starts after 6 pairs)."""
    out = tmp_path / "run"
    assert main(["train", "launch/tiny.yaml", "--no-progress", *train_args(out, objective, pair_folder, clip_dir)]) == 0
    for name in ("lora/pytorch_lora_weights.safetensors", "samples.png", "config.yaml", "summary.json"):
        assert (out / name).exists(), name
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["algorithm"], summary["samples"], summary["updates"]) == (objective, 8, 4)
    assert summary["train_reward_start"] is None and summary["sample_seconds_per_rollout"] == 0  # no sampling
    lora_b = [v for k, v in load_file(str(out / "lora/pytorch_lora_weights.safetensors")).items() if "lora_B" in k]
    assert lora_b and max(float(v.abs().max()) for v in lora_b) > 0  # B starts at zero: the LoRA moved
    for tag in ["loss", "preference_accuracy", "error_w", "error_l", "grad_norm", *tags]:
        assert list(scalars(out, f"train/{tag}")) == [2, 4, 6, 8], tag
    if objective == "diff_contrast":  # each of the 6 pairs embedded once, saved with the run
        shards = list((out / "clip_embeddings").glob("shard-*.safetensors"))
        assert sorted(load_file(str(shards[0]))["rows"].tolist()) == list(range(6)) and len(shards) == 1


@pytest.mark.slow
@pytest.mark.parametrize("objective", ["diffusion_dpo", "diff_contrast"])
def test_resume_continues_with_the_same_losses_and_lora(tmp_path, pair_folder, clip_dir, objective):
    """Interrupted after 4 pairs and resumed: the next losses and the final LoRA equal the uninterrupted
    run's bit for bit (data position, noise generator, optimizer state and the CLIP cache are restored)."""
    whole, split = tmp_path / "whole", tmp_path / "split"

    def run(out, pairs: int, resume: bool = False):
        args = train_args(out, objective, pair_folder, clip_dir, "train.checkpoint_every=1",
                          f"train.total_samples={pairs}")
        return train_pairs(load_config("launch/tiny.yaml", args[1::2]), progress=False, resume=resume)

    run(whole, 8)
    run(split, 4)
    assert run(split, 8, resume=True).updates == 4
    assert scalars(split, "train/loss") == scalars(whole, "train/loss")
    assert len(scalars(whole, "train/loss")) == 4
    lora = lambda out: load_file(str(out / "lora/pytorch_lora_weights.safetensors"))  # noqa: E731
    for key, value in lora(whole).items():
        assert torch.equal(lora(split)[key], value), key
    if objective == "diff_contrast":  # the resumed run embedded only the pairs the first part had not seen
        shards = sorted((split / "clip_embeddings").glob("shard-*.safetensors"))
        assert [load_file(str(s))["rows"].tolist() for s in shards] == [[0, 1], [2, 3], [4, 5]]


def test_pair_configs_fail_at_load_naming_the_field():
    load_config("launch/tiny.yaml", ["algorithm.name=mapo", "runtime.samplers=2"])  # online pairs run on Ray
    with pytest.raises(ConfigError, match="runtime.samplers: algorithm.name='diffusion_dpo' with pairs.source"):
        load_config("launch/tiny.yaml", ["algorithm.name=diffusion_dpo", "pairs.source=x", "runtime.samplers=2"])
    with pytest.raises(ConfigError, match="pairs.mapo.snr_value: Input should be greater than 0"):
        load_config("launch/tiny.yaml", ["pairs.mapo.snr_value=0"])


@pytest.mark.slow
def test_build_style_pairs_writes_a_readable_pair_folder_with_shared_noise(tmp_path, capsys):
    prompts_file = tmp_path / "prompts.txt"
    prompts_file.write_text("a cat\n\na dog\n")
    out = tmp_path / "style"
    assert main(["build-style-pairs", "launch/tiny.yaml", str(out), "--prompts", str(prompts_file)]) == 0
    assert "wrote 2 pairs" in capsys.readouterr().out
    records = list(read_pairs(out, on_error="raise"))
    assert [(r.index, r.prompt) for r in records] == [(0, "a cat"), (1, "a dog")]  # stored under the plain prompt
    lines = [json.loads(line) for line in (out / "pairs.jsonl").read_text().splitlines()]
    assert lines[0]["prompt_w"] == "Disney style animated image, a cat"
    assert lines[1]["prompt_l"] == "Realistic 8k image, a dog"
    assert all(r.image_w.tobytes() != r.image_l.tobytes() for r in records)

    # CLIP's tokenizer lowercases, so "A" and "a" condition alike: identical images prove the shared noise
    same = tmp_path / "same"
    args = ["build-style-pairs", "launch/tiny.yaml", str(same), "--prompts", "a cat",
            "--preferred-prefix", "A", "--dispreferred-prefix", "a"]
    assert main(args) == 0
    (record,) = read_pairs(same)
    assert record.image_w.tobytes() == record.image_l.tobytes()

    assert main(["build-style-pairs", "launch/tiny.yaml", str(tmp_path / "x"), "--recipe", "safety"]) == 2
    assert "--recipe safety needs --dispreferred-prefix" in capsys.readouterr().err


class Brightness(TorchReward):
    """Mean pixel value; 0 for the prompt "tie", so both of its samples tie."""

    name = "brightness"

    def forward(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        scored = torch.tensor([prompt != "tie" for prompt in prompts], dtype=images.dtype)
        return images.mean(dim=(1, 2, 3)) * scored


@pytest.mark.slow
def test_online_pairs_are_the_two_samples_of_a_prompt_ranked_by_reward(policy, tmp_path):
    prompts = ["a cat", "tie", "a dog"]
    rollout = final_image_pair_rollout(policy, Brightness(), prompts, torch.Generator().manual_seed(0))
    pairs = rollout.data
    assert pairs.prompt_index.tolist() == [0, 2] and rollout.stats["ties"] == 1  # the tie dropped
    for row, i in enumerate(pairs.prompt_index.tolist()):
        first, second = rollout.images[i] * 2 - 1, rollout.images[3 + i] * 2 - 1
        winner_first = rollout.rewards[i] > rollout.rewards[3 + i]
        assert torch.equal(pairs.image_w[row], first if winner_first else second)
        assert torch.equal(pairs.image_l[row], second if winner_first else first)
    assert (pairs.image_w.mean(dim=(1, 2, 3)) > pairs.image_l.mean(dim=(1, 2, 3))).all()

    again = final_image_pair_rollout(policy, Brightness(), prompts, torch.Generator().manual_seed(0))
    assert again.data.noise_seed == pairs.noise_seed and torch.equal(again.data.image_w, pairs.image_w)

    # the exporter ranks the same images the same way: online training sees what offline training would read
    export_pairs(tmp_path, prompts, rollout.images, rollout.rewards)
    exported = batch_of(tmp_path, [0, 1])
    assert exported.prompts == ["a cat", "a dog"]
    assert (exported.image_w - pairs.image_w).abs().max() <= 1 / 255 + 1e-6


def test_sample_pairs_writes_reward_ranked_pairs_of_the_base_model(tmp_path, capsys):
    out = tmp_path / "pairs"
    assert main(["sample-pairs", "launch/tiny.yaml", str(out), "--count", "3"]) == 0
    assert "wrote 4 pairs" in capsys.readouterr().out  # whole batches of sampling.batch_size=2 prompts
    lines = [json.loads(line) for line in (out / "pairs.jsonl").read_text().splitlines()]
    assert len(lines) == 4 and all(line["reward_w"] > line["reward_l"] for line in lines)
    records = list(read_pairs(out, on_error="raise"))
    assert len(records) == 4 and {r.prompt for r in records} <= set(load_config("launch/tiny.yaml").prompts)
    assert main(["sample-pairs", "launch/tiny.yaml", str(out), "--count", "0"]) == 2


@pytest.mark.slow
def test_tailorpo_train_runs_a_pair_objective_on_its_own_samples(tmp_path, clip_dir):
    """Without pairs.source, Diff-contrast trains on the policy's own ranked samples: total_samples counts
    images (2 per prompt), CLIP embeds every new pair and nothing is cached."""
    out = tmp_path / "run"
    sets = [f"output_dir={out}", "algorithm.name=diff_contrast", "train.total_samples=8",
            f"pairs.diff_contrast.clip_model={clip_dir}", "eval.prompts=[a cat]", "eval.images_per_prompt=1"]
    assert main(["train", "launch/tiny.yaml", "--no-progress", *[a for s in sets for a in ("--set", s)]]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["samples"], summary["updates"]) == (8, 2)
    assert summary["train_reward_start"] is not None and summary["sample_seconds_per_rollout"] > 0
    assert list(scalars(out, "train/pairs")) == [4, 8] and set(scalars(out, "train/pairs").values()) <= {1.0, 2.0}
    assert list(scalars(out, "train/diagonal_weight")) == [4, 8] and not (out / "clip_embeddings").exists()
    lora_b = [v for k, v in load_file(str(out / "lora/pytorch_lora_weights.safetensors")).items() if "lora_B" in k]
    assert max(float(v.abs().max()) for v in lora_b) > 0
