import io
import re

import pytest
import torch
from PIL import Image

from tailorpo.rewards import RewardInputError, build_reward, differentiable_reward
from tailorpo.rewards.catalogue import CATALOGUE, resolve
from tailorpo.rewards.colorfulness import colorfulness
from tailorpo.rewards.jpeg import JpegCompressibility


def test_jpeg_is_minus_kilobytes_at_quality_95():
    gen = torch.Generator().manual_seed(0)
    noise = torch.rand(1, 3, 32, 32, generator=gen)
    flat = torch.full((1, 3, 32, 32), 0.5)
    reward = build_reward("jpeg")
    scores = reward.score(torch.cat([noise, flat]), ["a", "b"]).scores
    buffer = io.BytesIO()
    pixels = (noise[0] * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=95)
    assert scores[0].item() == pytest.approx(-buffer.tell() / 1000)
    assert scores[1] > scores[0]  # a flat image compresses better than noise


def test_jpeg_refuses_gradients():
    with pytest.raises(RewardInputError, match="not differentiable"):
        build_reward("jpeg").score(torch.rand(1, 3, 8, 8), ["x"], want_grad=True)


def test_colorfulness_closed_form():
    gray = torch.full((1, 3, 8, 8), 0.4)
    assert colorfulness(gray).item() == pytest.approx(0.0, abs=1e-2)
    red = torch.zeros(1, 3, 8, 8)
    red[:, 0] = 1.0  # rg = 255, yb = 127.5 everywhere: no spread, mean term only
    assert colorfulness(red).item() == pytest.approx(0.3 * (255**2 + 127.5**2) ** 0.5, rel=1e-4)


def test_colorfulness_gradient_matches_finite_differences():
    reward = build_reward("colorfulness")
    images = torch.rand(2, 3, 6, 6, generator=torch.Generator().manual_seed(3), dtype=torch.float64) * 0.8 + 0.1
    out = reward.score(images.float(), ["a", "b"], want_grad=True)
    direction = torch.randn(images.shape, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    h = 1e-4
    plus = colorfulness(images + h * direction)
    minus = colorfulness(images - h * direction)
    numeric = (plus - minus) / (2 * h)
    analytic = (out.grad.double() * direction).sum(dim=(1, 2, 3))
    torch.testing.assert_close(analytic, numeric, rtol=1e-3, atol=1e-3)


def test_differentiable_reward_op_backpropagates_the_reward_gradient():
    reward = build_reward("colorfulness")
    latent = torch.rand(2, 3, 6, 6, generator=torch.Generator().manual_seed(5)).requires_grad_(True)
    images = latent * 0.5 + 0.25
    differentiable_reward(reward, images, ["a", "b"]).sum().backward()
    expected = reward.score(images.detach(), ["a", "b"], want_grad=True).grad * 0.5
    torch.testing.assert_close(latent.grad, expected)


@pytest.mark.parametrize(
    "images, prompts, message",
    [
        (torch.rand(2, 4, 8, 8), ["a", "b"], "shape"),
        (torch.rand(0, 3, 8, 8), [], "empty"),
        (torch.rand(2, 3, 8, 8), ["a"], "2 images but 1 prompts"),
        (torch.full((1, 3, 8, 8), float("nan")), ["a"], "NaN"),
        (torch.full((1, 3, 8, 8), 1.5), ["a"], r"\[0, 1\]"),
    ],
)
def test_bad_reward_input_is_named(images, prompts, message):
    with pytest.raises(RewardInputError, match=message):
        build_reward("jpeg").score(images, prompts)


def test_unknown_reward_name():
    with pytest.raises(ValueError, match="reward.name: unknown reward 'nope'; choose one of aesthetic, "):
        build_reward("nope")


@pytest.mark.parametrize(
    "target, message",
    [
        ("mypkg.rewards.Brightness", "'mypkg.rewards.Brightness' is not 'module:attr'"),
        ("no_such_package_xyz.rewards:Brightness", "cannot import 'no_such_package_xyz.rewards'"),
        ("tailorpo.rewards.jpeg:Brightness", "module 'tailorpo.rewards.jpeg' has no 'Brightness'"),
    ],
)
def test_a_loader_string_that_does_not_resolve_is_named(target, message):
    with pytest.raises(ValueError, match=f"^reward.name: .*{re.escape(message)}"):
        resolve(target)


def test_a_loader_string_resolves_to_its_object_and_builds_the_reward():
    assert resolve(CATALOGUE["jpeg"].loader) is JpegCompressibility
    assert isinstance(build_reward("jpeg"), JpegCompressibility)
