"""Attention Bending on Mochi in the diffusers host: diffusers' own MochiTransformer3DModel (joint attention per batch
item over [video; the item's valid T5 tokens], RoPE on the video), tiny and seeded.

The reference is the model's own processors (MochiAttnProcessor2_0) with PyTorch's attention call replaced by an
explicit softmax whose video-query × text-key block is bent by bending.bend_probs (2 frames) and whose rows are
renormalised over all keys: every bent call equals it. The prompt's padded T5 tokens are dropped by the model, so
the text keys are the valid ones. The negative item of the CFG batch, strength 0 and steps outside the window are
bit-identical to the plain model."""

import types

import pytest
import torch
import torch.nn.functional as F
from diffusers import FlowMatchEulerDiscreteScheduler, MochiTransformer3DModel

from ckptbend.runtime import bending
from ckptbend.runtime import diffusers_host as dh

CONFIG = dict(patch_size=2, num_attention_heads=2, attention_head_dim=8, num_layers=2, pooled_projection_dim=16,
              in_channels=4, text_embed_dim=16, time_embed_dim=16, max_sequence_length=16)
TEXT, VALID, FRAMES, H, W = 6, 5, 2, 4, 6        # T5 tokens (the last padding), frames × token grid
VIDEO = FRAMES * H * W
COLUMNS = {"sunset": [2, 3]}
ENTRY = {"token": "sunset", "mode": "translate", "translate_x": 0.5}

pytestmark = pytest.mark.usefixtures("one_thread_no_grad")


@pytest.fixture(scope="module")
def mochi():
    with torch.random.fork_rng():
        torch.manual_seed(37)
        model = MochiTransformer3DModel(**CONFIG).eval()
        for name, p in model.named_parameters():       # larger gates: the attention's output shows
            if "norm1" in name:
                p.data *= 4
    g = torch.Generator().manual_seed(2)
    mask = torch.ones(1, TEXT, dtype=torch.long)
    mask[:, VALID:] = 0
    inputs = dict(hidden_states=torch.randn(1, 4, FRAMES, 2 * H, 2 * W, generator=g),
                  encoder_hidden_states=torch.randn(1, TEXT, 16, generator=g), encoder_attention_mask=mask)
    scheduler = FlowMatchEulerDiscreteScheduler(invert_sigmas=True)
    scheduler.set_timesteps(2)
    return model, inputs, types.SimpleNamespace(transformer=model, scheduler=scheduler)


def sample(mochi, step=0, dynamic=None, inputs=None, prompt=None):
    model, given, pipe = mochi
    inputs = inputs or given
    if dynamic is not None:
        session = dh.apply(pipe, dynamic)
        session.token_indices = COLUMNS
        session.prompt_embeds = prompt
    try:
        t = pipe.scheduler.timesteps[step:step + 1]                   # the pipeline passes t itself
        return model(**inputs, timestep=t.expand(inputs["hidden_states"].shape[0]), return_dict=False)[0]
    finally:
        dh.remove(pipe)


def explicit_bent(entry, plain_sdpa):
    """PyTorch's attention replaced: softmax(q·kᵀ·d^−½) with the video × text block bent, rows renormalised."""
    spec = bending.BendSpec.from_dict({**entry, "renormalize": "none"})

    def attend(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None):
        if q.shape[2] != VIDEO + VALID:                  # not the model's attention
            return plain_sdpa(q, k, v, attn_mask=attn_mask, scale=scale)
        probs = torch.softmax(q.float() @ k.float().transpose(-1, -2) * q.shape[-1] ** -0.5, dim=-1)
        block = probs[:, :, :VIDEO, VIDEO:].reshape(-1, VIDEO, VALID)
        bent = bending.bend_probs(block, COLUMNS, (H, W), [spec], frames=FRAMES).view(probs[:, :, :VIDEO, VIDEO:].shape)
        probs = probs.clone()
        probs[:, :, :VIDEO, VIDEO:] = bent
        probs[:, :, :VIDEO] /= probs[:, :, :VIDEO].sum(-1, keepdim=True)
        return (probs @ v.float()).to(q.dtype)

    return attend


def test_every_bent_call_is_the_explicit_bent_softmax(mochi, monkeypatch):
    plain = sample(mochi)
    bent = sample(mochi, dynamic={"bending": [ENTRY]})
    model, inputs, pipe = mochi
    monkeypatch.setattr(F, "scaled_dot_product_attention", explicit_bent(ENTRY, F.scaled_dot_product_attention))
    expected = model(**inputs, timestep=pipe.scheduler.timesteps[:1], return_dict=False)[0]
    torch.testing.assert_close(bent, expected, rtol=1e-4, atol=1e-5)
    assert (bent - plain).abs().max() > 1e-3                               # bending acts


def test_strength_zero_and_outside_the_step_window_are_bit_identical(mochi):
    plain = sample(mochi, step=1)
    assert torch.equal(sample(mochi, step=1, dynamic={"bending": [{**ENTRY, "strength": 0.0}]}), plain)
    assert torch.equal(sample(mochi, step=1, dynamic={"bending": [{**ENTRY, "apply_to_timesteps": [0, 0]}]}), plain)
    assert not torch.equal(sample(mochi, step=1, dynamic={"bending": [{**ENTRY, "apply_to_timesteps": [1, 1]}]}),
                           plain)


def test_the_negative_item_of_the_cfg_batch_is_bit_identical(mochi):
    """MochiPipeline batches CFG as [negative; prompt], each with its own mask: only the prompt's item is bent."""
    model, inputs, pipe = mochi
    negative = torch.randn(1, TEXT, 16, generator=torch.Generator().manual_seed(3))
    prompt = inputs["encoder_hidden_states"]
    batch = dict(hidden_states=inputs["hidden_states"].repeat(2, 1, 1, 1, 1),
                 encoder_hidden_states=torch.cat([negative, prompt]),
                 encoder_attention_mask=torch.cat([torch.tensor([[1, 1, 0, 0, 0, 0]]),
                                                   inputs["encoder_attention_mask"]]))
    plain = sample(mochi, inputs=batch)
    bent = sample(mochi, dynamic={"bending": [ENTRY]}, inputs=batch, prompt=prompt)
    assert torch.equal(bent[0], plain[0])
    torch.testing.assert_close(bent[1:], sample(mochi, dynamic={"bending": [ENTRY]}), rtol=1e-5, atol=1e-6)
    assert (bent[1] - plain[1]).abs().max() > 1e-3


def test_a_word_among_the_padding_is_refused(mochi):
    with pytest.raises(ValueError, match="beyond the 5 text tokens"):
        model, inputs, pipe = mochi
        session = dh.apply(pipe, {"bending": [ENTRY]})
        session.token_indices = {"sunset": [5]}
        try:
            model(**inputs, timestep=pipe.scheduler.timesteps[:1], return_dict=False)
        finally:
            dh.remove(pipe)
