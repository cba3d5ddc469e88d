"""Attention Bending on NextDiT (Lumina 2, Z-Image) in a ComfyUI whose loop writes no transformer_options
["block_index"] nor ["block_type"]: ComfyUI 0.3.64's `for layer in self.layers` (the stand-in's block_index=False).
The node tells a main layer by its place among the model call's attention calls, past the refiners' calls, and
bends it as on a newer ComfyUI; the refiners' calls, other layers, negative rows and unbent steps stay the
backend's bit for bit. bin/check-comfyui's `lumina2` runs the same on 0.3.64's own NextDiT."""

import pytest
import torch
from torch.testing import assert_close

import comfy_standin as cs
import comfy_standin_nextdit as cn
from test_comfy_nextdit import ENTRY, GAIN, N_TEXT, PROMPT, GemmaCLIP, ZImageCLIP, explicit, latent, patched
from ckptbend.runtime import bending, comfy_host
from ckptbend.runtime.comfy_host import nextdit

pytestmark = pytest.mark.usefixtures("one_thread_no_grad", "comfy")     # conftest.py


def lumina2():
    return cn.ZImageModel(cn.tiny_zimage(), multiple=None, block_index=False), GemmaCLIP(), "gemma2_2b"


def zimage():
    return cn.ZImageModel(cn.tiny_zimage(), block_index=False), ZImageCLIP(), "qwen3_4b"


@pytest.mark.parametrize("build", [lumina2, zimage], ids=["lumina2", "zimage"])
def test_main_layers_are_counted_without_block_index(build):
    """Layer 1 bends "sunset", both layers "kiss" (Z-Image) or "sunset" at layer 1 alone (Lumina 2): each main call
    equals the explicit bent softmax on the positive rows' image queries; the refiners' calls are untouched."""
    model, clip, key = build()
    entries = [ENTRY, GAIN] if key == "qwen3_4b" else [ENTRY]
    words = [e["token"] for e in entries]
    columns = comfy_host.token_columns(clip, PROMPT, words, key)
    n_text = len(clip.tokenize(PROMPT)[key][0]) if key == "gemma2_2b" else N_TEXT     # Z-Image: 10 padded to 32
    g = torch.Generator().manual_seed(1)
    cond, uncond = (torch.randn(1, n_text if key == "gemma2_2b" else 10, 16, generator=g) for _ in range(2))
    sigmas, step = model.schedule(3), 1
    model.record = []
    cs.calc_cond_batch(model, [cs.cond(cond), cs.cond(uncond)], latent(), sigmas[step:step + 1],
                       patched(model, clip, entries).sampling_options(sigmas))
    assert [c["layer"] for c in model.record] == ["noise_refiner", "context_refiner", 0, 1]
    bent = 0
    for call in model.record:
        plain = cs.attention_chunked(call["q"], call["k"], call["v"], 2, skip_reshape=True)
        active = [] if isinstance(call["layer"], str) else [
            e for e in entries if bending.entry_active(e, step, call["layer"])]
        if not active:
            assert torch.equal(call["out"], plain), call["layer"]
            continue
        rows = comfy_host.common.chunk_rows(call["cond_or_uncond"], 0, 2)
        assert_close(call["out"], explicit(call, rows, active, columns, step, n_text), rtol=1e-4, atol=1e-5)
        others = [r for r in range(2) if r not in rows]
        assert torch.equal(call["out"][others], plain[others]) and torch.equal(call["out"][:, :n_text],
                                                                               plain[:, :n_text])
        assert (call["out"] - plain).abs().max() > 1e-4
        bent += 1
    assert bent == (2 if key == "qwen3_4b" else 1)


def test_unbent_steps_and_zero_strength_sample_bit_identically():
    model, clip, _ = zimage()
    g = torch.Generator().manual_seed(1)
    cond, uncond = (torch.randn(1, 10, 16, generator=g) for _ in range(2))
    noise = latent()
    plain = cs.sample(cs.ModelPatcher(model), noise, cond, uncond, steps=3)
    late = [{**ENTRY, "apply_to_timesteps": [5, 9]}, {**GAIN, "apply_to_timesteps": [3, 3]}]
    assert torch.equal(cs.sample(patched(model, clip, late), noise, cond, uncond, steps=3), plain)
    assert torch.equal(cs.sample(patched(model, clip, [ENTRY], bend1_strength=0.0), noise, cond, uncond, steps=3),
                       plain)
    assert not torch.equal(cs.sample(patched(model, clip, [ENTRY, GAIN]), noise, cond, uncond, steps=3), plain)


def test_lumina2_text_is_the_tokens_the_model_keeps():
    """ComfyUI's NextDiT keeps num_tokens context tokens, or under an attention mask each row's kept count; rows of
    one model call keeping different counts have no one text slice: refused in one line."""
    context = torch.zeros(2, 12, 16)
    assert nextdit.text_length(context, {"num_tokens": 9}) == 9
    assert nextdit.text_length(context, {}) == 12
    mask = (torch.arange(12) < 7).long().expand(2, -1)
    assert nextdit.text_length(context, {"attention_mask": mask, "num_tokens": 7}) == 7
    with pytest.raises(ValueError, match=r"^Attention Bending on Lumina 2: [^\n]*differ by row$"):
        nextdit.text_length(context, {"attention_mask": torch.stack([mask[0], torch.ones(12, dtype=torch.long)])})
