"""LTX-2 / 2.3 / 2.5: file layouts checked against diffusers' own single-file converter and class, and bakes
shown equal to the run-time multiplication on the real `LTX2VideoTransformer3DModel` (video and audio streams,
their text cross-attentions and the audio↔video exchange). The reference is always the original model with
forward hooks multiplying q after its qk-norm, k after its qk-norm, v, or the attention output by the factor;
the baked file is read back through diffusers' converter into a fresh model, so ckptbend's tables never judge."""

import copy

import diffusers
import pytest
import torch
from diffusers.loaders.single_file_utils import convert_ltx2_transformer_to_diffusers, infer_diffusers_model_type
from safetensors.torch import load_file, save_file

from _dit import compare, dequantised, recipe, run
from _helpers import load_strict
from ckptbend.bake import bake
from ckptbend.errors import CkptbendError
from ckptbend.layouts import blocks_with_attention, detect
from ckptbend.plan import make_plan
from ckptbend.synth import ltx2 as L

pytestmark = pytest.mark.usefixtures("one_thread_no_grad")
# LTX-2.3's prompt modulation: ComfyUI's names, which diffusers 0.42.1's converter leaves as they are.
CONVERTER_GAP = {"prompt_adaln_single.": "prompt_adaln.", "audio_prompt_adaln_single.": "audio_prompt_adaln."}
HOOK = {"q": "norm_q", "k": "norm_k", "v": "to_v", "out": "to_out.0"}
# (section, stream) → the attentions whose projection of that kind is that stream's, per kind
STREAMS = {("self", "video"): {p: ["attn1"] for p in HOOK}, ("self", "audio"): {p: ["audio_attn1"] for p in HOOK},
           ("cross", "video"): {p: ["attn2"] for p in HOOK}, ("cross", "audio"): {p: ["audio_attn2"] for p in HOOK},
           ("joint", "video"): {"q": ["audio_to_video_attn"], "out": ["audio_to_video_attn"],
                                "k": ["video_to_audio_attn"], "v": ["video_to_audio_attn"]},
           ("joint", "audio"): {"q": ["video_to_audio_attn"], "out": ["video_to_audio_attn"],
                                "k": ["audio_to_video_attn"], "v": ["audio_to_video_attn"]}}


@pytest.fixture(scope="module")
def models():
    return {arch: L.dit.build(L.FAMILY, arch) for arch in L.ARCHES}


def to_diffusers(state):
    """diffusers' converter, then the one rename it lacks (LTX-2.3's prompt modulation)."""
    out = convert_ltx2_transformer_to_diffusers(dict(state))
    for a, b in CONVERTER_GAP.items():
        out = {(b + k[len(a):] if k.startswith(a) else k): v for k, v in out.items()}
    return out


def load(arch, path, layout):
    """A baked or synthetic file read the way diffusers reads it, into a fresh float64 model of the real class."""
    model = diffusers.LTX2VideoTransformer3DModel(**L.CONFIGS[arch]).eval()
    if layout == "diffusers":
        state = {k: v for f in sorted((path / "transformer").glob("*.safetensors")) for k, v in load_file(f).items()}
    else:
        state = dequantised(path)
        state = state if layout == "transformer_diffusers" else to_diffusers(state)
    return load_strict(model, {k: v.float() for k, v in state.items()}).double()


def forward(model):
    g = torch.Generator().manual_seed(7)

    def r(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64)
    text, audio_text = (32, 16) if model.config.cross_attn_mod else (24, 24)   # 2.3+: projected in the connector
    t = torch.tensor([0.4], dtype=torch.float64)
    video, audio = model(hidden_states=r(1, 8, 8), audio_hidden_states=r(1, 6, 4), encoder_hidden_states=r(1, 5, text),
                         audio_encoder_hidden_states=r(1, 5, audio_text), timestep=t, sigma=t, audio_sigma=t,
                         num_frames=2, height=2, width=2, audio_num_frames=6, return_dict=False)
    return torch.cat([video.flatten(), audio.flatten()])


def hooked(model, factors, blocks=(0, 1)):
    """{(section, stream, proj): f} applied by forward hooks on a float64 copy."""
    m = copy.deepcopy(model).double()
    for (section, stream, proj), f in factors.items():
        for b in blocks:
            for module in STREAMS[section, stream][proj]:
                m.get_submodule(f"transformer_blocks.{b}.{module}.{HOOK[proj]}").register_forward_hook(
                    lambda mod, args, out, f=f: out * f)
    return m


def body(factors):
    text = ""
    for (section, stream, proj), f in factors.items():
        text += f'[[dit.{section}]]\nstream = "{stream}"\n{proj} = {f}\n'
    return text


ALL = {("self", "video", "q"): 1.7, ("self", "audio", "k"): 0.6, ("self", "video", "v"): 1.9,
       ("self", "audio", "out"): 0.55, ("cross", "video", "k"): 1.3, ("cross", "audio", "q"): 0.8,
       ("cross", "audio", "v"): 1.4, ("cross", "video", "out"): 0.7, ("joint", "video", "q"): 1.5,
       ("joint", "audio", "k"): 0.75, ("joint", "video", "v"): 1.6, ("joint", "audio", "out"): 0.65}


# --- layouts ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("arch, name", [("ltx2", "ltx-2"), ("ltx2_3", "ltx-2.3"), ("ltx2_5", "ltx-2.5")])
@pytest.mark.parametrize("layout", ["single", "single_prefixed", "transformer_diffusers", "diffusers"])
def test_layouts_load_strict_and_are_named(synth_file, models, arch, name, layout):
    path = synth_file(arch, layout)
    loaded = load(arch, path, layout).float().state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in models[arch].state_dict().items())
    ckpt = detect(path)
    assert ckpt.architecture == name and ckpt.qk_norm
    assert ckpt.kind == ("diffusers-folder" if layout == "diffusers" else "dit")
    assert blocks_with_attention(ckpt) == ["B00", "B01"]
    assert {s.stream for s in ckpt.sites if s.component == "dit"} == {"video", "audio"}


def test_converter_gap_is_only_the_prompt_modulation(synth_file):
    """diffusers 0.42.1's converter takes LTX-2's names whole; of LTX-2.3's it misses only prompt_adaln_single."""
    assert set(convert_ltx2_transformer_to_diffusers(load_file(synth_file("ltx2")))) == set(
        L.dit.build(L.FAMILY, "ltx2").state_dict())
    missed = set(convert_ltx2_transformer_to_diffusers(load_file(synth_file("ltx2_3")))) - set(
        L.dit.build(L.FAMILY, "ltx2_3").state_dict())
    assert missed and all(k.startswith(tuple(CONVERTER_GAP)) for k in missed)


def test_sites_follow_the_module_table(synth_file):
    keys = {(s.key, s.component, s.attn, s.proj, s.stream) for s in detect(synth_file("ltx2")).sites}
    b = "transformer_blocks.1."
    for want in [(b + "audio_attn1.q_norm.weight", "dit", "self", "q", "audio"),
                 (b + "attn2.k_norm.weight", "dit", "cross", "k", "video"),
                 (b + "audio_attn2.to_v.bias", "dit", "cross", "v", "audio"),
                 (b + "audio_to_video_attn.q_norm.weight", "dit", "joint", "q", "video"),
                 (b + "audio_to_video_attn.to_v.weight", "dit", "joint", "v", "audio"),
                 (b + "video_to_audio_attn.k_norm.weight", "dit", "joint", "k", "video"),
                 (b + "video_to_audio_attn.to_out.0.weight", "dit", "joint", "out", "audio"),
                 (b + "audio_attn1.to_q.weight", "unet", "attn1", "q", None),     # ComfyUI's nodes match it
                 (b + "attn2.to_out.0.bias", "unet", "attn2", "out", None)]:
        assert want in keys, want
    assert not any(k[1] == "unet" and "_to_" in k[0] for k in keys)          # nor the a2v / v2a exchange
    assert not any(k[1] == "dit" and (".to_q." in k[0] or ".to_k." in k[0]) for k in keys)   # cancelled by the norm


def test_full_size_header_is_named_like_diffusers_and_comfyui(tmp_path):
    with torch.device("meta"):
        model = diffusers.LTX2VideoTransformer3DModel(num_layers=48)
    state = {"model.diffusion_model." + k: torch.empty(v.shape, dtype=torch.bfloat16)
             for k, v in L.to_original(model.state_dict()).items()}
    # diffusers' sniffer asks its LTX-Video branch first, whose key LTX-2 shares: the same mistake ckptbend made
    assert infer_diffusers_model_type(state) == "ltx-video-0.9.7"
    assert "model.diffusion_model.audio_adaln_single.linear.weight" in state      # ComfyUI's ltxav key
    from test_dit_wan import sparse_file
    ckpt = detect(sparse_file(tmp_path / "full.safetensors", state))
    assert ckpt.architecture == "ltx-2-19b" and len(blocks_with_attention(ckpt)) == 48


# --- what is not LTX-2 or LTX-Video is refused -----------------------------------------------------------------

def test_ltx_video_with_an_unknown_block_part_is_refused(tmp_path, synth_file):
    state = load_file(synth_file("ltx_video"))
    state["transformer_blocks.0.audio_attn1.to_q.weight"] = torch.zeros(32, 32)
    save_file(state, tmp_path / "odd.safetensors")
    with pytest.raises(CkptbendError, match=r"LTX-Video with a part ckptbend does not know "
                                            r"\(transformer_blocks\.0\.audio_attn1\.to_q\.weight\)"):
        detect(tmp_path / "odd.safetensors")
    r = run("inspect", tmp_path / "odd.safetensors")
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1


def test_ltx2_with_an_unknown_attention_part_is_refused(tmp_path, synth_file):
    state = load_file(synth_file("ltx2"))
    state["transformer_blocks.1.video_to_audio_attn.to_qkv.weight"] = torch.zeros(48, 16)
    save_file(state, tmp_path / "odd.safetensors")
    with pytest.raises(CkptbendError, match="LTX-2 with a part ckptbend does not know"):
        detect(tmp_path / "odd.safetensors")


def test_text_connectors_are_left_alone_and_said_to_be(tmp_path, synth_file):
    """Released files carry the text connectors inside the model (diffusers' converter drops them)."""
    state = {"model.diffusion_model." + k: v for k, v in load_file(synth_file("ltx2")).items()}
    for stream in ("video", "audio"):
        key = f"model.diffusion_model.{stream}_embeddings_connector.transformer_1d_blocks.0.attn1.to_q.weight"
        state[key] = torch.zeros(8, 8)
    save_file(state, tmp_path / "x.safetensors")
    ckpt = detect(tmp_path / "x.safetensors")
    assert not any("connector" in s.key for s in ckpt.sites)
    assert [n.split(" (")[0] for n in ckpt.left_alone] == ["1 tensors of LTX-2's video text connector",
                                                            "1 tensors of LTX-2's audio text connector"]


def test_a_released_all_in_one_file_bakes_its_model_only(tmp_path, synth_file):
    """Lightricks' release holds the model under `model.diffusion_model.` beside the video VAE, the audio VAE, the
    vocoder and the text projection: only the model's attention is scaled, every other tensor is copied as it is."""
    state = load_file(synth_file("ltx2_3", "single_prefixed"))
    extras = {"vae.per_channel_statistics.mean-of-means": torch.randn(8),
              "audio_vae.per_channel_statistics.mean-of-means": torch.randn(4),
              "vocoder.conv_pre.weight": torch.randn(4, 4, 3), "text_embedding_projection.aggregate_embed.weight":
              torch.randn(6, 6)}
    save_file({**state, **extras}, tmp_path / "release.safetensors")
    ckpt = detect(tmp_path / "release.safetensors")
    assert ckpt.architecture == "ltx-2.3" and ckpt.kind == "single-file"
    bake(recipe('[dit.cross]\nk = 1.5\n[dit.joint]\nv = 0.5\n'), tmp_path / "release.safetensors",
         tmp_path / "out.safetensors", durable=False)
    after = load_file(tmp_path / "out.safetensors")
    assert all(torch.equal(after[k], v) for k, v in extras.items())
    changed = {k for k, v in state.items() if not torch.equal(after[k], v)}
    assert changed == {f"model.diffusion_model.transformer_blocks.{b}.{m}.{t}" for b in (0, 1)
                       for m, t in (("attn2", "k_norm.weight"), ("audio_attn2", "k_norm.weight"),
                                    ("audio_to_video_attn", "to_v.weight"), ("audio_to_video_attn", "to_v.bias"),
                                    ("video_to_audio_attn", "to_v.weight"), ("video_to_audio_attn", "to_v.bias"))}


# --- equivalence: baked == run-time multiplication ----------------------------------------------------------

@pytest.mark.parametrize("arch, layout", [("ltx2", "single"), ("ltx2_3", "single_prefixed"),
                                          ("ltx2_5", "transformer_diffusers"), ("ltx2_3", "diffusers")])
def test_bake_equals_runtime_multiplication(tmp_path, synth_file, models, arch, layout):
    out = tmp_path / "out"
    bake(recipe(body(ALL)), synth_file(arch, layout), out, durable=False)
    original = models[arch]
    compare(forward(load(arch, out, layout)), forward(hooked(original, ALL)), forward(original.double()))


@pytest.mark.parametrize("section, stream", list(STREAMS))
def test_each_stream_alone(tmp_path, synth_file, models, section, stream):
    """One section and stream at a time, every kind, on block B01 only: nothing else moves."""
    factors = {(section, stream, p): f for p, f in zip(HOOK, (1.6, 0.7, 1.8, 0.6))}
    text = "".join(f'[[dit.{section}]]\nstream = "{stream}"\nblocks = ["B01"]\n{p} = {f}\n'
                   for (_, _, p), f in factors.items())
    out = tmp_path / "out.safetensors"
    bake(recipe(text), synth_file("ltx2_3"), out, durable=False)
    original = models["ltx2_3"]
    compare(forward(load("ltx2_3", out, "single")), forward(hooked(original, factors, blocks=(1,))),
            forward(original.double()))


def test_scaled_fp8_bakes_by_the_rule(tmp_path, synth_file, models):
    src = synth_file("ltx2", "single", "scaled_fp8")
    factors = {("self", "video", "v"): 1.25, ("cross", "audio", "out"): 0.5, ("joint", "audio", "k"): 0.75}
    result = bake(recipe(body(factors)), src, tmp_path / "out.safetensors", durable=False)
    assert any(".audio_attn2.to_out.0.scale_weight" in line and "via scale_weight" in line
               for line in result.plan.describe())
    original = load("ltx2", src, "single")
    base, ref = forward(original), forward(hooked(original, factors))
    baked = forward(load("ltx2", tmp_path / "out.safetensors", "single"))
    effect = (ref - base).abs().max().item()
    assert effect > 1e-2 and (baked - ref).abs().max().item() < 0.02 * effect   # bf16 rounding of biases / norms


def test_unet_sections_are_comfyui_literal_on_both_streams(tmp_path, synth_file):
    """ComfyUI's UNet nodes match key suffixes: `attn1.to_v` is video's attn1 and audio's audio_attn1 alike."""
    src = synth_file("ltx2")
    plan = make_plan(recipe('[unet.self]\nq = 1.5\nv = 1.25\n'), detect(src))
    assert {e.key for e in plan.edits} == {f"transformer_blocks.{b}.{m}.{p}.{wb}" for b in (0, 1)
                                          for m in ("attn1", "audio_attn1") for p in ("to_q", "to_v")
                                          for wb in ("weight", "bias")}
    assert len(plan.warnings) == 1 and "cancelled by this model's qk-norm" in plan.warnings[0]


def test_qk_warning_counts_each_streams_own_attention(synth_file):
    """Video queries never meet audio keys in [dit.self]: q 3 on video and k 2 on audio multiply nowhere."""
    ckpt = detect(synth_file("ltx2"))
    apart = make_plan(recipe('[[dit.self]]\nstream = "video"\nq = 3\n[[dit.self]]\nstream = "audio"\nk = 2\n'), ckpt)
    met = make_plan(recipe('[[dit.self]]\nstream = "audio"\nq = 3\n[[dit.self]]\nstream = "audio"\nk = 2\n'), ckpt)
    assert not apart.warnings and any("q x k up to 6" in w for w in met.warnings)


def test_qk_warning_keeps_the_two_audio_video_attentions_apart(synth_file):
    """[dit.joint] is two softmaxes per block: audio→video (video queries, audio keys) and video→audio (audio
    queries, video keys). Video q 3 and video k 2 never meet; video q 3 and audio k 2 meet in every a2v."""
    ckpt = detect(synth_file("ltx2"))
    apart = make_plan(recipe('[[dit.joint]]\nstream = "video"\nq = 3\n[[dit.joint]]\nstream = "video"\nk = 2\n'), ckpt)
    met = make_plan(recipe('[[dit.joint]]\nstream = "video"\nq = 3\n[[dit.joint]]\nstream = "audio"\nk = 2\n'), ckpt)
    blocks = len({s.block for s in ckpt.sites if s.attn == "joint"})
    assert not [w for w in apart.warnings if "q x k" in w]
    assert [w for w in met.warnings if "q x k" in w] == [w for w in met.warnings if f"q x k up to 6 (> 4) in {blocks} "
                                                         "attention(s)" in w] != []


def test_inspect_names_model_blocks_and_streams(synth_file):
    r = run("inspect", synth_file("ltx2_5", "single_prefixed"))
    assert r.returncode == 0, r.stderr
    for needle in ("architecture: ltx-2.5", "B01   attn1 attn2 cross joint self (streams: audio, video) qk-norm",
                   "model.diffusion_model.transformer_blocks.N.audio_to_video_attn.q_norm.weight"):
        assert needle in r.stdout, needle
