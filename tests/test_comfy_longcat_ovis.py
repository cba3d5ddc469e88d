"""Attention Bending on LongCat-Image and Ovis-Image in ComfyUI: ComfyUI runs both as Flux, so the node bends them as
Flux.1 (double then single blocks, joint [text; image]), with the words found among the Qwen tokens their encoders keep
from a padded template (comfy_standin_longcat_ovis); every bent call equals the explicit bent softmax
(test_comfy_joint.check_calls), the negative prediction, strength 0 and steps outside the window are bit-identical.
Flux.2 Klein's Qwen3 template, padded to 512 by ComfyUI, has its words found too."""

import functools

import pytest
import torch

from _helpers import bending_node, gain_entry, translate_entry
import comfy_standin as cs
import comfy_standin_joint as cj
import comfy_standin_longcat_ovis as clo
from ckptbend.runtime import comfy_host
from test_comfy_joint import HEIGHT, WIDTH, check_calls, latent

PROMPT = "a romantic kiss at {sunset}"
ENTRY = translate_entry([1, 2])
GAIN = gain_entry([3])

pytestmark = pytest.mark.usefixtures("one_thread_no_grad", "comfy")     # conftest.py


@pytest.fixture(scope="module", params=["longcat", "ovis"])
def family(request):
    return request.param, clo.LongCatCLIP() if request.param == "longcat" else clo.OvisCLIP()


def flux_as(kind):
    """The stand-in's Flux with the attributes ComfyUI's Flux class has for LongCat (vector_in None) or Ovis (also
    txt_norm)."""
    model = cj.FluxModel(cj.tiny_flux())
    model.diffusion_model.vector_in = None
    if kind == "ovis":
        model.diffusion_model.txt_norm = torch.nn.Identity()
    return model


def text_length(clip):
    ids = [i for i, _ in clip.tokenize(PROMPT.replace("{", "").replace("}", ""))[clip.key][0]]
    return clo.PAD_TO if clip.key == "qwen25_7b" else len(ids) - ids.index(clo.OVIS_CUT) - 1


def contexts(n_text, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(1, n_text, 32, generator=g) for _ in range(2)]


patched = functools.partial(bending_node, prompt=PROMPT)     # the node as ComfyUI runs it


def test_words_are_found_among_the_kept_padded_tokens(family):
    kind, clip = family
    layout = comfy_host.dit_layout(flux_as(kind).diffusion_model)
    assert layout.text_key == {"longcat": "qwen25_7b:longcat", "ovis": "qwen3_2b:ovis"}[kind]
    columns = comfy_host.token_columns(clip, PROMPT, ["sunset", "a", "kiss"], layout.text_key)
    ids = [i for i, _ in clip.tokenize("a romantic kiss at sunset")[clip.key][0]]
    kept = ids[ids.index(151644, 1) + 3:] if kind == "longcat" else ids[ids.index(clo.OVIS_CUT) + 1:]
    words = clip.tokenizer.convert_ids_to_tokens(kept)
    assert [words[j] for j in columns["sunset"]] == ["Ġsun", "set"]
    assert words[columns["kiss"][0]] == "Ġkiss" and columns["a"] == ([0] if kind == "longcat" else [1])
    assert words[0] == ("a" if kind == "longcat" else ":")


def test_bent_calls_are_the_explicit_bent_softmax(family):
    kind, clip = family
    model, n_text = flux_as(kind), text_length(clip)
    cond, uncond = contexts(n_text)
    sigmas, step = model.schedule(3), 1
    entries = [ENTRY, GAIN]
    columns = comfy_host.token_columns(clip, PROMPT, ["sunset", "kiss"], comfy_host.dit_layout(
        model.diffusion_model).text_key)
    model.record = []
    cs.calc_cond_batch(model, [cs.cond(cond), cs.cond(uncond)], latent(), sigmas[step:step + 1],
                       patched(model, clip, entries).sampling_options(sigmas))
    assert len(model.record) == 4
    assert check_calls(model.record, 2, entries, columns, n_text, (HEIGHT // 2, WIDTH // 2), step) > 1e-3


def test_unbent_steps_and_zero_strength_sample_bit_identically(family):
    kind, clip = family
    model = flux_as(kind)
    cond, uncond = contexts(text_length(clip))
    noise = latent()
    plain = cs.sample(cs.ModelPatcher(model), noise, cond, uncond, steps=3)
    late = [{**ENTRY, "apply_to_timesteps": [5, 9]}, {**GAIN, "apply_to_timesteps": [3, 3]}]
    assert torch.equal(cs.sample(patched(model, clip, late), noise, cond, uncond, steps=3), plain)
    zero = patched(model, clip, [ENTRY], bend1_strength=0.0)
    assert "optimized_attention_override" not in zero.model_options["transformer_options"]
    assert not torch.equal(cs.sample(patched(model, clip, [ENTRY, GAIN]), noise, cond, uncond, steps=3), plain)


def test_klein_words_are_found_in_its_padded_template():
    """ComfyUI pads Flux.2 Klein's Qwen3 template to 512 tokens: a word's spelling ends before the padding."""
    clip = clo.KleinCLIP()
    columns = comfy_host.token_columns(clip, PROMPT, ["sunset", "kiss", "a"], None)   # Flux.2: the CLIP's only key
    ids = [i for i, _ in clip.tokenize("a romantic kiss at sunset")["qwen3_4b"][0]]
    words = clip.tokenizer.convert_ids_to_tokens(ids)
    assert len(ids) == clo.KLEIN_LENGTH and words[:3] == ["<|im_start|>", "user", "Ċ"]
    assert [words[j] for j in columns["sunset"]] == ["Ġsun", "set"]
    assert [words[j] for j in columns["kiss"]] == ["Ġkiss"] and columns["a"] == [3]
