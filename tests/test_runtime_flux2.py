"""Attention Bending on Flux.2 in the diffusers host: diffusers' own Flux2Transformer2DModel (double blocks: Flux's
joint attention without biases; single blocks: q, k, v and the MLP from one fused projection), tiny and seeded.

The reference is the model's own processors with diffusers' attention call replaced by an explicit softmax whose
image-query × text-key block is bent by bending.bend_probs and whose rows are renormalised over all keys: every
bent call equals it, and a call outside the step window, or at strength 0, is bit-identical to the plain model.
The words are found in Flux.2's Mistral 3 / Qwen3 (Klein) chat templates (last test); the sampling tests give the
columns by hand."""

import types

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, Flux2Transformer2DModel
from diffusers.models.transformers import transformer_flux2

import comfy_standin_joint as cj
from ckptbend.runtime import bending
from ckptbend.runtime import diffusers_host as dh

CONFIG = dict(in_channels=8, num_layers=2, num_single_layers=2, attention_head_dim=8, num_attention_heads=2,
              joint_attention_dim=16, timestep_guidance_channels=16, axes_dims_rope=(2, 2, 2, 2))
TEXT, H, W = 6, 4, 6
COLUMNS = {"sunset": [2, 3]}
ENTRY = {"token": "sunset", "mode": "translate", "translate_x": 0.5}

pytestmark = pytest.mark.usefixtures("one_thread_no_grad")


@pytest.fixture(scope="module")
def flux2():
    model = cj.seeded_transformer(Flux2Transformer2DModel, CONFIG, 23)
    g = torch.Generator().manual_seed(1)
    ids = torch.zeros(H * W, 4)
    ids[:, 1], ids[:, 2] = torch.arange(H).repeat_interleave(W), torch.arange(W).repeat(H)
    text_ids = torch.zeros(TEXT, 4)
    text_ids[:, 3] = torch.arange(TEXT)
    inputs = dict(hidden_states=torch.randn(1, H * W, 8, generator=g),
                  encoder_hidden_states=torch.randn(1, TEXT, 16, generator=g), img_ids=ids, txt_ids=text_ids,
                  guidance=torch.tensor([3.5]))
    scheduler = FlowMatchEulerDiscreteScheduler()
    scheduler.set_timesteps(2)
    return model, inputs, types.SimpleNamespace(transformer=model, scheduler=scheduler)


def sample(flux2, step=0, dynamic=None, columns=COLUMNS):
    model, inputs, pipe = flux2
    if dynamic is not None:
        session = dh.apply(pipe, dynamic)
        session.token_indices = columns
    try:
        return model(**inputs, timestep=pipe.scheduler.timesteps[step:step + 1] / 1000).sample
    finally:
        dh.remove(pipe)


def explicit_bent(entry):
    """diffusers' attention call replaced: softmax(q·kᵀ·d^−½) with the image × text block bent, rows renormalised."""
    spec = bending.BendSpec.from_dict({**entry, "renormalize": "none"})

    def attend(query, key, value, attn_mask=None, **kwargs):
        q, k, v = (t.transpose(1, 2).float() for t in (query, key, value))      # [b, heads, L, d]
        probs = torch.softmax(q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5, dim=-1)
        block = probs[:, :, TEXT:, :TEXT].reshape(-1, H * W, TEXT)
        bent = bending.bend_probs(block, COLUMNS, (H, W), [spec]).view(probs[:, :, TEXT:, :TEXT].shape)
        probs = probs.clone()
        probs[:, :, TEXT:, :TEXT] = bent
        probs[:, :, TEXT:] /= probs[:, :, TEXT:].sum(-1, keepdim=True)
        return (probs @ v).transpose(1, 2).to(query.dtype)

    return attend


def test_every_bent_call_is_the_explicit_bent_softmax(flux2, monkeypatch):
    plain = sample(flux2)
    bent = sample(flux2, dynamic={"bending": [ENTRY]})
    model, inputs, pipe = flux2
    monkeypatch.setattr(transformer_flux2, "dispatch_attention_fn", explicit_bent(ENTRY))
    expected = model(**inputs, timestep=pipe.scheduler.timesteps[:1] / 1000).sample
    torch.testing.assert_close(bent, expected, rtol=1e-4, atol=1e-5)
    assert (bent - plain).abs().max() > 1e-3                               # bending acts


def test_strength_zero_and_outside_the_step_window_are_bit_identical(flux2):
    plain = sample(flux2, step=1)
    assert torch.equal(sample(flux2, step=1, dynamic={"bending": [{**ENTRY, "strength": 0.0}]}), plain)
    assert torch.equal(sample(flux2, step=1, dynamic={"bending": [{**ENTRY, "apply_to_timesteps": [0, 0]}]}), plain)
    assert not torch.equal(sample(flux2, step=1, dynamic={"bending": [{**ENTRY, "apply_to_timesteps": [1, 1]}]}), plain)


QWEN3 = ("{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
         "{% if add_generation_prompt %}<|im_start|>assistant\n{% if enable_thinking is defined and "
         "enable_thinking is false %}<think>\n\n</think>\n\n{% endif %}{% endif %}")          # Qwen3's, abridged
MISTRAL = ("{% for m in messages %}{% if m.role == 'system' %}[SYSTEM_PROMPT]{% else %}[INST]{% endif %}"
           "{% for c in m.content %}{{ c.text }}{% endfor %}{% if m.role == 'system' %}[/SYSTEM_PROMPT]"
           "{% else %}[/INST]{% endif %}{% endfor %}")                                           # Mistral 3's form


@pytest.mark.parametrize("pipeline, padding", [("klein", "right"), ("mistral", "right"), ("mistral", "left")])
def test_words_are_found_in_flux2s_chat_templates(pipeline, padding):
    """Flux2KleinPipeline: the prompt in Qwen3's template without thinking; Flux2Pipeline: Mistral 3's with the
    pipeline's system message. All max_sequence_length (512) tokens are attended, padding included: a word's columns
    count from the first token, plus the padding when the tokenizer pads on the left. (A tiny byte-level BPE
    tokenizer stands in for both; the templates are the models' forms.)"""
    import comfy_standin_qwen as cq

    tokenizer = cq.qwen_tokenizer()
    tokenizer.chat_template, tokenizer.padding_side = (QWEN3 if pipeline == "klein" else MISTRAL), padding
    pipe = types.SimpleNamespace(tokenizer=tokenizer)
    if pipeline == "mistral":
        pipe.system_message = "You are a photo assistant."
    session = types.SimpleNamespace(pipe=pipe, joint="flux2", single=None, family=None,
                                    entries=[bending.as_spec(ENTRY)])
    found = dh.prompts._locate(session, {"prompt": "a romantic kiss at sunset"})
    text = ("<|im_start|>user\na romantic kiss at sunset<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
            if pipeline == "klein" else
            "[SYSTEM_PROMPT]You are a photo assistant.[/SYSTEM_PROMPT][INST]a romantic kiss at sunset[/INST]")
    ids = tokenizer(text)["input_ids"]
    pad = 512 - len(ids) if padding == "left" else 0
    assert tokenizer.convert_ids_to_tokens([ids[j - pad] for j in found["sunset"]]) == ["Ġsun", "set"]
    assert min(found["sunset"]) >= pad
