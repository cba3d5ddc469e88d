"""Attention Bending on Kandinsky 5 in ComfyUI (comfy_host's optimized_attention_override path), driven through the
stand-in host (comfy_standin_kandinsky5: a real tiny diffusers Kandinsky5Transformer3DModel run as ComfyUI's
kandinsky5 model runs it; not in ComfyUI 0.3.64, the newest runnable here). Call 1 of each visual block, the
visual→text cross-attention, is bent: its video queries against the word's Qwen2.5-VL keys (the words found as
Qwen-Image's: ComfyUI's Kandinsky 5 encoder keeps its tokens by the same template rule); the self-attentions and the
text blocks' attentions are left as the backend computes them."""

import functools
import pytest
import torch

from _comfy_cross_calls import explicit_cross
from _helpers import assert_bent_on_positive_rows, bending_node, gain_entry, translate_entry
import comfy_standin as cs
import comfy_standin_kandinsky5 as ck
import comfy_standin_qwen as cq
from ckptbend.runtime import comfy_host

PROMPT = "a romantic kiss at {sunset}"
F_, H, W, TEXT = 2, 3, 4, 9                    # token grid (latent 2 × 6 × 8, patch 1 × 2 × 2)
N_VIDEO = F_ * H * W
ENTRY = translate_entry([1])
GAIN = gain_entry(None, factor=4.0)

pytestmark = pytest.mark.usefixtures("one_thread_no_grad", "comfy")     # conftest.py


@pytest.fixture(scope="module")
def clip():
    return cq.QwenCLIP()


@pytest.fixture
def kandinsky():
    return ck.KandinskyModel(ck.tiny_kandinsky5())


def conds(seed=1):
    g = torch.Generator().manual_seed(seed)
    return [[{"c_crossattn": torch.randn(1, TEXT, 24, generator=g)}] for _ in range(2)]


def latent(seed=2):
    return torch.randn(1, 4, F_, 2 * H, 2 * W, generator=torch.Generator().manual_seed(seed))


patched = functools.partial(bending_node, prompt=PROMPT)     # the node as ComfyUI runs it


def explicit(call, rows, entries, columns, step):
    """The backend's output, except the batch items `rows`: the explicit fp32 softmax with the video × text
    probabilities bent by bending.bend_probs, rows renormalised."""
    return explicit_cross(call, rows, entries, columns, step, (H, W), 2, frames=F_)


def test_layout_and_words(kandinsky, clip):
    layout = comfy_host.dit_layout(kandinsky.diffusion_model)
    assert (layout.kind, layout.text_key, layout.text_call, layout.joint) == ("kandinsky5", "qwen25_7b", 1, False)
    assert [b[:2] for b in layout.blocks] == [("double_block", 0), ("double_block", 1)]
    kept = cq.encoder_columns(clip, "a romantic kiss at sunset")
    columns = comfy_host.token_columns(clip, PROMPT, ["sunset"], layout.text_key)
    assert clip.tokenizer.convert_ids_to_tokens([kept[j] for j in columns["sunset"]]) == ["Ġsun", "set"]


def test_kandinsky_bends_the_cross_attention_of_each_visual_block(kandinsky, clip):
    sigmas, step = kandinsky.schedule(3), 1
    entries = [ENTRY, GAIN]
    columns = comfy_host.token_columns(clip, PROMPT, ["sunset", "kiss"], "qwen25_7b")
    kandinsky.record = []
    cs.calc_cond_batch(kandinsky, conds()[::-1], latent(), sigmas[step:step + 1],
                       patched(kandinsky, clip, entries).sampling_options(sigmas))
    assert [(c["layer"], c["kind"]) for c in kandinsky.record] == [(0, "self"), (0, "cross"), (1, "self"),
                                                                  (1, "cross")]
    changed = 0.0
    for call in kandinsky.record:
        plain = cs.attention_chunked(call["q"], call["k"], call["v"], 2, skip_reshape=True)
        if call["kind"] == "self":
            assert torch.equal(call["out"], plain)
            continue
        changed = max(changed, assert_bent_on_positive_rows(call, plain, entries, step, explicit, columns))
    assert changed > 1e-3


def test_kandinsky_unbent_steps_and_zero_strength_sample_bit_identically(kandinsky, clip):
    positive, negative = conds()
    noise = latent()
    plain = cs.sample(cs.ModelPatcher(kandinsky), noise, positive, negative, steps=3)
    late = [{**ENTRY, "apply_to_timesteps": [5, 9]}, {**GAIN, "strength": 0.0}]
    assert torch.equal(cs.sample(patched(kandinsky, clip, late), noise, positive, negative, steps=3), plain)
    assert not torch.equal(cs.sample(patched(kandinsky, clip, [ENTRY, GAIN]), noise, positive, negative, steps=3),
                           plain)
