"""The tiny-shapes model: its synthetic data, the training script's plumbing, and the shipped weights (the
classifier reward is accurate, the VAE reconstructs, samples show their prompts, the reward is served)."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml
from safetensors.torch import load_file, save_file

from reward_servers.shapes import ShapeMatchReward, load, load_classifier
from tailorpo.algorithms.rollouts import trajectory_rollout
from tailorpo.diffusion.pipeline import load_pipeline
from tailorpo.diffusion.policy import DiffusionPolicy
from tailorpo.prompts import SHAPE_HELD_OUT, SHAPE_SCENES, SHAPE_TRAIN, shape_caption, shape_held_out
from tailorpo.rewards import RewardInputError, build_reward
from tailorpo.rewards.grpc_client import GrpcReward
from tailorpo.tiny.shape_classifier import HEADS
from tailorpo.tiny.shapes import IMAGE_SIZE, SHAPES_MODEL_DIR, draw_scenes, render, scenes_of
from tailorpo.tiny.shapes_training import TrainingPlan, train_tiny_shapes
from tests.servers.test_reward_server import reward_server

ROOT = Path(__file__).resolve().parents[2]


def fresh_images(n: int, seed: int, scenes: list[tuple[int, int, int]] = SHAPE_SCENES):
    generator = torch.Generator().manual_seed(seed)
    drawn = draw_scenes(n, scenes, generator)
    return render(drawn, generator), drawn


def predicted_scenes(reward: ShapeMatchReward, images: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return torch.stack([head.argmax(1) for head in reward.classifier(images).split(HEADS, dim=1)], dim=1)


@pytest.fixture(scope="module")
def shipped_reward() -> ShapeMatchReward:
    return build_reward("shapes")


@pytest.fixture(scope="module")
def shipped_pipe():
    return load_pipeline("tiny-shapes")


def test_render_is_a_function_of_the_seed_and_draws_the_caption():
    images, scenes = fresh_images(90, seed=0, scenes=SHAPE_SCENES)
    torch.testing.assert_close(images, fresh_images(90, seed=0, scenes=SHAPE_SCENES)[0], rtol=0, atol=0)
    assert not torch.equal(images, fresh_images(90, seed=1, scenes=SHAPE_SCENES)[0])
    assert images.shape == (90, 3, IMAGE_SIZE, IMAGE_SIZE) and images.min() >= 0 and images.max() <= 1
    background = images[:, :, :1, :1]  # the corners are background at every position
    shape = ((images - background).abs().sum(1) > 0.1).float()  # (N, H, W) where the shape is
    coords = torch.arange(IMAGE_SIZE) + 0.5
    x = (shape.sum(1) * coords).sum(1) / shape.sum((1, 2)) / IMAGE_SIZE
    y = (shape.sum(2) * coords).sum(1) / shape.sum((1, 2)) / IMAGE_SIZE
    position = scenes[:, 2]
    assert (x[position == 0] < 0.4).all() and (x[position == 1] > 0.6).all()
    assert (y[position == 2] < 0.4).all() and (y[position == 3] > 0.6).all()
    assert ((x[position == 4] - 0.5).abs() < 0.1).all() and ((y[position == 4] - 0.5).abs() < 0.1).all()
    red = scenes[:, 0] == 0
    red_channel, green_channel = (images[red, c] * shape[red] for c in (0, 1))
    assert red_channel.sum() > 3 * green_channel.sum()


def test_held_out_prompts_are_new_combinations_of_seen_words_and_pairs():
    assert len(SHAPE_TRAIN) == 75 and len(SHAPE_HELD_OUT) == 15 and not set(SHAPE_TRAIN) & set(SHAPE_HELD_OUT)
    train = [s for s in SHAPE_SCENES if not shape_held_out(s)]
    for held in (s for s in SHAPE_SCENES if shape_held_out(s)):
        assert set(shape_caption(held).split()) <= {w for p in SHAPE_TRAIN for w in p.split()}
        for i, j in itertools.combinations(range(3), 2):  # every attribute pair of it was seen in training
            assert any(t[i] == held[i] and t[j] == held[j] for t in train), (held, i, j)


def test_a_prompt_outside_the_grammar_is_bad_input_naming_it(shipped_reward):
    assert scenes_of(["a red circle on the left"]).tolist() == [[0, 0, 0]]
    with pytest.raises(RewardInputError, match="a cat"):
        shipped_reward.score(torch.rand(2, 3, 32, 32), ["a red circle on the left", "a cat"])


def test_training_script_is_deterministic_and_writes_a_loadable_pipeline(tmp_path):
    """A few steps of each stage (the plumbing, not the quality): the same seed writes the same weights, the
    folder loads through load_pipeline as a StableDiffusionPipeline and its classifier through the reward."""
    plan = TrainingPlan(classifier_steps=2, vae_steps=2, denoiser_steps=2, batch_size=4, latent_set=8)
    report = train_tiny_shapes(tmp_path / "a", seed=3, plan=plan, progress=False)
    train_tiny_shapes(tmp_path / "b", seed=3, plan=plan, progress=False)
    train_tiny_shapes(tmp_path / "c", seed=4, plan=plan, progress=False)
    weights = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*.safetensors"))
    assert [str(p) for p in weights] == [
        "classifier/model.safetensors", "text_encoder/model.safetensors", "unet/diffusion_pytorch_model.safetensors",
        "vae/diffusion_pytorch_model.safetensors",
    ]
    for path in weights:
        a, b, c = (load_file(str(tmp_path / run / path)) for run in "abc")
        assert all(torch.equal(a[k], b[k]) for k in a), path
        assert any(not torch.equal(a[k], c[k]) for k in a), path
    assert set(report.seconds) == {"classifier", "vae", "denoiser"}
    pipe = load_pipeline(str(tmp_path / "a"))
    assert type(pipe).__name__ == "StableDiffusionPipeline" and pipe.unet.config.sample_size == IMAGE_SIZE // 4
    assert pipe.vae.config.scaling_factor != 0.18215  # set from the trained latents
    reward = load(str(tmp_path / "a"), tiny=False)
    assert torch.isfinite(reward.score(torch.rand(1, 3, 32, 32), [SHAPE_TRAIN[0]]).scores).all()


def test_the_classifier_checkpoint_is_loaded_strictly(tmp_path):
    state = load_file(str(SHAPES_MODEL_DIR / "classifier" / "model.safetensors"))
    key = sorted(state)[0]
    save_file({k: v for k, v in state.items() if k != key}, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match=f"missing keys.*{key}"):
        load_classifier(str(tmp_path))


def test_the_shipped_classifier_knows_all_90_captions(shipped_reward):
    images, scenes = fresh_images(900, seed=11)
    accuracy = (predicted_scenes(shipped_reward, images) == scenes).all(1).float().mean()
    assert accuracy > 0.98
    scores = shipped_reward.score(images[:90], [shape_caption(tuple(s)) for s in scenes[:90].tolist()]).scores
    wrong = [shape_caption(((c + 1) % 6, k, p)) for c, k, p in scenes[:90].tolist()]  # another color
    assert scores.mean() > -0.1 and (scores > shipped_reward.score(images[:90], wrong).scores + 1).all()


def test_the_shipped_vae_reconstructs(shipped_pipe, shipped_reward):
    images, scenes = fresh_images(256, seed=12)
    vae = shipped_pipe.vae
    with torch.no_grad():
        posterior = vae.encode(images * 2 - 1).latent_dist
        recon = (vae.decode(posterior.mean).sample / 2 + 0.5).clamp(0, 1)
    assert F.mse_loss(recon, images) < 2e-3  # in [0, 1]; a random VAE is about 0.1
    assert (posterior.std / (posterior.mean.std() + 1e-8)).mean() < 0.1  # the posterior is narrow, not the prior
    latent_std = float(posterior.mean.std() * vae.config.scaling_factor)
    assert 0.8 < latent_std < 1.25  # scaling_factor makes the latents about unit variance, as SD's does
    assert (predicted_scenes(shipped_reward, recon) == scenes).all(1).float().mean() > 0.95


def sample(pipe, prompts: list[str], seed: int) -> torch.Tensor:
    """The trainer's own sampler (DDIM eta = 1, 20 steps, guidance 5), 32 px."""
    policy = DiffusionPolicy(pipe, num_steps=20, eta=1.0, guidance_scale=5.0, resolution=IMAGE_SIZE)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        return trajectory_rollout(policy, policy.encode_prompts(prompts), generator, []).images


@pytest.mark.parametrize("prompts, bound", [(SHAPE_TRAIN, 0.6), (SHAPE_HELD_OUT, 0.3)], ids=["train", "held-out"])
def test_shipped_samples_show_their_prompt(shipped_pipe, shipped_reward, prompts, bound):
    """All three attributes right in most samples (chance: 1/90); on held-out combinations too, less often."""
    batch = [p for p in prompts for _ in range(2)][:60]
    correct = (predicted_scenes(shipped_reward, sample(shipped_pipe, batch, seed=5)) == scenes_of(batch)).all(1)
    assert correct.float().mean() > bound


def test_shapes_reward_server_serves_the_shipped_classifier_with_its_gradient(shipped_reward):
    """`tailorpo serve-reward shapes` (default weights) over gRPC on loopback: Info, the in-process scores, a
    gradient that matches finite differences, and INVALID_ARGUMENT for a prompt it cannot score."""
    images, scenes = fresh_images(2, seed=13)
    images = images * 0.9 + 0.05  # away from the [0, 1] bounds for the finite differences
    # another shape than the image's: the classifier is not saturated there, so the gradient is worth comparing
    prompts = [shape_caption((color, (kind + 1) % 3, position)) for color, kind, position in scenes.tolist()]
    with reward_server("shapes", tiny=False) as (address, _):
        client = GrpcReward([address])
        assert (client.name, client.differentiable, client.image_size) == ("shapes", True, IMAGE_SIZE)
        assert client.model_id == str(SHAPES_MODEL_DIR)
        out = client.score(images, prompts, want_grad=True)
        torch.testing.assert_close(out.scores, shipped_reward.score(images, prompts).scores, atol=1e-5, rtol=1e-5)
        direction = torch.randn(images.shape, generator=torch.Generator().manual_seed(14))
        h = 1e-3
        numeric = (client.score(images + h * direction, prompts).scores
                   - client.score(images - h * direction, prompts).scores) / (2 * h)
        analytic = (out.grad * direction).sum(dim=(1, 2, 3))
        assert analytic.abs().min() > 0.1
        torch.testing.assert_close(analytic, numeric, rtol=2e-2, atol=1e-3)
        with pytest.raises(Exception, match="INVALID_ARGUMENT.*a cat|a cat.*INVALID_ARGUMENT"):
            client.score(images, [prompts[0], "a cat"])


def test_launch_shapes_yaml_trains_on_the_train_prompts_and_evaluates_both_splits():
    cfg = yaml.safe_load((ROOT / "launch" / "shapes.yaml").read_text())
    assert cfg["model"] == {"pretrained": "tiny-shapes", "resolution": IMAGE_SIZE}
    assert cfg["prompts"] == SHAPE_TRAIN and cfg["reward"]["name"] == "shapes"
    assert set(cfg["eval"]["prompts"]) <= set(SHAPE_TRAIN + SHAPE_HELD_OUT)
