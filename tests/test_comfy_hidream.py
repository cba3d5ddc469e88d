"""Attention Bending on HiDream in ComfyUI (comfy_host's optimized_attention_override path), driven through the
stand-in host (comfy_standin_hidream: ComfyUI 0.3.64's HiDream loop). Its loop has no "dit" block replaces, so the
node tells the blocks by the order of the model call's attention calls (one per block, double-stream then
single-stream). Every call is joint over [image; T5; Llama's last layer; Llama's layer for the block]: the image
queries of the positive rows are bent against the word's T5 keys and its Llama keys in both Llama parts."""

import functools
import pytest
import torch
from torch.testing import assert_close

from _helpers import bending_node, gain_entry, translate_entry
import comfy_standin as cs
import comfy_standin_hidream as ch
from ckptbend.runtime import bending, comfy_host

PROMPT = "a romantic kiss at {sunset}"
H, W = 3, 4                                    # token grid (latent 5 × 8 padded to 6 × 8, patch 2)
N_IMAGE, N_TEXT = H * W, ch.T5_TOKENS + 2 * ch.LLAMA_TOKENS
ENTRY = translate_entry([1])
GAIN = gain_entry(None, factor=4.0)

pytestmark = pytest.mark.usefixtures("one_thread_no_grad", "comfy")     # conftest.py


@pytest.fixture(scope="module")
def clip():
    return ch.HiDreamCLIP()


@pytest.fixture
def hidream():
    return ch.HiDreamModel()


def conds(seed=1):
    g = torch.Generator().manual_seed(seed)
    return [[{"c_crossattn": torch.randn(1, ch.T5_TOKENS, ch.T5_WIDTH, generator=g),
              "encoder_hidden_states_llama3": torch.randn(1, 4, ch.LLAMA_TOKENS, ch.LLAMA_WIDTH, generator=g)}]
            for _ in range(2)]


def latent(seed=2):
    return torch.randn(1, ch.CHANNELS, 2 * H - 1, 2 * W, generator=torch.Generator().manual_seed(seed))


patched = functools.partial(bending_node, prompt=PROMPT)     # the node as ComfyUI runs it


def explicit(call, rows, entries, columns, step):
    """The backend's output, except the image queries of the batch items `rows`: the explicit fp32 softmax with
    their image × text probabilities bent by bending.bend_probs, rows renormalised."""
    q, k, v = (t.float() for t in cs._heads_first(call["q"], call["k"], call["v"], ch.HEADS))
    out = cs.attention_chunked(call["q"], call["k"], call["v"], ch.HEADS).clone()
    probs = torch.softmax(q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5, dim=-1)[rows][:, :, :N_IMAGE]
    text = probs[..., N_IMAGE:].reshape(-1, N_IMAGE, N_TEXT)
    unrowed = [{**e, "renormalize": "none"} if e["renormalize"] == "row" else e for e in entries]
    probs[..., N_IMAGE:] = bending.bend_probs(text, columns, (H, W), unrowed, step, call["layer"]).view(
        len(rows), ch.HEADS, N_IMAGE, N_TEXT)
    if any(e["renormalize"] == "row" for e in entries):
        probs = probs / probs.sum(-1, keepdim=True)
    bent = (probs @ v[rows]).transpose(1, 2).flatten(2)
    for i, r in enumerate(rows):
        out[r, :N_IMAGE] = bent[i].to(out.dtype)
    return out


def test_layout_and_words(hidream, clip):
    layout = comfy_host.dit_layout(hidream.diffusion_model)
    assert (layout.kind, layout.text_key, layout.joint, layout.blocks) == ("hidream", ("t5xxl", "llama", "llama"),
                                                                           True, [])
    columns = comfy_host.token_columns(clip, PROMPT, ["sunset"], layout.text_key)["sunset"]
    tokens = clip.tokenize("a romantic kiss at sunset")
    t5 = [t for t, _ in tokens["t5xxl"][0]]
    llama = [t for t, _ in tokens["llama"][0]]
    keys = t5 + llama + llama                  # the text keys of every block: T5, then Llama twice
    assert clip.t5.tokenizer.convert_ids_to_tokens([keys[j] for j in columns if j < len(t5)]) == ["sunset"]
    pieces = clip.bpe.convert_ids_to_tokens([keys[j] for j in columns if j >= len(t5)])
    assert pieces == ["Ġsun", "set"] * 2 and max(columns) < N_TEXT


def test_hidream_bends_every_block_by_call_order(hidream, clip):
    sigmas, step = hidream.schedule(3), 1
    entries = [ENTRY, GAIN]
    columns = comfy_host.token_columns(clip, PROMPT, ["sunset", "kiss"], ("t5xxl", "llama", "llama"))
    hidream.record = []
    cs.calc_cond_batch(hidream, conds()[::-1], latent(), sigmas[step:step + 1],
                       patched(hidream, clip, entries).sampling_options(sigmas))
    assert [c["layer"] for c in hidream.record] == [0, 1, 2, 3]
    changed = 0.0
    for call in hidream.record:
        plain = cs.attention_chunked(call["q"], call["k"], call["v"], ch.HEADS)
        rows = comfy_host.common.chunk_rows(call["cond_or_uncond"], 0, 2)
        active = [e for e in entries if bending.entry_active(e, step, call["layer"])]
        assert_close(call["out"], explicit(call, rows, active, columns, step), rtol=1e-4, atol=1e-5)
        others = [r for r in range(2) if r not in rows]
        assert torch.equal(call["out"][others], plain[others])
        assert torch.equal(call["out"][:, N_IMAGE:], plain[:, N_IMAGE:])       # the text queries
        changed = max(changed, float((call["out"] - plain).abs().max()))
    assert changed > 1e-3


def test_hidream_unbent_steps_and_zero_strength_sample_bit_identically(hidream, clip):
    positive, negative = conds()
    noise = latent()
    plain = cs.sample(cs.ModelPatcher(hidream), noise, positive, negative, steps=3)
    late = [{**ENTRY, "apply_to_timesteps": [5, 9]}, {**GAIN, "strength": 0.0}]
    assert torch.equal(cs.sample(patched(hidream, clip, late), noise, positive, negative, steps=3), plain)
    assert not torch.equal(cs.sample(patched(hidream, clip, [ENTRY, GAIN]), noise, positive, negative, steps=3),
                           plain)


def test_hidream_e1_edit_is_refused(hidream, clip):
    cond = [[{**c, "image_cond": torch.zeros(1, ch.CHANNELS, 2 * H, 2 * W)} for c in cs_] for cs_ in conds()]
    sigmas = hidream.schedule(2)
    with pytest.raises(ValueError, match="HiDream E1's edit image sits beside the target"):
        cs.calc_cond_batch(hidream, cond, latent(), sigmas[:1],
                           patched(hidream, clip, [ENTRY]).sampling_options(sigmas))
