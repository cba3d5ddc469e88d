"""Attention Bending on LongCat-Image and Ovis-Image in the diffusers host: diffusers' own
LongCatImageTransformer2DModel and OvisImageTransformer2DModel (Flux.1's double and single blocks, their own
processors), tiny (synth/flux_relatives.py's configs) and seeded.

The reference is the model's own processors with their attention call (dispatch_attention_fn) replaced by an
explicit softmax whose image-query × text-key block is bent by bending.bend_probs, rows renormalised over all keys:
every bent call equals it. The negative call (both pipelines run CFG as two calls), strength 0 and calls outside the
step window are bit-identical. The words' columns are found with a Qwen2 tokenizer in each pipeline's own text
(the real pipeline objects' templates, quote splitting, dropped tokens)."""

import types

import pytest
import torch
from diffusers import (FlowMatchEulerDiscreteScheduler, LongCatImagePipeline, LongCatImageTransformer2DModel,
                       OvisImagePipeline, OvisImageTransformer2DModel)
from diffusers.models.transformers import transformer_longcat_image, transformer_ovis_image
from diffusers.pipelines.longcat_image.pipeline_longcat_image import prepare_pos_ids

import comfy_standin_joint as cj
from ckptbend.runtime import bending
from ckptbend.runtime import diffusers_host as dh
from ckptbend.synth.flux_relatives import CONFIGS

TEXT, H, W = 7, 4, 6
COLUMNS = {"sunset": [2, 3]}
ENTRY = {"token": "sunset", "mode": "translate", "translate_x": 0.5}
FAMILIES = {"longcat_image": (LongCatImageTransformer2DModel, transformer_longcat_image, 31),
            "ovis_image": (OvisImageTransformer2DModel, transformer_ovis_image, 37)}

pytestmark = pytest.mark.usefixtures("one_thread_no_grad")


def _ids(family):
    """The pipelines' position ids: LongCat's text (0, j, j) and image (1, 512 + row, 512 + column)
    (prepare_pos_ids, image rows counted from tokenizer_max_length); Ovis's text (0, j, j), image (0, row, column)."""
    if family == "longcat_image":
        return (prepare_pos_ids(0, "text", num_token=TEXT),
                prepare_pos_ids(1, "image", start=(512, 512), height=H, width=W))
    text = torch.zeros(TEXT, 3)
    text[:, 1] = text[:, 2] = torch.arange(TEXT)
    return text, OvisImagePipeline._prepare_latent_image_ids(1, H, W, "cpu", torch.float32)


@pytest.fixture(scope="module", params=list(FAMILIES))
def model(request):
    family = request.param
    cls, module, seed = FAMILIES[family]
    transformer = cj.seeded_transformer(cls, CONFIGS[family], seed)
    g = torch.Generator().manual_seed(seed)
    txt_ids, img_ids = _ids(family)
    inputs = dict(hidden_states=torch.randn(1, H * W, 8, generator=g), txt_ids=txt_ids, img_ids=img_ids)
    prompt, negative = (torch.randn(1, TEXT, 24, generator=g) for _ in range(2))
    scheduler = FlowMatchEulerDiscreteScheduler()
    scheduler.set_timesteps(2)
    return transformer, module, inputs, prompt, negative, types.SimpleNamespace(transformer=transformer,
                                                                                 scheduler=scheduler)


def sample(model, step=0, dynamic=None, negative=False):
    transformer, _, inputs, prompt, negative_text, pipe = model
    if dynamic is not None:
        session = dh.apply(pipe, dynamic)
        session.token_indices, session.prompt_embeds = COLUMNS, prompt
    try:
        return transformer(**inputs, encoder_hidden_states=negative_text if negative else prompt,
                           timestep=pipe.scheduler.timesteps[step:step + 1] / 1000, return_dict=False)[0]
    finally:
        dh.remove(pipe)


def explicit_bent(entry):
    """diffusers' attention call ([b, L, heads, d], no mask) replaced by softmax(q·kᵀ·d^−½) in float32, the image ×
    text block bent and the image rows renormalised (every call: double and single blocks see [text; image])."""
    spec = bending.BendSpec.from_dict({**entry, "renormalize": "none"})

    def attend(query, key, value, attn_mask=None, **kwargs):
        assert attn_mask is None and query.shape[1] == TEXT + H * W
        q, k, v = (t.transpose(1, 2).float() for t in (query, key, value))
        probs = torch.softmax(q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5, dim=-1)
        block = probs[:, :, TEXT:, :TEXT].reshape(-1, H * W, TEXT)
        bent = bending.bend_probs(block, COLUMNS, (H, W), [spec]).view(probs[:, :, TEXT:, :TEXT].shape)
        probs = probs.clone()
        probs[:, :, TEXT:, :TEXT] = bent
        probs[:, :, TEXT:] /= probs[:, :, TEXT:].sum(-1, keepdim=True)
        return (probs @ v).transpose(1, 2).to(query.dtype)

    return attend


def test_every_bent_call_is_the_explicit_bent_softmax(model, monkeypatch):
    plain = sample(model)
    bent = sample(model, dynamic={"bending": [ENTRY]})
    monkeypatch.setattr(model[1], "dispatch_attention_fn", explicit_bent(ENTRY))
    torch.testing.assert_close(bent, sample(model), rtol=1e-4, atol=1e-5)
    assert (bent - plain).abs().max() > 1e-3                               # bending acts


def test_the_negative_call_is_bit_identical(model):
    """Both pipelines run the negative prompt as a call of its own, after the prompt's: left alone."""
    assert torch.equal(sample(model, dynamic={"bending": [ENTRY]}, negative=True), sample(model, negative=True))


def test_strength_zero_and_outside_the_step_window_are_bit_identical(model):
    plain = sample(model, step=1)
    assert torch.equal(sample(model, 1, {"bending": [{**ENTRY, "strength": 0.0}]}), plain)
    assert torch.equal(sample(model, 1, {"bending": [{**ENTRY, "apply_to_timesteps": [0, 0]}]}), plain)
    assert not torch.equal(sample(model, 1, {"bending": [{**ENTRY, "apply_to_timesteps": [1, 1]}]}), plain)


def test_every_double_and_single_block_is_a_layer(model):
    transformer, _, _, _, _, pipe = model
    session = dh.apply(pipe, {"bending": [ENTRY]})
    try:
        assert [s.name for s in dh.processor.sites_of(transformer)] == [
            "transformer_blocks.0.attn", "transformer_blocks.1.attn",
            "single_transformer_blocks.0.attn", "single_transformer_blocks.1.attn"]
        assert session.joint in ("longcat", "ovis")
    finally:
        dh.remove(pipe)


# --- the words' columns --------------------------------------------------------------------------------------

QWEN3 = ("{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
         "{% if add_generation_prompt %}<|im_start|>assistant\n{% if enable_thinking is defined and "
         "enable_thinking is false %}<think>\n\n</think>\n\n{% endif %}{% endif %}")          # Qwen3's, abridged


def _session(pipe, joint, *words):
    return types.SimpleNamespace(pipe=pipe, joint=joint, entries=[bending.as_spec({**ENTRY, "token": w})
                                                                    for w in words])


@pytest.mark.parametrize("padding", ["right", "left"])
def test_longcat_words_are_the_prompts_tokens_quotes_split_into_characters(padding):
    """LongCatImagePipeline encodes the bare prompt (no special tokens; a part between quotes one character at a
    time), padded to 512, between a prefix and a suffix that its encoder output drops: column j is token j (after
    the padding when the tokenizer pads on the left). The first word is spelled bare, the others after a space."""
    import comfy_standin_qwen as cq

    tokenizer = cq.qwen_tokenizer()
    tokenizer.padding_side = padding
    pipe = LongCatImagePipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=None, text_encoder=None,
                                tokenizer=tokenizer, text_processor=None, transformer=None)
    session = _session(pipe, "longcat", "sunset", "a", "kiss")
    prompt = 'a romantic kiss at "sunset"'
    found = dh.prompts._locate(session, {"prompt": prompt})
    pieces = [tokenizer.convert_ids_to_tokens(tokenizer(p, add_special_tokens=False)["input_ids"])
              for p in ("a romantic kiss at ", *'"sunset"')]
    pieces = [p for part in pieces for p in part]
    pad = 512 - len(pieces) if padding == "left" else 0
    assert [pieces[j - pad] for j in found["sunset"]] == list("sunset")
    assert [pieces[j - pad] for j in found["a"]] == ["a"] and found["a"] == [pad]
    assert [pieces[j - pad] for j in found["kiss"]] == ["Ġkiss"]


@pytest.mark.parametrize("padding", ["right", "left"])
def test_ovis_words_follow_the_dropped_template_tokens(padding):
    """OvisImagePipeline: Qwen3's template of one user turn, its system prompt + the prompt, padded to
    max_sequence_length + 28, the first 28 tokens dropped: a word's column is its token's place less 28 (the system
    prompt's rest before it; a word of the system prompt is not the prompt's)."""
    import comfy_standin_qwen as cq

    tokenizer = cq.qwen_tokenizer()
    tokenizer.chat_template, tokenizer.padding_side = QWEN3, padding
    pipe = OvisImagePipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=None, text_encoder=None,
                             tokenizer=tokenizer, transformer=None)
    session = _session(pipe, "ovis", "sunset", "image")
    prompt = "image of a kiss at sunset"
    found = dh.prompts._locate(session, {"prompt": prompt, "max_sequence_length": 64})
    text = pipe._get_messages(prompt)[0]
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    pad = 64 + 28 - len(ids) if padding == "left" else 0
    pieces = tokenizer.convert_ids_to_tokens(ids)
    assert [pieces[28 + j - pad] for j in found["sunset"]] == ["Ġsun", "set"]
    assert [pieces[28 + j - pad] for j in found["image"]] == ["Ġimage"]
    assert pieces.index("Ġimage") < 28 + found["image"][0] - pad          # the system prompt's "image" is skipped
    padded = tokenizer(text, padding="max_length", max_length=64 + 28, add_special_tokens=False)["input_ids"][28:]
    assert [padded[j] for j in found["sunset"]] == tokenizer.convert_tokens_to_ids(["Ġsun", "set"])
