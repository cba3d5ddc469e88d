"""Attention Bending on Mochi in ComfyUI (comfy_host's optimized_attention_override path), driven through the stand-in
host (comfy_standin_mochi: a real tiny diffusers MochiTransformer3DModel run as ComfyUI 0.3.64's AsymmDiTJoint runs
it). Each block's one joint attention over [video; the first num_tokens T5 tokens] is bent at its video queries against
the word's T5 keys; the text queries, the negative rows, strength 0 and steps outside the window are the backend's
output bit for bit. bin/check-comfyui mochi runs the same on the real ComfyUI."""

import functools
import pytest
import torch
from torch.testing import assert_close

from _comfy_joint_calls import check_calls
from _helpers import bending_node, gain_entry, translate_entry
from _pipelines import t5_like_tokenizer
import comfy_standin as cs
import comfy_standin_mochi as cm
from ckptbend.runtime import comfy_host

PROMPT = "a romantic kiss at {sunset}"
F_, H, W, TEXT, VALID = 2, 3, 4, 16, 6       # token grid (latent 2 × 6 × 8, patch 1 × 2 × 2); T5 tokens, the prompt's
N_VIDEO = F_ * H * W
ENTRY, GAIN = translate_entry([1]), gain_entry([0], factor=4.0)

pytestmark = pytest.mark.usefixtures("one_thread_no_grad", "comfy")     # conftest.py


@pytest.fixture(scope="module")
def clip():
    return cs.T5CLIP(t5_like_tokenizer(), key="t5xxl", min_length=TEXT)


@pytest.fixture
def mochi():
    return cm.MochiModel(cm.tiny_mochi())


def conds(negative_valid=VALID, seed=1):
    g = torch.Generator().manual_seed(seed)
    positive, negative = (torch.randn(1, TEXT, 16, generator=g) for _ in range(2))
    return [cm.conditioning(positive, VALID), cm.conditioning(negative, negative_valid)]


def latent(seed=2):
    return torch.randn(1, 4, F_, 2 * H, 2 * W, generator=torch.Generator().manual_seed(seed))


patched = functools.partial(bending_node, prompt=PROMPT)     # the node as ComfyUI runs it


def test_stand_in_mochi_runs_the_diffusers_model_as_comfyui_does(mochi, monkeypatch):
    """With PyTorch's SDPA as the backend the stand-in equals diffusers' own forward (which crops each item's padding
    by its mask); every call is joint over [video; the valid text] as ComfyUI's crop_y gives it."""
    cs.install_comfy(monkeypatch, cs.Backend(cs.attention_sdpa))
    (cond,), x, sigma = conds()[0], latent(), torch.tensor([0.7])
    got = mochi.apply_model(x, sigma, cond["c_crossattn"], {"wrappers": {}}, attention_mask=cond["attention_mask"],
                            num_tokens=cond["num_tokens"])
    velocity = -cm.tiny_mochi()(x, cond["c_crossattn"], (1 - sigma) * 1000, cond["attention_mask"]).sample
    assert_close(got, x - velocity * sigma, rtol=1e-5, atol=1e-5)
    assert {shape for _, _, shape, _ in mochi.log} == {(1, 2, N_VIDEO + VALID, 8)}


def test_layout_and_words(mochi, clip):
    layout = comfy_host.dit_layout(mochi.diffusion_model)
    assert (layout.kind, layout.text_key, layout.text_call, layout.joint) == ("mochi", "t5xxl", 0, True)
    assert [b for b in layout.blocks] == [("double_block", 0, 0), ("double_block", 1, 1)]
    ids = [t[0] for t in clip.tokenize("a romantic kiss at sunset")["t5xxl"][0]]
    columns = comfy_host.token_columns(clip, PROMPT, ["sunset", "kiss"], layout.text_key)
    assert {w: clip.tokenizer.convert_ids_to_tokens([ids[j] for j in js]) for w, js in columns.items()} == \
        {"sunset": ["sunset"], "kiss": ["kiss"]}


@pytest.mark.parametrize("negative_valid", [VALID, VALID - 2])
def test_mochi_bends_the_joint_call_of_each_block(mochi, clip, negative_valid):
    """A negative of the positive's num_tokens shares its call (batched); a shorter one runs in a call of its own
    (ComfyUI batches equal CONDConstants only), left as the backend computes it."""
    sigmas, step, entries = mochi.schedule(3), 1, [ENTRY, GAIN]
    columns = comfy_host.token_columns(clip, PROMPT, ["sunset", "kiss"], "t5xxl")
    mochi.record = []
    cs.calc_cond_batch(mochi, conds(negative_valid), latent(), sigmas[step:step + 1],
                       patched(mochi, clip, entries).sampling_options(sigmas))
    chunks = [c["cond_or_uncond"] for c in mochi.record]
    assert chunks == ([[1, 0]] * 2 if negative_valid == VALID else [[1]] * 2 + [[0]] * 2)
    assert all(c["k"].shape[2] == N_VIDEO + VALID for c in mochi.record if 0 in c["cond_or_uncond"])
    changed, bent = check_calls(mochi.record, entries, columns, slice(N_VIDEO, N_VIDEO + VALID), slice(0, N_VIDEO),
                                (F_, H, W), step)
    assert bent == 2 and changed > 1e-3


def test_mochi_unbent_steps_and_zero_strength_sample_bit_identically(mochi, clip):
    positive, negative = conds()
    noise = latent()
    plain = cs.sample(cs.ModelPatcher(mochi), noise, positive, negative, steps=3)
    late = [{**ENTRY, "apply_to_timesteps": [5, 9]}, {**GAIN, "strength": 0.0}]
    assert torch.equal(cs.sample(patched(mochi, clip, late), noise, positive, negative, steps=3), plain)
    assert not torch.equal(cs.sample(patched(mochi, clip, [ENTRY, GAIN]), noise, positive, negative, steps=3), plain)
