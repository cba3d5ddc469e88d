"""Attention Bending on Cosmos Predict2 in ComfyUI (comfy_host's optimized_attention_override path), driven through
the stand-in host (comfy_standin_cosmos: ComfyUI 0.3.64's predict2 loop). Its loop has no "dit" block replaces, so
the node tells the blocks by the order of the model call's attention calls (two per block): call 1 of each block,
the cross-attention to the T5 context, is bent (video queries against the word's T5 keys, from 0: T5 has no start
token); the self-attentions are the backend's output."""

import functools
import pytest
import torch

from _comfy_cross_calls import explicit_cross
from _helpers import assert_bent_on_positive_rows, bending_node, gain_entry, translate_entry
import comfy_standin as cs
import comfy_standin_cosmos as cc
from _pipelines import t5_like_tokenizer
from ckptbend.runtime import comfy_host

PROMPT = "a romantic kiss at {sunset}"
F_, H, W, TEXT = 2, 3, 4, 10                   # token grid (latent 2 × 6 × 8, patch 1 × 2 × 2); T5 tokens
N_VIDEO = F_ * H * W
ENTRY = translate_entry([1])
GAIN = gain_entry(None, factor=4.0)

pytestmark = pytest.mark.usefixtures("one_thread_no_grad", "comfy")     # conftest.py


@pytest.fixture(scope="module")
def clip():
    return cs.T5CLIP(t5_like_tokenizer(), key="t5xxl", min_length=TEXT)


@pytest.fixture
def cosmos():
    return cc.CosmosModel()


def conds(seed=1):
    g = torch.Generator().manual_seed(seed)
    return [[{"c_crossattn": torch.randn(1, TEXT, cc.T5_WIDTH, generator=g)}] for _ in range(2)]


def latent(seed=2):
    return torch.randn(1, cc.CHANNELS, F_, 2 * H, 2 * W, generator=torch.Generator().manual_seed(seed))


patched = functools.partial(bending_node, prompt=PROMPT)     # the node as ComfyUI runs it


def explicit(call, rows, entries, columns, step):
    """The backend's output, except the batch items `rows`: the explicit fp32 softmax with the video × text
    probabilities bent by bending.bend_probs, rows renormalised."""
    return explicit_cross(call, rows, entries, columns, step, (H, W), cc.HEADS, frames=F_)


def test_layout_and_words(cosmos, clip):
    layout = comfy_host.dit_layout(cosmos.diffusion_model)
    assert (layout.kind, layout.text_key, layout.text_call, layout.joint, layout.patch) == ("cosmos", "t5xxl", 1,
                                                                                           False, (1, 2, 2))
    ids = [t for t, _ in clip.tokenize("a romantic kiss at sunset")["t5xxl"][0]]
    columns = comfy_host.token_columns(clip, PROMPT, ["sunset"], layout.text_key)["sunset"]
    assert clip.tokenizer.convert_ids_to_tokens([ids[j] for j in columns]) == ["sunset"]


def test_cosmos_bends_the_cross_attention_of_each_block_by_call_order(cosmos, clip):
    sigmas, step = cosmos.schedule(3), 1
    entries = [ENTRY, GAIN]
    columns = comfy_host.token_columns(clip, PROMPT, ["sunset", "kiss"], "t5xxl")
    cosmos.record = []
    cs.calc_cond_batch(cosmos, conds()[::-1], latent(), sigmas[step:step + 1],
                       patched(cosmos, clip, entries).sampling_options(sigmas))
    assert [(c["layer"], c["kind"]) for c in cosmos.record] == [(0, "self"), (0, "cross"), (1, "self"), (1, "cross")]
    changed = 0.0
    for call in cosmos.record:
        plain = cs.attention_chunked(call["q"], call["k"], call["v"], cc.HEADS, skip_reshape=True)
        if call["kind"] == "self":
            assert torch.equal(call["out"], plain)
            continue
        changed = max(changed, assert_bent_on_positive_rows(call, plain, entries, step, explicit, columns))
    assert changed > 1e-3


def test_cosmos_unbent_steps_and_zero_strength_sample_bit_identically(cosmos, clip):
    positive, negative = conds()
    noise = latent()
    plain = cs.sample(cs.ModelPatcher(cosmos), noise, positive, negative, steps=3)
    late = [{**ENTRY, "apply_to_timesteps": [5, 9]}, {**GAIN, "strength": 0.0}]
    assert torch.equal(cs.sample(patched(cosmos, clip, late), noise, positive, negative, steps=3), plain)
    assert not torch.equal(cs.sample(patched(cosmos, clip, [ENTRY, GAIN]), noise, positive, negative, steps=3), plain)


def test_a_call_out_of_its_place_is_refused():
    """Blocks are told by call order: a call where the block's cross-attention should be that has the shape of a
    self-attention (another node adding or skipping calls) stops sampling instead of bending the wrong call."""
    from ckptbend.runtime.comfy_host import counted

    call = {"grid": (1, 2, 3), "text": 10, "calls": [1]}
    with pytest.raises(ValueError, match="not its block's text attention"):
        counted.layer_of("cosmos", 1, call, 6, 6)
    assert counted.layer_of("cosmos", 1, {**call, "calls": [3]}, 6, 10) == 1
