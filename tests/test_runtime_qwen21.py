"""Attention Bending on Qwen-Image 2.x in the diffusers host: diffusers' own QwenImage21Transformer2DModel (one
block-causal sequence [text; target image], the prompt's padding masked), tiny and seeded, with and without its KV
cache (step 0 prefills the text's keys, step 1 queries the image alone against them).

The reference is the model's processors with their attention calls replaced by an explicit softmax whose
target-image-query × text-key block is bent by bending.bend_probs, rows renormalised over all keys: every bent call
equals it; strength 0 and calls outside the step window are bit-identical; condition images are refused."""

import types

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from diffusers.models.transformers import transformer_qwenimage21 as tq

import comfy_standin_joint as cj
from ckptbend.runtime import bending
from ckptbend.runtime import diffusers_host as dh

CONFIG = dict(patch_size=1, in_channels=8, out_channels=8, num_layers=2, attention_head_dim=16,
              num_attention_heads=2, context_in_dim=16, axes_dims_rope=(4, 6, 6))
H, W, TEXT = 4, 6, 7                          # the last text token is padding (masked)
COLUMNS = {"sunset": [2, 3]}
ENTRY = {"token": "sunset", "mode": "translate", "translate_x": 0.5}

pytestmark = pytest.mark.usefixtures("one_thread_no_grad")


@pytest.fixture(scope="module")
def qwen21():
    model = cj.seeded_transformer(tq.QwenImage21Transformer2DModel, CONFIG, 37)
    g = torch.Generator().manual_seed(5)
    inputs = dict(hidden_states=torch.randn(1, H * W, 8, generator=g),
                  encoder_hidden_states=torch.randn(1, TEXT, 16, generator=g),
                  encoder_hidden_states_mask=torch.tensor([[True] * (TEXT - 1) + [False]]),
                  img_shapes=[[(1, H, W)]], img_mask=torch.tensor([[False] * TEXT + [True] * (H * W // 4)]))
    scheduler = FlowMatchEulerDiscreteScheduler()
    scheduler.set_timesteps(2)
    return model, inputs, types.SimpleNamespace(transformer=model, scheduler=scheduler)


def sample(qwen21, dynamic=None, cached=False, **changes):
    """The prediction at step 1: straight, or (cached) after step 0 prefilled the KV cache."""
    model, inputs, pipe = qwen21
    inputs = {**inputs, **changes}
    if dynamic is not None:
        session = dh.apply(pipe, dynamic)
        session.token_indices = COLUMNS
    steps = pipe.scheduler.timesteps / 1000
    try:
        if not cached:
            return model(**inputs, timestep=steps[1:2]).sample
        cache = tq.QwenImage21KVCache(CONFIG["num_layers"])
        model(**inputs, timestep=steps[:1], kv_cache=cache, kv_cache_mode="extract")
        return model(**inputs, timestep=steps[1:2], kv_cache=cache, kv_cache_mode="cached").sample
    finally:
        dh.remove(pipe)


def explicit_bent(entry):
    """diffusers' attention call replaced: softmax(q·kᵀ·d^−½ + mask) in float32; at the target image's call
    (H·W queries against all TEXT + H·W keys) the text block bent and each row renormalised."""
    spec = bending.BendSpec.from_dict({**entry, "renormalize": "none"})

    def attend(query, key, value, attn_mask=None, **kwargs):
        q, k, v = (t.transpose(1, 2).float() for t in (query, key, value))
        logits = q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5
        if attn_mask is not None:
            logits = logits.masked_fill(~attn_mask, float("-inf"))
        probs = torch.softmax(logits, dim=-1)
        if q.shape[2] == H * W and k.shape[2] == TEXT + H * W:
            probs = probs.clone()
            probs[..., :TEXT] = bending.bend_probs(probs[0, :, :, :TEXT].contiguous(), COLUMNS, (H, W),
                                                   [spec])[None]
            probs /= probs.sum(-1, keepdim=True)
        return (probs @ v).transpose(1, 2).to(query.dtype)

    return attend


@pytest.mark.parametrize("cached", [False, True])
def test_every_bent_call_is_the_explicit_bent_softmax(qwen21, monkeypatch, cached):
    plain = sample(qwen21, cached=cached)
    bent = sample(qwen21, {"bending": [ENTRY]}, cached=cached)
    monkeypatch.setattr(tq, "dispatch_attention_fn", explicit_bent(ENTRY))
    expected = sample(qwen21, cached=cached)
    torch.testing.assert_close(bent, expected, rtol=1e-4, atol=1e-5)
    assert (bent - plain).abs().max() > 1e-3


def test_strength_zero_and_outside_the_step_window_are_bit_identical(qwen21):
    plain = sample(qwen21, cached=True)
    assert torch.equal(sample(qwen21, {"bending": [{**ENTRY, "strength": 0.0}]}, cached=True), plain)
    assert torch.equal(sample(qwen21, {"bending": [{**ENTRY, "apply_to_timesteps": [0, 0]}]}, cached=True), plain)


def test_condition_images_are_refused_in_one_line(qwen21):
    model, inputs, _ = qwen21
    with pytest.raises(ValueError, match="text-to-image calls only"):
        sample(qwen21, {"bending": [ENTRY]}, hidden_states=torch.cat([inputs["hidden_states"]] * 2, 1),
               img_shapes=[[(1, H, W), (1, H, W)]])
