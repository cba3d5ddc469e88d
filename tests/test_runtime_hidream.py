"""Attention Bending on HiDream in the diffusers host: diffusers' own HiDreamImageTransformer2DModel (MoE feed-
forwards; a double-stream and a single-stream block), tiny and seeded, with HiDreamImagePipeline's CFG batch
[uncond; cond]. Every block attends to [image, padded to max_resolution's tokens; T5; Llama's last layer; Llama's
layer for the block]: a word's columns are its T5 ones and its Llama ones in both Llama parts.

The reference is the model with PyTorch's attention replaced by an explicit softmax whose image × text block
(conditional item only) is bent by bending.bend_probs, rows renormalised: every bent call equals it; the
unconditional item, strength 0 and steps outside the window are bit-identical."""

import types

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, HiDreamImageTransformer2DModel

import comfy_standin_joint as cj
from ckptbend.runtime import bending
from ckptbend.runtime import diffusers_host as dh

CONFIG = dict(patch_size=2, in_channels=4, out_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=8,
              num_attention_heads=2, caption_channels=[16, 8], text_emb_dim=12, num_routed_experts=2,
              num_activated_experts=1, axes_dims_rope=(4, 2, 2), max_resolution=(16, 16), llama_layers=[0, 1])
H, W, T5, LLAMA = 4, 6, 6, 5
N_TEXT = T5 + 2 * LLAMA
PADDED = (16 // 2) ** 2                                      # the model pads image tokens to max_resolution's
COLUMNS = {"sunset": [2, 3, T5 + 1, T5 + LLAMA + 1]}       # T5's two pieces, Llama's one in both Llama parts
ENTRY = {"token": "sunset", "mode": "translate", "translate_x": 0.5}

pytestmark = pytest.mark.usefixtures("one_thread_no_grad")


@pytest.fixture(scope="module")
def hidream():
    model = cj.seeded_transformer(HiDreamImageTransformer2DModel, CONFIG, 47)
    g = torch.Generator().manual_seed(11)
    t5 = torch.randn(2, T5, 16, generator=g)
    inputs = dict(hidden_states=torch.randn(1, 4, 2 * H, 2 * W, generator=g).expand(2, -1, -1, -1),
                  encoder_hidden_states_t5=t5, encoder_hidden_states_llama3=torch.randn(2, 2, LLAMA, 8, generator=g),
                  pooled_embeds=torch.randn(2, 12, generator=g), return_dict=False)
    scheduler = FlowMatchEulerDiscreteScheduler()
    scheduler.set_timesteps(2)
    return model, inputs, types.SimpleNamespace(transformer=model, scheduler=scheduler)


def sample(hidream, step=0, dynamic=None):
    model, inputs, pipe = hidream
    if dynamic is not None:
        session = dh.apply(pipe, dynamic)
        session.token_indices, session.prompt_embeds = COLUMNS, inputs["encoder_hidden_states_t5"][1:]
    try:
        return model(**inputs, timesteps=pipe.scheduler.timesteps[step:step + 1].expand(2))[0]
    finally:
        dh.remove(pipe)


def explicit_bent(entry):
    spec = bending.BendSpec.from_dict({**entry, "renormalize": "none"})
    n_image = H * W

    def attend(q, k, v, *args, **kwargs):                         # HiDream's call: [b, heads, L, d], no mask
        probs = torch.softmax(q.float() @ k.float().transpose(-1, -2) * q.shape[-1] ** -0.5, dim=-1)
        if q.shape[2] == PADDED + N_TEXT:                           # image (grid first, then padding); text
            text = slice(PADDED, PADDED + N_TEXT)
            probs = probs.clone()
            probs[1, :, :n_image, text] = bending.bend_probs(probs[1, :, :n_image, text].contiguous(), COLUMNS,
                                                             (H, W), [spec])
            probs[1, :, :n_image] /= probs[1, :, :n_image].sum(-1, keepdim=True)
        return (probs @ v.float()).to(q.dtype)

    return attend


def test_every_bent_call_is_the_explicit_bent_softmax(hidream, monkeypatch):
    plain = sample(hidream)
    bent = sample(hidream, dynamic={"bending": [ENTRY]})
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", explicit_bent(ENTRY))
    expected = sample(hidream)
    torch.testing.assert_close(bent, expected, rtol=1e-4, atol=1e-5)
    assert (bent[1] - plain[1]).abs().max() > 1e-3
    assert torch.equal(bent[0], plain[0])                                    # the negative item


def test_strength_zero_and_outside_the_step_window_are_bit_identical(hidream):
    plain = sample(hidream, step=1)
    assert torch.equal(sample(hidream, 1, {"bending": [{**ENTRY, "strength": 0.0}]}), plain)
    assert torch.equal(sample(hidream, 1, {"bending": [{**ENTRY, "apply_to_timesteps": [0, 0]}]}), plain)


def test_words_are_found_in_t5_and_in_both_llama_parts():
    import comfy_standin_qwen as cq
    from _pipelines import t5_like_tokenizer

    t5, llama = t5_like_tokenizer(), cq.qwen_tokenizer()
    pipe = types.SimpleNamespace(tokenizer_3=t5, tokenizer_4=llama)
    session = types.SimpleNamespace(pipe=pipe, joint=None, single=None, family="hidream",
                                    entries=[bending.as_spec({**ENTRY, "token": "kiss"})])
    found = dh.prompts._locate(session, {"prompt": "a romantic kiss at sunset", "max_sequence_length": 128})
    t5_ids = t5("a romantic kiss at sunset")["input_ids"]
    llama_ids = llama("a romantic kiss at sunset")["input_ids"]
    n_t5, n_llama = min(128, t5.model_max_length), min(128, llama.model_max_length)
    t5_cols = [j for j in found["kiss"] if j < n_t5]
    llama_cols = [j - n_t5 for j in found["kiss"] if n_t5 <= j < n_t5 + n_llama]
    assert t5.decode([t5_ids[j] for j in t5_cols]).strip() == "kiss"
    assert llama.convert_ids_to_tokens([llama_ids[j] for j in llama_cols]) == ["Ġkiss"]
    assert [j - n_t5 - n_llama for j in found["kiss"] if j >= n_t5 + n_llama] == llama_cols
