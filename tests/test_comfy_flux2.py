"""Attention Bending on Flux.2 in ComfyUI, driven through the stand-in host (comfy_standin_flux2: a real tiny
diffusers Flux2Transformer2DModel run as ComfyUI runs Flux; not in ComfyUI 0.3.64, the newest runnable here): Flux's
layout (double then single blocks, [text; image]) with the wired CLIP's Mistral 3 tokens, found in its chat
template; the explicit reference is test_comfy_joint's."""

import functools
import pytest
import torch

from _helpers import bending_node, translate_entry
import comfy_standin as cs
import comfy_standin_flux2 as cf
from ckptbend.runtime import comfy_host
from test_comfy_joint import check_calls

PROMPT = "a romantic kiss at {sunset}"
HEIGHT, WIDTH, TEXT = 8, 12, 10
ENTRY = translate_entry([1, 2])

pytestmark = pytest.mark.usefixtures("one_thread_no_grad", "comfy")     # conftest.py


@pytest.fixture
def flux2():
    return cf.Flux2Model(cf.tiny_flux2())


patched = functools.partial(bending_node, prompt=PROMPT)     # the node as ComfyUI runs it


def test_flux2_layout_and_mistral_words(flux2):
    clip = cf.MistralCLIP()
    layout = comfy_host.dit_layout(flux2.diffusion_model)
    assert (layout.kind, layout.text_key, len(layout.blocks)) == ("flux", None, 4)
    columns = comfy_host.token_columns(clip, PROMPT, ["sunset", "a"], layout.text_key)
    ids = [i for i, _ in clip.tokenize("a romantic kiss at sunset")["mistral3_24b"][0]]
    pieces = clip.tokenizer.convert_ids_to_tokens(ids)
    assert [pieces[j] for j in columns["sunset"]] == ["Ġsun", "set"]
    assert pieces[columns["a"][0] - 1] == "]"                   # the prompt's first word, right after [INST]


def test_flux2_bends_image_queries_against_the_words_text_keys(flux2):
    clip = cf.MistralCLIP()
    g = torch.Generator().manual_seed(1)
    n_text = len(clip.tokenize("a romantic kiss at sunset")["mistral3_24b"][0])
    cond, uncond = (torch.randn(1, n_text, 16, generator=g) for _ in range(2))
    latent = torch.randn(1, cf.LATENT_CHANNELS, HEIGHT, WIDTH, generator=torch.Generator().manual_seed(2))
    sigmas, step = flux2.schedule(3), 1
    flux2.record = []
    cs.calc_cond_batch(flux2, [cs.cond(cond), cs.cond(uncond)], latent, sigmas[step:step + 1],
                       patched(flux2, clip, [ENTRY]).sampling_options(sigmas))
    assert len(flux2.record) == 4
    columns = comfy_host.token_columns(clip, PROMPT, ["sunset"], None)
    assert check_calls(flux2.record, 2, [ENTRY], columns, n_text, (HEIGHT // 2, WIDTH // 2), step) > 1e-3
