"""Attention Bending on Krea 2 in the diffusers host: diffusers' own Krea2TransformerModel ([text; image] per item, the
text's padding masked, grouped key/value heads, a sigmoid-gated output; CFG as two calls as Krea2Pipeline runs it),
tiny and seeded.

The reference is the model's processors with their main blocks' attention call replaced by an explicit softmax
whose image-query × text-key block is bent by bending.bend_probs, rows renormalised over all keys: every bent call
equals it; the negative call, strength 0 and calls outside the step window are bit-identical; the words' columns
count from the prompt's first token (the template's prefix dropped)."""

import types

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from diffusers.models.transformers import transformer_krea2 as tk

import comfy_standin_joint as cj
from ckptbend.runtime import bending
from ckptbend.runtime import diffusers_host as dh

CONFIG = dict(in_channels=8, num_layers=2, attention_head_dim=16, num_attention_heads=2, num_key_value_heads=1,
              intermediate_size=32, timestep_embed_dim=16, text_hidden_dim=16, num_text_layers=2,
              text_num_attention_heads=2, text_num_key_value_heads=2, text_intermediate_size=32,
              num_layerwise_text_blocks=1, num_refiner_text_blocks=1, axes_dims_rope=(4, 6, 6))
H, W, TEXT = 4, 6, 7                          # the last two text tokens are padding (masked)
COLUMNS = {"sunset": [2, 3]}
ENTRY = {"token": "sunset", "mode": "translate", "translate_x": 0.5}

pytestmark = pytest.mark.usefixtures("one_thread_no_grad")


@pytest.fixture(scope="module")
def krea2():
    model = cj.seeded_transformer(tk.Krea2Transformer2DModel, CONFIG, 43)
    g = torch.Generator().manual_seed(9)
    for name, p in model.named_parameters():
        if name.endswith(("scale_shift_table", "norm_q.weight", "norm_k.weight")):
            p.data = torch.randn(p.shape, generator=g) * 0.5       # zero-initialised: flat attention otherwise
    prompt, negative = (torch.randn(1, TEXT, 2, 16, generator=g) for _ in range(2))
    inputs = dict(hidden_states=torch.randn(1, H * W, 8, generator=g),
                  position_ids=_positions(),
                  encoder_attention_mask=torch.tensor([[True] * (TEXT - 2) + [False] * 2]))
    scheduler = FlowMatchEulerDiscreteScheduler()
    scheduler.set_timesteps(2)
    return model, inputs, prompt, negative, types.SimpleNamespace(transformer=model, scheduler=scheduler)


def _positions():
    """Krea2Pipeline.prepare_position_ids: text rows zero, image rows (0, h, w)."""
    image = torch.stack(torch.meshgrid(torch.arange(H), torch.arange(W), indexing="ij"), -1).reshape(-1, 2)
    return torch.cat([torch.zeros(TEXT, 3), torch.cat([torch.zeros(H * W, 1), image.float()], 1)])


def sample(krea2, step=0, dynamic=None, negative=False):
    model, inputs, prompt, negative_text, pipe = krea2
    if dynamic is not None:
        session = dh.apply(pipe, dynamic)
        session.token_indices, session.prompt_embeds = COLUMNS, prompt
    text = negative_text if negative else prompt
    try:
        return model(**inputs, encoder_hidden_states=text, timestep=pipe.scheduler.timesteps[step:step + 1] / 1000,
                     return_dict=False)[0]
    finally:
        dh.remove(pipe)


def explicit_bent(entry):
    """diffusers' attention call ([b, L, heads, d]) replaced by softmax(q·kᵀ·d^−½ + mask) in float32; at the main
    blocks' calls (TEXT + H·W tokens) the image × text block bent and the image rows renormalised."""
    spec = bending.BendSpec.from_dict({**entry, "renormalize": "none"})

    def attend(query, key, value, attn_mask=None, **kwargs):
        q, k, v = (t.transpose(1, 2).float() for t in (query, key, value))
        logits = q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5
        if attn_mask is not None:
            logits = logits.masked_fill(~attn_mask, float("-inf"))
        probs = torch.softmax(logits, dim=-1)
        if q.shape[2] == TEXT + H * W:
            probs = probs.clone()
            probs[0, :, TEXT:, :TEXT] = bending.bend_probs(probs[0, :, TEXT:, :TEXT].contiguous(), COLUMNS, (H, W),
                                                           [spec])
            probs[0, :, TEXT:] /= probs[0, :, TEXT:].sum(-1, keepdim=True)
        return (probs @ v).transpose(1, 2).to(query.dtype)

    return attend


def test_every_bent_call_is_the_explicit_bent_softmax(krea2, monkeypatch):
    plain = sample(krea2)
    bent = sample(krea2, dynamic={"bending": [ENTRY]})
    assert torch.equal(sample(krea2, dynamic={"bending": [ENTRY]}, negative=True), sample(krea2, negative=True))
    monkeypatch.setattr(tk, "dispatch_attention_fn", explicit_bent(ENTRY))
    expected = sample(krea2)
    torch.testing.assert_close(bent, expected, rtol=1e-4, atol=1e-5)
    assert (bent - plain).abs().max() > 1e-3


def test_strength_zero_and_outside_the_step_window_are_bit_identical(krea2):
    plain = sample(krea2, step=1)
    assert torch.equal(sample(krea2, 1, {"bending": [{**ENTRY, "strength": 0.0}]}), plain)
    assert torch.equal(sample(krea2, 1, {"bending": [{**ENTRY, "apply_to_timesteps": [0, 0]}]}), plain)


def test_words_are_found_after_the_template_prefix():
    """Krea2Pipeline drops its prefix's prompt_template_encode_start_idx tokens (system turn and user header):
    column 0 is the prompt's first token, spelled bare; a word of the system turn is not the prompt's."""
    import comfy_standin_qwen as cq

    tokenizer = cq.qwen_tokenizer()
    prefix = "<|im_start|>system\nDescribe the image:<|im_end|>\n<|im_start|>user\n"
    pipe = types.SimpleNamespace(tokenizer=tokenizer, prompt_template_encode_prefix=prefix,
                                 prompt_template_encode_start_idx=len(tokenizer(prefix)["input_ids"]),
                                 prompt_template_encode_num_suffix_tokens=5)
    session = types.SimpleNamespace(pipe=pipe, family="krea2", joint=None,
                                    entries=[bending.as_spec({**ENTRY, "token": w}) for w in ("sunset", "image")])
    prompt = "image of a kiss at sunset"
    found = dh.prompts._locate(session, {"prompt": prompt})
    pieces = tokenizer.convert_ids_to_tokens(tokenizer(prompt)["input_ids"])
    assert [pieces[j] for j in found["sunset"]] == ["Ġsun", "set"]
    assert found["image"][0] == 0 and "".join(pieces[j] for j in found["image"]) == "image"
