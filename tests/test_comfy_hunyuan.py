"""Attention Bending on HunyuanVideo 1.5 in ComfyUI (comfy_host's optimized_attention_override path), driven through
the stand-in host (comfy_standin_hunyuan: a real tiny diffusers HunyuanVideo15Transformer3DModel run as ComfyUI's
hunyuan_video model runs it; not in ComfyUI 0.3.64, the newest runnable here). The joint tokens are [video; prompt;
glyphs]: the node bends the video queries against the word's prompt keys, under the prompt's key mask; the words are
found as Qwen-Image's (the same Qwen2.5-VL template rule)."""

import functools
import pytest
import torch
from torch.testing import assert_close

from _helpers import bending_node, gain_entry, translate_entry
import comfy_standin as cs
import comfy_standin_hunyuan as ch
import comfy_standin_qwen as cq
from ckptbend.runtime import bending, comfy_host

PROMPT = "a romantic kiss at {sunset}"
F_, H, W, TEXT, GLYPHS = 2, 3, 4, 9, 3
N_VIDEO = F_ * H * W
ENTRY = translate_entry([1])
GAIN = gain_entry(None)

pytestmark = pytest.mark.usefixtures("one_thread_no_grad", "comfy")     # conftest.py


@pytest.fixture(scope="module")
def clip():
    return cq.QwenCLIP()


@pytest.fixture
def hunyuan():
    glyphs = torch.randn(1, GLYPHS, 8, generator=torch.Generator().manual_seed(7))
    return ch.HunyuanModel(ch.tiny_hunyuan15(), glyphs=glyphs)


def conds(seed=1):
    """Positive and negative conditionings, each with its prompt mask (the last prompt token padded)."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.tensor([[1.0] * (TEXT - 1) + [0.0]])
    return [[{"c_crossattn": torch.randn(1, TEXT, 16, generator=g), "attention_mask": mask}] for _ in range(2)]


def latent(seed=2):
    return torch.randn(1, 4, F_, H, W, generator=torch.Generator().manual_seed(seed))


patched = functools.partial(bending_node, prompt=PROMPT)     # the node as ComfyUI runs it


def explicit(call, rows, entries, columns, step):
    """The backend's output, except the video queries of the batch items `rows`: the explicit fp32 softmax (the
    key mask added) with the video × prompt block bent by bending.bend_probs, rows renormalised over all keys."""
    q, k, v = (call[n].float() for n in ("q", "k", "v"))
    out = cs.attention_chunked(call["q"], call["k"], call["v"], 2, mask=call["mask"], skip_reshape=True).clone()
    logits = q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5 + call["mask"].float()[:, None]
    probs = torch.softmax(logits, dim=-1)[rows]
    text = slice(N_VIDEO, N_VIDEO + TEXT)
    unrowed = [{**e, "renormalize": "none"} if e["renormalize"] == "row" else e for e in entries]
    probs[:, :, :N_VIDEO, text] = bending.bend_probs(probs[:, :, :N_VIDEO, text].reshape(-1, N_VIDEO, TEXT), columns,
                                                     (H, W), unrowed, step, call["layer"], frames=F_
                                                     ).view(len(rows), 2, N_VIDEO, TEXT)
    if any(e["renormalize"] == "row" for e in entries):
        probs[:, :, :N_VIDEO] /= probs[:, :, :N_VIDEO].sum(-1, keepdim=True)
    bent = (probs[:, :, :N_VIDEO] @ v[rows]).transpose(1, 2).flatten(2)
    for i, r in enumerate(rows):
        out[r, :N_VIDEO] = bent[i].to(out.dtype)
    return out


def test_layout_and_words(hunyuan, clip):
    layout = comfy_host.dit_layout(hunyuan.diffusion_model)
    assert (layout.kind, layout.text_key, layout.text_call) == ("hunyuan", "qwen25_7b", 0)
    assert [b[:2] for b in layout.blocks] == [("double_block", 0), ("double_block", 1)]
    kept = cq.encoder_columns(clip, "a romantic kiss at sunset")
    columns = comfy_host.token_columns(clip, PROMPT, ["sunset"], layout.text_key)
    assert clip.tokenizer.convert_ids_to_tokens([kept[j] for j in columns["sunset"]]) == ["Ġsun", "set"]


def test_hunyuan_bends_the_video_queries_against_the_prompt_keys(hunyuan, clip):
    sigmas, step = hunyuan.schedule(3), 1
    entries = [ENTRY, GAIN]
    columns = comfy_host.token_columns(clip, PROMPT, ["sunset", "kiss"], "qwen25_7b")
    hunyuan.record = []
    cs.calc_cond_batch(hunyuan, conds()[::-1], latent(), sigmas[step:step + 1],
                       patched(hunyuan, clip, entries).sampling_options(sigmas))
    assert [c["layer"] for c in hunyuan.record] == [0, 1]
    changed = 0.0
    for call in hunyuan.record:
        assert call["k"].shape[2] == N_VIDEO + TEXT + GLYPHS
        plain = cs.attention_chunked(call["q"], call["k"], call["v"], 2, mask=call["mask"], skip_reshape=True)
        rows = comfy_host.common.chunk_rows(call["cond_or_uncond"], 0, 2)
        active = [e for e in entries if bending.entry_active(e, step, call["layer"])]
        # "kiss" × 40, column-renormalised: float32 rounding of two orders of summation shows at 4e-5
        assert_close(call["out"], explicit(call, rows, active, columns, step), rtol=1e-4, atol=1e-4)
        others = [r for r in range(2) if r not in rows]
        assert torch.equal(call["out"][others], plain[others])
        assert torch.equal(call["out"][:, N_VIDEO:], plain[:, N_VIDEO:])          # text queries
        changed = max(changed, float((call["out"] - plain).abs().max()))
    assert changed > 1e-3


def test_hunyuan_unbent_steps_and_zero_strength_sample_bit_identically(hunyuan, clip):
    positive, negative = conds()
    noise = latent()
    plain = cs.sample(cs.ModelPatcher(hunyuan), noise, positive, negative, steps=3)
    late = [{**ENTRY, "apply_to_timesteps": [5, 9]}, {**GAIN, "apply_to_timesteps": [3, 3]}]
    assert torch.equal(cs.sample(patched(hunyuan, clip, late), noise, positive, negative, steps=3), plain)
    assert not torch.equal(cs.sample(patched(hunyuan, clip, [ENTRY, GAIN]), noise, positive, negative, steps=3), plain)
