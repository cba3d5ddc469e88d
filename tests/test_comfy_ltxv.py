"""Attention Bending on LTX-Video in ComfyUI (comfy_host's optimized_attention_override path), driven through the
stand-in host (comfy_standin_ltxv: ComfyUI 0.3.64's lightricks loop, blocks behind "dit" replaces). Call 1 of each
block, attn2 to the T5 context under the additive text mask, is bent: the video queries (one token per latent
voxel) against the word's T5 keys, the mask added before the softmax; attn1 and the negative rows are the backend's
output."""

import functools
import pytest
import torch

from _comfy_cross_calls import explicit_cross
from _helpers import assert_bent_on_positive_rows, bending_node, gain_entry, translate_entry
import comfy_standin as cs
import comfy_standin_ltxv as cl
from _pipelines import t5_like_tokenizer
from ckptbend.runtime import comfy_host

PROMPT = "a romantic kiss at {sunset}"
F_, H, W, TEXT = 2, 3, 4, 12                   # token grid = latent (patch 1); T5 tokens
N_VIDEO = F_ * H * W
ENTRY = translate_entry([1])
GAIN = gain_entry(None, factor=4.0)

pytestmark = pytest.mark.usefixtures("one_thread_no_grad", "comfy")     # conftest.py


@pytest.fixture(scope="module")
def clip():
    return cs.T5CLIP(t5_like_tokenizer(), key="t5xxl", min_length=TEXT)


@pytest.fixture
def ltxv():
    return cl.LTXVModel()


def conds(seed=1, valid=(8, 5)):
    g = torch.Generator().manual_seed(seed)
    return [[{"c_crossattn": torch.randn(1, TEXT, cl.T5_WIDTH, generator=g),
              "attention_mask": (torch.arange(TEXT) < n).long()[None]}] for n in valid]


def latent(seed=2):
    return torch.randn(1, cl.CHANNELS, F_, H, W, generator=torch.Generator().manual_seed(seed))


patched = functools.partial(bending_node, prompt=PROMPT)     # the node as ComfyUI runs it


def explicit(call, rows, entries, columns, step):
    """The backend's output, except the batch items `rows`: the explicit fp32 softmax (mask added) with the video ×
    text probabilities bent by bending.bend_probs, rows renormalised."""
    return explicit_cross(call, rows, entries, columns, step, (H, W), cl.HEADS, frames=F_)


def test_layout_and_words(ltxv, clip):
    layout = comfy_host.dit_layout(ltxv.diffusion_model)
    assert (layout.kind, layout.text_key, layout.text_call, layout.joint, layout.patch) == ("ltxv", "t5xxl", 1,
                                                                                           False, (1, 1, 1))
    assert [b[:2] for b in layout.blocks] == [("double_block", 0), ("double_block", 1)]
    ids = [t for t, _ in clip.tokenize("a romantic kiss at sunset")["t5xxl"][0]]
    columns = comfy_host.token_columns(clip, PROMPT, ["sunset"], layout.text_key)["sunset"]
    assert clip.tokenizer.convert_ids_to_tokens([ids[j] for j in columns]) == ["sunset"]


def test_ltxv_bends_attn2_of_each_block_under_the_text_mask(ltxv, clip):
    sigmas, step = ltxv.schedule(3), 1
    entries = [ENTRY, GAIN]
    columns = comfy_host.token_columns(clip, PROMPT, ["sunset", "kiss"], "t5xxl")
    ltxv.record = []
    cs.calc_cond_batch(ltxv, conds()[::-1], latent(), sigmas[step:step + 1],
                       patched(ltxv, clip, entries).sampling_options(sigmas))
    assert [(c["layer"], c["kind"]) for c in ltxv.record] == [(0, "self"), (0, "cross"), (1, "self"), (1, "cross")]
    changed = 0.0
    for call in ltxv.record:
        plain = cs.attention_chunked(call["q"], call["k"], call["v"], cl.HEADS, call["mask"])
        if call["kind"] == "self":
            assert call["mask"] is None and torch.equal(call["out"], plain)
            continue
        assert call["mask"].shape == (2, 1, 1, TEXT)
        changed = max(changed, assert_bent_on_positive_rows(call, plain, entries, step, explicit, columns))
    assert changed > 1e-3


def test_ltxv_unbent_steps_and_zero_strength_sample_bit_identically(ltxv, clip):
    positive, negative = conds()
    noise = latent()
    plain = cs.sample(cs.ModelPatcher(ltxv), noise, positive, negative, steps=3)
    late = [{**ENTRY, "apply_to_timesteps": [5, 9]}, {**GAIN, "strength": 0.0}]
    assert torch.equal(cs.sample(patched(ltxv, clip, late), noise, positive, negative, steps=3), plain)
    assert not torch.equal(cs.sample(patched(ltxv, clip, [ENTRY, GAIN]), noise, positive, negative, steps=3), plain)
