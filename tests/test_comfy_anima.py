"""Attention Bending on Anima in ComfyUI, driven through the stand-in host (comfy_standin_anima: the newest readable
ComfyUI source's Anima, Cosmos Predict2's MiniTrainDIT behind an LLM adapter). The node reaches it as Cosmos
Predict2 (told by its blocks, patch_spatial and t_embedding_norm; the adapter runs in extra_conds, before the
model call, or in training mode inside it): call 1 of each block, the cross-attention to the adapter's 512 rows, is
bent. Row j is the prompt's
T5 token j (the adapter maps T5 ids, attending to the Qwen3 states; the rest is zero padding), so the word's
columns are its T5 tokens, read from the tokenizer's "t5xxl" key, not its Qwen3 tokens."""

import functools
import pytest
import torch
from torch.testing import assert_close

from _comfy_cross_calls import explicit_cross
from _helpers import bending_node, gain_entry, translate_entry
import comfy_standin as cs
import comfy_standin_anima as ca
import comfy_standin_cosmos as cc
from ckptbend.runtime import bending, comfy_host

PROMPT, NEGATIVE = "a romantic (kiss:1.5) at {sunset}", "a red sky"
F_, H, W = 1, 3, 4                             # token grid (latent 1 × 6 × 8, patch 1 × 2 × 2)
N_VIDEO = F_ * H * W
ENTRY = translate_entry([1])
GAIN = gain_entry(None, factor=4.0)

pytestmark = pytest.mark.usefixtures("one_thread_no_grad", "comfy")     # conftest.py


@pytest.fixture(scope="module")
def clip():
    return ca.AnimaCLIP()


@pytest.fixture(scope="module")
def anima():
    return ca.AnimaModel()


@pytest.fixture(scope="module")
def conds(anima, clip):
    return clip.conditioning(anima, PROMPT.replace("{", "").replace("}", "")), clip.conditioning(anima, NEGATIVE)


def latent(seed=2):
    return torch.randn(1, cc.CHANNELS, F_, 2 * H, 2 * W, generator=torch.Generator().manual_seed(seed))


patched = functools.partial(bending_node, prompt=PROMPT)     # the node as ComfyUI runs it


def test_the_words_columns_are_its_t5_tokens_the_rows_of_the_adapter(anima, clip, conds):
    layout = comfy_host.dit_layout(anima.diffusion_model)
    assert (layout.kind, layout.text_key, layout.text_call, layout.joint) == ("cosmos", "t5xxl", 1, False)
    columns = comfy_host.token_columns(clip, PROMPT, ["sunset", "kiss"], layout.text_key)
    tokens = clip.tokenize("a romantic (kiss:1.5) at sunset")
    t5 = [t for t, _ in tokens["t5xxl"][0]]
    assert clip.t5.tokenizer.convert_ids_to_tokens([t5[j] for j in columns["sunset"] + columns["kiss"]]) == [
        "sunset", "kiss"]
    context = conds[0][0]["c_crossattn"]
    assert context.shape == (1, ca.PADDED, cc.T5_WIDTH)
    assert context[0, :len(t5)].abs().sum(-1).min() > 0 and not context[0, len(t5):].any()   # T5 rows, then zeros
    # Among the Qwen3 tokens the word sits elsewhere (two pieces, after the "Ġ" that "(kiss:1.5)" splits off): the
    # rows the DiT attends to are not those.
    qwen = clip.bpe.convert_ids_to_tokens([t for t, _ in tokens["qwen3_06b"][0]])
    assert qwen.index("Ġsun") != columns["sunset"][0] and qwen[qwen.index("Ġsun") + 1] == "set"


def explicit(call, rows, entries, columns, step):
    """The backend's output, except the batch items `rows`: the explicit fp32 softmax over the 512 keys with the
    video × key probabilities bent by bending.bend_probs, rows renormalised."""
    return explicit_cross(call, rows, entries, columns, step, (H, W), cc.HEADS)


@pytest.mark.parametrize("inference", [True, False], ids=["adapter-in-extra-conds", "adapter-in-the-model"])
def test_anima_bends_each_blocks_cross_attention_at_the_t5_rows(anima, clip, inference):
    """ComfyUI samples under inference mode (the adapter's rows are the context; both prompts in one batch); in
    training mode the model call runs the adapter itself (its Qwen states are the context; the prompts' T5 lengths
    differ, so each is its own call): the same rows are bent."""
    sigmas, step = anima.schedule(3), 1
    entries = [ENTRY, GAIN]
    columns = comfy_host.token_columns(clip, PROMPT, ["sunset", "kiss"], "t5xxl")
    conds = [clip.conditioning(anima, text, inference) for text in (PROMPT.replace("{", "").replace("}", ""), NEGATIVE)]
    anima.record = []
    try:
        cs.calc_cond_batch(anima, conds, latent(), sigmas[step:step + 1],
                           patched(anima, clip, entries).sampling_options(sigmas))
        record = anima.record
    finally:
        anima.record = None
    kinds = [(c["layer"], c["kind"]) for c in record]
    assert kinds == [(0, "self"), (0, "cross"), (1, "self"), (1, "cross")] * (1 if inference else 2)
    changed, seen = 0.0, set()
    for call in record:
        plain = cs.attention_chunked(call["q"], call["k"], call["v"], cc.HEADS, skip_reshape=True)
        if call["kind"] == "self":
            assert torch.equal(call["out"], plain)
            continue
        assert call["k"].shape[2] == ca.PADDED
        n = call["q"].shape[0]
        rows = comfy_host.common.chunk_rows(call["cond_or_uncond"], 0, n)
        active = [e for e in entries if bending.entry_active(e, step, call["layer"])]
        if rows:
            assert_close(call["out"], explicit(call, rows, active, columns, step), rtol=1e-4, atol=1e-5)
        others = [r for r in range(n) if r not in rows]
        assert torch.equal(call["out"][others], plain[others])                          # the negative: its own
        seen.update(("cond" if r in rows else "uncond") for r in range(n))
        changed = max(changed, float((call["out"] - plain).abs().max()))
    assert seen == {"cond", "uncond"} and changed > 1e-3


def test_anima_unbent_steps_and_zero_strength_sample_bit_identically(anima, clip, conds):
    positive, negative = conds
    noise = latent()
    plain = cs.sample(cs.ModelPatcher(anima), noise, positive, negative, steps=3)
    late = [{**ENTRY, "apply_to_timesteps": [5, 9]}, {**GAIN, "strength": 0.0}]
    assert torch.equal(cs.sample(patched(anima, clip, late), noise, positive, negative, steps=3), plain)
    assert not torch.equal(cs.sample(patched(anima, clip, [ENTRY, GAIN]), noise, positive, negative, steps=3), plain)
