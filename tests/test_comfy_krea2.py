"""Attention Bending on Krea 2 in ComfyUI (comfy_host's optimized_attention_override path), driven through the
stand-in host's Krea 2 (comfy_standin_krea2: a real tiny diffusers Krea2Transformer2DModel run as the newest readable
ComfyUI source runs it; ComfyUI 0.3.64, the newest runnable here, has no Krea 2). ComfyUI's Krea 2 loop registers no
"dit" replace and writes no block_index: the node counts the joint [text; image] calls of each model call, leaves the
text-fusion calls alone and bends the image queries against the word's text keys; the words are found past the
system turn its encoder drops."""

import functools
import pytest
import torch
from torch.testing import assert_close

from _helpers import bending_node, gain_entry, translate_entry
import comfy_standin as cs
import comfy_standin_krea2 as ck
from ckptbend.runtime import bending, comfy_host

PROMPT = "a romantic kiss at {sunset}"
HEIGHT, WIDTH, TEXT = 8, 12, 9               # latent; tokens: 4 × 6
ENTRY = translate_entry([1])
GAIN = gain_entry(None)

pytestmark = pytest.mark.usefixtures("one_thread_no_grad", "comfy")     # conftest.py


@pytest.fixture(scope="module")
def clip():
    return ck.Krea2CLIP()


@pytest.fixture
def krea2():
    return ck.Krea2Model(ck.tiny_krea2())


def contexts(n=2, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(1, TEXT, ck.TEXT_LAYERS * ck.TEXT_DIM, generator=g) for _ in range(n)]


def latent(seed=2):
    return torch.randn(1, 4, HEIGHT, WIDTH, generator=torch.Generator().manual_seed(seed))


patched = functools.partial(bending_node, prompt=PROMPT)     # the node as ComfyUI runs it


def test_words_are_found_past_the_system_turn(clip, krea2):
    layout = comfy_host.dit_layout(krea2.diffusion_model)
    assert (layout.kind, layout.text_key, layout.patch, layout.blocks) == ("krea2", "qwen3vl_4b", (1, 2, 2), [])
    columns = comfy_host.token_columns(clip, PROMPT, ["sunset", "a"], layout.text_key)
    ids = [i for i, _ in clip.tokenize("a romantic kiss at sunset")["qwen3vl_4b"][0]]
    kept = clip.tokenizer.convert_ids_to_tokens(ids[[i for i, t in enumerate(ids) if t == 151644][1] + 3:])
    assert [kept[j] for j in columns["sunset"]] == ["Ġsun", "set"] and columns["a"] == [0]


def explicit(call, rows, entries, columns, step):
    """The backend's output, except the batch items `rows`, whose image queries come from the explicit fp32 softmax
    with the text block bent by bending.bend_probs and each row renormalised over all keys."""
    q, k, v = (call[n].float() for n in ("q", "k", "v"))
    out = cs.attention_chunked(call["q"], call["k"], call["v"], 2, skip_reshape=True).clone()
    probs = torch.softmax(q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5, dim=-1)[rows]
    h, w = HEIGHT // 2, WIDTH // 2
    unrowed = [{**e, "renormalize": "none"} if e["renormalize"] == "row" else e for e in entries]
    block = probs[:, :, TEXT:, :TEXT].reshape(-1, h * w, TEXT)
    probs[:, :, TEXT:, :TEXT] = bending.bend_probs(block, columns, (h, w), unrowed, step,
                                                   call["layer"]).view(len(rows), 2, h * w, TEXT)
    if any(e["renormalize"] == "row" for e in entries):
        probs[:, :, TEXT:] /= probs[:, :, TEXT:].sum(-1, keepdim=True)
    bent = (probs[:, :, TEXT:] @ v[rows]).transpose(1, 2).flatten(2)
    out[rows, TEXT:] = bent.to(out.dtype)
    return out


def test_krea2_bends_the_image_queries_of_each_counted_block(krea2, clip):
    cond, uncond = contexts()
    sigmas, step = krea2.schedule(3), 1
    entries = [ENTRY, GAIN]
    columns = comfy_host.token_columns(clip, PROMPT, ["sunset", "kiss"], "qwen3vl_4b")
    krea2.record = []
    cs.calc_cond_batch(krea2, [cs.cond(cond), cs.cond(uncond)], latent(), sigmas[step:step + 1],
                       patched(krea2, clip, entries).sampling_options(sigmas))
    assert [c["layer"] for c in krea2.record] == [0, 1]
    assert [kind for _, kind, _, _ in krea2.log].count("text") == 2          # text fusion: through, unbent
    changed = 0.0
    for call in krea2.record:
        plain = cs.attention_chunked(call["q"], call["k"], call["v"], 2, skip_reshape=True)
        rows = comfy_host.common.chunk_rows(call["cond_or_uncond"], 0, 2)
        active = [e for e in entries if bending.entry_active(e, step, call["layer"])]
        assert_close(call["out"], explicit(call, rows, active, columns, step), rtol=1e-4, atol=1e-5)
        others = [r for r in range(2) if r not in rows]
        assert torch.equal(call["out"][others], plain[others])                # the negative prediction
        assert torch.equal(call["out"][:, :TEXT], plain[:, :TEXT])            # text queries
        changed = max(changed, float((call["out"] - plain).abs().max()))
    assert changed > 1e-3


def test_krea2_unbent_steps_and_zero_strength_sample_bit_identically(krea2, clip):
    cond, uncond = contexts()
    noise = latent()
    plain = cs.sample(cs.ModelPatcher(krea2), noise, cond, uncond, steps=3)
    late = [{**ENTRY, "apply_to_timesteps": [5, 9]}, {**GAIN, "apply_to_timesteps": [3, 3]}]
    assert torch.equal(cs.sample(patched(krea2, clip, late), noise, cond, uncond, steps=3), plain)
    zero = patched(krea2, clip, [ENTRY], bend1_strength=0.0)
    assert "optimized_attention_override" not in zero.model_options["transformer_options"]
    assert not torch.equal(cs.sample(patched(krea2, clip, [ENTRY, GAIN]), noise, cond, uncond, steps=3), plain)
