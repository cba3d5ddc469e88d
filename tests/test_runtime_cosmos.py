"""Attention Bending on Cosmos Predict2 in the diffusers host: diffusers' own CosmosTransformer3DModel (text
cross-attention attn2, per-head q/k RMS norms), tiny and seeded, reached by the generic cross-attention path (cross.py)
as Wan's is. The reference is the model's own processors with diffusers' attention call replaced, for the text
cross-attention, by an explicit softmax bent by bending.bend_probs (2 frames): every bent call equals it; strength 0
is bit-identical. (Cosmos2 pipelines pass σ/(σ+1) as the timestep: the step window's mapping for them is not done,
so these tests call the model with the scheduler's timesteps.)"""

import types

import pytest
import torch
from diffusers import CosmosTransformer3DModel, FlowMatchEulerDiscreteScheduler
from diffusers.models.transformers import transformer_cosmos

from ckptbend.runtime import bending
from ckptbend.runtime import diffusers_host as dh

CONFIG = dict(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=24, num_layers=2,
              text_embed_dim=16, adaln_lora_dim=8, max_size=(4, 16, 16), patch_size=(1, 2, 2),
              concat_padding_mask=False)     # its padding-mask resize needs torchvision
TEXT, FRAMES, H, W = 6, 2, 4, 6
COLUMNS = {"sunset": [2, 3]}
ENTRY = {"token": "sunset", "mode": "translate", "translate_x": 0.5}

pytestmark = pytest.mark.usefixtures("one_thread_no_grad")


@pytest.fixture(scope="module")
def cosmos():
    with torch.random.fork_rng():
        torch.manual_seed(3)
        model = CosmosTransformer3DModel(**CONFIG).eval()
        for name, p in model.named_parameters():        # larger gates: the attention's output shows
            if "norm" in name and "linear" in name:
                p.data *= 4
    g = torch.Generator().manual_seed(1)
    inputs = dict(hidden_states=torch.randn(1, 4, FRAMES, 2 * H, 2 * W, generator=g),
                  encoder_hidden_states=torch.randn(1, TEXT, 16, generator=g))
    scheduler = FlowMatchEulerDiscreteScheduler()
    scheduler.set_timesteps(2)
    return model, inputs, types.SimpleNamespace(transformer=model, scheduler=scheduler)


def sample(cosmos, dynamic=None):
    model, inputs, pipe = cosmos
    if dynamic is not None:
        session = dh.apply(pipe, dynamic)
        session.token_indices = COLUMNS
    try:
        return model(**inputs, timestep=pipe.scheduler.timesteps[:1], return_dict=False)[0]
    finally:
        dh.remove(pipe)


def explicit_bent(entry, dispatch):
    spec = bending.BendSpec.from_dict(entry)           # the entry's own renormalisation (cross-attention)

    def attend(query, key, value, attn_mask=None, **kwargs):
        if key.shape[1] != TEXT:                          # the self-attentions: as the model does
            return dispatch(query, key, value, attn_mask=attn_mask, **kwargs)
        q, k, v = (t.transpose(1, 2).float() for t in (query, key, value))      # [b, heads, L, d]
        probs = torch.softmax(q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5, dim=-1)
        bent = bending.bend_probs(probs.reshape(-1, *probs.shape[2:]), COLUMNS, (H, W), [spec], frames=FRAMES)
        return (bent.view(probs.shape) @ v).transpose(1, 2).to(query.dtype)

    return attend


def test_every_bent_call_is_the_explicit_bent_softmax(cosmos, monkeypatch):
    plain = sample(cosmos)
    bent = sample(cosmos, dynamic={"bending": [ENTRY]})
    model, inputs, pipe = cosmos
    monkeypatch.setattr(transformer_cosmos, "dispatch_attention_fn",
                        explicit_bent(ENTRY, transformer_cosmos.dispatch_attention_fn))
    expected = model(**inputs, timestep=pipe.scheduler.timesteps[:1], return_dict=False)[0]
    torch.testing.assert_close(bent, expected, rtol=1e-4, atol=1e-5)
    assert (bent - plain).abs().max() > 1e-3


def test_strength_zero_is_bit_identical(cosmos):
    assert torch.equal(sample(cosmos, dynamic={"bending": [{**ENTRY, "strength": 0.0}]}), sample(cosmos))
