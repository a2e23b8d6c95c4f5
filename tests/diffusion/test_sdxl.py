"""SDXL: the tiny SDXL-shaped pipeline, the policy's conditioning (two text encoders, pooled embeddings, size
ids) against diffusers' own StableDiffusionXLPipeline, and TailorPO / D3PO rollouts and LoRA updates on it."""

import functools
import json
from dataclasses import fields

import pytest
import torch
from diffusers import DDIMScheduler, StableDiffusionXLPipeline
from diffusers.configuration_utils import FrozenDict
from transformers import CLIPTextModel, CLIPTextModelWithProjection

from tailorpo.algorithms.branching import tailorpo_rollout
from tailorpo.algorithms.learner import Learner
from tailorpo.algorithms.rollouts import d3po_rollout, select_rows
from tailorpo.cli import main
from tailorpo.config import AlgorithmConfig, OptimConfig
from tailorpo.core.guidance import cosine_eta_schedule
from tailorpo.diffusion.lora import save_lora
from tailorpo.diffusion.pipeline import load_pipeline
from tailorpo.diffusion.policy import DiffusionPolicy, PromptEmbeds
from tailorpo.rewards import build_reward
from tests.conftest import perturb_lora

PROMPTS = ["a cat", "a red car"]
RESOLUTION = 64


def test_make_tiny_model_sdxl_writes_an_sdxl_pipeline_that_loads_through_the_path_route(tmp_path):
    assert main(["make-tiny-model", "--sdxl", str(tmp_path / "xl")]) == 0
    index = json.loads((tmp_path / "xl" / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionXLPipeline" and index["force_zeros_for_empty_prompt"] is True
    pipe = load_pipeline(str(tmp_path / "xl"))
    assert isinstance(pipe, StableDiffusionXLPipeline) and isinstance(pipe.scheduler, DDIMScheduler)
    assert not pipe.scheduler.config.set_alpha_to_one  # the last DDIM step keeps a density
    assert isinstance(pipe.text_encoder, CLIPTextModel)
    assert isinstance(pipe.text_encoder_2, CLIPTextModelWithProjection)
    unet = pipe.unet.config
    assert unet.addition_embed_type == "text_time"
    assert unet.cross_attention_dim == pipe.text_encoder.config.hidden_size + pipe.text_encoder_2.config.hidden_size
    assert unet.projection_class_embeddings_input_dim == (
        6 * unet.addition_time_embed_dim + pipe.text_encoder_2.config.projection_dim
    )
    assert pipe.tokenizer_2.pad_token == "!" and pipe.tokenizer_2("a cat").input_ids == [49406, 320, 2368, 49407]
    modules = [m for m in pipe.components.values() if isinstance(m, torch.nn.Module)]
    assert len(modules) == 4 and not any(p.requires_grad for m in modules for p in m.parameters())


def test_prompt_embeds_rows_carry_the_sdxl_fields():
    gen = torch.Generator().manual_seed(0)
    embeds = PromptEmbeds(
        cond=torch.randn(3, 5, 4, generator=gen),
        uncond=torch.randn(3, 5, 4, generator=gen),
        pooled_cond=torch.randn(3, 2, generator=gen),
        pooled_uncond=torch.randn(3, 2, generator=gen),
        time_ids=torch.arange(18.0).view(3, 6),
    )
    rows = torch.tensor([2, 0, 2])
    picked, doubled = embeds.index(rows), embeds.repeat(2)
    for field in fields(PromptEmbeds):
        value = getattr(embeds, field.name)
        assert torch.equal(getattr(picked, field.name), value[rows]), field.name
        assert torch.equal(getattr(doubled, field.name), torch.cat([value, value])), field.name
    sd = PromptEmbeds(embeds.cond, embeds.uncond).index(rows).repeat(2)
    assert sd.pooled_cond is None and sd.pooled_uncond is None and sd.time_ids is None


def _run_pipeline(pipe, latents, guidance_scale, monkeypatch):
    """Run diffusers' StableDiffusionXLPipeline (DDIM eta=1, 20 steps) from ``latents`` and record every
    (x_t, t, eps) its scheduler is handed: eps is the pipeline's own (guided) noise prediction."""
    calls = []
    step = pipe.scheduler.step

    @functools.wraps(step)  # the pipeline reads the signature to decide whether to pass eta and the generator
    def recording_step(model_output, timestep, sample, *args, **kwargs):
        calls.append((sample.clone(), int(timestep), model_output.clone()))
        return step(model_output, timestep, sample, *args, **kwargs)

    monkeypatch.setattr(pipe.scheduler, "step", recording_step)
    final = pipe(
        PROMPTS, height=RESOLUTION, width=RESOLUTION, num_inference_steps=20, guidance_scale=guidance_scale,
        eta=1.0, latents=latents, generator=torch.Generator().manual_seed(1), output_type="latent",
    ).images
    assert len(calls) == 20
    return calls, final


@pytest.mark.parametrize("force_zeros", [True, False])
def test_guided_eps_and_steps_match_the_diffusers_sdxl_pipeline(sdxl_policy, force_zeros, monkeypatch):
    """At every step our eps at the pipeline's own x_t equals its guided noise prediction, and our eta=1 chain
    drawing the same noise (the pipeline's generator feeds only the scheduler when latents are given) ends on
    its latents. ``force_zeros_for_empty_prompt`` decides whether the unconditional branch is zeros or the
    encoded empty prompt; both must agree with the pipeline."""
    pipe = sdxl_policy.pipe
    config = FrozenDict({**pipe.config, "force_zeros_for_empty_prompt": force_zeros})
    monkeypatch.setattr(pipe, "_internal_dict", config)
    embeds = sdxl_policy.encode_prompts(PROMPTS)
    assert bool((embeds.uncond == 0).all()) == force_zeros
    assert bool((embeds.pooled_uncond == 0).all()) == force_zeros
    x_T = sdxl_policy.initial_latents(len(PROMPTS), torch.Generator().manual_seed(0))
    calls, final = _run_pipeline(pipe, x_T, 5.0, monkeypatch)

    generator, x = torch.Generator().manual_seed(1), x_T
    with torch.no_grad():
        for i, (x_t, t, pipeline_eps) in enumerate(calls):
            assert t == sdxl_policy.timesteps[i]
            torch.testing.assert_close(sdxl_policy.eps(x_t, i, embeds), pipeline_eps, atol=1e-5, rtol=1e-5)
            x = sdxl_policy.step(i, sdxl_policy.eps(x, i, embeds), x, noise=sdxl_policy.noise(x.shape, generator))
            x = x.prev_sample
    # 20 fp32 steps on latents that grow to ~50 under random weights: relative agreement
    torch.testing.assert_close(x, final, atol=1e-4, rtol=1e-5)


def test_unguided_eps_matches_the_pipeline_without_guidance(sdxl_policy, monkeypatch):
    """cond_eps (the offline pair objectives' noise prediction, one timestep per row) is the pipeline's UNet
    output when it runs without classifier-free guidance (guidance_scale 1: cond rows only)."""
    x_T = sdxl_policy.initial_latents(len(PROMPTS), torch.Generator().manual_seed(2))
    calls, _ = _run_pipeline(sdxl_policy.pipe, x_T, 1.0, monkeypatch)
    embeds = sdxl_policy.encode_prompts(PROMPTS)
    with torch.no_grad():
        for x_t, t, pipeline_eps in calls[::5]:
            eps = sdxl_policy.cond_eps(x_t, torch.full((len(PROMPTS),), t), embeds)
            torch.testing.assert_close(eps, pipeline_eps, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("algorithm", ["tailorpo", "tailorpo_g", "d3po"])
def test_a_rollout_and_an_update_on_sdxl_raise_the_winner_over_the_loser(sdxl_policy, algorithm):
    """TailorPO (one x_t, CFG through the SDXL conditioning), TailorPO-G (reward gradient through the SDXL UNet)
    and D3PO (different parents: the embeddings are repeated) each train the SDXL LoRA: one update moves the
    LoRA and raises log pi(x^w) - log pi(x^l) of the pairs it trained on."""
    perturb_lora(sdxl_policy.unet, seed=1, scale=0.01)
    generator, steps = torch.Generator().manual_seed(3), [20, 8]
    if algorithm == "d3po":
        rollout = d3po_rollout(sdxl_policy, build_reward("jpeg"), PROMPTS, generator, steps)
    else:
        eta = cosine_eta_schedule(steps) if algorithm == "tailorpo_g" else None
        reward = build_reward("colorfulness" if eta else "jpeg")
        rollout = tailorpo_rollout(sdxl_policy, reward, PROMPTS, generator, steps, guidance_eta=eta)
    pairs = select_rows(rollout.data, rollout.data.valid)
    assert len(pairs.step_index) > 0 and rollout.images.shape[1:] == (3, RESOLUTION, RESOLUTION)
    group = select_rows(pairs, pairs.step_index == pairs.step_index[0])
    group_embeds = sdxl_policy.encode_prompts(PROMPTS).index(group.prompt_index)
    learner = Learner(sdxl_policy, OptimConfig(lr=1e-4), AlgorithmConfig(name=algorithm, ratio_clip=None))

    def margin() -> torch.Tensor:
        with torch.no_grad():
            return learner.pair_logits(group, group_embeds)

    before_margin, before_lora = margin(), [p.detach().clone() for p in learner.params]
    stats = learner.train_on(rollout)
    assert learner.updates == 1 and stats["grad_norm"] > 0
    assert any(not torch.equal(p, b) for p, b in zip(learner.params, before_lora, strict=True))
    assert (margin() > before_margin).all()


def test_sdxl_lora_round_trip_into_a_fresh_pipeline(sdxl_policy, tmp_path):
    """save_lora's file loads with StableDiffusionXLPipeline.load_lora_weights and gives the same eps."""
    perturb_lora(sdxl_policy.unet, seed=4)
    x = sdxl_policy.initial_latents(len(PROMPTS), torch.Generator().manual_seed(5))
    with torch.no_grad():
        expected = sdxl_policy.eps(x, 3, sdxl_policy.encode_prompts(PROMPTS))
    save_lora(sdxl_policy.unet, tmp_path / "lora")
    fresh = DiffusionPolicy(load_pipeline("tiny-sdxl"), num_steps=20, resolution=RESOLUTION)
    embeds = fresh.encode_prompts(PROMPTS)
    with torch.no_grad():
        base = fresh.eps(x, 3, embeds)
        fresh.pipe.load_lora_weights(str(tmp_path / "lora"))
        loaded = fresh.eps(x, 3, embeds)
    assert not torch.allclose(base, expected, atol=1e-4)
    torch.testing.assert_close(loaded, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.slow
def test_tailorpo_train_on_tiny_sdxl(tmp_path):
    """`tailorpo train` end to end with model.pretrained=tiny-sdxl: the SDXL pipeline through the real trainer."""
    from tailorpo.config import load_config
    from tailorpo.training.loop import train

    overrides = ["model.pretrained=tiny-sdxl", "train.total_samples=4", "eval.images_per_prompt=1",
                 f"output_dir={tmp_path}"]
    summary = train(load_config("launch/tiny.yaml", overrides), progress=False)
    assert summary.updates == 2 and summary.eval_reward_trained != summary.eval_reward_base
    assert (tmp_path / "lora" / "pytorch_lora_weights.safetensors").exists()


def test_a_float16_pipeline_keeps_a_force_upcast_vae_in_float32_and_decodes_in_it():
    """SDXL's VAE overflows in fp16 (its config says force_upcast); diffusers decodes it in fp32, and so do we."""
    pipe = load_pipeline("tiny-sdxl", dtype=torch.float16)
    assert pipe.vae.config.force_upcast
    assert pipe.unet.dtype == torch.float16 and pipe.vae.dtype == torch.float32
    policy = DiffusionPolicy(pipe, num_steps=20, resolution=RESOLUTION)
    image = policy.decode(torch.randn(1, *policy.latent_shape))
    assert image.dtype == torch.float32 and image.shape == (1, 3, RESOLUTION, RESOLUTION)
    assert load_pipeline("tiny-sdxl", dtype=torch.bfloat16).vae.dtype == torch.bfloat16  # bf16 does not overflow


@pytest.mark.parametrize("flags", [["--full-size", "sd15", "--sdxl"], ["--dtype", "float16"]])
def test_make_tiny_model_refuses_flags_it_would_ignore(tmp_path, capsys, flags):
    assert main(["make-tiny-model", *flags, str(tmp_path / "m")]) == 2
    assert "error: --" in capsys.readouterr().err and not (tmp_path / "m").exists()
