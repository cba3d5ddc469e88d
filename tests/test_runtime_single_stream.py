"""Attention Bending on the single-stream NextDiTs in the diffusers host: diffusers' own ZImageTransformer2DModel
([image; text], each padded to 32 tokens, CFG batched [cond; uncond] with unequal texts masked) and
Lumina2Transformer2DModel ([text; image], grouped key/value heads), tiny and seeded.

The reference is the model's own processors with their attention call replaced by an explicit softmax whose
image-query × text-key block is bent by bending.bend_probs, each row renormalised over all keys: every bent call
equals it; the unconditional item, calls outside the step window and strength 0 are bit-identical to the plain
model."""

import types

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, Lumina2Transformer2DModel, ZImageTransformer2DModel
from diffusers.models.transformers import transformer_z_image

import comfy_standin_joint as cj
from ckptbend.runtime import bending
from ckptbend.runtime import diffusers_host as dh

ZIMAGE = dict(all_patch_size=(2,), all_f_patch_size=(1,), in_channels=4, dim=32, n_layers=2, n_refiner_layers=1,
              n_heads=2, n_kv_heads=2, cap_feat_dim=16, axes_dims=[4, 6, 6], axes_lens=[128, 16, 16])
LUMINA2 = dict(sample_size=8, patch_size=2, in_channels=4, hidden_size=32, num_layers=2, num_refiner_layers=1,
               num_attention_heads=2, num_kv_heads=1, multiple_of=16, axes_dim_rope=(4, 6, 6),
               axes_lens=(64, 16, 16), cap_feat_dim=16)
H, W, TEXT, NEGATIVE = 4, 6, 6, 40            # token grid 4×6; the prompt's 6 tokens, the negative's 40 (Z-Image)
COLUMNS = {"sunset": [2, 3]}
ENTRY = {"token": "sunset", "mode": "translate", "translate_x": 0.5}

pytestmark = pytest.mark.usefixtures("one_thread_no_grad")


def scheduler():
    s = FlowMatchEulerDiscreteScheduler()
    s.set_timesteps(2)
    return s


@pytest.fixture(scope="module")
def zimage():
    model = cj.seeded_transformer(ZImageTransformer2DModel, ZIMAGE, 29)
    g = torch.Generator().manual_seed(3)
    latent = torch.randn(4, 1, 2 * H, 2 * W, generator=g)
    prompt, negative = torch.randn(TEXT, 16, generator=g), torch.randn(NEGATIVE, 16, generator=g)
    pipe = types.SimpleNamespace(transformer=model, scheduler=scheduler())
    return model, latent, prompt, negative, pipe


def zimage_sample(zimage, step=0, dynamic=None):
    """The model's prediction for [cond, uncond] (ZImagePipeline's CFG batch) at the scheduler's step."""
    model, latent, prompt, negative, pipe = zimage
    if dynamic is not None:
        session = dh.apply(pipe, dynamic)
        session.token_indices, session.prompt_embeds = COLUMNS, [prompt]
    t = 1 - pipe.scheduler.timesteps[step:step + 1] / 1000
    try:
        return torch.stack(model([latent, latent.clone()], t.repeat(2), [prompt, negative], return_dict=False)[0])
    finally:
        dh.remove(pipe)


def explicit_bent(entry, n_image, text_at, full, rows=(0,), n_text=TEXT):
    """An attention call replaced by softmax(q·kᵀ·scale + mask) with, at the main blocks' calls (length `full`),
    the image × text block of the batch items `rows` bent and their rows renormalised ([b, heads, L, d] in/out)."""
    spec = bending.BendSpec.from_dict({**entry, "renormalize": "none"})

    def attend(q, k, v, attn_mask=None, scale=None):
        q, k, v = q.float(), k.float(), v.float()
        logits = q @ k.transpose(-1, -2) * (q.shape[-1] ** -0.5 if scale is None else scale)
        if attn_mask is not None:
            logits = logits.masked_fill(~attn_mask, float("-inf"))
        probs = torch.softmax(logits, dim=-1)
        if q.shape[2] == full:
            probs = probs.clone()
            for r in rows:
                block = probs[r, :, :n_image, text_at:text_at + n_text]
                probs[r, :, :n_image, text_at:text_at + n_text] = bending.bend_probs(
                    block.contiguous(), COLUMNS, (H, W), [spec])
                probs[r, :, :n_image] /= probs[r, :, :n_image].sum(-1, keepdim=True)
        return probs @ v

    return attend


def test_zimage_every_bent_call_is_the_explicit_bent_softmax(zimage, monkeypatch):
    plain = zimage_sample(zimage)
    bent = zimage_sample(zimage, dynamic={"bending": [ENTRY]})
    attend = explicit_bent(ENTRY, H * W, 32, full=32 + 64)          # [image 24 → 32; text 6 → 32 (negative 64)]

    def dispatch(query, key, value, attn_mask=None, **kwargs):     # diffusers' [b, L, heads, d]
        q, k, v = (t.transpose(1, 2) for t in (query, key, value))
        return attend(q, k, v, attn_mask).transpose(1, 2).to(query.dtype)

    monkeypatch.setattr(transformer_z_image, "dispatch_attention_fn", dispatch)
    expected = zimage_sample(zimage)
    torch.testing.assert_close(bent, expected, rtol=1e-4, atol=1e-5)
    assert (bent[0] - plain[0]).abs().max() > 1e-3                          # bending acts on the prompt's item
    assert torch.equal(bent[1], plain[1])                                    # the negative's is untouched


def test_zimage_strength_zero_and_outside_the_step_window_are_bit_identical(zimage):
    plain = zimage_sample(zimage, step=1)
    assert torch.equal(zimage_sample(zimage, 1, {"bending": [{**ENTRY, "strength": 0.0}]}), plain)
    assert torch.equal(zimage_sample(zimage, 1, {"bending": [{**ENTRY, "apply_to_timesteps": [0, 0]}]}), plain)
    assert not torch.equal(zimage_sample(zimage, 1, {"bending": [{**ENTRY, "apply_to_timesteps": [1, 1]}]}), plain)


@pytest.fixture(scope="module")
def lumina2():
    model = cj.seeded_transformer(Lumina2Transformer2DModel, LUMINA2, 31)
    g = torch.Generator().manual_seed(4)
    inputs = dict(hidden_states=torch.randn(1, 4, 2 * H, 2 * W, generator=g),
                  encoder_hidden_states=torch.randn(1, TEXT + 2, 16, generator=g),
                  encoder_attention_mask=torch.tensor([[1] * TEXT + [0, 0]]))     # two padded tokens, cut
    return model, inputs, types.SimpleNamespace(transformer=model, scheduler=scheduler())


def lumina2_sample(lumina2, step=0, dynamic=None):
    model, inputs, pipe = lumina2
    if dynamic is not None:
        session = dh.apply(pipe, dynamic)
        session.token_indices = COLUMNS
    try:
        return model(**inputs, timestep=1 - pipe.scheduler.timesteps[step:step + 1] / 1000).sample
    finally:
        dh.remove(pipe)


def test_lumina2_every_bent_call_is_the_explicit_bent_softmax(lumina2, monkeypatch):
    plain = lumina2_sample(lumina2)
    bent = lumina2_sample(lumina2, dynamic={"bending": [ENTRY]})
    explicit = explicit_bent(ENTRY, H * W, 0, full=TEXT + H * W)
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def attend(q, k, v, attn_mask=None, scale=None, **kwargs):    # [text; image]: image queries from TEXT
        if q.shape[2] != TEXT + H * W:
            return sdpa(q, k, v, attn_mask=attn_mask, scale=scale)
        out = explicit(q.roll(-TEXT, 2), k, v, attn_mask, scale)   # image queries first, as explicit_bent reads
        return out.roll(TEXT, 2).to(q.dtype)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", attend)
    expected = lumina2_sample(lumina2)
    torch.testing.assert_close(bent, expected, rtol=1e-4, atol=1e-5)
    assert (bent - plain).abs().max() > 1e-3


def test_lumina2_strength_zero_and_outside_the_step_window_are_bit_identical(lumina2):
    plain = lumina2_sample(lumina2, step=1)
    assert torch.equal(lumina2_sample(lumina2, 1, {"bending": [{**ENTRY, "strength": 0.0}]}), plain)
    assert torch.equal(lumina2_sample(lumina2, 1, {"bending": [{**ENTRY, "apply_to_timesteps": [0, 0]}]}), plain)
    assert not torch.equal(lumina2_sample(lumina2, 1, {"bending": [{**ENTRY, "apply_to_timesteps": [1, 1]}]}), plain)


QWEN3_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
                  "{% if add_generation_prompt %}<|im_start|>assistant\n{% if enable_thinking is defined and "
                  "enable_thinking is false %}<think>\n\n</think>\n\n{% endif %}{% endif %}")   # Qwen3's, abridged


@pytest.mark.parametrize("family", ["zimage", "lumina2", "hunyuan15"])
def test_words_are_found_in_the_text_the_pipeline_encodes(family):
    """Z-Image: the user turn of the tokenizer's chat template (Qwen3 with its generation prompt); Lumina 2: the
    system prompt, " <Prompt Start> ", then the prompt; HunyuanVideo 1.5: system and user turns, its crop_start
    tokens (the system turn) dropped. The columns count every token the model sees from the first; the first word
    is spelled bare, the others after a space (byte-level BPE); a word of the system prompt is not the prompt's."""
    import comfy_standin_qwen as cq

    tokenizer = cq.qwen_tokenizer()
    tokenizer.chat_template = QWEN3_TEMPLATE
    system = "You are a photo assistant."
    crop = len(tokenizer(f"<|im_start|>system\n{system}<|im_end|>\n")["input_ids"])
    pipe = types.SimpleNamespace(tokenizer=tokenizer, system_prompt=system, system_message=system,
                                 prompt_template_encode_start_idx=crop, tokenizer_max_length=1000)
    session = types.SimpleNamespace(pipe=pipe, single=None if family == "hunyuan15" else family, joint=None,
                                    family="hunyuan15" if family == "hunyuan15" else "single",
                                    entries=[bending.as_spec({**ENTRY, "token": w}) for w in ("sunset", "a")])
    prompt = "a romantic kiss at sunset"
    found = dh.prompts._locate(session, {"prompt": prompt})
    text = {"zimage": "<|im_start|>user\n" + prompt + "<|im_end|>\n<|im_start|>assistant\n",
            "lumina2": f"{system} <Prompt Start> " + prompt,
            "hunyuan15": "<|im_start|>user\n" + prompt + "<|im_end|>\n<|im_start|>assistant\n"}[family]
    pieces = tokenizer.convert_ids_to_tokens(tokenizer(text)["input_ids"])
    assert [pieces[j] for j in found["sunset"]] == ["Ġsun", "set"]
    assert [pieces[j] for j in found["a"]] == (["Ġa"] if family == "lumina2" else ["a"])
    assert found["a"][0] == (len(pieces) - 6 if family == "lumina2" else 3)     # the prompt's, not the system's
