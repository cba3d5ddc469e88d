"""Attention Bending on Ideogram 4 in ComfyUI (comfy_host's optimized_attention_override path), driven through the
stand-in host's Ideogram 4 (comfy_standin_ideogram4: a real tiny diffusers Ideogram4Transformer2DModel run as the
newest readable ComfyUI source runs it; ComfyUI 0.3.64, the newest runnable here, has no Ideogram 4). ComfyUI's
Ideogram 4 loop registers no "dit" replace and writes no block_index: the node counts the joint [text; image] calls of
each model call and bends the image queries against the word's text keys, under ComfyUI's block-diagonal padding mask
where the conditioning has one; every token of its Qwen3-VL template is a text key (the encoder drops none)."""

import functools
import pytest
import torch
from torch.testing import assert_close

from _helpers import bending_node, gain_entry, translate_entry
import comfy_standin as cs
import comfy_standin_ideogram4 as ci
from ckptbend.runtime import bending, comfy_host

PROMPT = "a romantic kiss at {sunset}"
GH, GW, TEXT = 4, 6, 14
ENTRY = translate_entry([1])
GAIN = gain_entry(None)

pytestmark = pytest.mark.usefixtures("one_thread_no_grad", "comfy")     # conftest.py


@pytest.fixture(scope="module")
def clip():
    return ci.Ideogram4CLIP()


@pytest.fixture
def ideogram():
    return ci.Ideogram4Model(ci.tiny_ideogram4())


def conds(masked=False, seed=1):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(2):
        entry = {"c_crossattn": torch.randn(1, TEXT, ci.CONFIG["llm_features_dim"], generator=g)}
        if masked:
            entry["text_mask"] = torch.tensor([[1.0] * (TEXT - 3) + [0.0] * 3])
        out.append([entry])
    return out


def latent(seed=2):
    return torch.randn(1, 16, GH, GW, generator=torch.Generator().manual_seed(seed))


patched = functools.partial(bending_node, prompt=PROMPT)     # the node as ComfyUI runs it


def test_every_template_token_is_a_text_key(clip, ideogram):
    layout = comfy_host.dit_layout(ideogram.diffusion_model)
    assert (layout.kind, layout.patch, layout.blocks) == ("ideogram4", (1, 1, 1), [])
    columns = comfy_host.token_columns(clip, PROMPT, ["sunset", "a"], layout.text_key)
    ids = [i for i, _ in clip.tokenize("a romantic kiss at sunset")["qwen3vl_8b"][0]]
    words = clip.tokenizer.convert_ids_to_tokens(ids)
    assert words[:3] == ["<|im_start|>", "user", "Ċ"] and len(ids) == TEXT
    assert [words[j] for j in columns["sunset"]] == ["Ġsun", "set"] and columns["a"] == [3]


def explicit(call, rows, entries, columns, step, mask):
    """The backend's output, except the batch items `rows`, whose image queries come from the explicit fp32 softmax
    (under the call's additive mask) with the text block bent by bending.bend_probs, each row renormalised."""
    q, k, v = (call[n].float() for n in ("q", "k", "v"))
    out = cs.attention_chunked(call["q"], call["k"], call["v"], 2, mask, skip_reshape=True).clone()
    logits = q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5
    probs = torch.softmax(logits if mask is None else logits + mask, dim=-1)[rows]
    unrowed = [{**e, "renormalize": "none"} if e["renormalize"] == "row" else e for e in entries]
    block = probs[:, :, TEXT:, :TEXT].reshape(-1, GH * GW, TEXT)
    probs[:, :, TEXT:, :TEXT] = bending.bend_probs(block, columns, (GH, GW), unrowed, step,
                                                   call["layer"]).view(len(rows), 2, GH * GW, TEXT)
    if any(e["renormalize"] == "row" for e in entries):
        probs[:, :, TEXT:] /= probs[:, :, TEXT:].sum(-1, keepdim=True)
    out[rows, TEXT:] = (probs[:, :, TEXT:] @ v[rows]).transpose(1, 2).flatten(2).to(out.dtype)
    return out


@pytest.mark.parametrize("masked", [False, True])
def test_ideogram4_bends_the_image_queries_of_each_counted_block(ideogram, clip, masked):
    cond, uncond = conds(masked)
    sigmas, step = ideogram.schedule(3), 1
    entries = [ENTRY, GAIN]
    columns = comfy_host.token_columns(clip, PROMPT, ["sunset", "kiss"], comfy_host.dit_layout(
        ideogram.diffusion_model).text_key)
    ideogram.record = []
    cs.calc_cond_batch(ideogram, [cond, uncond], latent(), sigmas[step:step + 1],
                       patched(ideogram, clip, entries).sampling_options(sigmas))
    assert [c["layer"] for c in ideogram.record] == [0, 1]
    changed = 0.0
    for call in ideogram.record:
        mask = call["mask"]
        assert (mask is not None) == masked
        plain = cs.attention_chunked(call["q"], call["k"], call["v"], 2, mask, skip_reshape=True)
        rows = comfy_host.common.chunk_rows(call["cond_or_uncond"], 0, 2)
        active = [e for e in entries if bending.entry_active(e, step, call["layer"])]
        assert_close(call["out"], explicit(call, rows, active, columns, step, mask), rtol=1e-4, atol=1e-5)
        others = [r for r in range(2) if r not in rows]
        assert torch.equal(call["out"][others], plain[others])                # the negative prediction
        assert torch.equal(call["out"][:, :TEXT], plain[:, :TEXT])            # text queries
        changed = max(changed, float((call["out"] - plain).abs().max()))
    assert changed > 1e-3


def test_ideogram4_unbent_steps_and_zero_strength_sample_bit_identically(ideogram, clip):
    cond, uncond = conds()
    noise = latent()
    plain = cs.sample(cs.ModelPatcher(ideogram), noise, cond, uncond, steps=3)
    late = [{**ENTRY, "apply_to_timesteps": [5, 9]}, {**GAIN, "apply_to_timesteps": [3, 3]}]
    assert torch.equal(cs.sample(patched(ideogram, clip, late), noise, cond, uncond, steps=3), plain)
    zero = patched(ideogram, clip, [ENTRY], bend1_strength=0.0)
    assert "optimized_attention_override" not in zero.model_options["transformer_options"]
    assert not torch.equal(cs.sample(patched(ideogram, clip, [ENTRY, GAIN]), noise, cond, uncond, steps=3), plain)


def test_ideogram4_image_only_pass_is_left_alone(ideogram, clip):
    """ComfyUI runs a call without a context as an image-only sequence: no text keys, so nothing is bent, even where
    the call is marked conditional; the output is the unpatched model's, bit for bit."""
    sigmas = ideogram.schedule(3)
    options = {"cond_or_uncond": [0], "sigmas": sigmas[1:2]}
    x, sigma = latent(), sigmas[1:2]
    plain = ideogram.apply_model(x, sigma, None, {**cs.ModelPatcher(ideogram).sampling_options(sigmas)[
        "transformer_options"], **options})
    bent = patched(ideogram, clip, [ENTRY, GAIN]).sampling_options(sigmas)["transformer_options"]
    assert torch.equal(ideogram.apply_model(x, sigma, None, {**bent, **options}), plain)
