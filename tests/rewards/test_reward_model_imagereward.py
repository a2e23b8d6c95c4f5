"""ImageReward rebuilt on transformers: the tiny model's behaviour, and the published checkpoint's layout.

The full model is never allocated: the checkpoint layout below is written from the original code
(salesforce/BLIP models/vit.py, THUDM/ImageReward train/src/models/med.py, blip_pretrain.py, ImageReward.py)
and compared, on the meta device, with the full-size transformers network.
"""

from __future__ import annotations

import pytest
import torch

from reward_servers.imagereward import (
    SCORE_MEAN,
    SCORE_STD,
    ImageRewardNet,
    _full_configs,
    convert_imagereward_state_dict,
    load,
)
from tailorpo.rewards.preprocess import clip_preprocess
from tailorpo.rewards.weights import check_state_dict

PROMPTS = ["a photo of a cat", "a dog riding a horse"]


def original_layout() -> dict[str, tuple[int, ...]]:
    """Key -> shape of THUDM's ImageReward.pt: BLIP ViT-L/16 at 224, BERT-base with cross-attention to 1024-wide
    image tokens (vocab 30524, 512 positions, no token types, position_ids buffer), unused ITC projections
    (embed_dim 256), and the MLP 768-1024-128-64-16-1 as nn.Sequential indices 0, 2, 4, 6, 7."""
    vis, txt, ffn_v, ffn_t = 1024, 768, 4096, 3072
    layout: dict[str, tuple[int, ...]] = {
        "blip.visual_encoder.cls_token": (1, 1, vis),
        "blip.visual_encoder.pos_embed": (1, (224 // 16) ** 2 + 1, vis),
        "blip.visual_encoder.patch_embed.proj.weight": (vis, 3, 16, 16),
        "blip.visual_encoder.patch_embed.proj.bias": (vis,),
        "blip.visual_encoder.norm.weight": (vis,),
        "blip.visual_encoder.norm.bias": (vis,),
    }
    for i in range(24):
        b = f"blip.visual_encoder.blocks.{i}."
        layout |= {
            b + "norm1.weight": (vis,), b + "norm1.bias": (vis,),
            b + "attn.qkv.weight": (3 * vis, vis), b + "attn.qkv.bias": (3 * vis,),
            b + "attn.proj.weight": (vis, vis), b + "attn.proj.bias": (vis,),
            b + "norm2.weight": (vis,), b + "norm2.bias": (vis,),
            b + "mlp.fc1.weight": (ffn_v, vis), b + "mlp.fc1.bias": (ffn_v,),
            b + "mlp.fc2.weight": (vis, ffn_v), b + "mlp.fc2.bias": (vis,),
        }
    e = "blip.text_encoder.embeddings."
    layout |= {
        e + "word_embeddings.weight": (30524, txt), e + "position_embeddings.weight": (512, txt),
        e + "LayerNorm.weight": (txt,), e + "LayerNorm.bias": (txt,), e + "position_ids": (1, 512),
    }
    for i in range(12):
        b = f"blip.text_encoder.encoder.layer.{i}."
        for block, kv_width in (("attention", txt), ("crossattention", vis)):
            layout |= {
                f"{b}{block}.self.query.weight": (txt, txt), f"{b}{block}.self.query.bias": (txt,),
                f"{b}{block}.self.key.weight": (txt, kv_width), f"{b}{block}.self.key.bias": (txt,),
                f"{b}{block}.self.value.weight": (txt, kv_width), f"{b}{block}.self.value.bias": (txt,),
                f"{b}{block}.output.dense.weight": (txt, txt), f"{b}{block}.output.dense.bias": (txt,),
                f"{b}{block}.output.LayerNorm.weight": (txt,), f"{b}{block}.output.LayerNorm.bias": (txt,),
            }
        layout |= {
            b + "intermediate.dense.weight": (ffn_t, txt), b + "intermediate.dense.bias": (ffn_t,),
            b + "output.dense.weight": (txt, ffn_t), b + "output.dense.bias": (txt,),
            b + "output.LayerNorm.weight": (txt,), b + "output.LayerNorm.bias": (txt,),
        }
    layout |= {
        "blip.vision_proj.weight": (256, vis), "blip.vision_proj.bias": (256,),
        "blip.text_proj.weight": (256, txt), "blip.text_proj.bias": (256,),
    }
    widths = ((768, 1024), (1024, 128), (128, 64), (64, 16), (16, 1))
    for index, (n_in, n_out) in zip((0, 2, 4, 6, 7), widths, strict=True):
        layout |= {f"mlp.layers.{index}.weight": (n_out, n_in), f"mlp.layers.{index}.bias": (n_out,)}
    return layout


@pytest.fixture(scope="module")
def full_meta_state() -> dict[str, torch.Tensor]:
    with torch.device("meta"):
        return ImageRewardNet(*_full_configs()).state_dict()


@pytest.fixture(scope="module")
def fake_checkpoint() -> dict[str, torch.Tensor]:
    return {key: torch.empty(shape, device="meta") for key, shape in original_layout().items()}


@pytest.fixture(scope="module")
def reward():
    return load(None, tiny=True)


def images(n: int = 2, seed: int = 0, size: tuple[int, int] = (40, 48)) -> torch.Tensor:
    return torch.rand(n, 3, *size, generator=torch.Generator().manual_seed(seed)) * 0.8 + 0.1


def test_tiny_scores_shape_finite_and_deterministic(reward):
    torch.rand(3)  # move off the state a previous seeded load may have left
    state = torch.random.get_rng_state()
    other = load(None, tiny=True)
    assert torch.equal(torch.random.get_rng_state(), state)  # loading leaves the caller's RNG alone
    out = reward.score(images(), PROMPTS)
    assert out.scores.shape == (2,) and out.scores.dtype == torch.float32
    assert torch.isfinite(out.scores).all()
    assert torch.equal(out.scores, other.score(images(), PROMPTS).scores)
    assert torch.equal(out.scores, reward.score(images(), PROMPTS).scores)  # eval mode: no dropout
    assert reward.name == "imagereward" and reward.image_size == 224 and reward.model_id == "tiny-imagereward"


def test_score_depends_on_prompt_and_pixels(reward):
    """With a causal self-attention mask the [CLS] feature would see only itself, so the prompt would not
    change the score (checked: BlipTextModel(is_decoder=True) gives identical CLS features)."""
    same_image = images(1).expand(2, -1, -1, -1)
    by_prompt = reward.score(same_image, ["a photo of a cat", "a photo of a dog"]).scores
    assert (by_prompt[0] - by_prompt[1]).abs() > 1e-3
    by_image = reward.score(torch.cat([images(1, seed=1), images(1, seed=2)]), [PROMPTS[0]] * 2).scores
    assert (by_image[0] - by_image[1]).abs() > 1e-3


def test_score_is_normalised_affine_mlp_of_text_cls(reward):
    pics = images()
    tokens = reward.tokenize(PROMPTS)
    assert (SCORE_MEAN, SCORE_STD) == (0.16717362830052426, 1.0333394966054072)  # ImageReward.py
    with torch.no_grad():
        image_embeds = reward.net.vision_model(pixel_values=clip_preprocess(pics, 224)).last_hidden_state
        text = reward.net.text_encoder(
            input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"], encoder_hidden_states=image_embeds,
            encoder_attention_mask=torch.ones(image_embeds.shape[:2], dtype=torch.long), is_decoder=False,
        )
        raw = text.last_hidden_state[:, 0, :]  # the [CLS] feature
        for index in (0, 2, 4, 6, 7):  # Linear layers only: no activations, dropouts are identity in eval
            layer = reward.net.mlp.layers[index]
            raw = raw @ layer.weight.T + layer.bias
        expected = (raw.squeeze(-1) - 0.16717362830052426) / 1.0333394966054072
        torch.testing.assert_close(reward.forward(pics, PROMPTS), expected, rtol=1e-5, atol=1e-6)


def test_gradient_matches_finite_differences():
    """The public float32 gradient against central differences of a float64 copy along a random direction.
    In float64 with h = 1e-3 the truncation error is O(h^2 |f'''|) ~ 1e-6 and rounding ~1e-13 / h, so the
    remaining gap is float32 autograd error (~1e-6 relative per op); rtol 1e-3 leaves room for that and
    would still catch a missing chain-rule factor such as the CLIP std or the resize."""
    reward = load(None, tiny=True)
    pics = images()
    grad = reward.score(pics, PROMPTS, want_grad=True).grad
    assert grad.shape == pics.shape and grad.abs().sum() > 0
    reward.net.double()
    direction = torch.randn(pics.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    h, base = 1e-3, pics.double()
    with torch.no_grad():
        plus, minus = reward.forward(base + h * direction, PROMPTS), reward.forward(base - h * direction, PROMPTS)
    numeric = (plus - minus) / (2 * h)
    analytic = (grad.double() * direction).sum(dim=(1, 2, 3))
    torch.testing.assert_close(analytic, numeric, rtol=1e-3, atol=1e-6)


def test_tokenizer_keeps_cls_first_and_pads_to_35(reward):
    tok = reward.tokenizer
    tokens = reward.tokenize(["a cat", "a very long prompt " * 20])
    ids, mask = tokens["input_ids"], tokens["attention_mask"]
    assert ids.shape == mask.shape == (2, 35)
    assert (ids[:, 0] == tok.cls_token_id).all()  # not [ENC]: ImageReward.score passes the ids unchanged
    assert ids[0, :4].tolist() == [tok.cls_token_id, *tok.convert_tokens_to_ids(["a", "cat"]), tok.sep_token_id]
    assert (ids[0, 4:] == tok.pad_token_id).all() and mask[0].sum() == 4
    assert ids[1, -1] == tok.sep_token_id and mask[1].all()  # truncated
    assert tok.convert_tokens_to_ids(["[DEC]", "[ENC]"]) == [len(tok) - 2, len(tok) - 1]  # like 30522, 30523
    assert len(tok) == reward.net.text_encoder.config.vocab_size


def test_converted_checkpoint_layout_matches_full_model(fake_checkpoint, full_meta_state):
    converted = convert_imagereward_state_dict(fake_checkpoint)
    assert {k: tuple(v.shape) for k, v in converted.items()} == {k: tuple(v.shape) for k, v in full_meta_state.items()}
    check_state_dict(converted, full_meta_state, "ImageReward.pt")  # and the loader's own check agrees
    spot = {  # renames as in transformers' convert_blip_original_pytorch_to_hf.py
        "blip.visual_encoder.blocks.3.attn.qkv.weight": "vision_model.encoder.layers.3.self_attn.qkv.weight",
        "blip.visual_encoder.blocks.3.attn.proj.bias": "vision_model.encoder.layers.3.self_attn.projection.bias",
        "blip.visual_encoder.blocks.0.norm1.weight": "vision_model.encoder.layers.0.layer_norm1.weight",
        "blip.visual_encoder.norm.bias": "vision_model.post_layernorm.bias",
        "blip.visual_encoder.cls_token": "vision_model.embeddings.class_embedding",
        "blip.visual_encoder.pos_embed": "vision_model.embeddings.position_embedding",
        "blip.visual_encoder.patch_embed.proj.weight": "vision_model.embeddings.patch_embedding.weight",
        "blip.text_encoder.encoder.layer.5.crossattention.self.key.weight":
            "text_encoder.encoder.layer.5.crossattention.self.key.weight",
        "mlp.layers.7.bias": "mlp.layers.7.bias",
    }
    for old, new in spot.items():
        assert converted[new] is fake_checkpoint[old]


@pytest.mark.parametrize("kind", ["missing", "unexpected", "shape"])
def test_strict_check_names_the_bad_key(kind, fake_checkpoint, full_meta_state):
    state = convert_imagereward_state_dict(fake_checkpoint)
    key = "text_encoder.encoder.layer.11.crossattention.self.value.weight"
    if kind == "missing":
        del state[key]
    elif kind == "unexpected":
        key = "text_encoder.pooler.dense.weight"
        state[key] = torch.empty(768, 768, device="meta")
    else:
        state[key] = torch.empty(768, 768, device="meta")  # a 768-wide (ViT-B) image encoder's checkpoint
    with pytest.raises(ValueError, match=rf"my\.pt .*{kind}.*{key.replace('.', '[.]')}"):
        check_state_dict(state, full_meta_state, "my.pt")


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_load_rejects_a_foreign_checkpoint_naming_the_file(tmp_path, suffix):
    path = tmp_path / f"other{suffix}"
    state = {"visual.proj": torch.zeros(2, 2), "mlp.layers.0.weight": torch.zeros(1024, 768)}
    if suffix == ".pt":
        torch.save(state, path)
    else:
        from safetensors.torch import save_file

        save_file(state, str(path))
    with pytest.raises(ValueError, match=rf"{path.name}.*missing keys.*unexpected keys \(1\): visual\.proj"):
        load(str(path), tiny=False)


def test_load_names_a_missing_file(tmp_path):
    missing = tmp_path / "nowhere" / "ImageReward.pt"
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load(str(missing), tiny=False)
