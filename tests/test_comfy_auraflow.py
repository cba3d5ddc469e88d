"""Attention Bending on AuraFlow in ComfyUI (comfy_host's optimized_attention_override path), driven through the
stand-in host (comfy_standin_auraflow: a real tiny diffusers AuraFlowTransformer2DModel run as ComfyUI 0.3.64's
comfy/ldm/aura MMDiT runs it). Every double and single layer's joint attention over [8 register tokens; Pile-T5
tokens; image] is bent at its image queries against the word's keys (counted after the registers, the words found
with a SentencePiece tokenizer as Pile-T5's); the register and text queries, the negative rows, strength 0 and steps
outside the window are the backend's output bit for bit. bin/check-comfyui auraflow runs the same on the real
ComfyUI with its own Pile-T5 tokenizer."""

import functools
import pytest
import torch
from torch.testing import assert_close

from _comfy_joint_calls import check_calls
from _helpers import bending_node, gain_entry, translate_entry
from _pipelines import t5_sentencepiece_tokenizer
import comfy_standin as cs
import comfy_standin_auraflow as ca
from ckptbend.runtime import comfy_host

PROMPT = "a romantic kiss at {sunset}"
H, W, TEXT, REGISTERS = 4, 4, 20, 8          # token grid (latent 8 × 8, patch 2); Pile-T5 tokens (padded)
N_IMAGE = H * W
ENTRY, GAIN = translate_entry([1, 3]), gain_entry([0], factor=4.0)

pytestmark = pytest.mark.usefixtures("one_thread_no_grad", "comfy")     # conftest.py


@pytest.fixture(scope="module")
def clip():
    return cs.T5CLIP(t5_sentencepiece_tokenizer(), key="pile_t5xl", min_length=TEXT)


@pytest.fixture
def aura():
    return ca.AuraFlowModel(ca.tiny_auraflow())


def conds(seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(1, TEXT, 24, generator=g) for _ in range(2)]


def latent(seed=2):
    return torch.randn(1, 4, 2 * H, 2 * W, generator=torch.Generator().manual_seed(seed))


patched = functools.partial(bending_node, prompt=PROMPT)     # the node as ComfyUI runs it


def test_stand_in_auraflow_runs_the_diffusers_model_as_comfyui_does(aura, monkeypatch):
    """With PyTorch's SDPA as the backend the stand-in equals diffusers' own forward; every call is joint over
    [registers; text; image] ([B, heads, L, d], skip_reshape)."""
    cs.install_comfy(monkeypatch, cs.Backend(cs.attention_sdpa))
    cond, x, sigma = conds()[0], latent(), torch.tensor([0.7])
    got = aura.apply_model(x, sigma, cond, {"wrappers": {}})
    expected = x - ca.tiny_auraflow()(x, cond, sigma * 1000).sample * sigma
    assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert [(layer, shape) for layer, _, shape, _ in aura.log] == [(i, (1, 2, REGISTERS + TEXT + N_IMAGE, 16))
                                                                  for i in range(4)]


def test_layout_and_words(aura, clip):
    layout = comfy_host.dit_layout(aura.diffusion_model)
    assert (layout.kind, layout.text_key, layout.registers, layout.joint) == ("auraflow", "pile_t5xl", REGISTERS, True)
    assert layout.blocks == [("double_block", 0, 0), ("double_block", 1, 1), ("single_block", 0, 2),
                             ("single_block", 1, 3)]
    ids = [t[0] for t in clip.tokenize("a romantic kiss at sunset")["pile_t5xl"][0]]
    columns = comfy_host.token_columns(clip, PROMPT, ["sunset", "kiss"], layout.text_key)
    assert {w: clip.tokenizer.convert_ids_to_tokens([ids[j] for j in js]) for w, js in columns.items()} == \
        {"sunset": ["▁sunset"], "kiss": ["▁kiss"]}


def test_auraflow_bends_the_joint_call_of_each_layer(aura, clip):
    """Layers count the double layers then the single ones; cond and uncond share each call."""
    sigmas, step, entries = aura.schedule(3), 1, [ENTRY, GAIN]
    columns = comfy_host.token_columns(clip, PROMPT, ["sunset", "kiss"], "pile_t5xl")
    aura.record = []
    cs.calc_cond_batch(aura, [[{"c_crossattn": c}] for c in conds()], latent(), sigmas[step:step + 1],
                       patched(aura, clip, entries).sampling_options(sigmas))
    assert [(c["layer"], c["cond_or_uncond"]) for c in aura.record] == [(i, [1, 0]) for i in range(4)]
    changed, bent = check_calls(aura.record, entries, columns, slice(REGISTERS, REGISTERS + TEXT),
                                slice(REGISTERS + TEXT, None), (1, H, W), step)
    assert bent == 3 and changed > 1e-3


def test_auraflow_unbent_steps_and_zero_strength_sample_bit_identically(aura, clip):
    positive, negative = conds()
    noise = latent()
    plain = cs.sample(cs.ModelPatcher(aura), noise, positive, negative, steps=3)
    late = [{**ENTRY, "apply_to_timesteps": [5, 9]}, {**GAIN, "strength": 0.0}]
    assert torch.equal(cs.sample(patched(aura, clip, late), noise, positive, negative, steps=3), plain)
    assert not torch.equal(cs.sample(patched(aura, clip, [ENTRY, GAIN]), noise, positive, negative, steps=3), plain)
