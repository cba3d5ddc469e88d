"""Attention Bending on HunyuanVideo 1.5 in the diffusers host: diffusers' own HunyuanVideo15Transformer3DModel
(joint [video; context] attention, the context reordered per item as valid image, ByT5 and prompt tokens then
padding), tiny and seeded, with a batch whose two items have different glyph and prompt lengths.

The reference is the model's processors with their attention call replaced by an explicit softmax whose video-query ×
prompt-key block (at each item's own offset) is bent by bending.bend_probs, rows renormalised over all keys: every
bent call equals it; the item not bent, strength 0 and calls outside the step window are bit-identical."""

import types

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from diffusers.models.transformers import transformer_hunyuan_video15 as th

import comfy_standin_joint as cj
from ckptbend.runtime import bending
from ckptbend.runtime import diffusers_host as dh

CONFIG = dict(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=16, num_layers=2,
              num_refiner_layers=1, text_embed_dim=16, text_embed_2_dim=8, image_embed_dim=8, rope_axes_dim=(4, 6, 6))
F_, H, W = 2, 3, 4                             # 24 video tokens
PROMPT, GLYPHS = [5, 7], [2, 0]                # valid prompt / ByT5 tokens per item (of 8 / 3)
COLUMNS = {"sunset": [2, 3]}
ENTRY = {"token": "sunset", "mode": "translate", "translate_x": 0.5}

pytestmark = pytest.mark.usefixtures("one_thread_no_grad")


@pytest.fixture(scope="module")
def hunyuan():
    model = cj.seeded_transformer(th.HunyuanVideo15Transformer3DModel, CONFIG, 41)
    g = torch.Generator().manual_seed(6)
    inputs = dict(hidden_states=torch.randn(2, 4, F_, H, W, generator=g),
                  encoder_hidden_states=torch.randn(2, 8, 16, generator=g),
                  encoder_attention_mask=torch.tensor([[1] * n + [0] * (8 - n) for n in PROMPT]),
                  encoder_hidden_states_2=torch.randn(2, 3, 8, generator=g),
                  encoder_attention_mask_2=torch.tensor([[1] * n + [0] * (3 - n) for n in GLYPHS]),
                  image_embeds=torch.zeros(2, 4, 8))
    scheduler = FlowMatchEulerDiscreteScheduler()
    scheduler.set_timesteps(2)
    pipe = types.SimpleNamespace(transformer=model, scheduler=scheduler)
    return model, inputs, pipe


def sample(hunyuan, step=0, dynamic=None):
    """Both items as one call, item 0 the conditional one (the session's prompt is its embeddings)."""
    model, inputs, pipe = hunyuan
    if dynamic is not None:
        session = dh.apply(pipe, dynamic)
        session.token_indices = COLUMNS
    try:
        return model(**inputs, timestep=pipe.scheduler.timesteps[step:step + 1].expand(2)).sample
    finally:
        dh.remove(pipe)


def explicit_bent(entry, rows, items=None):
    """items: the data item of each batch row (default: row i is item i)."""
    spec = bending.BendSpec.from_dict({**entry, "renormalize": "none"})
    n_video = F_ * H * W

    def attend(query, key, value, attn_mask=None, **kwargs):
        q, k, v = (t.transpose(1, 2).float() for t in (query, key, value))
        logits = (q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5).masked_fill(~attn_mask, float("-inf"))
        probs = torch.softmax(logits, dim=-1).nan_to_num(0.0)      # padding queries see no key: 0, as SDPA gives
        if q.shape[2] > n_video:                                  # the blocks' joint calls, not the token refiner's
            probs = probs.clone()
            for r in rows:
                item = r if items is None else items[r]
                first = n_video + GLYPHS[item]
                text = slice(first, first + PROMPT[item])
                probs[r, :, :n_video, text] = bending.bend_probs(probs[r, :, :n_video, text].contiguous(), COLUMNS,
                                                                 (H, W), [spec], frames=F_)
                probs[r, :, :n_video] /= probs[r, :, :n_video].sum(-1, keepdim=True)
        return (probs @ v).transpose(1, 2).to(query.dtype)

    return attend


@pytest.mark.parametrize("row", [0, 1])
def test_every_bent_call_is_the_explicit_bent_softmax(hunyuan, monkeypatch, row):
    """The conditional item's words sit after its own ByT5 tokens (2 for item 0, none for item 1)."""
    model, inputs, pipe = hunyuan
    plain = sample(hunyuan)
    pipe_prompt = inputs["encoder_hidden_states"][row:row + 1]
    session = dh.apply(pipe, {"bending": [ENTRY]})
    session.token_indices, session.prompt_embeds = COLUMNS, pipe_prompt
    try:                     # one item at a time, as the pipeline's guider calls it; the other item is not bent
        one = {k: v[row:row + 1] for k, v in inputs.items()}
        bent = model(**one, timestep=pipe.scheduler.timesteps[:1]).sample
    finally:
        dh.remove(pipe)
    monkeypatch.setattr(th, "dispatch_attention_fn", explicit_bent(ENTRY, [0], [row]))
    expected = model(**{k: v[row:row + 1] for k, v in inputs.items()}, timestep=pipe.scheduler.timesteps[:1]).sample
    torch.testing.assert_close(bent, expected, rtol=1e-4, atol=1e-5)
    assert (bent - plain[row:row + 1]).abs().max() > 1e-3


def test_a_batch_bends_every_conditional_item_at_its_offset(hunyuan, monkeypatch):
    bent = sample(hunyuan, dynamic={"bending": [ENTRY]})           # no prompt encoded: every item conditional
    monkeypatch.setattr(th, "dispatch_attention_fn", explicit_bent(ENTRY, [0, 1]))
    torch.testing.assert_close(bent, sample(hunyuan), rtol=1e-4, atol=1e-5)


def test_strength_zero_and_outside_the_step_window_are_bit_identical(hunyuan):
    plain = sample(hunyuan, step=1)
    assert torch.equal(sample(hunyuan, 1, {"bending": [{**ENTRY, "strength": 0.0}]}), plain)
    assert torch.equal(sample(hunyuan, 1, {"bending": [{**ENTRY, "apply_to_timesteps": [0, 0]}]}), plain)
    assert not torch.equal(sample(hunyuan, 1, {"bending": [{**ENTRY, "apply_to_timesteps": [1, 1]}]}), plain)


def test_the_negative_call_is_bit_identical(hunyuan):
    """A call with other embeddings than the encoded prompt's (the guider's unconditional batch) is not bent."""
    model, inputs, pipe = hunyuan
    one = {k: v[1:] for k, v in inputs.items()}
    plain = model(**one, timestep=pipe.scheduler.timesteps[:1]).sample
    session = dh.apply(pipe, {"bending": [ENTRY]})
    session.token_indices, session.prompt_embeds = COLUMNS, inputs["encoder_hidden_states"][:1]
    try:
        assert torch.equal(model(**one, timestep=pipe.scheduler.timesteps[:1]).sample, plain)
    finally:
        dh.remove(pipe)
