"""Attention Bending on DiTs in ComfyUI (comfy_host's optimized_attention_override path), driven through
the stand-in host's Wan 2.1 (a real tiny diffusers WanTransformer3DModel run as ComfyUI runs Wan:
shared/docs/comfyui-dit-hooks.md) and compared with the diffusers host on the same weights."""

import functools
import contextlib

import pytest
import torch
from torch.testing import assert_close

from _helpers import bending_node, gain_entry, translate_entry
import comfy_standin as cs
from _pipelines import t5_like_tokenizer, wan_pipeline
from ckptbend.runtime import bending, comfy_host
from ckptbend.runtime import diffusers_host as dh

PROMPT = "a romantic kiss at {sunset}"
FRAMES, HEIGHT, WIDTH = 2, 8, 12             # latent; grid 2 × 4 × 6 with Wan's 1×2×2 patch
ENTRY = translate_entry(None)
GAIN = gain_entry([1])


pytestmark = pytest.mark.usefixtures("one_thread_no_grad", "comfy")     # conftest.py


@pytest.fixture(scope="module")
def clip():
    return cs.T5CLIP(t5_like_tokenizer())


@pytest.fixture
def model():
    return cs.FlowModel(cs.tiny_wan())


def contexts(seed=1, length=16):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(1, length, 32, generator=g), torch.randn(1, length, 32, generator=g)


def latent(seed=2):
    return torch.randn(1, 16, FRAMES, HEIGHT, WIDTH, generator=torch.Generator().manual_seed(seed))


patched = functools.partial(bending_node, prompt=PROMPT)     # the node as ComfyUI runs it


def predictions(model, patcher, cond, uncond, sigma, sample_sigmas):
    return cs.calc_cond_batch(model, [cs.cond(cond), cs.cond(uncond)], latent(), sigma,
                              patcher.sampling_options(sample_sigmas))


@contextlib.contextmanager
def cross_attention_outputs(transformer):
    """{block index: [output per call]} of the blocks' text cross-attention (attn2)."""
    records, handles = {}, []
    for i, block in enumerate(transformer.blocks):
        handles.append(block.attn2.register_forward_hook(
            lambda m, args, out, i=i: records.setdefault(i, []).append(out)))
    try:
        yield records
    finally:
        for h in handles:
            h.remove()


def test_stand_in_wan_runs_the_diffusers_model_as_comfyui_does(model, comfy, monkeypatch):
    """With PyTorch's SDPA as the backend the stand-in's Wan equals diffusers' own forward; the
    attention calls are what the doc observed (self then text cross-attention per block)."""
    cs.install_comfy(monkeypatch, cs.Backend(cs.attention_sdpa))
    reference = cs.tiny_wan()
    cond, _ = contexts()
    x, sigma = latent(), torch.tensor([0.7])
    expected = x - reference(x, sigma * 1000, encoder_hidden_states=cond).sample * sigma
    got = model.apply_model(x, sigma, cond, {"wrappers": {}})
    assert_close(got, expected, rtol=1e-5, atol=1e-5)
    tokens = FRAMES * (HEIGHT // 2) * (WIDTH // 2)
    assert [(kind, tuple(q), tuple(k)) for kind, q, k in model.log] == [
        ("self", (1, tokens, 24), (1, tokens, 24)), ("cross", (1, tokens, 24), (1, 16, 24))] * 2


def test_token_columns_through_the_t5_tokenizer(clip):
    assert comfy_host.token_columns(clip, "a (romantic:1.3) kiss at {sunset}", ["sunset", "kiss"], "umt5xxl") == \
        {"sunset": [4], "kiss": [2]}


def test_node_hooks_wan_through_the_override(model, clip):
    m = patched(model, clip, [ENTRY])
    options = m.model_options["transformer_options"]
    assert callable(options["optimized_attention_override"])
    assert sorted(options["patches_replace"]["dit"]) == [("double_block", 0), ("double_block", 1)]
    assert list(m.wrappers[cs.APPLY_MODEL]) == ["ckptbend_bending"]
    assert "optimized_attention_override" not in cs.ModelPatcher(model).model_options["transformer_options"]


@pytest.mark.parametrize("max_chunks", [8, 1])
def test_wan_bending_changes_only_the_conditional_prediction(model, clip, max_chunks):
    model.max_chunks = max_chunks
    cond, uncond = contexts()
    sigmas = model.schedule(3)
    plain = predictions(model, cs.ModelPatcher(model), cond, uncond, sigmas[:1], sigmas)
    bent = predictions(model, patched(model, clip, [ENTRY, GAIN]), cond, uncond, sigmas[:1], sigmas)
    assert torch.equal(bent[1], plain[1])
    assert (bent[0] - plain[0]).abs().max() > 1e-3


def test_wan_unbent_steps_and_zero_strength_sample_bit_identically(model, clip):
    """Every attention call the node does not bend runs the selected backend: bit-identical."""
    cond, uncond = contexts()
    noise = latent()
    plain = cs.sample(cs.ModelPatcher(model), noise, cond, uncond, steps=3)
    late = [{**ENTRY, "apply_to_timesteps": [5, 9]}, {**GAIN, "apply_to_timesteps": [3, 3]}]
    assert torch.equal(cs.sample(patched(model, clip, late), noise, cond, uncond, steps=3), plain)
    zero = patched(model, clip, [ENTRY], bend1_strength=0.0)
    assert "optimized_attention_override" not in zero.model_options["transformer_options"]
    assert not torch.equal(cs.sample(patched(model, clip, [ENTRY, GAIN]), noise, cond, uncond, steps=3), plain)


def test_wan_bending_matches_the_diffusers_host(model, clip):
    """The same tiny Wan in both hosts: the text cross-attention outputs of a conditional call at a
    scheduler step agree (diffusers: explicit bent softmax; ComfyUI: backend output + correction)."""
    pipe = wan_pipeline()
    entries = [ENTRY, GAIN, {**ENTRY, "token": "kiss, sunset", "mode": "flip", "flip_horizontal": True,
                             "apply_to_timesteps": [1, 1], "renormalize": "none"}]
    x, step = latent(), 1
    cond = pipe.encode_prompt(PROMPT.replace("{", "").replace("}", ""), do_classifier_free_guidance=False,
                              max_sequence_length=16)[0]
    pipe.scheduler.set_timesteps(3)
    t, sigma = pipe.scheduler.timesteps[step], pipe.scheduler.sigmas[step:step + 1]
    dh.apply(pipe, {"bending": entries})
    try:
        pipe.encode_prompt(PROMPT, do_classifier_free_guidance=False, max_sequence_length=16)  # locates the words
        with cross_attention_outputs(pipe.transformer) as d_out:
            v = pipe.transformer(x, t.expand(1), encoder_hidden_states=cond).sample
    finally:
        dh.remove(pipe)
    m = patched(model, clip, entries)
    with cross_attention_outputs(model.transformer) as c_out:
        (c_cond,) = cs.calc_cond_batch(model, [cs.cond(cond)], x, sigma, m.sampling_options(pipe.scheduler.sigmas))
    with cross_attention_outputs(model.transformer) as plain:
        cs.calc_cond_batch(model, [cs.cond(cond)], x, sigma, cs.ModelPatcher(model).sampling_options())
    for i in (0, 1):
        assert_close(c_out[i][0], d_out[i][0], rtol=1e-5, atol=1e-6, msg=f"block {i}")
        assert not torch.allclose(c_out[i][0], plain[i][0], atol=1e-4), i
    assert_close(c_cond, x - v * sigma, rtol=1e-5, atol=1e-5)


# --- Wan I2V: [257 CLIP-image; 512 text] context, the text call is the block's third ---------------------------

def image_features(seed=4):
    return torch.randn(1, cs.CLIP_IMAGE_TOKENS, cs.WAN_I2V["image_dim"], generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def clip512():
    return cs.T5CLIP(t5_like_tokenizer(), min_length=cs.WAN_TEXT_TOKENS)


@pytest.fixture
def i2v():
    return cs.FlowModel(cs.tiny_wan_i2v(), clip_fea=image_features())


class Recording(cs.Backend):
    """The backend, keeping each call's (q, k, v) and what the model got back (after any override)."""

    def __init__(self):
        super().__init__(cs.attention_chunked)
        self.calls = []

    def optimized_attention(self, q, k, v, heads, *args, **kwargs):
        out = super().optimized_attention(q, k, v, heads, *args, **kwargs)
        self.calls.append((q, k, v, heads, out.clone()))
        return out


def test_stand_in_wan_i2v_runs_the_diffusers_model_as_comfyui_does(i2v, monkeypatch):
    cs.install_comfy(monkeypatch, cs.Backend(cs.attention_sdpa))
    reference = cs.tiny_wan_i2v()
    cond, _ = contexts(length=cs.WAN_TEXT_TOKENS)
    x, sigma = latent(), torch.tensor([0.7])
    expected = x - reference(x, sigma * 1000, encoder_hidden_states=cond,
                             encoder_hidden_states_image=image_features()).sample * sigma
    assert_close(i2v.apply_model(x, sigma, cond, {"wrappers": {}}), expected, rtol=1e-5, atol=1e-5)
    tokens = FRAMES * (HEIGHT // 2) * (WIDTH // 2)
    assert [(kind, tuple(q), tuple(k)) for kind, q, k in i2v.log] == [
        ("self", (1, tokens, 24), (1, tokens, 24)), ("image", (1, tokens, 24), (1, 257, 24)),
        ("cross", (1, tokens, 24), (1, 512, 24))] * 2
    assert comfy_host.dit_layout(i2v.diffusion_model).text_call == 2


def test_wan_i2v_bends_the_text_call_only(i2v, clip512, monkeypatch):
    """Per block: self-attention and the CLIP-image call return the backend's output bit for bit; the
    text call is changed in the positive chunk only."""
    backend = Recording()
    cs.install_comfy(monkeypatch, backend)
    cond, uncond = contexts(length=cs.WAN_TEXT_TOKENS)
    sigmas = i2v.schedule(3)
    cs.calc_cond_batch(i2v, [cs.cond(cond), cs.cond(uncond)], latent(), sigmas[:1],
                       patched(i2v, clip512, [ENTRY, GAIN]).sampling_options(sigmas))
    kinds = [kind for kind, _, _ in i2v.log]
    assert kinds == ["self", "image", "cross"] * 2 and len(backend.calls) == 6
    for kind, (q, k, v, heads, out) in zip(kinds, backend.calls):
        plain = cs.attention_chunked(q, k, v, heads)
        if kind == "cross":
            assert torch.equal(out[0], plain[0])                       # negative chunk (batched first)
            assert (out[1] - plain[1]).abs().max() > 1e-4
        else:
            assert torch.equal(out, plain), kind


def test_wan_i2v_bending_matches_the_diffusers_host(i2v, clip512):
    """Wan I2V in both hosts: the bent text cross-attention (plus the untouched image part) agree."""
    pipe = wan_pipeline()
    pipe = type(pipe)(**{**pipe.components, "transformer": cs.tiny_wan_i2v()})
    entries = [ENTRY, GAIN]
    x, step = latent(), 1
    text = PROMPT.replace("{", "").replace("}", "")
    cond = pipe.encode_prompt(text, do_classifier_free_guidance=False, max_sequence_length=cs.WAN_TEXT_TOKENS)[0]
    pipe.scheduler.set_timesteps(3)
    t, sigma = pipe.scheduler.timesteps[step], pipe.scheduler.sigmas[step:step + 1]
    dh.apply(pipe, {"bending": entries})
    try:
        pipe.encode_prompt(PROMPT, do_classifier_free_guidance=False, max_sequence_length=cs.WAN_TEXT_TOKENS)
        with cross_attention_outputs(pipe.transformer) as d_out:
            v = pipe.transformer(x, t.expand(1), encoder_hidden_states=cond,
                                 encoder_hidden_states_image=image_features()).sample
    finally:
        dh.remove(pipe)
    m = patched(i2v, clip512, entries)
    with cross_attention_outputs(i2v.transformer) as c_out:
        (c_cond,) = cs.calc_cond_batch(i2v, [cs.cond(cond)], x, sigma, m.sampling_options(pipe.scheduler.sigmas))
    with cross_attention_outputs(i2v.transformer) as plain:
        cs.calc_cond_batch(i2v, [cs.cond(cond)], x, sigma, cs.ModelPatcher(i2v).sampling_options())
    for i in (0, 1):
        assert_close(c_out[i][0], d_out[i][0], rtol=1e-5, atol=1e-6, msg=f"block {i}")
        assert not torch.allclose(c_out[i][0], plain[i][0], atol=1e-5), i
    assert_close(c_cond, x - v * sigma, rtol=1e-5, atol=1e-5)


# --- Wan 2.2 A14B: two experts, one node ------------------------------------------------------------------

def two_experts(high, low, clip, entries, **values):
    (cls,) = comfy_host.node_class_mappings({"bending": entries}, "wan bend", "ab" * 32)[0].values()
    values = {"bending_clip": clip, "bending_prompt": PROMPT, **values}
    return getattr(cls(), cls.FUNCTION)(model=cs.ModelPatcher(high), model_2=cs.ModelPatcher(low), **values)


def run_experts(high_patcher, low_patcher, switch=2, steps=4):
    """The two KSamplerAdvanced of a Wan 2.2 A14B workflow: high-noise steps [0, switch), low-noise the rest."""
    cond, uncond = contexts()
    sigmas = high_patcher.model.schedule(steps)
    x = cs.sample_advanced(high_patcher, latent() * sigmas[0], cond, uncond, sigmas[:switch + 1])
    return cs.sample_advanced(low_patcher, x, cond, uncond, sigmas[switch:])


def test_wan_reference_and_concatenated_frames_leave_their_rows_unbent():
    """A Wan call with tokens beside the video's (ComfyUI's WanModel puts Fun Control's reference image, ref_conv, before
    them and Phantom's time_dim_concat frames after; bin/check-comfyui wan-extra-tokens runs both on ComfyUI's own
    model): the node's override bends the positive item's video rows as in a call without the extra tokens (a query
    row's attention is its own), and leaves the extra rows and the negative item to ComfyUI's attention."""
    from ckptbend.runtime.comfy_host import dit
    from ckptbend.runtime.comfy_host.dit_layouts import DiTLayout

    layout = DiTLayout("wan", [], 1, False, (1, 2, 2), "umt5xxl")
    specs = [bending.as_spec(ENTRY)]
    override = dit._dit_override(specs, {"sunset": [4]}, layout, None, steps=lambda options: 0)
    g = torch.Generator().manual_seed(7)
    x, image = torch.randn(2, 16, FRAMES, HEIGHT, WIDTH, generator=g), torch.randn(2, 16, HEIGHT, WIDTH, generator=g)
    n_video, n_frame = FRAMES * (HEIGHT // 2) * (WIDTH // 2), (HEIGHT // 2) * (WIDTH // 2)
    q, k, v = (torch.randn(2, n, 24, generator=g) for n in (n_video + n_frame, 16, 16))

    def call(q, **conds):
        options = {"cond_or_uncond": [1, 0]}                        # [negative; positive]
        dit._record_call(layout)(lambda *a, **kw: None, x, None, None, None, None, options, **conds)
        options[dit.DIT_TAG] = {"calls": [layout.text_call], "layer": 0}
        return override(cs.attention_sdpa, q, k, v, 2, transformer_options=options)

    plain = cs.attention_sdpa(q, k, v, 2)
    for conds, video in (({"reference_latent": image}, slice(n_frame, None)),
                         ({"time_dim_concat": image[:, :, None]}, slice(0, n_video))):
        out = call(q, **conds)
        assert_close(out[:, video], call(q[:, video]), rtol=1e-5, atol=1e-6)
        assert not torch.allclose(out[1, video], plain[1, video], atol=1e-4)                # the positive is bent
        assert torch.equal(out[0], plain[0])                                                # the negative is not
        extra = [i for i in range(q.shape[1]) if i not in range(q.shape[1])[video]]
        assert torch.equal(out[:, extra], plain[:, extra])                                  # nor the extra rows
    with pytest.raises(ValueError, match="do not fit the grid"):
        call(q)                                                     # extra tokens the call does not explain


def test_node_takes_an_optional_second_model(model, clip):
    (cls,) = comfy_host.node_class_mappings({"bending": [ENTRY]}, "wan bend", "ab" * 32)[0].values()
    assert cls.RETURN_TYPES == ("MODEL", "MODEL") and cls.RETURN_NAMES == ("model", "model_2")
    assert cls.INPUT_TYPES()["optional"] == {"model_2": ("MODEL", {"tooltip": comfy_host.node.SECOND_MODEL})}
    patched_1, patched_2 = getattr(cls(), cls.FUNCTION)(model=cs.ModelPatcher(model), bending_clip=clip,
                                                          bending_prompt=PROMPT)
    assert patched_2 is None and "optimized_attention_override" in patched_1.model_options["transformer_options"]
    (sag_node,) = comfy_host.node_class_mappings({"sag": {"scale": 0.5}}, "sag", "cd" * 32)[0].values()
    assert sag_node.RETURN_TYPES == ("MODEL",) and "optional" not in sag_node.INPUT_TYPES()


def test_wan22_two_experts_one_step_window(clip):
    """apply_to_timesteps [1, 2] over a 4-step run split high [0, 1] / low [2, 3]: the node bends step 1
    on the high-noise expert and step 2 (its first) on the low-noise one, although each sampler passes
    only its slice of the schedule; the same as patching each expert alone with its own local window."""
    high, low = cs.FlowModel(cs.tiny_wan(5)), cs.FlowModel(cs.tiny_wan(7))
    window = [{**ENTRY, "apply_to_timesteps": [1, 2]}, {**GAIN, "apply_to_timesteps": [1, 2]}]
    patched_high, patched_low = two_experts(high, low, clip, window)
    got = run_experts(patched_high, patched_low)

    def local(model, start, end):
        return patched(model, clip, [{**e, "apply_to_timesteps": [start, end]} for e in window])

    expected = run_experts(local(high, 1, 1), local(low, 0, 0))
    naive = run_experts(local(high, 1, 2), local(low, 1, 2))        # each slice counted from 0
    plain = run_experts(cs.ModelPatcher(high), cs.ModelPatcher(low))
    assert torch.equal(got, expected)
    assert (got - naive).abs().max() > 1e-4 and (got - plain).abs().max() > 1e-4
    # a window inside the high-noise slice leaves the low-noise expert's steps alone
    early_high, early_low = two_experts(high, low, clip, [{**e, "apply_to_timesteps": [0, 1]} for e in window])
    assert torch.equal(run_experts(early_high, early_low),
                       run_experts(local(high, 0, 1), cs.ModelPatcher(low)))


def test_older_comfyui_gets_one_clear_error(model, clip, monkeypatch):
    cs.install_comfy(monkeypatch, cs.Backend(override_mechanism=False))
    with pytest.raises(ValueError, match=r"needs ComfyUI 0\.3\.60 or newer"):
        patched(model, clip, [ENTRY])


def test_sag_and_slothful_need_a_unet(model):
    with pytest.raises(ValueError, match="need a UNet"):
        comfy_host.patch_model(cs.ModelPatcher(model), {"sag": {"scale": 0.5, "blur_sigma": 2.0}})


# --- joint attention (Flux, SD3): the override's arithmetic on ComfyUI's call layouts -------------------

def joint_model(kind):
    """A diffusion_model with the structure dit_layout reads (Flux: double + single blocks; SD3: joint
    blocks); the blocks themselves are not run here."""
    dm = torch.nn.Module()
    if kind == "flux":
        dm.double_blocks, dm.single_blocks = torch.nn.ModuleList([torch.nn.Identity()] * 2), torch.nn.ModuleList(
            [torch.nn.Identity()] * 3)
    else:
        dm.joint_blocks = torch.nn.ModuleList([torch.nn.Identity()] * 4)
    dm.patch_size = 2
    return dm


@pytest.mark.parametrize("kind", ["flux", "sd3"])
def test_joint_attention_bends_image_queries_against_text_keys(kind):
    """Through ComfyUI's call (Flux: [B, heads, L, d] with skip_reshape; SD3: [B, L, heads·d]) with the
    keys [text; image]: the image-query × text-key block of the positive chunk is bent, every row
    renormalised over all keys; text queries and the negative chunk keep the backend's output."""
    layout = comfy_host.dit_layout(joint_model(kind))
    assert layout.joint and layout.text_call == 0 and len(layout.blocks) == (5 if kind == "flux" else 4)
    entry = {**ENTRY, "token": "kiss", "translate_x": 0.5, "apply_to_layers": [3]}
    override = comfy_host.dit._dit_override([bending.as_spec(entry)], {"kiss": [2, 3]}, layout, None)
    heads, d, n_text, grid = 2, 8, 6, (1, 4, 6)
    length = n_text + 24
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(2, heads, length, d, generator=g) * 2 for _ in range(3))
    options = {"optimized_attention_override": override, "cond_or_uncond": [1, 0], "sigmas": torch.tensor([0.5, 0.5]),
               "sample_sigmas": None, comfy_host.dit.DIT_TAG: {"layer": 3, "calls": [0]},
               comfy_host.dit.DIT_CALL: {"grid": grid, "text": n_text}}
    backend = cs.Backend(cs.attention_chunked)
    if kind == "flux":
        args, kwargs = (q, k, v, heads), {"skip_reshape": True}
    else:
        args, kwargs = [t.transpose(1, 2).flatten(2) for t in (q, k, v)], {"heads": heads}
    out = backend.optimized_attention(*args, **kwargs, transformer_options=options)
    plain = cs.attention_chunked(*args, **kwargs)
    probs = torch.softmax(q @ k.transpose(-1, -2) * d ** -0.5, dim=-1)
    block = probs[1:, :, n_text:, :n_text].reshape(heads, 24, n_text)
    bent = bending.bend_probs(block, {"kiss": [2, 3]}, grid[1:], [{**entry, "renormalize": "none"}],
                                         layer_index=3)
    expected = probs[1:].clone()
    expected[0, :, n_text:, :n_text] = bent.view(heads, 24, n_text)
    expected[0, :, n_text:] /= expected[0, :, n_text:].sum(-1, keepdim=True)
    expected = (expected @ v[1:]).transpose(1, 2).flatten(2)
    assert_close(out[1:], expected, rtol=1e-4, atol=1e-5)
    assert torch.equal(out[:1], plain[:1])                                   # negative chunk
    assert torch.equal(out[1:, :n_text], plain[1:, :n_text])                 # text queries
    assert options[comfy_host.dit.DIT_TAG]["calls"] == [1]
    # the next call of the block (SD3.5's dual-block image self-attention) passes through
    again = backend.optimized_attention(*args, **kwargs, transformer_options=options)
    assert torch.equal(again, plain)


def test_hunyuan_video_is_not_taken_for_flux():
    """ComfyUI's HunyuanVideo has Flux's double_blocks / single_blocks, but its text goes through a token refiner
    (txt_in.individual_token_refiner) and its joint tokens are [image; text]: 1.0 (no ByT5 branch) attends to Llama
    tokens (test_comfy_hunyuan_video.py; 1.5: test_comfy_hunyuan.py)."""
    from torch import nn

    model = nn.Module()
    model.double_blocks, model.single_blocks, model.patch_size = nn.ModuleList(), nn.ModuleList(), (1, 2, 2)
    model.txt_in = nn.Module()
    model.txt_in.individual_token_refiner = nn.Module()
    layout = comfy_host.dit_layout(model)
    assert (layout.kind, layout.text_key) == ("hunyuan", comfy_host.tokens.HUNYUAN_KEY)


def test_ltx2_is_refused_with_its_reason():
    """ComfyUI's LTX-2 (LTXAV) blocks carry an audio stream beside the video one; its latent packs both, so the node
    cannot read the video grid: one line says so (the diffusers host bends the video stream)."""
    from torch import nn

    model = nn.Module()
    block = nn.Module()
    block.attn2, block.audio_attn2 = nn.Module(), nn.Module()
    model.transformer_blocks = nn.ModuleList([block])
    with pytest.raises(ValueError, match="does not reach LTX-2: its latent packs video and audio"):
        comfy_host.dit_layout(model)
