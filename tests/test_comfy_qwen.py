"""Attention Bending on Qwen-Image in ComfyUI (comfy_host's optimized_attention_override path), driven through the
stand-in host's Qwen-Image (a real tiny diffusers QwenImageTransformer2DModel run as ComfyUI runs it:
comfy_standin_qwen), and compared with the diffusers host on the same weights."""

import functools
import pytest
import torch
from torch.testing import assert_close

from _helpers import bending_node, gain_entry, translate_entry
import comfy_standin as cs
import comfy_standin_joint as cj
import comfy_standin_qwen as cq
from ckptbend.runtime import comfy_host
from ckptbend.runtime import diffusers_host as dh
from test_comfy_joint import attention_outputs, check_calls

PROMPT = "a romantic kiss at {sunset} on a lake"
HEIGHT, WIDTH = 8, 12                     # latent 8×12 → grid 4×6 of 2×2 patches
TEXT = 9 + cq.TEMPLATE_TAIL               # a Ġromantic Ġkiss Ġat Ġsun set Ġon Ġa Ġlake, then the template's tail
COLUMNS = {"sunset": [4, 5], "kiss": [2]}
ENTRY = translate_entry([1, 2])
GAIN = gain_entry([0])

pytestmark = pytest.mark.usefixtures("one_thread_no_grad", "comfy")     # conftest.py


@pytest.fixture(scope="module")
def clip():
    return cq.QwenCLIP()


@pytest.fixture
def qwen():
    return cq.QwenModel(cq.tiny_qwen())


def contexts(n=2, seed=1, length=TEXT):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(1, length, 32, generator=g) for _ in range(n)]


def latent(seed=2):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(1, cq.LATENT_CHANNELS, 1, HEIGHT, WIDTH, generator=g)


patched = functools.partial(bending_node, prompt=PROMPT)     # the node as ComfyUI runs it


def words_at(clip, prompt, columns):
    """The text of the kept tokens at `columns` (ComfyUI's encoder rule, applied by the stand-in)."""
    kept = cq.encoder_columns(clip, prompt)
    return clip.tokenizer.decode([kept[j] for j in columns]).strip()


def test_stand_in_qwen_runs_the_diffusers_model_as_comfyui_does(qwen, monkeypatch):
    """With PyTorch's SDPA as the backend the stand-in's Qwen-Image (joint RoPE, mask positional) equals
    diffusers' own forward (per-stream RoPE); every call is joint [B, text + image, heads·d]; the stand-in's
    default backend differs in the last bits."""
    (cond,) = contexts(1)
    x, sigma = latent(), torch.tensor([0.7])
    expected = cq.diffusers_qwen_prediction(cq.tiny_qwen(), x, sigma, cond)
    chunked = qwen.apply_model(x, sigma, cond, {"wrappers": {}})
    cs.install_comfy(monkeypatch, cs.Backend(cs.attention_sdpa))
    qwen.log.clear()
    assert_close(qwen.apply_model(x, sigma, cond, {"wrappers": {}}), expected, rtol=1e-6, atol=1e-6)
    assert not torch.equal(chunked, expected)
    assert_close(chunked, expected, rtol=1e-5, atol=1e-5)
    tokens = TEXT + (HEIGHT // 2) * (WIDTH // 2)
    assert qwen.log == [(layer, "joint", (1, tokens, 32), (1, tokens, 32)) for layer in range(3)]


def test_qwen_columns_follow_comfyuis_template_rule(clip):
    """Column 0 is the prompt's first token (the system prompt and "<|im_start|>user\\n" are dropped); a word is
    found after a space or bare (the first word; after a literal "(": ComfyUI's Qwen tokenizer keeps emphasis
    as text); "\\(" escapes are resolved; several sub-tokens are all bent."""
    layout = comfy_host.dit_layout(cq.QwenModel(cq.tiny_qwen()).diffusion_model)
    assert (layout.kind, layout.joint, layout.text_key, layout.patch) == ("qwen", True, "qwen25_7b", (1, 2, 2))
    cases = [(PROMPT, {"sunset": [4, 5], "kiss": [2], "a": [0]}),
             ("a romantic kiss at (sunset:1.2) on a lake", {"sunset": [6, 7], "kiss": [2], "a": [0]}),
             ("a romantic kiss at \\(sunset\\)", {"sunset": [6, 7], "kiss": [2], "a": [0]}),
             ("romantic {kiss}, a lake", {"sunset": None, "kiss": [1], "a": [3]})]
    for prompt, expected in cases:
        words = [w for w, c in expected.items() if c is not None]
        found = comfy_host.token_columns(clip, prompt, words, layout.text_key)
        assert found == {w: c for w, c in expected.items() if c is not None}, prompt
        text = prompt.replace("{", "").replace("}", "")
        assert all(words_at(clip, text, found[w]) == w for w in words), prompt
    assert comfy_host.token_columns(clip, PROMPT, ["*"], layout.text_key) == {}       # wildcard: per call
    with pytest.raises(ValueError, match="car"):
        comfy_host.token_columns(clip, PROMPT, ["car"], layout.text_key)


def test_node_hooks_qwen_through_the_override(qwen, clip):
    m = patched(qwen, clip, [ENTRY])
    options = m.model_options["transformer_options"]
    assert callable(options["optimized_attention_override"])
    assert sorted(options["patches_replace"]["dit"]) == [("double_block", i) for i in range(3)]
    assert list(m.wrappers[cs.APPLY_MODEL]) == ["ckptbend_bending"]


@pytest.mark.parametrize("batching", ["cfg", "one chunk", "positive chunks"])
def test_qwen_bends_image_queries_against_the_words_text_keys(qwen, clip, batching):
    """Blocks 1, 2 bend "sunset" (two sub-tokens), block 0 "kiss"; everything outside the image × text block of
    the positive chunks is the backend's, bit for bit."""
    cond, other, uncond = contexts(3)
    conds = [cs.cond(cond), cs.cond(uncond)]
    if batching == "one chunk":
        qwen.max_chunks = 1
    elif batching == "positive chunks":
        conds[0] = cs.cond(cond) + cs.cond(other)
    sigmas, step = qwen.schedule(3), 1
    entries = [ENTRY, GAIN]
    qwen.record = []
    cs.calc_cond_batch(qwen, conds, latent(), sigmas[step:step + 1],
                       patched(qwen, clip, entries).sampling_options(sigmas))
    layouts = {tuple(c["cond_or_uncond"]) for c in qwen.record}
    assert layouts == {"cfg": {(1, 0)}, "one chunk": {(0,), (1,)}, "positive chunks": {(1, 0, 0)}}[batching]
    assert len(qwen.record) == 3 * (2 if batching == "one chunk" else 1)
    changed = check_calls(qwen.record, 2, entries, COLUMNS, TEXT, (HEIGHT // 2, WIDTH // 2), step)
    assert changed > 1e-3


def test_qwen_unbent_steps_and_zero_strength_sample_bit_identically(qwen, clip, monkeypatch):
    cond, uncond = contexts()
    noise = latent()
    plain = cs.sample(cs.ModelPatcher(qwen), noise, cond, uncond, steps=3)
    late = [{**ENTRY, "apply_to_timesteps": [5, 9]}, {**GAIN, "apply_to_timesteps": [3, 3]}]
    assert torch.equal(cs.sample(patched(qwen, clip, late), noise, cond, uncond, steps=3), plain)
    zero = patched(qwen, clip, [ENTRY], bend1_strength=0.0)
    assert "optimized_attention_override" not in zero.model_options["transformer_options"]
    assert not torch.equal(cs.sample(patched(qwen, clip, [ENTRY, GAIN]), noise, cond, uncond, steps=3), plain)
    cs.install_comfy(monkeypatch, cs.Backend(cs.attention_sdpa))
    assert not torch.equal(cs.sample(cs.ModelPatcher(qwen), noise, cond, uncond, steps=3), plain)


def test_qwen_word_beyond_the_text_is_an_error(qwen, clip):
    """A bending prompt longer than the conditioning the model sees: a clear error, not a silent bend."""
    cond, uncond = contexts(length=4)
    with pytest.raises(ValueError, match="beyond the text tokens"):
        cs.sample(patched(qwen, clip, [ENTRY]), latent(), cond, uncond, steps=2)


# --- the diffusers host on the same weights ---------------------------------------------------------------

@pytest.fixture(scope="module")
def pipe():
    from _pipelines_joint import qwen_pipeline

    return qwen_pipeline()


def qwen_call(pipe, x, timestep, context, mask=None):
    """QwenImagePipeline's transformer call: packed latent, img_shapes, timestep / 1000, the text mask."""
    b, _, _, h, w = x.shape
    return pipe.transformer(hidden_states=cj.pack(x[:, :, 0]), timestep=timestep.expand(b) / 1000,
                            encoder_hidden_states=context, encoder_hidden_states_mask=mask,
                            img_shapes=[[(1, h // 2, w // 2)]] * b, return_dict=False)[0]


def unmarked(prompt):
    return prompt.replace("{", "").replace("}", "")


def test_qwen_bending_matches_the_diffusers_host(qwen, clip, pipe):
    """The same tiny Qwen-Image in both hosts (diffusers: per-stream complex RoPE, SDPA + correction; ComfyUI:
    joint RoPE, the selected backend + correction): the words' columns agree, and so does every joint
    attention's output of a conditional call at a scheduler step, and the prediction."""
    entries = [ENTRY, GAIN, {**ENTRY, "token": "kiss, sunset", "mode": "flip", "flip_horizontal": True,
                             "apply_to_timesteps": [1, 1], "apply_to_layers": None, "renormalize": "none"}]
    x, step = latent(), 1
    cond = pipe.encode_prompt(unmarked(PROMPT))[0]
    assert cond.shape == (1, TEXT, 32)
    pipe.scheduler.set_timesteps(3)
    t, sigma = pipe.scheduler.timesteps[step:step + 1], pipe.scheduler.sigmas[step:step + 1]
    session = dh.apply(pipe, {"bending": entries})
    try:
        pipe.encode_prompt(PROMPT)                                              # locates the words
        assert session.token_indices == {**COLUMNS, "kiss, sunset": [2, 4, 5]}
        with attention_outputs(pipe.transformer) as d_out:
            v = qwen_call(pipe, x, t, cond)
    finally:
        dh.remove(pipe)
    m = patched(qwen, clip, entries)
    with attention_outputs(qwen.transformer) as c_out:
        (c_cond,) = cs.calc_cond_batch(qwen, [cs.cond(cond)], x, sigma, m.sampling_options(pipe.scheduler.sigmas))
    with attention_outputs(qwen.transformer) as plain:
        cs.calc_cond_batch(qwen, [cs.cond(cond)], x, sigma, cs.ModelPatcher(qwen).sampling_options())
    for layer in range(3):
        assert_close(c_out[layer][0], d_out[layer][0], rtol=1e-5, atol=1e-5, msg=f"layer {layer}")
        assert not torch.allclose(c_out[layer][0][0], plain[layer][0][0], atol=1e-4), layer
    assert_close(c_cond, x - cj.unpack(v, HEIGHT, WIDTH)[:, :, None] * sigma, rtol=1e-5, atol=1e-5)


def test_diffusers_qwen_bends_only_the_positive_call_and_identity_is_plain(pipe):
    """QwenImagePipeline's true CFG runs the negative prompt as a call of its own: left to diffusers' processor;
    an identity bend (scale 1, no renormalisation) reproduces the plain output; maps are recorded."""
    negative = pipe.encode_prompt("a red car on a lake")[0]
    cond = pipe.encode_prompt(unmarked(PROMPT))[0]
    pipe.scheduler.set_timesteps(3)
    x, t = latent(), pipe.scheduler.timesteps[1:2]
    plain_cond, plain_neg = qwen_call(pipe, x, t, cond), qwen_call(pipe, x, t, negative)
    identity = {"token": "sunset", "mode": "scale", "scale_factor": 1.0, "renormalize": "none"}
    for entries, changes in (([ENTRY, GAIN], True), ([identity], False)):
        session = dh.apply(pipe, {"bending": entries}, record_maps=True)
        try:
            pipe.encode_prompt(PROMPT)
            bent_cond, bent_neg = qwen_call(pipe, x, t, cond), qwen_call(pipe, x, t, negative)
        finally:
            dh.remove(pipe)
        assert torch.equal(bent_neg, plain_neg)
        if changes:
            assert (bent_cond - plain_cond).abs().max() > 1e-3
            assert [(r["token"], r["layer"], r["step"]) for r in session.maps] == [
                ("kiss", 0, 1), ("sunset", 1, 1), ("sunset", 2, 1)]
            assert session.maps[0]["original"].shape == (HEIGHT // 2, WIDTH // 2)
        else:
            assert_close(bent_cond, plain_cond, rtol=1e-5, atol=1e-6)


def test_diffusers_qwen_masked_prompt_batch_bends_as_each_prompt_alone(pipe):
    """A prompt list of unequal lengths: diffusers pads the shorter and passes encoder_hidden_states_mask; the
    correction gets the mask as its bias, so the padded item's prediction is the one of its prompt alone."""
    prompts = ["a romantic kiss at {sunset} on a lake", "a romantic kiss at {sunset}"]
    pipe.scheduler.set_timesteps(3)
    x, t = torch.cat([latent(), latent()]), pipe.scheduler.timesteps[1:2]
    session = dh.apply(pipe, {"bending": [ENTRY, GAIN]})
    try:
        both, mask = pipe.encode_prompt(prompts)
        assert mask is not None and not mask.all()
        assert session.token_indices == COLUMNS
        batched = qwen_call(pipe, x, t, both, mask)
        alone = [qwen_call(pipe, x[:1], t, pipe.encode_prompt(p)[0]) for p in prompts]
    finally:
        dh.remove(pipe)
    plain = qwen_call(pipe, x, t, both, mask)
    for i in range(2):
        assert_close(batched[i:i + 1], alone[i], rtol=1e-5, atol=1e-5)
        assert (batched[i] - plain[i]).abs().max() > 1e-3
