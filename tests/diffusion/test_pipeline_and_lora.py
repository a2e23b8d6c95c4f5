import json

import pytest
import torch
from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
from transformers import CLIPTextModel, CLIPTokenizer

from tailorpo.diffusion.lora import reference_model, save_lora
from tailorpo.diffusion.pipeline import load_pipeline
from tailorpo.tiny.models import make_tiny_model
from tests.conftest import perturb_lora


def test_tiny_model_is_sd_shaped_and_loads_through_the_path_route(tmp_path):
    make_tiny_model(tmp_path / "tiny")
    index = json.loads((tmp_path / "tiny" / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionPipeline"
    pipe = load_pipeline(str(tmp_path / "tiny"))
    assert isinstance(pipe.unet, UNet2DConditionModel) and pipe.unet.config.cross_attention_dim == 32
    assert isinstance(pipe.vae, AutoencoderKL) and isinstance(pipe.text_encoder, CLIPTextModel)
    assert isinstance(pipe.tokenizer, CLIPTokenizer) and isinstance(pipe.scheduler, DDIMScheduler)
    assert pipe.scheduler.config.beta_schedule == "scaled_linear"
    assert pipe.scheduler.config.beta_start == 0.00085 and pipe.scheduler.config.beta_end == 0.012
    # CLIP's real BPE ids: <|startoftext|> a photo of a cat <|endoftext|>
    assert pipe.tokenizer("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]


@pytest.mark.parametrize("sdxl", [False, True])
def test_tiny_model_is_deterministic(tmp_path, sdxl):
    a = load_pipeline(str(make_tiny_model(tmp_path / "a", seed=0, sdxl=sdxl)))
    b = load_pipeline(str(make_tiny_model(tmp_path / "b", seed=0, sdxl=sdxl)))
    for component, module in a.components.items():
        if isinstance(module, torch.nn.Module):  # UNet, VAE and every text encoder
            state_b = getattr(b, component).state_dict()
            for name, pa in module.state_dict().items():
                assert torch.equal(pa, state_b[name]), f"{component}.{name}"


def test_missing_model_names_the_field(tmp_path):
    with pytest.raises(RuntimeError, match="model.pretrained="):
        load_pipeline(str(tmp_path / "does-not-exist"))


def _unet_out(unet, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(1, 4, 16, 16, generator=gen)
    states = torch.randn(1, 77, 32, generator=gen)
    with torch.no_grad():
        return unet(x, 500, encoder_hidden_states=states).sample


def test_reference_model_disables_the_adapter_and_restores_it(tiny_pipe):
    perturb_lora(tiny_pipe.unet)
    with_lora = _unet_out(tiny_pipe.unet)
    with reference_model(tiny_pipe.unet):
        base = _unet_out(tiny_pipe.unet)
    assert not torch.allclose(with_lora, base)
    torch.testing.assert_close(_unet_out(tiny_pipe.unet), with_lora)


def test_lora_round_trip_into_a_fresh_pipeline(tiny_pipe, tmp_path):
    perturb_lora(tiny_pipe.unet, seed=3)
    expected = _unet_out(tiny_pipe.unet)
    save_lora(tiny_pipe.unet, tmp_path / "lora")
    fresh = load_pipeline("tiny-sd")
    base = _unet_out(fresh.unet)
    fresh.load_lora_weights(str(tmp_path / "lora"))
    loaded = _unet_out(fresh.unet)
    assert not torch.allclose(loaded, base, atol=1e-4)
    torch.testing.assert_close(loaded, expected, atol=1e-5, rtol=1e-5)


def test_making_the_tiny_model_leaves_the_global_rng_alone(tmp_path):
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    make_tiny_model(tmp_path / "t")
    torch.testing.assert_close(torch.rand(3), expected)


def test_mixed_precision_covers_the_vae_decode():
    """optim.mixed_precision=bf16 runs the decoder under autocast too (the decode is the costlier half at
    512 px): the bf16 decode differs from the fp32 one by bf16 round-off, and only by that."""
    from tailorpo.diffusion.policy import DiffusionPolicy

    pipe = load_pipeline("tiny-sd")
    policy = DiffusionPolicy(pipe, resolution=32)
    latents = torch.randn(2, *policy.latent_shape, generator=torch.Generator().manual_seed(0))
    full = policy.decode(latents)
    mixed = DiffusionPolicy(pipe, resolution=32, autocast_dtype=torch.bfloat16).decode(latents)
    assert mixed.dtype == torch.float32 and not torch.equal(full, mixed)
    torch.testing.assert_close(mixed, full, atol=0.05, rtol=0)


def test_vae_slicing_from_the_config_decodes_one_image_at_a_time_to_the_same_images():
    """model.vae_slicing: the decoder sees one image per call (its activation peak is one image's, what lets
    eval decode eval.batch_size images at 512 px), and the images are those of a batched decode."""
    from tailorpo.config import load_config
    from tailorpo.training.build import build_policy

    policy = build_policy(load_config("launch/tiny.yaml", ["model.vae_slicing=true"]), torch.device("cpu"))
    latents = torch.randn(3, *policy.latent_shape, generator=torch.Generator().manual_seed(0))
    rows = []
    hook = policy.pipe.vae.decoder.register_forward_hook(lambda module, args, out: rows.append(args[0].shape[0]))
    sliced = policy.decode(latents)
    policy.pipe.vae.disable_slicing()
    batched = policy.decode(latents)
    hook.remove()
    assert rows == [1, 1, 1, 3]
    torch.testing.assert_close(sliced, batched, atol=1e-5, rtol=0)  # float32 kernels batch differently
