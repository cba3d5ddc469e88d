"""Attention Bending on Z-Image in ComfyUI (comfy_host's optimized_attention_override path), driven through the
stand-in host's NextDiT (comfy_standin_nextdit: a real tiny diffusers ZImageTransformer2DModel run as the newest
ComfyUI source runs it; ComfyUI 0.3.64, the newest runnable here, has no Z-Image). The node tells a main block by
transformer_options["block_index"], leaves the refiners' calls alone, and bends the image queries against the
word's keys among the padded [text; image] tokens; the words are found in Qwen3's chat template."""

import functools
import pytest
import torch
from torch.testing import assert_close

from _helpers import bending_node, gain_entry, translate_entry
import comfy_standin as cs
import comfy_standin_nextdit as cn
import comfy_standin_qwen as cq
from ckptbend.runtime import bending, comfy_host

PROMPT = "a romantic kiss at {sunset}"
HEIGHT, WIDTH, TEXT = 8, 12, 10               # latent 8×12 → grid 4×6 (24 tokens, padded to 32); text 10 → 32
N_TEXT, N_IMAGE = 32, 24
ENTRY = translate_entry([1])
GAIN = gain_entry(None)
TEMPLATE = "<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n"      # ComfyUI's ZImageTokenizer

pytestmark = pytest.mark.usefixtures("one_thread_no_grad", "comfy")     # conftest.py


class ZImageCLIP:
    """ComfyUI's Z-Image CLIP object, only tokenize(): the prompt in Qwen3's chat template, weights disabled (one
    segment, escapes resolved), no start / end token, no padding."""

    def __init__(self):
        self.tokenizer = cq.qwen_tokenizer()

    def tokenize(self, text):
        ids = self.tokenizer(TEMPLATE.format(text.replace("\\(", "(").replace("\\)", ")")))["input_ids"]
        return {"qwen3_4b": [[(i, 1.0) for i in ids]]}


@pytest.fixture(scope="module")
def clip():
    return ZImageCLIP()


@pytest.fixture
def zimage():
    return cn.ZImageModel(cn.tiny_zimage())


def contexts(n=2, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(1, TEXT, 16, generator=g) for _ in range(n)]


def latent(seed=2):
    return torch.randn(1, cn.LATENT_CHANNELS, HEIGHT, WIDTH, generator=torch.Generator().manual_seed(seed))


patched = functools.partial(bending_node, prompt=PROMPT)     # the node as ComfyUI runs it


def test_words_are_found_among_all_the_template_tokens(clip):
    """Z-Image attends to every token of the template (column 0 is <|im_start|>): "sunset" after a space is
    "Ġsun", "set"; the first word, after "user\\n", is bare."""
    layout = comfy_host.dit_layout(cn.ZImageModel(cn.tiny_zimage()).diffusion_model)
    assert (layout.kind, layout.text_key, layout.pad, layout.blocks) == ("nextdit", "qwen3_4b", 32, [])
    columns = comfy_host.token_columns(clip, PROMPT, ["sunset", "a", "kiss"], layout.text_key)
    ids = [i for i, _ in clip.tokenize("a romantic kiss at sunset")["qwen3_4b"][0]]
    pieces = clip.tokenizer.convert_ids_to_tokens(ids)
    assert [pieces[j] for j in columns["sunset"]] == ["Ġsun", "set"]
    assert [pieces[j] for j in columns["a"]] == ["a"] and columns["a"] == [3]
    assert [pieces[j] for j in columns["kiss"]] == ["Ġkiss"]


def explicit(call, rows, entries, columns, step, n_text=N_TEXT):
    """The node's result for one main-block call, computed independently: the backend's output, except the image
    queries (N_TEXT … N_TEXT + N_IMAGE) of the batch items `rows`, which come from the explicit fp32 softmax with
    the image × text block bent by bending.bend_probs and each row renormalised over all keys."""
    q, k, v = (call[n].float() for n in ("q", "k", "v"))
    out = cs.attention_chunked(call["q"], call["k"], call["v"], 2, skip_reshape=True).clone()
    probs = torch.softmax(q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5, dim=-1)[rows]
    image = slice(n_text, n_text + N_IMAGE)
    block = probs[:, :, image, :n_text].reshape(-1, N_IMAGE, n_text)
    unrowed = [{**e, "renormalize": "none"} if e["renormalize"] == "row" else e for e in entries]
    probs[:, :, image, :n_text] = bending.bend_probs(block, columns, (HEIGHT // 2, WIDTH // 2), unrowed, step,
                                                     call["layer"]).view(len(rows), 2, N_IMAGE, n_text)
    if any(e["renormalize"] == "row" for e in entries):
        probs[:, :, image] /= probs[:, :, image].sum(-1, keepdim=True)
    bent = (probs[:, :, image] @ v[rows]).transpose(1, 2).flatten(2)
    for i, r in enumerate(rows):
        out[r, image] = bent[i].to(out.dtype)
    return out


def test_zimage_bends_the_main_blocks_image_queries_only(zimage, clip):
    """Layer 1 bends "sunset", both layers "kiss"; the refiners' calls, the negative chunk, the text queries and
    the padding queries are the backend's, bit for bit."""
    cond, uncond = contexts()
    sigmas, step = zimage.schedule(3), 1
    entries = [ENTRY, GAIN]
    columns = comfy_host.token_columns(clip, PROMPT, ["sunset", "kiss"], "qwen3_4b")
    zimage.record = []
    cs.calc_cond_batch(zimage, [cs.cond(cond), cs.cond(uncond)], latent(), sigmas[step:step + 1],
                       patched(zimage, clip, entries).sampling_options(sigmas))
    assert [c["layer"] for c in zimage.record] == ["noise_refiner", "context_refiner", 0, 1]
    changed = 0.0
    for call in zimage.record:
        plain = cs.attention_chunked(call["q"], call["k"], call["v"], 2, skip_reshape=True)
        if isinstance(call["layer"], str):
            assert torch.equal(call["out"], plain), call["layer"]
            continue
        rows = comfy_host.common.chunk_rows(call["cond_or_uncond"], 0, 2)
        active = [e for e in entries if bending.entry_active(e, step, call["layer"])]
        assert_close(call["out"], explicit(call, rows, active, columns, step), rtol=1e-4, atol=1e-5)
        others = [r for r in range(2) if r not in rows]
        assert torch.equal(call["out"][others], plain[others])
        assert torch.equal(call["out"][:, :N_TEXT], plain[:, :N_TEXT])
        assert torch.equal(call["out"][:, N_TEXT + N_IMAGE:], plain[:, N_TEXT + N_IMAGE:])
        changed = max(changed, float((call["out"] - plain).abs().max()))
    assert changed > 1e-3


def test_zimage_unbent_steps_and_zero_strength_sample_bit_identically(zimage, clip):
    cond, uncond = contexts()
    noise = latent()
    plain = cs.sample(cs.ModelPatcher(zimage), noise, cond, uncond, steps=3)
    late = [{**ENTRY, "apply_to_timesteps": [5, 9]}, {**GAIN, "apply_to_timesteps": [3, 3]}]
    assert torch.equal(cs.sample(patched(zimage, clip, late), noise, cond, uncond, steps=3), plain)
    zero = patched(zimage, clip, [ENTRY], bend1_strength=0.0)
    assert "optimized_attention_override" not in zero.model_options["transformer_options"]
    assert not torch.equal(cs.sample(patched(zimage, clip, [ENTRY, GAIN]), noise, cond, uncond, steps=3), plain)


class GemmaCLIP:
    """ComfyUI's Lumina 2 CLIP object, only tokenize(): Gemma 2's tokens with <bos> (id 2) first, weights enabled,
    no padding (a byte-level BPE tokenizer stands in for Gemma's SentencePiece). The system prompt is the text
    node's, part of the text."""

    def __init__(self):
        self.tokenizer = cq.qwen_tokenizer()

    def tokenize(self, text):
        return {"gemma2_2b": [[(i, 1.0) for i in [2] + self.tokenizer(text)["input_ids"]]]}


def test_lumina2_bends_the_main_blocks_without_padding():
    """Lumina 2's NextDiT: [text; image] unpadded, Gemma 2's key (column 0 is <bos>); the main blocks' image queries
    are bent against the word's keys as the explicit bent softmax, the refiners' calls left alone."""
    clip = GemmaCLIP()
    model = cn.ZImageModel(cn.tiny_zimage(), multiple=None)
    layout = comfy_host.dit_layout(model.diffusion_model)
    assert (layout.kind, layout.text_key, layout.pad) == ("nextdit", "gemma2_2b", None)
    prompt = "You are an assistant. <Prompt Start> " + PROMPT
    columns = comfy_host.token_columns(clip, prompt, ["sunset"], layout.text_key)
    pieces = clip.tokenizer.convert_ids_to_tokens([i for i, _ in clip.tokenize(prompt.replace("{", "").replace(
        "}", ""))["gemma2_2b"][0]][1:])
    assert [pieces[j - 1] for j in columns["sunset"]] == ["Ġsun", "set"]
    n_text = len(clip.tokenize(prompt)["gemma2_2b"][0])
    g = torch.Generator().manual_seed(1)
    cond, uncond = (torch.randn(1, n_text, 16, generator=g) for _ in range(2))
    (cls,) = comfy_host.node_class_mappings({"bending": [ENTRY]}, "lumina bend", "56" * 32)[0].values()
    m = getattr(cls(), cls.FUNCTION)(model=cs.ModelPatcher(model), bending_clip=clip, bending_prompt=prompt)[0]
    sigmas, step = model.schedule(3), 1
    model.record = []
    cs.calc_cond_batch(model, [cs.cond(cond), cs.cond(uncond)], latent(), sigmas[step:step + 1],
                       m.sampling_options(sigmas))
    assert [c["layer"] for c in model.record] == ["noise_refiner", "context_refiner", 0, 1]
    for call in model.record:
        plain = cs.attention_chunked(call["q"], call["k"], call["v"], 2, skip_reshape=True)
        if call["layer"] != 1:                                   # refiners, and layer 0 (not in the entry's layers)
            assert torch.equal(call["out"], plain)
            continue
        rows = comfy_host.common.chunk_rows(call["cond_or_uncond"], 0, 2)
        others = [r for r in range(2) if r not in rows]
        assert torch.equal(call["out"][others], plain[others])
        assert torch.equal(call["out"][:, :n_text], plain[:, :n_text])
        assert_close(call["out"], explicit(call, rows, [ENTRY], columns, step, n_text), rtol=1e-4, atol=1e-5)
        assert (call["out"][:, n_text:] - plain[:, n_text:]).abs().max() > 1e-4
