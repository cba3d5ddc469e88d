"""Attention Bending on HunyuanVideo 1.0 in ComfyUI: its hunyuan_video model is 1.5's without the ByT5 glyph branch
(byt5_in None), the joint tokens [video; the Llama 3 prompt tokens its encoder keeps]. Driven through the stand-in
host of test_comfy_hunyuan.py (comfy_standin_hunyuan: diffusers' HunyuanVideo 1.5 blocks run as ComfyUI's
hunyuan_video model runs them, no glyphs) with a Llama-3-like tokenizer laid out in ComfyUI's template
(comfy_standin_hunyuan_video). The word's columns follow ComfyUI's template_end / user_end rule; every bent call equals
the explicit bent softmax, the text queries and the negative rows are the backend's bit for bit. bin/check-comfyui
hunyuan-video runs ComfyUI 0.3.64's own HunyuanVideo 1.0 (double and single blocks) and tokenizer code."""

import functools
import pytest
import torch

from _comfy_joint_calls import check_calls
from _helpers import bending_node, gain_entry, translate_entry
import comfy_standin as cs
import comfy_standin_hunyuan as ch
import comfy_standin_hunyuan_video as chv
from ckptbend.runtime import comfy_host
from ckptbend.runtime.comfy_host import hunyuan_video

PROMPT = "a romantic kiss at {sunset}"
F_, H, W, TEXT = 2, 3, 4, 6                  # token grid (patch 1); the kept Llama tokens: 5 words and <|eot_id|>
N_VIDEO = F_ * H * W
ENTRY, GAIN = translate_entry([1]), gain_entry([0], factor=4.0)

pytestmark = pytest.mark.usefixtures("one_thread_no_grad", "comfy")     # conftest.py


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    folder = tmp_path_factory.mktemp("clip")
    cs.write_tokenizer(folder)
    return chv.HunyuanVideoCLIP(cs.CLIP(folder))


@pytest.fixture
def hunyuan():
    model = ch.HunyuanModel(ch.tiny_hunyuan15())
    model.diffusion_model.byt5_in = None                   # HunyuanVideo 1.0's face: no glyph branch
    return model


def conds(seed=1, images=0):
    """Positive and negative contexts; `images` tokens before the prompt's, as ComfyUI's encoder puts an
    image-to-video prompt's image tokens."""
    g = torch.Generator().manual_seed(seed)
    return [[{"c_crossattn": torch.randn(1, images + TEXT, 16, generator=g)}] for _ in range(2)]


def latent(seed=2):
    return torch.randn(1, 4, F_, H, W, generator=torch.Generator().manual_seed(seed))


patched = functools.partial(bending_node, prompt=PROMPT)     # the node as ComfyUI runs it


def test_layout_and_words(hunyuan, clip):
    layout = comfy_host.dit_layout(hunyuan.diffusion_model)
    assert (layout.kind, layout.text_key, layout.joint) == ("hunyuan", comfy_host.tokens.HUNYUAN_KEY, True)
    columns = comfy_host.token_columns(clip, PROMPT, ["sunset", "kiss"], layout.text_key)
    assert columns == {"sunset": [4], "kiss": [2]}          # the kept tokens: a romantic kiss at sunset <|eot_id|>
    ids = [t[0] for t in clip.tokenize(PROMPT)["llama"][0]]
    kept = hunyuan_video.kept(ids)
    assert len(kept) == TEXT and clip.tokenizer.convert_ids_to_tokens(kept[4]) == "sunset"


def test_template_rule_as_comfyui_applies_it():
    """ComfyUI keeps the tokens past the last user header (and its blank line, when there) through the first
    <|eot_id|> after it; without an <|eot_id|> it drops the last token."""
    kept = hunyuan_video.kept
    header = [128006, 882, 128007]
    assert kept([128000, *header, 271, 5, 6, 128009, 7]) == [5, 6, 128009]
    assert kept([128000, *header, 5, 6, 128009]) == [128007, 5, 6, 128009]
    assert kept([*header, 271, 1, 128009, *header, 271, 5, 128009]) == [5, 128009]
    assert kept([*header, 271, 5, 6]) == [5]
    with pytest.raises(ValueError, match="no Llama user header"):
        kept([128000, 5, 6])


@pytest.mark.parametrize("images", [0, 5])
def test_hunyuan_video_bends_the_video_queries_against_the_prompt_keys(hunyuan, clip, images):
    """With image tokens before the prompt's (image-to-video), the word's keys are counted from the prompt's first
    token: the prompt's tokens end the context."""
    sigmas, step, entries = hunyuan.schedule(3), 1, [ENTRY, GAIN]
    columns = comfy_host.token_columns(clip, PROMPT, ["sunset", "kiss"], comfy_host.tokens.HUNYUAN_KEY)
    hunyuan.record = []
    cs.calc_cond_batch(hunyuan, conds(images=images), latent(), sigmas[step:step + 1],
                       patched(hunyuan, clip, entries).sampling_options(sigmas))
    assert [c["cond_or_uncond"] for c in hunyuan.record] == [[1, 0]] * 2
    first = N_VIDEO + images
    changed, bent = check_calls(hunyuan.record, entries, columns, slice(first, first + TEXT), slice(0, N_VIDEO),
                                (F_, H, W), step)
    assert bent == 2 and changed > 1e-3


def test_hunyuan_video_refuses_a_bending_prompt_longer_than_the_context(hunyuan, clip):
    sigmas = hunyuan.schedule(3)
    (positive,), _ = conds()
    short = [[{"c_crossattn": positive["c_crossattn"][:, :TEXT - 2]}]] * 2
    with pytest.raises(ValueError, match="the bending prompt has 6 tokens, the model sees 4"):
        cs.calc_cond_batch(hunyuan, short, latent(), sigmas[:1],
                           patched(hunyuan, clip, [ENTRY]).sampling_options(sigmas))


def test_hunyuan_video_unbent_steps_and_zero_strength_sample_bit_identically(hunyuan, clip):
    positive, negative = conds()
    noise = latent()
    plain = cs.sample(cs.ModelPatcher(hunyuan), noise, positive, negative, steps=3)
    late = [{**ENTRY, "apply_to_timesteps": [5, 9]}, {**GAIN, "strength": 0.0}]
    assert torch.equal(cs.sample(patched(hunyuan, clip, late), noise, positive, negative, steps=3), plain)
    assert not torch.equal(cs.sample(patched(hunyuan, clip, [ENTRY, GAIN]), noise, positive, negative, steps=3), plain)
