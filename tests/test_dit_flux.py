"""Flux.1 (dev, schnell) and Chroma: file layouts checked against diffusers' own single-file converters and
classes, and bakes checked against the run-time definition (dit-layouts.md §11) on the real diffusers
transformer: the baked model's forward equals the original's with q (after its qk-norm), k, v or the
attention output multiplied by hooks."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers
from click.testing import CliRunner
from diffusers import AutoencoderKL, FluxTransformer2DModel
from diffusers.loaders.single_file_utils import (
    convert_flux_transformer_checkpoint_to_diffusers,
    convert_ldm_vae_checkpoint,
    convert_sd3_t5_checkpoint_to_diffusers,
    infer_diffusers_model_type,
)
from safetensors.torch import load_file

import _dit_flux as F
from ckptbend.bake import bake
from ckptbend.cli import cli
from ckptbend.layouts import detect
from ckptbend.recipe import parse_recipe
from ckptbend.synth import write_checkpoint
from ckptbend.synth import flux as synth_flux
from _helpers import load_strict

ROOT = Path(__file__).resolve().parent.parent
H = synth_flux.H
ARCH_NAMES = {"flux_dev": "flux-dev", "flux_schnell": "flux-schnell", "chroma": "chroma"}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """One file per (arch, layout), written once: fp32; scaled fp8 with bf16 biases and norms, as released."""
    root = tmp_path_factory.mktemp("flux")
    made = {}

    def get(arch, layout):
        if (arch, layout) not in made:
            name = f"{arch}-{layout}" + ("" if layout == "diffusers" else ".safetensors")
            scaled = layout == "scaled_fp8"   # BFL's names in ComfyUI's scaled fp8 (the single layout, that dtype)
            made[arch, layout] = write_checkpoint(root / name, arch, layout="single" if scaled else layout,
                                               dtype="scaled_fp8" if scaled else torch.float32)
        return made[arch, layout]
    return get


def recipe(body):
    return parse_recipe('schema = 1\nname = "t"\n' + body)


def bake_to(tmp_path, body, src, **kw):
    out = tmp_path / ("out" if Path(src).is_dir() else "out.safetensors")
    bake(recipe(body), src, out, progress=False, **kw)
    return out


# --- layouts against diffusers -----------------------------------------------------------------

@pytest.mark.parametrize("arch", ["flux_dev", "flux_schnell", "chroma"])
@pytest.mark.parametrize("layout", ["single", "comfy", "transformer_diffusers", "scaled_fp8"])
def test_layout_loads_strict_through_diffusers_converter(files, arch, layout):
    path = files(arch, layout)
    ckpt = detect(path)
    assert ckpt.architecture == ARCH_NAMES[arch]
    assert ckpt.kind == ("single-file" if layout == "comfy" else "dit")
    loaded = F.load_transformer(arch, path, layout)
    expected = F.model(arch).state_dict()
    if layout == "scaled_fp8":   # fp8 weights: the dequantised model equals the source to fp8 precision
        got = loaded.state_dict()
        assert all((got[k] - v).abs().max() <= 0.07 * v.abs().max() for k, v in expected.items())
    else:
        assert all(torch.equal(loaded.state_dict()[k], v) for k, v in expected.items())
    if layout == "single":   # diffusers' own sniffer names the file as ckptbend does
        assert infer_diffusers_model_type(load_file(path)) == ARCH_NAMES[arch]


def test_comfy_all_in_one_text_encoders_and_vae_load_strict(files):
    state = load_file(files("flux_dev", "comfy"))
    clip = {k.removeprefix("text_encoders.clip_l.transformer."): v for k, v in state.items()
            if k.startswith("text_encoders.clip_l.transformer.")}
    encoders = synth_flux.build_text_encoders("flux_dev")
    clip_model = transformers.CLIPTextModel(encoders["clip_l"][0].config)
    # files keep `text_model.` (transformers 5's class dropped it from its own state dict)
    load_strict(clip_model, {k.removeprefix("text_model."): v for k, v in clip.items()})
    t5 = transformers.T5EncoderModel(encoders["t5xxl"][0].config)
    load_strict(t5, convert_sd3_t5_checkpoint_to_diffusers(state))
    vae = AutoencoderKL(**synth_flux._TINY_VAE)
    load_strict(vae, convert_ldm_vae_checkpoint({k.removeprefix("vae."): v for k, v in state.items()
                                                 if k.startswith("vae.")}, vae.config))
    ckpt = detect(files("flux_dev", "comfy"))
    assert {"dit", "clip_l", "t5xxl", "vae"} <= set(ckpt.components)


def test_diffusers_folder_loads_with_from_pretrained(files):
    folder = files("flux_dev", "diffusers")
    loaded = FluxTransformer2DModel.from_pretrained(folder / "transformer").double()
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in F.model("flux_dev").state_dict().items())
    ckpt = detect(folder)
    assert ckpt.kind == "diffusers-folder" and ckpt.architecture == "flux-dev"
    assert set(ckpt.components) == {"dit", "clip_l", "t5xxl"}
    assert json.loads((folder / "model_index.json").read_text())["_class_name"] == "FluxPipeline"


@pytest.mark.parametrize("arch,pipeline,encoders", [("flux_schnell", "FluxPipeline", {"clip_l", "t5xxl"}),
                                                     ("chroma", "ChromaPipeline", {"t5xxl"})])
def test_other_diffusers_folders(files, arch, pipeline, encoders):
    folder = files(arch, "diffusers")
    assert json.loads((folder / "model_index.json").read_text())["_class_name"] == pipeline
    ckpt = detect(folder)
    assert ckpt.architecture == {"chroma": "chroma", "flux_schnell": "flux-schnell"}.get(arch, "flux-dev")
    assert set(ckpt.components) == {"dit"} | encoders
    assert {s.component for s in ckpt.sites} == {"dit"} | encoders


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float8_e4m3fn, torch.float8_e5m2])
def test_stored_dtypes_follow_the_arithmetic_rule(tmp_path, dtype):
    """Every dtype: the v rows, linear2's attention columns and the norm weights come out as the float32
    product rounded to nearest into the stored dtype; every other byte stays."""
    src = write_checkpoint(tmp_path / "src.safetensors", "flux_dev", dtype=dtype)
    out = bake_to(tmp_path, "[dit.joint]\nk = 1.25\nv = 1.5\nout = 0.75\n", src)
    before, after = load_file(src), load_file(out)

    def rule(t, f):
        return (t.float() * f).to(t.dtype)
    for k, b in before.items():
        a = after[k]
        if k.endswith(("linear1.weight", "linear1.bias", "qkv.weight", "qkv.bias")):
            expect = torch.cat([b[:2 * H], rule(b[2 * H:3 * H], 1.5), b[3 * H:]])
        elif k.endswith("linear2.weight"):
            expect = torch.cat([rule(b[:, :H], 0.75), b[:, H:]], dim=1)
        elif k.endswith(("attn.proj.weight", "attn.proj.bias")):
            expect = rule(b, 0.75)
        elif k.endswith("key_norm.scale"):
            expect = rule(b, 1.25)
        else:
            expect = b
        assert a.dtype == dtype and torch.equal(a.view(torch.uint8), expect.view(torch.uint8)), k


def test_sites_follow_section_11(files):
    """Per block and stream: q/k on the norm weights, v on rows [2h,3h), out on proj (w+b) or linear2's
    attention columns [0,h) without the bias."""
    ckpt = detect(files("flux_dev", "single"))
    by_key = {}
    for s in ckpt.sites:
        by_key.setdefault(s.key, []).append(s)
    d0 = "double_blocks.0.img_attn."
    assert [(s.proj, s.stream, s.block) for s in by_key[d0 + "norm.query_norm.scale"]] == [("q", "image", "D00")]
    assert [(s.proj, s.stream) for s in by_key["double_blocks.1.txt_attn.norm.key_norm.scale"]] == [("k", "text")]
    assert [(s.proj, s.rows) for s in by_key[d0 + "qkv.weight"]] == [("v", (2 * H, 3 * H))]
    assert [(s.proj, s.rows) for s in by_key[d0 + "qkv.bias"]] == [("v", (2 * H, 3 * H))]
    assert [(s.proj, s.rows, s.cols) for s in by_key[d0 + "proj.bias"]] == [("out", None, None)]
    single = {k: v for k, v in by_key.items() if k.startswith("single_blocks.1.")}
    assert {s.block for v in single.values() for s in v} == {"S01"}
    assert {s.group for v in single.values() for s in v} == {"single"}
    assert [(s.proj, s.rows) for s in single["single_blocks.1.linear1.bias"]] == [("v", (2 * H, 3 * H))]
    assert [(s.proj, s.cols, s.stream) for s in single["single_blocks.1.linear2.weight"]] == [("out", (0, H), None)]
    assert "single_blocks.1.linear2.bias" not in by_key
    assert all(s.attn == "joint" and s.component == "dit" for s in ckpt.sites)


# --- equivalence: baked == run-time multiply ------------------------------------------------------

CASES = [   # (recipe body, factors, blocks, stream)
    ('[dit.joint]\nstream = "image"\nq = 1.7\n', {"q": 1.7}, None, "image"),
    ('[dit.joint]\nstream = "text"\nk = 0.6\n', {"k": 0.6}, None, "text"),
    ('[dit.joint]\nstream = "text"\nq = 1.6\nout = 0.7\n', {"q": 1.6, "out": 0.7}, None, "text"),
    ('[dit.joint]\nv = 1.9\n', {"v": 1.9}, None, None),
    ('[dit.joint]\nout = 0.55\n', {"out": 0.55}, None, None),
    ('[dit.joint]\nblocks = ["S01"]\nq = 1.7\nk = 0.6\n', {"q": 1.7, "k": 0.6}, ["S01"], None),
    ('[dit.joint]\nblocks = ["single"]\nout = 1.8\n', {"out": 1.8}, ["S00", "S01"], None),
    ('[dit.joint]\nblocks = ["D01"]\nstream = "image"\nv = 1.5\nout = 0.6\n', {"v": 1.5, "out": 0.6}, ["D01"], "image"),
    ('[dit.joint]\nq = 1.3\nk = 0.8\nv = 1.4\nout = 0.7\n', {"q": 1.3, "k": 0.8, "v": 1.4, "out": 0.7}, None, None),
]


def check_equivalent(arch, layout, src, tmp_path, body, factors, blocks, stream):
    baked = F.forward(F.load_transformer(arch, bake_to(tmp_path, body, src), layout), arch)
    ref = F.reference(arch, factors, blocks, stream)
    base = F.forward(F.model(arch), arch)
    effect = (ref - base).abs().max().item()
    err = (baked - ref).abs().max().item()
    assert effect > 1e-3, "the factor must change the output, or the comparison proves nothing"
    assert err <= 1e-5 * max(1.0, ref.abs().max().item()), (err, effect)   # fp32 rounding of the baked tensors
    return effect, err


@pytest.mark.parametrize("body,factors,blocks,stream", CASES)
def test_bake_equals_runtime_multiply(files, tmp_path, body, factors, blocks, stream):
    check_equivalent("flux_dev", "single", files("flux_dev", "single"), tmp_path, body, factors, blocks, stream)


@pytest.mark.parametrize("arch,layout", [("flux_dev", "comfy"), ("flux_dev", "transformer_diffusers"),
                                         ("flux_schnell", "single"), ("chroma", "single"), ("chroma", "comfy")])
def test_bake_equals_runtime_multiply_other_forms(files, tmp_path, arch, layout):
    body, factors, blocks, stream = CASES[-1]
    check_equivalent(arch, layout, files(arch, layout), tmp_path, body, factors, blocks, stream)


def test_bake_of_a_diffusers_folder_equals_runtime_multiply(files, tmp_path):
    body, factors, _, stream = CASES[2]
    out = bake_to(tmp_path, body, files("flux_dev", "diffusers"))
    baked = F.forward(FluxTransformer2DModel.from_pretrained(out / "transformer").double(), "flux_dev")
    ref = F.reference("flux_dev", factors, None, stream)
    assert (ref - F.forward(F.model("flux_dev"), "flux_dev")).abs().max() > 1e-3
    assert (baked - ref).abs().max() <= 1e-5 * max(1.0, ref.abs().max().item())


def _edited(state, edits):
    out = dict(state)
    for key, rows, cols, f in edits:
        t = out[key].clone()
        view = t if rows is None else t[rows[0]:rows[1]]
        view = view if cols is None else view[:, cols[0]:cols[1]]
        view.mul_(f)
        out[key] = t
    return out


def _forward_of(state, arch="flux_dev"):
    return F.forward(load_strict(F.empty(arch), F.CONVERTERS[arch](dict(state))), arch)


def test_scaling_the_projection_instead_of_the_norm_is_cancelled(files):
    """ComfyUI's way (q/k rows of the fused projection, weight and bias) against §11's (the norm weight):
    the norm undoes the first, all but its eps."""
    state = {k: v.double() for k, v in load_file(files("flux_dev", "single")).items()}
    base = F.forward(F.model("flux_dev"), "flux_dev")
    for fused, norm in (("double_blocks.0.img_attn.qkv", "double_blocks.0.img_attn.norm.query_norm.scale"),
                        ("single_blocks.1.linear1", "single_blocks.1.norm.query_norm.scale")):
        literal = _forward_of(_edited(state, [(fused + ".weight", (0, H), None, 1.7), (fused + ".bias", (0, H), None, 1.7)]))
        proper = _forward_of(_edited(state, [(norm, None, None, 1.7)]))
        effect = (proper - base).abs().max().item()
        assert effect > 1e-2
        assert (literal - base).abs().max().item() < 1e-3 * effect


def test_scaling_linear2_bias_too_would_be_wrong(files):
    """The single block's linear2 bias is shared with the MLP: scaling it with the attention columns is not
    'attention output × f' — which is why the bake leaves it."""
    state = {k: v.double() for k, v in load_file(files("flux_dev", "single")).items()}
    ref = F.reference("flux_dev", {"out": 0.55}, ["S00"], None)
    columns = _forward_of(_edited(state, [("single_blocks.0.linear2.weight", None, (0, H), 0.55)]))
    whole = _forward_of(_edited(state, [("single_blocks.0.linear2.weight", None, (0, H), 0.55),
                                        ("single_blocks.0.linear2.bias", None, None, 0.55)]))
    assert (columns - ref).abs().max() < 1e-9
    assert (whole - ref).abs().max() > 1e-3


# --- what the user sees: dry run, inspect, errors --------------------------------------------------

def test_dry_run_lists_the_section_11_tensors(files):
    r = CliRunner().invoke(cli, ["bake", str(ROOT / "recipes" / "flux-balanced.toml"), str(files("flux_dev", "single")),
                                 "-o", "/nonexistent/x.safetensors", "--dry-run"])
    assert r.exit_code == 0, r.output
    lines = set(r.output.splitlines())
    assert "single_blocks.0.linear2.weight columns 0:32  ×0.9  (dit.joint.out)" in lines
    assert "double_blocks.1.txt_attn.qkv.bias rows 64:96  ×1.05  (dit.joint.v)" in lines
    assert "double_blocks.0.img_attn.norm.query_norm.scale  ×1.1  (dit.joint.q)" in lines
    assert not any("linear2.bias" in line or "txt_attn.norm.query_norm" in line for line in lines)


def test_inspect_shows_model_blocks_streams_qk_norm_encoders(files):
    r = CliRunner().invoke(cli, ["inspect", str(files("flux_dev", "comfy"))])
    assert r.exit_code == 0, r.output
    out = r.output
    assert "architecture: flux-dev" in out
    assert "D01   joint (streams: image, text) qk-norm" in out
    assert "S01   joint qk-norm" in out
    assert "clip_l: 2 attention layers" in out and "t5xxl: 2 attention layers" in out
    assert "quantisation" not in out
    r = CliRunner().invoke(cli, ["inspect", str(files("flux_dev", "scaled_fp8"))])
    assert "quantisation: scaled fp8 (fp8 × scale_weight) ×36 layers" in r.output
    schnell = CliRunner().invoke(cli, ["inspect", str(files("flux_schnell", "single"))]).output
    assert "architecture: flux-schnell" in schnell


@pytest.mark.parametrize("body,message", [
    ('[dit.joint]\nblocks = ["D07"]\nq = 1.2\n', "has no block D07 with [dit.joint] attention (its blocks: D00"),
    ('[dit.self]\nv = 1.2\n', "[dit.self]: v = 1.2 matches no tensor"),
    ('[unet.self]\nv = 1.2\n', "[unet.self]: v = 1.2 matches no tensor"),
])
def test_unmatched_sections_are_one_line_errors(files, tmp_path, body, message):
    (tmp_path / "r.toml").write_text('schema = 1\nname = "t"\n' + body)
    r = CliRunner().invoke(cli, ["bake", str(tmp_path / "r.toml"), str(files("flux_dev", "single")),
                                 "-o", str(tmp_path / "o.safetensors")])
    assert r.exit_code == 2
    assert message in r.output and len(r.output.strip().splitlines()) == 1
    assert not (tmp_path / "o.safetensors").exists()


def test_allow_missing_bakes_the_dit_sections_of_a_mixed_recipe(files, tmp_path):
    body = '[unet.self]\nq = 1.2\n[dit.joint]\nstream = "image"\nq = 1.7\n'
    src = files("flux_dev", "single")
    with pytest.raises(Exception, match=r"\[unet.self\]: q = 1.2 matches no tensor"):
        bake_to(tmp_path, body, src)
    out = bake_to(tmp_path, body, src, allow_missing=True)
    baked = F.forward(F.load_transformer("flux_dev", out, "single"), "flux_dev")
    ref = F.reference("flux_dev", {"q": 1.7}, None, "image")
    assert (baked - ref).abs().max() <= 1e-5 * max(1.0, ref.abs().max().item())


# --- text encoders inside a Flux all-in-one file ------------------------------------------------------

def _hooked_text_forward(model, pattern, factor, ids):
    handles = [m.register_forward_hook(lambda mod, a, out: out * factor)
               for name, m in model.named_modules() if name.endswith(pattern)]
    assert handles
    try:
        with torch.no_grad():
            return model(input_ids=ids).last_hidden_state
    finally:
        for h in handles:
            h.remove()


def test_clip_and_text_sections_reach_the_encoders_of_an_all_in_one_file(files, tmp_path):
    src = files("flux_dev", "comfy")
    out = bake_to(tmp_path, "[clip]\nq = 1.4\nout = 0.8\n[text]\nv = 1.3\n", src)
    before, after = load_file(src), load_file(out)
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    clip = "text_encoders.clip_l.transformer.text_model.encoder.layers.1.self_attn."
    # ComfyUI's CLIPAttentionMultiply rule: float32 multiply of weight and bias, round to the stored dtype
    for key, f in ((clip + "q_proj.weight", 1.4), (clip + "q_proj.bias", 1.4), (clip + "out_proj.bias", 0.8)):
        assert torch.equal(after[key], (before[key].float() * f).to(before[key].dtype))
    t5v = "text_encoders.t5xxl.transformer.encoder.block.0.layer.0.SelfAttention.v.weight"
    assert torch.equal(after[t5v], (before[t5v].float() * 1.3).to(before[t5v].dtype))
    assert all(k.startswith(("text_encoders.clip_l.", "text_encoders.t5xxl.")) for k in changed)
    assert len(changed) == 2 * 4 + 2   # CLIP-L: q and out, weight and bias, in 2 layers; T5: v in 2 blocks

    ids = torch.tensor([[0, 5, 9, 3, 1]])
    encoders = synth_flux.build_text_encoders("flux_dev")
    t5 = encoders["t5xxl"][0].double()
    reference = _hooked_text_forward(t5, "SelfAttention.v", 1.3, ids)
    baked_t5 = load_strict(transformers.T5EncoderModel(t5.config), convert_sd3_t5_checkpoint_to_diffusers(after)).double()
    with torch.no_grad():
        baked = baked_t5(input_ids=ids).last_hidden_state
    with torch.no_grad():
        untouched = t5(input_ids=ids).last_hidden_state
    assert (reference - untouched).abs().max() > 1e-3
    assert (baked - reference).abs().max() < 1e-5


# --- scaled fp8 -------------------------------------------------------------------------------------

def test_scaled_fp8_round_trip(files, tmp_path):
    src = files("flux_dev", "scaled_fp8")
    body = '[dit.joint]\nq = 1.25\nv = 1.5\nout = 0.75\n'
    (tmp_path / "r.toml").write_text('schema = 1\nname = "t"\n' + body)
    r = CliRunner().invoke(cli, ["bake", str(tmp_path / "r.toml"), str(src), "-o", str(tmp_path / "x.safetensors"),
                                 "--dry-run"])
    lines = r.output.splitlines()
    assert "double_blocks.0.img_attn.proj.scale_weight  ×0.75  (dit.joint.out (via scale_weight))" in lines
    # v × 1.5 would clip v rows' largest codes, more than rounding q and k rows by 1/1.5 loses (least squares):
    # the scale takes ×1.5
    assert "double_blocks.0.img_attn.qkv.scale_weight  ×1.5  (dit.joint.v (the largest factor, via scale_weight))" \
        in lines
    assert any(line.startswith("double_blocks.0.img_attn.qkv.weight rows 0:64  ×0.666667  (not in a range: ×1 overall")
               and line.endswith(", 0 clipped)") for line in lines)
    assert any(line.startswith("single_blocks.0.linear2.weight columns 0:32  ×0.75  (dit.joint.out, requantised in "
                               "fp8 e4m3fn; the tensor: 1,024 rounded to nearest, 0 clipped") for line in lines)

    out = bake_to(tmp_path, body, src)
    before, after = load_file(src), load_file(out)
    p = "double_blocks.0.img_attn."
    # whole weight: exact, through the float32 scale; the fp8 bytes stay
    assert torch.equal(after[p + "proj.weight"].view(torch.uint8), before[p + "proj.weight"].view(torch.uint8))
    assert torch.equal(after[p + "proj.scale_weight"], before[p + "proj.scale_weight"] * 0.75)
    assert torch.equal(after[p + "proj.bias"], (before[p + "proj.bias"].float() * 0.75).to(torch.bfloat16))
    # rows: the largest factor on the scale (v rows' codes stay), the other rows requantised to nearest
    qkv_b, qkv_a = before[p + "qkv.weight"], after[p + "qkv.weight"]
    assert torch.equal(after[p + "qkv.scale_weight"], before[p + "qkv.scale_weight"] * 1.5)
    assert torch.equal(qkv_a[2 * H:].view(torch.uint8), qkv_b[2 * H:].view(torch.uint8))
    assert torch.equal(qkv_a[:2 * H].float(), (qkv_b[:2 * H].float() * (1 / 1.5)).to(torch.float8_e4m3fn).float())
    # columns by 0.75 (cannot clip): requantised to nearest, the rest untouched
    l2b, l2a = before["single_blocks.0.linear2.weight"], after["single_blocks.0.linear2.weight"]
    assert torch.equal(l2a[:, :H].float(), (l2b[:, :H].float() * 0.75).to(torch.float8_e4m3fn).float())
    assert torch.equal(l2a[:, H:].view(torch.uint8), l2b[:, H:].view(torch.uint8))
    # norm weights in their own dtype; activation scales and the marker untouched
    q = p + "norm.query_norm.scale"
    assert after[q].dtype == torch.bfloat16 and torch.equal(after[q], (before[q].float() * 1.25).to(torch.bfloat16))
    for k in before:
        if k.endswith(".scale_input") or k == "scaled_fp8" or k.endswith("linear2.bias"):
            assert torch.equal(after[k].reshape(-1).view(torch.uint8), before[k].reshape(-1).view(torch.uint8)), k
    # The dequantised bake computes the hooked dequantised original: exactly where no range is requantised
    # (image stream: proj through scale_weight; q on the bf16 norm, by 2, which bf16 holds exactly).
    (tmp_path / "exact").mkdir()
    exact = bake_to(tmp_path / "exact", '[dit.joint]\nstream = "image"\nq = 2.0\nout = 0.5\n', src)
    m = F.load_transformer("flux_dev", src, "scaled_fp8")
    base = F.forward(m, "flux_dev")
    handles = F.hooked(m, {"q": 2.0, "out": 0.5}, stream="image")
    ref = F.forward(m, "flux_dev")
    for h in handles:
        h.remove()
    baked = F.forward(F.load_transformer("flux_dev", exact, "scaled_fp8"), "flux_dev")
    assert (ref - base).abs().max() > 1e-2
    assert (baked - ref).abs().max() <= 1e-5 * ref.abs().max()


# --- synth and bench ---------------------------------------------------------------------------------

def test_synth_cli_writes_flux_dev(tmp_path):
    r = CliRunner().invoke(cli, ["synth", "flux_dev", str(tmp_path / "out.safetensors")])
    assert r.exit_code == 0, r.output
    assert detect(tmp_path / "out.safetensors").architecture == "flux-dev"
    assert {t.dtype for t in detect(tmp_path / "out.safetensors").files[0].header.tensors} == {"F16"}


def test_synth_full_size_flux_dev_has_the_released_shapes():
    state = synth_flux.to_original("flux_dev", synth_flux.build_transformer("flux_dev", "full").state_dict())
    assert len(state) == 780   # dit-layouts.md §1
    assert tuple(state["double_blocks.0.img_attn.qkv.weight"].shape) == (9216, 3072)
    assert tuple(state["single_blocks.37.linear1.weight"].shape) == (21504, 3072)
    assert tuple(state["single_blocks.0.linear2.weight"].shape) == (3072, 15360)
    assert tuple(state["txt_in.weight"].shape) == (3072, 4096)
    assert infer_diffusers_model_type(state) == "flux-dev"


def test_bench_flux_runs_at_tiny_size(tmp_path):
    r = subprocess.run([sys.executable, ROOT / "bin" / "bench", "--size", "flux-tiny", "--runs", "1", "--dir", tmp_path],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    assert "ratio ckptbend bake / cp:" in r.stdout and "flux-tiny" in r.stdout
    assert list(tmp_path.iterdir()) == []


def _sparse_file(path, shapes, dtype="BF16"):
    """A safetensors file with the full-size tensor table and no data written (a sparse file)."""
    header, offset = {}, 0
    for name, shape in shapes.items():
        n = 2 * int(torch.Size(shape).numel())
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    blob = json.dumps(header).encode()
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as f:
        f.write(len(blob).to_bytes(8, "little") + blob)
        f.truncate(8 + len(blob) + offset)
    return path


def test_full_width_ranges_are_the_ones_diffusers_cuts(tmp_path):
    """At the released width (h 3072) the rows and columns ckptbend scales are the ones diffusers'
    unpatched converter turns into to_v / the attention input of proj_out."""
    state = synth_flux.to_original("flux_dev", synth_flux.build_transformer("flux_dev", "full").state_dict())
    ckpt = detect(_sparse_file(tmp_path / "flux1-dev.safetensors", {k: v.shape for k, v in state.items()}))
    assert ckpt.architecture == "flux-dev"
    ranges = {(s.key, s.proj): (s.rows, s.cols) for s in ckpt.sites}
    assert ranges["double_blocks.3.txt_attn.qkv.weight", "v"] == ((6144, 9216), None)
    assert ranges["single_blocks.37.linear1.bias", "v"] == ((6144, 9216), None)
    assert ranges["single_blocks.0.linear2.weight", "out"] == (None, (0, 3072))
    assert len({s.block for s in ckpt.sites}) == 19 + 38

    def tagged(shape):   # row i holds i; one column: the converter cuts rows only, and copies what it cuts
        return torch.arange(shape[0], dtype=torch.float32).reshape(-1, *([1] * (len(shape) - 1)))
    stub = {k: tagged(v.shape) for k, v in state.items()}
    converted = convert_flux_transformer_checkpoint_to_diffusers(stub)   # unpatched: its own width 3072
    for diffusers_key, source, (rows, _) in (
            ("transformer_blocks.3.attn.add_v_proj.weight", "double_blocks.3.txt_attn.qkv.weight",
             ranges["double_blocks.3.txt_attn.qkv.weight", "v"]),
            ("single_transformer_blocks.37.attn.to_v.bias", "single_blocks.37.linear1.bias",
             ranges["single_blocks.37.linear1.bias", "v"])):
        assert converted[diffusers_key].reshape(converted[diffusers_key].shape[0], -1)[:, 0].tolist() == \
            list(map(float, range(*rows))), source

