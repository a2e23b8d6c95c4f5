"""The CLIP-based reward servers' models (aesthetic, pickscore, hpsv2): tiny seeded builds, gradients, the score
formulas, and the strict key/shape check of the real loaders against the published checkpoint layouts."""

from __future__ import annotations

import inspect
import math
import re

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn
from transformers import CLIPConfig, CLIPModel

from reward_servers import aesthetic, hpsv2, pickscore
from tailorpo.rewards.catalogue import CATALOGUE, build_reward, resolve
from tailorpo.rewards.clip import checked_clip_state_dict, load_hf_clip
from tailorpo.rewards.preprocess import clip_preprocess, normalize

MODULES = {"aesthetic": aesthetic, "pickscore": pickscore, "hpsv2": hpsv2}
PROMPTS = ["a photo of a cat", "an oil painting of a red boat on a stormy sea"]


def _images(height: int = 32, width: int = 48, seed: int = 0) -> torch.Tensor:
    return torch.rand(2, 3, height, width, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def tiny():
    return {name: module.load(None, tiny=True) for name, module in MODULES.items()}


# ---------------------------------------------------------------- 1. tiny builds: shape, determinism, gradients


@pytest.mark.parametrize("name", MODULES)
def test_tiny_load_scores_are_finite_and_deterministic(name, tiny):
    torch.manual_seed(1234)  # the load must not depend on the caller's RNG, nor advance it
    rng = torch.get_rng_state()
    first, second = tiny[name], MODULES[name].load(None, tiny=True)
    assert torch.equal(torch.get_rng_state(), rng)
    assert (first.name, first.image_size, first.model_id, first.differentiable) == (name, 224, "tiny", True)
    scores = first.score(_images(), PROMPTS).scores
    assert scores.shape == (2,) and torch.isfinite(scores).all()
    assert scores[0] != scores[1]  # a constant reward would pass every other check
    assert torch.equal(scores, second.score(_images(), PROMPTS).scores)


@pytest.mark.parametrize("name", MODULES)
def test_gradient_matches_central_differences(name):
    """d score / d pixels from autograd vs a central difference along a random direction, in float64: the
    difference's error is O(h^2) ~ 1e-8 relative plus rounding ~1e-16/h, so rtol 1e-5 only fails on a wrong
    (or partly detached) gradient. Non-square inputs take the resize + crop/pad path."""
    reward = MODULES[name].load(None, tiny=True)
    for part in vars(reward).values():
        if isinstance(part, nn.Module):
            part.double()
    images = _images().double().requires_grad_(True)
    (grad,) = torch.autograd.grad(reward.forward(images, PROMPTS).sum(), images)
    direction = torch.randn(images.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    h = 1e-4
    with torch.no_grad():
        plus = reward.forward(images + h * direction, PROMPTS)
        minus = reward.forward(images - h * direction, PROMPTS)
    numeric = (plus - minus) / (2 * h)
    analytic = (grad * direction).flatten(1).sum(1)  # score_i depends on image_i only
    assert analytic.abs().min() > 0
    torch.testing.assert_close(analytic, numeric, rtol=1e-5, atol=0)


# ---------------------------------------------------------------- 2. the score formulas, from the models' parts


def test_aesthetic_is_mlp_of_normalised_clip_image_embedding(tiny):
    reward, images = tiny["aesthetic"], _images()
    with torch.no_grad():
        clip = reward.clip
        embedding = clip.visual_projection(clip.vision_model(pixel_values=clip_preprocess(images)).pooler_output)
        expected = reward.mlp.layers(embedding / embedding.norm(dim=-1, keepdim=True))[:, 0]
        unnormalised = reward.mlp.layers(embedding)[:, 0]
        torch.testing.assert_close(reward.forward(images, PROMPTS), expected)
    assert not torch.allclose(expected, unnormalised)  # the check can tell the two apart


def test_pickscore_is_checkpoint_logit_scale_times_cosine():
    reward, images = pickscore.load(None, tiny=True), _images()
    model = reward.model
    model.logit_scale.data.fill_(math.log(100.0))  # PickScore_v1's value, not the init (exp 2.659 ~ 14.3)
    tokens = reward.tokenizer(PROMPTS, padding=True, truncation=True, max_length=77, return_tensors="pt")
    with torch.no_grad():
        image = model.visual_projection(model.vision_model(pixel_values=clip_preprocess(images)).pooler_output)
        text = model.text_projection(model.text_model(**tokens).pooler_output)
        cosine = (F.normalize(image, dim=-1) * F.normalize(text, dim=-1)).sum(-1)
        torch.testing.assert_close(reward.forward(images, PROMPTS), 100.0 * cosine)


def test_hpsv2_is_100_times_cosine(tiny):
    reward, images = tiny["hpsv2"], _images(64, 64)  # square: HPS's resize+pad equals resize+crop
    with torch.no_grad():
        image = reward.model.encode_image(clip_preprocess(images))
        text = reward.model.encode_text(reward.tokenizer(PROMPTS))
        torch.testing.assert_close(reward.forward(images, PROMPTS), 100.0 * F.cosine_similarity(image, text))


def test_hps_preprocess_resizes_longer_side_and_pads_with_black():
    images = _images(56, 112)  # -> 112 x 224, then 56 black rows above and below
    out = hpsv2.hps_preprocess(images)
    black = normalize(torch.zeros(1, 3, 1, 1))
    assert out.shape == (2, 3, 224, 224)
    torch.testing.assert_close(out[..., :56, :], black.expand(2, 3, 56, 224))
    torch.testing.assert_close(out[..., 168:, :], black.expand(2, 3, 56, 224))
    resized = F.interpolate(images, size=(112, 224), mode="bicubic", antialias=True, align_corners=False)
    torch.testing.assert_close(out[..., 56:168, :], normalize(resized))


# ---------------------------------------------------------------- 3. real loaders vs the published layouts

# sac+logos+ava1-l14-linearMSE.pth (simple_inference.py's MLP(768)): all of its keys.
AESTHETIC_LAYOUT = {
    "layers.0.weight": (1024, 768), "layers.0.bias": (1024,),
    "layers.2.weight": (128, 1024), "layers.2.bias": (128,),
    "layers.4.weight": (64, 128), "layers.4.bias": (64,),
    "layers.6.weight": (16, 64), "layers.6.bias": (16,),
    "layers.7.weight": (1, 16), "layers.7.bias": (1,),
}
# HPS_v2*_compressed.pt ['state_dict'] = open_clip ViT-H-14 (vision 32 x 1280 / 16 heads / patch 14 at 224,
# text 24 x 1024, embed 1024): 8 + 32*12 visual keys, 6 + 24*12 text/global keys.
HPS_NUM_KEYS = 686
HPS_LAYOUT = {
    "logit_scale": (), "positional_embedding": (77, 1024), "text_projection": (1024, 1024),
    "token_embedding.weight": (49408, 1024), "ln_final.weight": (1024,),
    "visual.class_embedding": (1280,), "visual.positional_embedding": (257, 1280), "visual.proj": (1280, 1024),
    "visual.conv1.weight": (1280, 3, 14, 14), "visual.ln_pre.weight": (1280,), "visual.ln_post.bias": (1280,),
    "visual.transformer.resblocks.31.attn.in_proj_weight": (3840, 1280),
    "visual.transformer.resblocks.31.mlp.c_fc.weight": (5120, 1280),
    "transformer.resblocks.23.attn.in_proj_weight": (3072, 1024),
    "transformer.resblocks.23.mlp.c_proj.weight": (1024, 4096),
}
# yuvalkirstain/PickScore_v1 = transformers CLIPModel of laion CLIP-ViT-H-14: 7 + 32*16 vision keys,
# 4 + 24*16 text keys, logit_scale and the two projections; transformers < 4.31 also saved position_ids.
PICKSCORE_CONFIG = dict(
    text_config=dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                     vocab_size=49408, max_position_embeddings=77),
    vision_config=dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=16,
                       image_size=224, patch_size=14),
    projection_dim=1024,
)
PICKSCORE_NUM_KEYS = 910
PICKSCORE_LAYOUT = {
    "logit_scale": (), "text_projection.weight": (1024, 1024), "visual_projection.weight": (1024, 1280),
    "text_model.embeddings.token_embedding.weight": (49408, 1024),
    "text_model.embeddings.position_embedding.weight": (77, 1024),
    "text_model.encoder.layers.23.self_attn.q_proj.weight": (1024, 1024),
    "text_model.encoder.layers.23.mlp.fc1.weight": (4096, 1024),
    "text_model.final_layer_norm.bias": (1024,),
    "vision_model.embeddings.class_embedding": (1280,),
    "vision_model.embeddings.patch_embedding.weight": (1280, 3, 14, 14),
    "vision_model.embeddings.position_embedding.weight": (257, 1280),
    "vision_model.pre_layrnorm.weight": (1280,),
    "vision_model.encoder.layers.31.self_attn.out_proj.weight": (1280, 1280),
    "vision_model.encoder.layers.31.mlp.fc2.weight": (1280, 5120),
    "vision_model.post_layernorm.weight": (1280,),
}
LEGACY_KEYS = {"text_model.embeddings.position_ids": (1, 77), "vision_model.embeddings.position_ids": (1, 257)}


def _break(state: dict, how: str, key: str) -> dict:
    """One missing key, one extra key, or one wrong shape."""
    state = dict(state)
    if how == "missing":
        del state[key]
    elif how == "extra":
        state[key + "_extra"] = state[key]
    else:
        state[key] = torch.empty((3, 3), device=state[key].device)
    return state


def _assert_layout(state: dict, layout: dict, num_keys: int) -> None:
    assert len(state) == num_keys
    assert {k: tuple(state[k].shape) for k in layout} == layout


def test_aesthetic_head_loads_the_published_layout(tmp_path):
    state = {k: torch.randn(shape) for k, shape in AESTHETIC_LAYOUT.items()}
    torch.save(state, tmp_path / "sac+logos+ava1-l14-linearMSE.pth")
    save_file(state, str(tmp_path / "head.safetensors"))
    for source in (tmp_path / "sac+logos+ava1-l14-linearMSE.pth", tmp_path / "head.safetensors", tmp_path):
        loaded = aesthetic.load_head(str(source)).state_dict()
        assert loaded.keys() == state.keys() and all(torch.equal(loaded[k], state[k]) for k in state)


@pytest.mark.parametrize("how", ["missing", "extra", "shape"])
def test_aesthetic_head_rejects_a_mismatch(tmp_path, how):
    state = _break({k: torch.randn(shape) for k, shape in AESTHETIC_LAYOUT.items()}, how, "layers.4.weight")
    path = tmp_path / "broken.pth"
    torch.save(state, path)
    with pytest.raises(ValueError, match=r"layers\.4\.weight") as error:
        aesthetic.load_head(str(path))
    assert str(path) in str(error.value)


@pytest.mark.parametrize("how", [None, "missing", "extra", "shape"])
def test_hpsv2_checks_the_published_layout(how):
    model = hpsv2.build_vit_h_14("meta")
    published = {k: torch.empty(v.shape, device="meta") for k, v in model.state_dict().items()}
    _assert_layout(published, HPS_LAYOUT, HPS_NUM_KEYS)
    key = "visual.transformer.resblocks.31.attn.in_proj_weight"
    checkpoint = {"state_dict": published if how is None else _break(published, how, key), "epoch": 1}
    if how is None:
        assert hpsv2.checked_state_dict(checkpoint, model, "HPS_v2.pt") is checkpoint["state_dict"]
        return
    with pytest.raises(ValueError, match=rf"HPS_v2\.pt.*{re.escape(key)}"):
        hpsv2.checked_state_dict(checkpoint, model, "HPS_v2.pt")


@pytest.mark.parametrize("how", [None, "missing", "extra", "shape"])
def test_pickscore_checks_the_published_layout(how):
    with torch.device("meta"):
        model = CLIPModel(CLIPConfig(**PICKSCORE_CONFIG))
    published = {k: torch.empty(v.shape, device="meta") for k, v in model.state_dict().items()}
    _assert_layout(published, PICKSCORE_LAYOUT, PICKSCORE_NUM_KEYS)
    published |= {k: torch.empty(shape, device="meta") for k, shape in LEGACY_KEYS.items()}
    key = "vision_model.encoder.layers.31.mlp.fc2.weight"
    if how is None:
        assert len(checked_clip_state_dict(published, model, "model.bin")) == PICKSCORE_NUM_KEYS
        return
    with pytest.raises(ValueError, match=rf"model\.bin.*{re.escape(key)}"):
        checked_clip_state_dict(_break(published, how, key), model, "model.bin")


def test_hf_clip_folder_round_trip(tmp_path, tiny):
    """The transformers-format loading path end to end on a small model, legacy position_ids included."""
    model = tiny["pickscore"].model
    model.config.save_pretrained(tmp_path)
    state = dict(model.state_dict())
    state["text_model.embeddings.position_ids"] = torch.arange(77)[None]
    torch.save(state, tmp_path / "pytorch_model.bin")
    loaded = load_hf_clip(str(tmp_path), "cpu")
    reloaded = pickscore.PickScoreReward(loaded, tiny["pickscore"].tokenizer, str(tmp_path))
    torch.testing.assert_close(reloaded.forward(_images(), PROMPTS), tiny["pickscore"].forward(_images(), PROMPTS))


# ---------------------------------------------------------------- 4. bad weights


@pytest.mark.parametrize("name", MODULES)
def test_missing_weights_path_is_named(name, tmp_path):
    missing = str(tmp_path / "nowhere" / "weights.pth")
    with pytest.raises(FileNotFoundError, match=re.escape(missing)):
        MODULES[name].load(missing, tiny=False)


@pytest.mark.parametrize("name", ["aesthetic", "hpsv2"])
def test_unreadable_weights_file_is_named(name, tmp_path):
    path = tmp_path / "garbage.pt"
    path.write_bytes(b"this is not a checkpoint")
    with pytest.raises(ValueError, match=re.escape(str(path))):
        MODULES[name].load(str(path), tiny=False)


# ---------------------------------------------------------------- 5. every part from a local path, any dtype


def test_catalogue_components_are_the_loaders_keyword_arguments():
    """A component the catalogue lists must reach the loader (and the config check must know each one)."""
    for name, entry in CATALOGUE.items():
        loader = resolve(entry.loader)
        extra = () if isinstance(loader, type) else tuple(inspect.signature(loader).parameters)[3:]
        assert extra == entry.components, name


def test_aesthetic_loads_its_clip_and_head_from_local_paths(tmp_path, tiny):
    """An offline node: the MLP from a file and CLIP ViT-L/14 from a transformers folder (``clip``), no hub id."""
    reference = tiny["aesthetic"]
    reference.clip.save_pretrained(tmp_path / "clip")
    save_file(reference.mlp.state_dict(), str(tmp_path / "head.safetensors"))
    loaded = build_reward("aesthetic", str(tmp_path / "head.safetensors"),
                          components={"clip": str(tmp_path / "clip")})
    assert loaded.model_id == str(tmp_path / "head.safetensors")
    torch.testing.assert_close(loaded.forward(_images(), PROMPTS), reference.forward(_images(), PROMPTS))


def test_pickscore_loads_its_tokenizer_from_a_local_folder(tmp_path, tiny):
    reference = tiny["pickscore"]
    reference.model.save_pretrained(tmp_path / "model")
    reference.tokenizer.save_pretrained(tmp_path / "tokenizer")
    loaded = build_reward("pickscore", str(tmp_path / "model"), components={"tokenizer": str(tmp_path / "tokenizer")})
    torch.testing.assert_close(loaded.forward(_images(), PROMPTS), reference.forward(_images(), PROMPTS))


@pytest.mark.parametrize("name, components, expected", [
    ("aesthetic", {"clp": "/m"}, "reward 'aesthetic' has no component 'clp'; its parts are: clip"),
    ("jpeg", {"clip": "/m"}, "reward 'jpeg' has no component 'clip'; it loads no further parts"),
])
def test_an_unknown_component_is_refused_naming_the_parts(name, components, expected):
    with pytest.raises(ValueError, match=re.escape(f"reward.name: {expected}")):
        build_reward(name, tiny=True, components=components)


@pytest.mark.parametrize("name", ["aesthetic", "pickscore", "hpsv2", "imagereward", "shapes"])
def test_bfloat16_backbone_scores_near_float32_with_float32_heads(name):
    """``dtype`` halves the backbone's bytes; the score heads stay float32 (a bf16 head would round an aesthetic
    score of 6 to steps of 0.03), and scores and gradients leave in float32, near the float32 model's: on these
    random tiny models within 15% of the scores' spread plus bf16's epsilon (2^-8) of their size, gradients at
    cosine > 0.99."""
    full, half = build_reward(name, tiny=True), build_reward(name, tiny=True, dtype=torch.bfloat16)
    dtypes = {n: p.dtype for m in vars(half).values() if isinstance(m, nn.Module) for n, p in m.named_parameters()}
    heads = {n: d for n, d in dtypes.items() if n.startswith(("layers.", "mlp."))}  # aesthetic's / ImageReward's
    assert set(dtypes.values()) == {torch.bfloat16} | ({torch.float32} if heads else set())
    assert all(d == torch.float32 for d in heads.values())
    images = torch.rand(8, 3, 32, 48, generator=torch.Generator().manual_seed(0))
    prompts = ["a red circle on the left"] * 8 if name == "shapes" else PROMPTS * 4
    exact, low = full.score(images, prompts, want_grad=True), half.score(images, prompts, want_grad=True)
    assert low.scores.dtype == low.grad.dtype == torch.float32
    error = (low.scores - exact.scores).abs().max()
    assert error <= 0.15 * exact.scores.std() + 2**-8 * exact.scores.abs().mean(), error
    assert F.cosine_similarity(low.grad.flatten(1), exact.grad.flatten(1)).min() > 0.99
