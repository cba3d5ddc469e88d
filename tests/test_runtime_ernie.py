"""Attention Bending on ERNIE-Image in the diffusers host: diffusers' own ErnieImageTransformer2DModel ([image; text]
per item, texts right-padded and masked, CFG batched [uncond; cond] as ErnieImagePipeline does), tiny and seeded.

The reference is the model's processors with their attention call replaced by an explicit softmax whose
image-query × text-key block of the conditional item is bent by bending.bend_probs, its rows renormalised over all
keys: every bent call equals it; the negative item, strength 0 and calls outside the step window are bit-identical
to the plain model; the words' columns are the bare prompt's tokens."""

import types

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from diffusers.models.transformers import transformer_ernie_image as te

import comfy_standin_joint as cj
from ckptbend.runtime import bending
from ckptbend.runtime import diffusers_host as dh

CONFIG = dict(hidden_size=32, num_attention_heads=2, num_layers=2, ffn_hidden_size=64, in_channels=8, out_channels=8,
              patch_size=1, text_in_dim=16, rope_axes_dim=(4, 6, 6))
H, W, TEXT, NEGATIVE = 4, 6, 6, 9             # the prompt's 6 tokens padded to the negative's 9 (masked)
COLUMNS = {"sunset": [2, 3]}
ENTRY = {"token": "sunset", "mode": "translate", "translate_x": 0.5}

pytestmark = pytest.mark.usefixtures("one_thread_no_grad")


@pytest.fixture(scope="module")
def ernie():
    model = cj.seeded_transformer(te.ErnieImageTransformer2DModel, CONFIG, 41)
    g = torch.Generator().manual_seed(7)
    for p in (*model.adaLN_modulation[-1].parameters(), *model.final_linear.parameters()):
        p.data = torch.randn(p.shape, generator=g) * 0.3          # zero-initialised: the blocks would do nothing
    latent = torch.randn(1, 8, H, W, generator=g)
    prompt, negative = torch.randn(TEXT, 16, generator=g), torch.randn(NEGATIVE, 16, generator=g)
    text = torch.zeros(2, NEGATIVE, 16)
    text[0], text[1, :TEXT] = negative, prompt                     # ErnieImagePipeline: [uncond; cond]
    scheduler = FlowMatchEulerDiscreteScheduler()
    scheduler.set_timesteps(2)
    inputs = dict(hidden_states=latent.repeat(2, 1, 1, 1), text_bth=text, text_lens=torch.tensor([NEGATIVE, TEXT]))
    return model, inputs, prompt, types.SimpleNamespace(transformer=model, scheduler=scheduler)


def sample(ernie, step=0, dynamic=None):
    model, inputs, prompt, pipe = ernie
    if dynamic is not None:
        session = dh.apply(pipe, dynamic)
        session.token_indices, session.prompt_embeds = COLUMNS, [prompt]
    try:
        return model(**inputs, timestep=pipe.scheduler.timesteps[step].repeat(2), return_dict=False)[0]
    finally:
        dh.remove(pipe)


def explicit_bent(entry):
    """diffusers' attention call ([b, L, heads, d]) replaced by softmax(q·kᵀ·d^−½ + mask) in float32, the
    conditional item's (row 1) image × text block bent and its image rows renormalised."""
    spec = bending.BendSpec.from_dict({**entry, "renormalize": "none"})
    n_image = H * W

    def attend(query, key, value, attn_mask=None, **kwargs):
        q, k, v = (t.transpose(1, 2).float() for t in (query, key, value))
        logits = q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5
        if attn_mask is not None:
            logits = logits.masked_fill(~attn_mask, float("-inf"))
        probs = torch.softmax(logits, dim=-1).clone()
        block = probs[1, :, :n_image, n_image:n_image + TEXT]
        probs[1, :, :n_image, n_image:n_image + TEXT] = bending.bend_probs(block.contiguous(), COLUMNS, (H, W), [spec])
        probs[1, :, :n_image] /= probs[1, :, :n_image].sum(-1, keepdim=True)
        return (probs @ v).transpose(1, 2).to(query.dtype)

    return attend


def test_every_bent_call_is_the_explicit_bent_softmax(ernie, monkeypatch):
    plain = sample(ernie)
    bent = sample(ernie, dynamic={"bending": [ENTRY]})
    monkeypatch.setattr(te, "dispatch_attention_fn", explicit_bent(ENTRY))
    expected = sample(ernie)
    torch.testing.assert_close(bent, expected, rtol=1e-4, atol=1e-5)
    assert (bent[1] - plain[1]).abs().max() > 1e-3               # bending acts on the prompt's item
    assert torch.equal(bent[0], plain[0])                         # the negative's is untouched


def test_strength_zero_and_outside_the_step_window_are_bit_identical(ernie):
    plain = sample(ernie, step=1)
    assert torch.equal(sample(ernie, 1, {"bending": [{**ENTRY, "strength": 0.0}]}), plain)
    assert torch.equal(sample(ernie, 1, {"bending": [{**ENTRY, "apply_to_timesteps": [0, 0]}]}), plain)


def test_visualise_only_is_bit_identical_and_records_maps(ernie):
    model, inputs, prompt, pipe = ernie
    plain = sample(ernie)
    session = dh.apply(pipe, {"bending": [ENTRY]}, phase=1)
    session.token_indices, session.prompt_embeds = COLUMNS, [prompt]
    try:
        seen = model(**inputs, timestep=pipe.scheduler.timesteps[0].repeat(2), return_dict=False)[0]
    finally:
        dh.remove(pipe)
    assert torch.equal(seen, plain) and session.maps


def test_words_are_found_in_the_bare_prompt():
    """ErnieImagePipeline tokenizes the prompt alone, special tokens included: column 0 is its first token; the
    first word is spelled bare, the others after a space (byte-level BPE)."""
    import comfy_standin_qwen as cq

    tokenizer = cq.qwen_tokenizer()
    session = types.SimpleNamespace(pipe=types.SimpleNamespace(tokenizer=tokenizer), family="ernie", joint=None,
                                    entries=[bending.as_spec({**ENTRY, "token": w}) for w in ("sunset", "a")])
    prompt = "a romantic kiss at sunset"
    found = dh.prompts._locate(session, {"prompt": prompt})
    pieces = tokenizer.convert_ids_to_tokens(tokenizer(prompt)["input_ids"])
    assert [pieces[j] for j in found["sunset"]] == ["Ġsun", "set"]
    assert found["a"] == [0]
