"""Attention Bending on Qwen-Image 2.x in ComfyUI (comfy_host's optimized_attention_override path), driven through
the stand-in host's Qwen-Image 2.x (comfy_standin_qwen21: a real tiny diffusers QwenImage21Transformer2DModel run as
the newest ComfyUI source runs it; ComfyUI 0.3.64, the newest runnable here, has no Qwen-Image 2.x). The node tells a
block by transformer_options["block_index"], leaves the text's causal calls alone and bends the target image's
queries against the word's keys; the words are found past the system turn its encoder drops."""

import functools
import pytest
import torch

from _helpers import assert_bent_on_positive_rows, bending_node, gain_entry, translate_entry
import comfy_standin as cs
import comfy_standin_qwen21 as cq21
from ckptbend.runtime import bending, comfy_host

PROMPT = "a romantic kiss at {sunset}"
HEIGHT, WIDTH, TEXT = 4, 6, 9
ENTRY = translate_entry([1])
GAIN = gain_entry(None)

pytestmark = pytest.mark.usefixtures("one_thread_no_grad", "comfy")     # conftest.py


@pytest.fixture(scope="module")
def clip():
    return cq21.Qwen21CLIP()


@pytest.fixture
def qwen21():
    return cq21.Qwen21Model(cq21.tiny_qwen21())


def contexts(n=2, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(1, TEXT, 16, generator=g) for _ in range(n)]


def latent(seed=2):
    return torch.randn(1, 8, HEIGHT, WIDTH, generator=torch.Generator().manual_seed(seed))


patched = functools.partial(bending_node, prompt=PROMPT)     # the node as ComfyUI runs it


def test_words_are_found_past_the_system_turn(clip):
    layout = comfy_host.dit_layout(cq21.Qwen21Model(cq21.tiny_qwen21()).diffusion_model)
    assert (layout.kind, layout.text_key, layout.patch) == ("qwen21", "qwen3vl_8b", (1, 1, 1))
    columns = comfy_host.token_columns(clip, PROMPT, ["sunset", "a"], layout.text_key)
    ids = [i for i, _ in clip.tokenize("a romantic kiss at sunset")["qwen3vl_8b"][0]]
    kept = clip.tokenizer.convert_ids_to_tokens(ids[[i for i, t in enumerate(ids) if t == 151644][1]:])
    assert kept[:3] == ["<|im_start|>", "user", "Ċ"]
    assert [kept[j] for j in columns["sunset"]] == ["Ġsun", "set"] and columns["a"] == [3]


def explicit(call, rows, entries, columns, step):
    """The backend's output, except the batch items `rows`, whose target-image queries come from the explicit fp32
    softmax with the text block bent by bending.bend_probs and each row renormalised over all keys."""
    q, k, v = cs._heads_first(*(call[n].float() for n in ("q", "k", "v")), 2)
    out = cs.attention_chunked(call["q"], call["k"], call["v"], 2).clone()
    probs = torch.softmax(q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5, dim=-1)[rows]
    n_image = HEIGHT * WIDTH
    unrowed = [{**e, "renormalize": "none"} if e["renormalize"] == "row" else e for e in entries]
    probs[..., :TEXT] = bending.bend_probs(probs[..., :TEXT].reshape(-1, n_image, TEXT), columns, (HEIGHT, WIDTH),
                                           unrowed, step, call["layer"]).view(len(rows), 2, n_image, TEXT)
    if any(e["renormalize"] == "row" for e in entries):
        probs /= probs.sum(-1, keepdim=True)
    bent = (probs @ v[rows]).transpose(1, 2).flatten(2)
    out[rows] = bent.to(out.dtype)
    return out


def test_qwen21_bends_the_target_image_queries_only(qwen21, clip):
    cond, uncond = contexts()
    sigmas, step = qwen21.schedule(3), 1
    entries = [ENTRY, GAIN]
    columns = comfy_host.token_columns(clip, PROMPT, ["sunset", "kiss"], "qwen3vl_8b")
    qwen21.record = []
    cs.calc_cond_batch(qwen21, [cs.cond(cond), cs.cond(uncond)], latent(), sigmas[step:step + 1],
                       patched(qwen21, clip, entries).sampling_options(sigmas))
    assert [c["layer"] for c in qwen21.record] == [0, 1]
    changed = 0.0
    for call in qwen21.record:
        plain = cs.attention_chunked(call["q"], call["k"], call["v"], 2)
        changed = max(changed, assert_bent_on_positive_rows(call, plain, entries, step, explicit, columns))
    assert changed > 1e-3


def test_qwen21_unbent_steps_and_zero_strength_sample_bit_identically(qwen21, clip):
    cond, uncond = contexts()
    noise = latent()
    plain = cs.sample(cs.ModelPatcher(qwen21), noise, cond, uncond, steps=3)
    late = [{**ENTRY, "apply_to_timesteps": [5, 9]}, {**GAIN, "apply_to_timesteps": [3, 3]}]
    assert torch.equal(cs.sample(patched(qwen21, clip, late), noise, cond, uncond, steps=3), plain)
    zero = patched(qwen21, clip, [ENTRY], bend1_strength=0.0)
    assert "optimized_attention_override" not in zero.model_options["transformer_options"]
    assert not torch.equal(cs.sample(patched(qwen21, clip, [ENTRY, GAIN]), noise, cond, uncond, steps=3), plain)
