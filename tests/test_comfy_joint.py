"""Attention Bending on joint-attention DiTs in ComfyUI (comfy_host's optimized_attention_override path),
driven through the stand-in host's Flux.1 (a real tiny diffusers FluxTransformer2DModel run as ComfyUI
runs Flux: shared/docs/comfyui-dit-hooks.md), and compared with the diffusers host on the same weights."""

import functools
import contextlib

import pytest
import torch
from torch.testing import assert_close

from _helpers import bending_node, gain_entry, translate_entry
import comfy_standin as cs
import comfy_standin_joint as cj
from _pipelines import t5_like_tokenizer, t5_sentencepiece_tokenizer
from _pipelines_joint import flux_pipeline, sd3_pipeline
from ckptbend.runtime import bending, comfy_host
from ckptbend.runtime import tokens as tk
from ckptbend.runtime import diffusers_host as dh

PROMPT = "a romantic kiss at {sunset}"
HEIGHT, WIDTH, TEXT = 8, 12, 16               # latent 8×12 → grid 4×6 of 2×2 patches; 16 T5 tokens
ENTRY = translate_entry([1, 2])
GAIN = gain_entry([3])

pytestmark = pytest.mark.usefixtures("one_thread_no_grad", "comfy")     # conftest.py


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    folder = tmp_path_factory.mktemp("clip")
    cs.write_tokenizer(folder)
    return cj.FluxCLIP(cs.CLIP(folder), cs.T5CLIP(t5_like_tokenizer(), key="t5xxl", min_length=TEXT))


@pytest.fixture
def flux():
    return cj.FluxModel(cj.tiny_flux())


def contexts(n=2, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(1, TEXT, 32, generator=g) for _ in range(n)]


def latent(seed=2):
    return torch.randn(1, cj.LATENT_CHANNELS, HEIGHT, WIDTH, generator=torch.Generator().manual_seed(seed))


patched = functools.partial(bending_node, prompt=PROMPT)     # the node as ComfyUI runs it


def backend(call, heads):
    """The selected backend on a recorded call, as the model called it (Flux: per head, skip_reshape; the
    block's attn_mask, if any)."""
    q, k, v = call["q"], call["k"], call["v"]
    return cs.attention_chunked(q, k, v, heads, mask=call.get("mask"), skip_reshape=q.ndim == 4)


def explicit(call, heads, rows, entries, columns, n_text, grid, step):
    """The node's result for one joint call, computed independently: ComfyUI's backend output, except the
    image-query rows of the batch items `rows`, which come from the explicit fp32 softmax (the call's
    additive [B, L, L] mask added to the logits, if it has one) with the image×text block bent by
    bending.bend_probs and each row renormalised over all keys."""
    q, k, v = call["q"], call["k"], call["v"]
    if q.ndim == 3:                 # not skip_reshape: each viewed as ComfyUI's backends do (SD3's v is 4-D)
        q, k, v = cs._heads_first(q, k, v, heads)
    d = q.shape[-1]
    out = backend(call, heads).clone()
    logits = q.float() @ k.float().transpose(-1, -2) * d ** -0.5
    if call.get("mask") is not None:
        logits = logits + call["mask"].float()[:, None]              # the same mask for every head
    probs = torch.softmax(logits, dim=-1)[rows]
    block = probs[:, :, n_text:, :n_text].reshape(-1, probs.shape[2] - n_text, n_text)
    row_norm = any(e["renormalize"] == "row" for e in entries)
    unrowed = [{**e, "renormalize": "none"} if e["renormalize"] == "row" else e for e in entries]
    bent = bending.bend_probs(block, columns, grid, unrowed, step, call["layer"])
    probs[:, :, n_text:, :n_text] = bent.view(len(rows), heads, -1, n_text)
    if row_norm:
        probs[:, :, n_text:] /= probs[:, :, n_text:].sum(-1, keepdim=True)
    image = (probs[:, :, n_text:] @ v[rows].float()).transpose(1, 2).flatten(2)
    for i, r in enumerate(rows):
        out[r, n_text:] = image[i]
    return out


def check_calls(record, heads, entries, columns, n_text, grid, step):
    """Every recorded call: bit-identical to the selected backend where nothing acts (other blocks, SD3.5's
    image self-attention, text queries, negative chunks), the explicit bent result at the image queries
    of the positive chunks. Returns the largest change bending made."""
    changed = 0.0
    for call in record:
        active = [e for e in entries if bending.entry_active(e, step, call["layer"])]
        plain = backend(call, heads)
        rows = comfy_host.common.chunk_rows(call["cond_or_uncond"], 0, call["q"].shape[0])
        if call["kind"] != "joint" or not active or not rows:
            assert torch.equal(call["out"], plain), call["layer"]
            continue
        expected = explicit(call, heads, rows, active, columns, n_text, grid, step)
        assert_close(call["out"], expected, rtol=1e-4, atol=1e-5, msg=f"layer {call['layer']}")
        others = [r for r in range(call["q"].shape[0]) if r not in rows]
        assert torch.equal(call["out"][others], plain[others])                   # negative chunks
        assert torch.equal(call["out"][:, :n_text], plain[:, :n_text])           # text queries
        changed = max(changed, float((call["out"] - plain).abs().max()))
    return changed


def test_stand_in_flux_runs_the_diffusers_model_as_comfyui_does(flux, monkeypatch):
    """With PyTorch's SDPA as the backend the stand-in's Flux equals diffusers' own forward; every call
    is joint ([B, heads, text + image, d], skip_reshape) as the doc observed."""
    cs.install_comfy(monkeypatch, cs.Backend(cs.attention_sdpa))
    (cond,) = contexts(1)
    x, sigma = latent(), torch.tensor([0.7])
    expected = cj.diffusers_flux_prediction(cj.tiny_flux(), x, sigma, cond)
    got = flux.apply_model(x, sigma, cond, {"wrappers": {}})
    assert_close(got, expected, rtol=1e-6, atol=1e-6)
    tokens = TEXT + (HEIGHT // 2) * (WIDTH // 2)
    assert flux.log == [(layer, "joint", (1, 2, tokens, 16), (1, 2, tokens, 16)) for layer in range(4)]


def test_token_columns_come_from_the_t5_tokens(clip):
    """Flux's joint attention sees the T5 tokens (no start token), not CLIP-L's."""
    layout = comfy_host.dit_layout(cj.FluxModel(cj.tiny_flux()).diffusion_model)
    assert comfy_host.token_columns(clip, "a (romantic:1.3) kiss at {sunset}", ["sunset", "kiss"],
                                    layout.text_key) == {"sunset": [4], "kiss": [2]}
    assert comfy_host.token_columns(clip, PROMPT, ["sunset"], "l") == {"sunset": [5, 6]}


@pytest.mark.parametrize("prompt, words", [
    ('a "kiss" at dusk,sunset', ["kiss", "sunset"]),          # after a quote, after a comma with no space
    ("a kiss at \\(sunset\\)", ["sunset"]),                  # ComfyUI's escaped brackets: a literal "("
    ("kiss,sunset over a sunset", ["sunset"]),                # both spellings: the word as tokenized alone
])
def test_t5_words_right_after_punctuation_are_found(prompt, words):
    """T5 (SentencePiece) spells a word right after punctuation without its "▁" ("s", "un", "set" where
    alone it is "▁sunset"): the node finds it either way, and the pieces at its columns spell the word."""
    tokenizer = t5_sentencepiece_tokenizer()
    t5 = cs.T5CLIP(tokenizer, key="t5xxl", min_length=TEXT)
    columns = comfy_host.token_columns(t5, prompt, words, "t5xxl")
    ids = [t[0] for t in t5.tokenize(tk.parse_marked_prompt(prompt)[0])["t5xxl"][0]]
    for word in words:
        pieces = tokenizer.convert_ids_to_tokens([ids[j] for j in columns[word]])
        assert "".join(pieces).lstrip("▁") == word, (word, pieces)
    if prompt.endswith("a sunset"):
        assert tokenizer.convert_ids_to_tokens([ids[j] for j in columns["sunset"]]) == ["▁sunset"]


def test_node_hooks_flux_through_the_override(flux, clip):
    m = patched(flux, clip, [ENTRY])
    options = m.model_options["transformer_options"]
    assert callable(options["optimized_attention_override"])
    assert sorted(options["patches_replace"]["dit"]) == [("double_block", 0), ("double_block", 1),
                                                          ("single_block", 0), ("single_block", 1)]
    assert list(m.wrappers[cs.APPLY_MODEL]) == ["ckptbend_bending"]


@pytest.mark.parametrize("batching", ["cfg", "one chunk", "positive chunks"])
def test_flux_bends_image_queries_against_the_words_text_keys(flux, clip, batching):
    """Layers 1, 2 (double block 1, single block 0) bend "sunset", layer 3 (single block 1) "kiss"; layer 0
    and everything outside the image × text block of positive chunks is the backend's, bit for bit."""
    cond, other, uncond = contexts(3)
    conds = [cs.cond(cond), cs.cond(uncond)]
    if batching == "one chunk":
        flux.max_chunks = 1
    elif batching == "positive chunks":
        conds[0] = cs.cond(cond) + cs.cond(other)
    sigmas, step = flux.schedule(3), 1
    entries = [ENTRY, GAIN]
    flux.record = []
    cs.calc_cond_batch(flux, conds, latent(), sigmas[step:step + 1], patched(flux, clip, entries).sampling_options(sigmas))
    layouts = {tuple(c["cond_or_uncond"]) for c in flux.record}
    assert layouts == {"cfg": {(1, 0)}, "one chunk": {(0,), (1,)}, "positive chunks": {(1, 0, 0)}}[batching]
    assert len(flux.record) == 4 * (2 if batching == "one chunk" else 1)
    changed = check_calls(flux.record, 2, entries, {"sunset": [4], "kiss": [2]}, TEXT, (HEIGHT // 2, WIDTH // 2),
                          step)
    assert changed > 1e-3


def test_flux_unbent_steps_and_zero_strength_sample_bit_identically(flux, clip, monkeypatch):
    """Outside the step window and at strength 0 the node leaves the user's backend alone: bit-identical
    samples (the stand-in's default backend differs from PyTorch's SDPA, so a node computing its own
    attention would show)."""
    cond, uncond = contexts()
    noise = latent()
    plain = cs.sample(cs.ModelPatcher(flux), noise, cond, uncond, steps=3)
    late = [{**ENTRY, "apply_to_timesteps": [5, 9]}, {**GAIN, "apply_to_timesteps": [3, 3]}]
    assert torch.equal(cs.sample(patched(flux, clip, late), noise, cond, uncond, steps=3), plain)
    zero = patched(flux, clip, [ENTRY], bend1_strength=0.0)
    assert "optimized_attention_override" not in zero.model_options["transformer_options"]
    assert not torch.equal(cs.sample(patched(flux, clip, [ENTRY, GAIN]), noise, cond, uncond, steps=3), plain)
    cs.install_comfy(monkeypatch, cs.Backend(cs.attention_sdpa))
    assert not torch.equal(cs.sample(cs.ModelPatcher(flux), noise, cond, uncond, steps=3), plain)


def redux_mask(n_text, n_redux, n_image, strength):
    """StyleModelApply's strength_type "attn_bias" as Flux's extra_conds hands it to the model: [1, L, L]
    fp16 over [T5 tokens; Redux image tokens; image], log(strength) on the Redux tokens' columns in the
    T5 and image rows, 0 elsewhere (strength 0: −inf, the Redux tokens are ignored)."""
    size = n_text + n_redux + n_image
    mask = torch.zeros(1, size, size, dtype=torch.float16)
    bias = torch.log(torch.tensor(float(strength)))
    mask[:, :n_text, n_text:n_text + n_redux] = bias
    mask[:, n_text + n_redux:, n_text:n_text + n_redux] = bias
    return mask


@pytest.mark.parametrize("negative", ["unmasked", "masked"])
@pytest.mark.parametrize("strength", [0.3, 0.0])
def test_flux_redux_attention_mask_enters_the_bent_softmax(flux, clip, strength, negative):
    """Flux Redux: the positive conditioning is the T5 tokens then 3 Redux image tokens, with
    StyleModelApply's attn_bias as its attention_mask. An unmasked negative cannot share a model call with
    it (two calls); a negative with its own mask (strength 1: zeros) can (one cfg call, the mask per batch
    item). The bent softmax adds the mask: every call equals the explicit result with the mask, the
    backend's own output (with the mask) wherever nothing is bent."""
    cond, uncond, redux = contexts(3)
    grid = (HEIGHT // 2, WIDTH // 2)
    n_redux, n_image = 3, grid[0] * grid[1]
    positive = [{"c_crossattn": torch.cat([cond, redux[:, :n_redux]], 1),
                 "attention_mask": redux_mask(TEXT, n_redux, n_image, strength)}]
    negatives = {"unmasked": cs.cond(uncond),
                 "masked": [{"c_crossattn": torch.cat([uncond, redux[:, :n_redux]], 1),
                             "attention_mask": redux_mask(TEXT, n_redux, n_image, 1.0)}]}
    sigmas, step = flux.schedule(3), 1
    entries = [ENTRY, GAIN]
    flux.record = []
    cs.calc_cond_batch(flux, [positive, negatives[negative]], latent(), sigmas[step:step + 1],
                       patched(flux, clip, entries).sampling_options(sigmas))
    layouts = {tuple(c["cond_or_uncond"]) for c in flux.record}
    assert layouts == ({(0,), (1,)} if negative == "unmasked" else {(1, 0)})
    assert all((c["mask"] is not None) == (0 in c["cond_or_uncond"] or negative == "masked") for c in flux.record)
    changed = check_calls(flux.record, 2, entries, {"sunset": [4], "kiss": [2]}, TEXT + n_redux, grid, step)
    assert changed > 1e-3


# --- the diffusers host on the same weights ---------------------------------------------------------------

@contextlib.contextmanager
def attention_outputs(transformer):
    """{layer: [output per call]} of the joint attentions (Flux: double blocks, then single blocks)."""
    modules = [b.attn for b in transformer.transformer_blocks] + [
        b.attn for b in getattr(transformer, "single_transformer_blocks", ())]
    records = {}
    handles = [m.register_forward_hook(lambda m, args, out, i=i: records.setdefault(i, []).append(out))
               for i, m in enumerate(modules)]
    try:
        yield records
    finally:
        for h in handles:
            h.remove()


def flux_call(pipe, x, timestep, context):
    """FluxPipeline's transformer call (packed latent, position ids, timestep / 1000; no pooled vector, as
    the stand-in's ComfyUI)."""
    h, w = x.shape[-2] // 2, x.shape[-1] // 2
    return pipe.transformer(hidden_states=cj.pack(x), encoder_hidden_states=context,
                            pooled_projections=x.new_zeros(1, 32), timestep=timestep / 1000,
                            img_ids=cj.image_ids(h, w), txt_ids=x.new_zeros(context.shape[1], 3)).sample


def unmarked(prompt):
    return prompt.replace("{", "").replace("}", "")


def test_flux_bending_matches_the_diffusers_host(flux, clip, tmp_path):
    """The same tiny Flux in both hosts: every joint attention's output of a conditional call at a scheduler
    step agrees (diffusers: SDPA + correction; ComfyUI: the selected backend + correction), and so does the
    prediction."""
    pipe = flux_pipeline(tmp_path)
    entries = [ENTRY, GAIN, {**ENTRY, "token": "kiss, sunset", "mode": "flip", "flip_horizontal": True,
                             "apply_to_timesteps": [1, 1], "apply_to_layers": None, "renormalize": "none"}]
    x, step = latent(), 1
    cond = pipe.encode_prompt(unmarked(PROMPT), None, max_sequence_length=TEXT)[0]
    pipe.scheduler.set_timesteps(3)
    t, sigma = pipe.scheduler.timesteps[step:step + 1], pipe.scheduler.sigmas[step:step + 1]
    dh.apply(pipe, {"bending": entries})
    try:
        pipe.encode_prompt(PROMPT, None, max_sequence_length=TEXT)                # locates the words
        with attention_outputs(pipe.transformer) as d_out:
            v = flux_call(pipe, x, t, cond)
    finally:
        dh.remove(pipe)
    m = patched(flux, clip, entries)
    with attention_outputs(flux.transformer) as c_out:
        (c_cond,) = cs.calc_cond_batch(flux, [cs.cond(cond)], x, sigma, m.sampling_options(pipe.scheduler.sigmas))
    with attention_outputs(flux.transformer) as plain:
        cs.calc_cond_batch(flux, [cs.cond(cond)], x, sigma, cs.ModelPatcher(flux).sampling_options())
    for layer in range(4):
        assert_close(c_out[layer][0], d_out[layer][0], rtol=1e-5, atol=1e-5, msg=f"layer {layer}")
    for layer in (1, 2, 3):                                   # bent: ENTRY at 1, 2; GAIN at 3; the flip at all
        bent, unbent = (torch.cat(o[layer][0], 1) if layer < 2 else o[layer][0] for o in (c_out, plain))
        assert not torch.allclose(bent, unbent, atol=1e-4), layer
    assert_close(c_cond, x - cj.unpack(v, *x.shape[-2:]) * sigma, rtol=1e-5, atol=1e-5)


def test_diffusers_flux_bends_only_the_positive_call_and_identity_is_plain(tmp_path):
    """FluxPipeline's true CFG runs the negative prompt as a call of its own: left to diffusers' processor;
    an identity bend (scale 1, no renormalisation) reproduces the plain output; maps are recorded."""
    pipe = flux_pipeline(tmp_path)
    negative = pipe.encode_prompt("a red car", None, max_sequence_length=TEXT)[0]
    cond = pipe.encode_prompt(unmarked(PROMPT), None, max_sequence_length=TEXT)[0]
    pipe.scheduler.set_timesteps(3)
    x, t = latent(), pipe.scheduler.timesteps[1:2]
    plain_cond, plain_neg = flux_call(pipe, x, t, cond), flux_call(pipe, x, t, negative)
    identity = {"token": "sunset", "mode": "scale", "scale_factor": 1.0, "renormalize": "none"}
    for entries, changes in (([ENTRY, GAIN], True), ([identity], False)):
        session = dh.apply(pipe, {"bending": entries}, record_maps=True)
        try:
            pipe.encode_prompt(PROMPT, None, max_sequence_length=TEXT)
            bent_cond, bent_neg = flux_call(pipe, x, t, cond), flux_call(pipe, x, t, negative)
        finally:
            dh.remove(pipe)
        assert torch.equal(bent_neg, plain_neg)
        if changes:
            assert (bent_cond - plain_cond).abs().max() > 1e-3
            assert [(r["token"], r["layer"], r["step"]) for r in session.maps] == [
                ("sunset", 1, 1), ("sunset", 2, 1), ("kiss", 3, 1)]
            assert session.maps[0]["original"].shape == (HEIGHT // 2, WIDTH // 2)
        else:
            assert_close(bent_cond, plain_cond, rtol=1e-5, atol=1e-6)


# --- SD3.5: [context; image] over 77 CLIP tokens then T5's, [B, L, heads·d], dual block 0 --------------------

CLIP_LENGTH = 77
SD3_COLUMNS = {"sunset": [5, CLIP_LENGTH + 4], "kiss": [3, CLIP_LENGTH + 2]}     # CLIP-L (BOS first), then T5
SD3_ENTRY = {**ENTRY, "apply_to_layers": [1]}
SD3_GAIN = {**GAIN, "apply_to_layers": [0, 2]}


@pytest.fixture(scope="module")
def sd3_folder(tmp_path_factory):
    """The SD3 pipeline's tokenizer folder, so that both hosts tokenize CLIP alike."""
    folder = tmp_path_factory.mktemp("sd3")
    sd3_pipeline(folder)
    return folder


@pytest.fixture
def sd3_clip(sd3_folder):
    return cj.SD3CLIP(cs.CLIP(sd3_folder / "clip"), cs.T5CLIP(t5_like_tokenizer(), key="t5xxl", min_length=TEXT))


@pytest.fixture
def sd3():
    return cj.SD3Model(cj.tiny_sd3())


def sd3_contexts(n=2, seed=1, length=CLIP_LENGTH + TEXT):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(1, length, 64, generator=g) for _ in range(n)]


def test_stand_in_sd3_runs_the_diffusers_model_as_comfyui_does(sd3, monkeypatch):
    """With SDPA the stand-in's SD3.5 equals diffusers' forward; per block a joint call over [context;
    image] tokens, and in the dual block 0 a second, image-only call, as the doc observed."""
    cs.install_comfy(monkeypatch, cs.Backend(cs.attention_sdpa))
    (cond,) = sd3_contexts(1)
    x, sigma = latent(), torch.tensor([0.7])
    expected = x - cj.tiny_sd3()(x, cond, torch.zeros(1, 64), sigma * 1000).sample * sigma
    assert_close(sd3.apply_model(x, sigma, cond, {"wrappers": {}}), expected, rtol=1e-6, atol=1e-6)
    image = (HEIGHT // 2) * (WIDTH // 2)
    joint = (1, CLIP_LENGTH + TEXT + image, 32)
    assert sd3.log == [(0, "joint", joint, joint), (0, "self", (1, image, 32), (1, image, 32)),
                       (1, "joint", joint, joint), (2, "joint", joint, joint)]


def test_sd3_columns_are_the_clip_and_the_t5_tokens(sd3_clip):
    key = comfy_host.dit_layout(cj.SD3Model(cj.tiny_sd3()).diffusion_model).text_key
    assert comfy_host.token_columns(sd3_clip, PROMPT, ["sunset", "kiss"], key) == SD3_COLUMNS
    without_t5 = cj.SD3CLIP(sd3_clip.clip, cs.T5CLIP(t5_like_tokenizer(), key="other"))
    assert comfy_host.token_columns(without_t5, PROMPT, ["sunset"], key) == {"sunset": [5]}


@pytest.mark.parametrize("batching", ["cfg", "positive chunks"])
def test_sd3_bends_image_queries_against_the_words_clip_and_t5_keys(sd3, sd3_clip, batching):
    cond, other, uncond = sd3_contexts(3)
    conds = [cs.cond(cond) + (cs.cond(other) if batching == "positive chunks" else []), cs.cond(uncond)]
    sigmas, step = sd3.schedule(3), 1
    entries = [SD3_ENTRY, SD3_GAIN]
    sd3.record = []
    cs.calc_cond_batch(sd3, conds, latent(), sigmas[step:step + 1], patched(sd3, sd3_clip, entries).sampling_options(sigmas))
    assert [c["kind"] for c in sd3.record] == ["joint", "self", "joint", "joint"]
    changed = check_calls(sd3.record, 4, entries, SD3_COLUMNS, CLIP_LENGTH + TEXT, (HEIGHT // 2, WIDTH // 2), step)
    assert changed > 1e-3


def test_sd3_without_t5_bends_the_clip_columns(sd3, sd3_clip):
    """SD3 sampled without T5 has a 77-token context: the word's T5 columns are dropped, not an error."""
    cond, uncond = sd3_contexts(length=CLIP_LENGTH)
    sigmas, step = sd3.schedule(3), 1
    sd3.record = []
    cs.calc_cond_batch(sd3, [cs.cond(cond), cs.cond(uncond)], latent(), sigmas[step:step + 1],
                       patched(sd3, sd3_clip, [SD3_ENTRY]).sampling_options(sigmas))
    changed = check_calls(sd3.record, 4, [SD3_ENTRY], {"sunset": [5]}, CLIP_LENGTH, (HEIGHT // 2, WIDTH // 2), step)
    assert changed > 1e-4


def test_sd3_unbent_steps_sample_bit_identically(sd3, sd3_clip):
    cond, uncond = sd3_contexts()
    noise = latent()
    plain = cs.sample(cs.ModelPatcher(sd3), noise, cond, uncond, steps=3)
    late = [{**SD3_ENTRY, "apply_to_timesteps": [5, 9]}, {**SD3_GAIN, "apply_to_timesteps": [3, 3]}]
    assert torch.equal(cs.sample(patched(sd3, sd3_clip, late), noise, cond, uncond, steps=3), plain)
    assert not torch.equal(cs.sample(patched(sd3, sd3_clip, [SD3_ENTRY, SD3_GAIN]), noise, cond, uncond, steps=3),
                           plain)


def test_sd3_bending_matches_the_diffusers_host(sd3, sd3_clip, sd3_folder):
    """The same tiny SD3.5 in both hosts, CLIP and T5 columns bent: every joint attention's output of a
    conditional call agrees, and so does the prediction."""
    pipe = sd3_pipeline(sd3_folder)
    entries = [SD3_ENTRY, SD3_GAIN, {**ENTRY, "token": "kiss, sunset", "mode": "flip", "flip_horizontal": True,
                                     "apply_to_timesteps": [1, 1], "apply_to_layers": None, "renormalize": "none"}]
    x, step = latent(), 1
    cond = pipe.encode_prompt(unmarked(PROMPT), None, None, do_classifier_free_guidance=False,
                              max_sequence_length=TEXT)[0]
    assert cond.shape == (1, CLIP_LENGTH + TEXT, 64)
    pipe.scheduler.set_timesteps(3)
    t, sigma = pipe.scheduler.timesteps[step:step + 1], pipe.scheduler.sigmas[step:step + 1]
    session = dh.apply(pipe, {"bending": entries})
    try:
        pipe.encode_prompt(PROMPT, None, None, do_classifier_free_guidance=False, max_sequence_length=TEXT)
        assert session.token_indices == {**SD3_COLUMNS, "kiss, sunset": [3, 5, CLIP_LENGTH + 2, CLIP_LENGTH + 4]}
        with attention_outputs(pipe.transformer) as d_out:
            v = pipe.transformer(hidden_states=x, encoder_hidden_states=cond, pooled_projections=torch.zeros(1, 64),
                                 timestep=t).sample                            # as the pipeline calls it
    finally:
        dh.remove(pipe)
    m = patched(sd3, sd3_clip, entries)
    with attention_outputs(sd3.transformer) as c_out:
        (c_cond,) = cs.calc_cond_batch(sd3, [cs.cond(cond)], x, sigma, m.sampling_options(pipe.scheduler.sigmas))
    with attention_outputs(sd3.transformer) as plain:
        cs.calc_cond_batch(sd3, [cs.cond(cond)], x, sigma, cs.ModelPatcher(sd3).sampling_options())
    for layer in range(3):
        image = c_out[layer][0][0]
        assert_close(image, d_out[layer][0][0], rtol=1e-5, atol=1e-5, msg=f"layer {layer}")
        assert not torch.allclose(image, plain[layer][0][0], atol=1e-4), layer
    assert_close(c_cond, x - v * sigma, rtol=1e-5, atol=1e-5)


# --- Chroma: Flux's attention path in ComfyUI (only the modulation differs) ----------------------------------

@pytest.fixture
def chroma():
    return cj.ChromaModel(cj.tiny_chroma())


def test_stand_in_chroma_runs_the_diffusers_model_as_comfyui_does(chroma, monkeypatch):
    cs.install_comfy(monkeypatch, cs.Backend(cs.attention_sdpa))
    (cond,) = contexts(1)
    x, sigma = latent(), torch.tensor([0.7])
    expected = x - cj.chroma_velocity(cj.tiny_chroma(), x, sigma, cond) * sigma
    assert_close(chroma.apply_model(x, sigma, cond, {"wrappers": {}}), expected, rtol=1e-6, atol=1e-6)
    tokens = TEXT + (HEIGHT // 2) * (WIDTH // 2)
    assert chroma.log == [(layer, "joint", (1, 2, tokens, 16), (1, 2, tokens, 16)) for layer in range(4)]


@pytest.mark.parametrize("batching", ["cfg", "positive chunks"])
def test_chroma_bends_image_queries_against_the_words_text_keys(chroma, clip, batching):
    """The node reads a Chroma as a Flux (double then single blocks, T5 keys): bent only where it should be."""
    assert comfy_host.dit_layout(chroma.diffusion_model).kind == "flux"
    cond, other, uncond = contexts(3)
    conds = [cs.cond(cond) + (cs.cond(other) if batching == "positive chunks" else []), cs.cond(uncond)]
    sigmas, step = chroma.schedule(3), 1
    entries = [ENTRY, GAIN]
    chroma.record = []
    cs.calc_cond_batch(chroma, conds, latent(), sigmas[step:step + 1],
                       patched(chroma, clip, entries).sampling_options(sigmas))
    changed = check_calls(chroma.record, 2, entries, {"sunset": [4], "kiss": [2]}, TEXT, (HEIGHT // 2, WIDTH // 2),
                          step)
    assert changed > 1e-3
    noise = latent()
    plain = cs.sample(cs.ModelPatcher(chroma), noise, cond, uncond, steps=3)
    late = [{**ENTRY, "apply_to_timesteps": [5, 9]}]
    assert torch.equal(cs.sample(patched(chroma, clip, late), noise, cond, uncond, steps=3), plain)


def test_diffusers_chroma_bends_with_the_pipelines_mask(tmp_path):
    """ChromaPipeline masks the T5 padding (all but the first pad): its blocks pass [b, 1, L, L] to SDPA, which
    the adapter's SDPA and bent_output's bias take as given. The words' columns come from the T5 tokens; the
    negative call is diffusers' own; an identity bend reproduces the plain output under the mask."""
    from _pipelines_joint import chroma_pipeline

    pipe = chroma_pipeline()
    cond, mask = pipe._get_t5_prompt_embeds(unmarked(PROMPT), max_sequence_length=TEXT)
    negative = pipe._get_t5_prompt_embeds("a red car", max_sequence_length=TEXT)
    assert not mask.all()
    pipe.scheduler.set_timesteps(3)
    x, t = latent(), pipe.scheduler.timesteps[1:2]
    h, w = HEIGHT // 2, WIDTH // 2

    def call(context, text_mask):
        joint = torch.cat([text_mask, text_mask.new_ones(1, h * w)], 1)
        return pipe.transformer(hidden_states=cj.pack(x), encoder_hidden_states=context, timestep=t / 1000,
                                img_ids=cj.image_ids(h, w), txt_ids=x.new_zeros(context.shape[1], 3),
                                attention_mask=joint).sample

    plain_cond, plain_neg = call(cond, mask), call(*negative)
    identity = {"token": "sunset", "mode": "scale", "scale_factor": 1.0, "renormalize": "none"}
    for entries, changes in (([ENTRY, GAIN], True), ([identity], False)):
        session = dh.apply(pipe, {"bending": entries})
        try:
            pipe.encode_prompt(PROMPT, None, max_sequence_length=TEXT)
            assert session.token_indices["sunset"] == [4]
            bent_cond, bent_neg = call(cond, mask), call(*negative)
        finally:
            dh.remove(pipe)
        assert torch.equal(bent_neg, plain_neg)
        if changes:
            assert (bent_cond - plain_cond).abs().max() > 1e-3
        else:
            assert_close(bent_cond, plain_cond, rtol=1e-5, atol=1e-6)
