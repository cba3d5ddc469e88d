"""SD3-medium, SD3.5-medium, SD3.5-large: layouts checked by diffusers' own single-file converters, and baked ==
run-time hooks on the real `SD3Transformer2DModel` (dit-layouts.md §3, §11).

The reference is the original model with forward hooks multiplying q after its qk-norm (`norm_q` /
`norm_added_q`; `to_q` / `add_q_proj` on SD3-medium, which has none), k likewise, v (`to_v` / `add_v_proj`)
or the attention output (`to_out.0` / `to_add_out`). The baked file goes through diffusers'
`convert_sd3_transformer_checkpoint_to_diffusers` and a strict load, never through ckptbend's tables.
"""

import json
import shutil

import pytest
import torch
from diffusers import SD3Transformer2DModel
from diffusers.loaders.single_file_utils import (convert_ldm_clip_checkpoint, convert_sd3_t5_checkpoint_to_diffusers,
                                                 convert_sd3_transformer_checkpoint_to_diffusers)
from safetensors.torch import load_file
from transformers import CLIPTextModelWithProjection, T5EncoderModel

from ckptbend.bake import bake
from ckptbend.layouts import detect
from ckptbend.layouts.sd3 import PRE_ONLY
from ckptbend.plan import make_plan
from ckptbend.synth import write_checkpoint
from ckptbend.synth.dit import MODEL_PREFIX, build, build_text_encoders
from ckptbend.synth.sd3 import CONFIGS, FAMILY
from _dit import compare, dequantised, hook_outputs, load_strict, recipe, run

H = 32                     # tiny width: 2 heads × 16
N_BLOCKS = 3
FACTORS = {"q": 1.7, "k": 0.6, "v": 1.9, "out": 0.55}
SELF_FACTORS = {"q": 0.7, "k": 1.6, "v": 0.8, "out": 1.45}
ARCHITECTURE = {"sd3_medium": "sd3-medium", "sd35_medium": "sd35-medium", "sd35_large": "sd35-large"}
# diffusers module of each (stream, projection): with qk-norm, and without (SD3-medium)
MODULE = {("image", "q"): ("norm_q", "to_q"), ("image", "k"): ("norm_k", "to_k"), ("image", "v"): ("to_v",) * 2,
          ("image", "out"): ("to_out.0",) * 2, ("text", "q"): ("norm_added_q", "add_q_proj"),
          ("text", "k"): ("norm_added_k", "add_k_proj"), ("text", "v"): ("add_v_proj",) * 2,
          ("text", "out"): ("to_add_out",) * 2}


def model_part(state: dict) -> dict:
    return {k: v for k, v in state.items() if not k.startswith(("text_encoders.", "first_stage_model."))}


def to_diffusers(arch, state: dict) -> SD3Transformer2DModel:
    """An original-format (or diffusers-format) state dict → the real class in float64, strict."""
    state = {k: v.double() if v.is_floating_point() else v for k, v in model_part(state).items()}
    if not any(".attn.to_q." in k for k in state):
        state = convert_sd3_transformer_checkpoint_to_diffusers(state)
    return load_strict(SD3Transformer2DModel(**CONFIGS[arch]).double(), state)


def inputs():
    g = torch.Generator().manual_seed(123)
    return dict(hidden_states=torch.randn(1, 4, 8, 8, generator=g, dtype=torch.float64),
                encoder_hidden_states=torch.randn(1, 5, 24, generator=g, dtype=torch.float64),
                pooled_projections=torch.randn(1, 20, generator=g, dtype=torch.float64),
                timestep=torch.tensor([0.37], dtype=torch.float64), return_dict=False)


@torch.no_grad()
def forward(model):
    return model(**inputs())[0]


def joint_hooks(arch, streams, factors, blocks=range(N_BLOCKS)):
    """Hook points of [dit.joint] for these streams and blocks (the last context block has no output projection)."""
    qk_norm = CONFIGS[arch]["qk_norm"] is not None
    hooks = {}
    for i in blocks:
        for stream in streams:
            for proj, f in factors.items():
                if stream == "text" and proj == "out" and i == N_BLOCKS - 1:
                    continue
                hooks[f"transformer_blocks.{i}.attn.{MODULE[(stream, proj)][0 if qk_norm else 1]}"] = f
    return hooks


def self_hooks(factors, blocks=(0, 1)):
    return {f"transformer_blocks.{i}.attn2.{MODULE[('image', p)][0]}": f for i in blocks for p, f in factors.items()}


def factor_lines(factors):
    return "".join(f"{k} = {v}\n" for k, v in factors.items())


def check_bake(tmp_path, arch, body, hooks, layout="single"):
    src = write_checkpoint(tmp_path / f"{arch}.safetensors", arch, layout)
    out = tmp_path / "baked.safetensors"
    bake(recipe(body), src, out, progress=False)
    original = load_file(str(src))
    plain, patched, baked = to_diffusers(arch, original), to_diffusers(arch, original), to_diffusers(arch, load_file(str(out)))
    hook_outputs(patched, hooks)
    return compare(forward(baked), forward(patched), forward(plain))


# --- layouts, checked by diffusers' converters -----------------------------------------------------------------

@pytest.mark.parametrize("arch", list(CONFIGS))
@pytest.mark.parametrize("layout", ["single", "single_prefixed", "comfy", "transformer_diffusers"])
def test_layout_converts_strict_to_the_real_class(tmp_path, arch, layout):
    path = write_checkpoint(tmp_path / "m.safetensors", arch, layout)
    state = load_file(str(path))
    model = to_diffusers(arch, state)
    reference = build(FAMILY, arch).double().state_dict()
    assert all(torch.equal(model.state_dict()[k], reference[k]) for k in reference)
    ckpt = detect(path)
    assert ckpt.architecture == ARCHITECTURE[arch]
    assert ckpt.qk_norm == (arch != "sd3_medium")
    assert ckpt.kind == ("single-file" if layout == "comfy" else "dit")
    prefixed = layout in ("single_prefixed", "comfy")
    assert all(k.startswith(MODEL_PREFIX) == prefixed for k in model_part(state))


def test_comfy_text_encoders_load_through_diffusers_converters(tmp_path):
    path = write_checkpoint(tmp_path / "aio.safetensors", "sd35_medium", "comfy")
    state = load_file(str(path))
    originals = build_text_encoders(FAMILY)
    for name in ("clip_l", "clip_g"):
        converted = convert_ldm_clip_checkpoint(state, remove_prefix=f"text_encoders.{name}.transformer.")
        model = load_strict(CLIPTextModelWithProjection(originals[name].config), converted)
        assert all(torch.equal(model.state_dict()[k], v) for k, v in originals[name].state_dict().items())
        assert {f"text_model.encoder.layers.0.self_attn.{p}.weight" for p in ("q_proj", "k_proj", "v_proj")} <= set(converted)
    t5 = load_strict(T5EncoderModel(originals["t5xxl"].config), convert_sd3_t5_checkpoint_to_diffusers(state))
    assert all(torch.equal(t5.state_dict()[k], v) for k, v in originals["t5xxl"].state_dict().items())
    assert {c for c in detect(path).components} == {"dit", "clip_l", "clip_g", "t5xxl", "vae"}


def test_diffusers_folder_is_detected_and_loads(tmp_path):
    root = write_checkpoint(tmp_path / "pipe", "sd35_medium", "diffusers")
    assert json.loads((root / "model_index.json").read_text())["_class_name"] == "StableDiffusion3Pipeline"
    ckpt = detect(root)
    assert (ckpt.kind, ckpt.architecture) == ("diffusers-folder", "sd35-medium")
    assert set(ckpt.components) == {"dit", "clip_l", "clip_g", "t5xxl"}
    model = SD3Transformer2DModel.from_pretrained(root / "transformer")
    reference = build(FAMILY, "sd35_medium").state_dict()
    assert all(torch.equal(model.state_dict()[k], reference[k]) for k in reference)
    assert type(T5EncoderModel.from_pretrained(root / "text_encoder_3")).__name__ == "T5EncoderModel"


def test_same_recipe_gives_the_same_model_in_every_layout(tmp_path):
    body = (f'[dit.joint]\nstream = "image"\n{factor_lines(FACTORS)}'
            f'[[dit.self]]\nblocks = ["J01"]\n{factor_lines(SELF_FACTORS)}')
    results = []
    for layout in ("single", "single_prefixed", "transformer_diffusers", "diffusers"):
        src = write_checkpoint(tmp_path / layout, "sd35_medium", layout)
        out = tmp_path / f"{layout}.baked"
        bake(recipe(body), src, out, progress=False)
        state = load_file(str(out / "transformer" / "diffusion_pytorch_model.safetensors")) if out.is_dir() \
            else load_file(str(out))
        results.append(to_diffusers("sd35_medium", state).state_dict())
    assert all(torch.equal(r[k], results[0][k]) for r in results[1:] for k in results[0])
    assert not torch.equal(results[0]["transformer_blocks.1.attn2.to_v.weight"],
                           to_diffusers("sd35_medium", load_file(str(tmp_path / "single"))).state_dict()[
                               "transformer_blocks.1.attn2.to_v.weight"])


# --- baked == run-time hooks ---------------------------------------------------------------------------------

@pytest.mark.parametrize("arch", list(CONFIGS))
@pytest.mark.parametrize("stream", ["image", "text", None])
def test_joint_attention_per_stream(tmp_path, arch, stream):
    selector = f'stream = "{stream}"\n' if stream else ""
    streams = [stream] if stream else ["image", "text"]
    check_bake(tmp_path, arch, f"[dit.joint]\n{selector}{factor_lines(FACTORS)}", joint_hooks(arch, streams, FACTORS))


@pytest.mark.parametrize("proj", ["q", "k", "v", "out"])
def test_each_factor_alone_sd35_medium(tmp_path, proj):
    f = {proj: FACTORS[proj]}
    check_bake(tmp_path, "sd35_medium", f'[dit.joint]\nblocks = ["J01"]\n{factor_lines(f)}',
               joint_hooks("sd35_medium", ["image", "text"], f, blocks=[1]))


def test_sd35_medium_attn2_is_dit_self_never_joint(tmp_path):
    check_bake(tmp_path, "sd35_medium", f"[dit.self]\n{factor_lines(SELF_FACTORS)}", self_hooks(SELF_FACTORS))
    ckpt = detect(write_checkpoint(tmp_path / "m.safetensors", "sd35_medium"))
    joint = make_plan(recipe(f"[dit.joint]\n{factor_lines(FACTORS)}"), ckpt)
    assert joint.edits and not any(".attn2." in e.key for e in joint.edits)


def test_joint_and_self_together_with_block_selectors(tmp_path):
    body = (f'[dit.joint]\nblocks = ["J00", "J02"]\n{factor_lines(FACTORS)}'
            f'[dit.self]\nblocks = ["J01"]\n{factor_lines(SELF_FACTORS)}')
    hooks = {**joint_hooks("sd35_medium", ["image", "text"], FACTORS, blocks=[0, 2]), **self_hooks(SELF_FACTORS, [1])}
    check_bake(tmp_path, "sd35_medium", body, hooks, layout="single_prefixed")


@torch.no_grad()
def test_scaling_the_projection_instead_of_the_norm_is_cancelled(tmp_path):
    """What ComfyUI-style q/k scaling (the q or k rows of qkv) does on SD3.5: (nearly) nothing."""
    src = write_checkpoint(tmp_path / "m.safetensors", "sd35_large")
    original = {k: v.double() for k, v in load_file(str(src)).items()}
    plain = forward(to_diffusers("sd35_large", original))
    for proj, rows in (("q", (0, H)), ("k", (H, 2 * H))):
        literal = dict(original)
        for wb in ("weight", "bias"):
            key = f"joint_blocks.1.x_block.attn.qkv.{wb}"
            literal[key] = literal[key].clone()
            literal[key][rows[0]:rows[1]] *= FACTORS[proj]
        proper = to_diffusers("sd35_large", original)
        hook_outputs(proper, {f"transformer_blocks.1.attn.{MODULE[('image', proj)][0]}": FACTORS[proj]})
        effect = (forward(proper) - plain).abs().max().item()
        leak = (forward(to_diffusers("sd35_large", literal)) - plain).abs().max().item()
        assert effect > 1e-2 and leak < 1e-3 * effect, (proj, effect, leak)


@torch.no_grad()
def test_last_context_block_q_is_structurally_dead(tmp_path):
    """The last block's text stream is pre-only: its q has no effect (its k and v do)."""
    src = write_checkpoint(tmp_path / "m.safetensors", "sd35_large")
    plain = forward(to_diffusers("sd35_large", load_file(str(src))))
    for proj, dead in (("q", True), ("k", False), ("v", False)):
        out = tmp_path / f"{proj}.safetensors"
        body = recipe(f'[dit.joint]\nblocks = ["J02"]\nstream = "text"\n{proj} = 1.7\n')
        result = bake(body, src, out, progress=False)
        change = (forward(to_diffusers("sd35_large", load_file(str(out)))) - plain).abs().max().item()
        assert (change == 0.0) if dead else change > 1e-3, (proj, change)
        warned = [w for w in result.plan.warnings if "has no effect" in w]
        assert warned == ([f"[dit.joint]: q = 1.7 has no effect: {PRE_ONLY}"] if dead else []), warned
    both = make_plan(recipe('[dit.joint]\nstream = "text"\nq = 1.7\n'), detect(src))
    assert not both.warnings, "a factor that also acts elsewhere is not reported"


# --- the plan: what §11 says ------------------------------------------------------------------------------------

def expected_edits(arch):
    """§11 written out: (key, rows) → reason, for [dit.joint] (both streams) and [dit.self]."""
    qk_norm = CONFIGS[arch]["qk_norm"] is not None
    rows = {"q": (0, H), "k": (H, 2 * H), "v": (2 * H, 3 * H)}
    expected = {}
    attentions = [(i, part, "attn", "dit.joint") for i in range(N_BLOCKS) for part in ("x_block", "context_block")]
    attentions += [(i, "x_block", "attn2", "dit.self") for i in CONFIGS[arch]["dual_attention_layers"]]
    for i, part, attn, section in attentions:
        base = f"joint_blocks.{i}.{part}.{attn}."
        for proj in ("q", "k", "v", "out"):
            if proj in ("q", "k") and qk_norm:
                expected[(base + f"ln_{proj}.weight", None)] = f"{section}.{proj}"
            elif proj == "out":
                if not (part == "context_block" and i == N_BLOCKS - 1):
                    expected[(base + "proj.weight", None)] = expected[(base + "proj.bias", None)] = f"{section}.out"
            else:
                expected[(base + "qkv.weight", rows[proj])] = expected[(base + "qkv.bias", rows[proj])] = f"{section}.{proj}"
    return expected


@pytest.mark.parametrize("arch", list(CONFIGS))
def test_plan_lists_what_section_11_says(tmp_path, arch):
    body = f"[dit.joint]\n{factor_lines(FACTORS)}"
    if CONFIGS[arch]["dual_attention_layers"]:
        body += f"[dit.self]\n{factor_lines(SELF_FACTORS)}"
    plan = make_plan(recipe(body), detect(write_checkpoint(tmp_path / "m.safetensors", arch)))
    got = {(e.key, seg.rows): ", ".join(seg.reasons) for e in plan.edits for seg in e.segments}
    assert got == expected_edits(arch)


def test_dry_run_prints_the_rows_and_names_no_ln_q_without_qk_norm(tmp_path):
    src = write_checkpoint(tmp_path / "m.safetensors", "sd3_medium")
    (tmp_path / "r.toml").write_text('schema = 1\nname = "r"\n[dit.joint]\nstream = "text"\nq = 1.5\n')
    result = run("bake", str(tmp_path / "r.toml"), str(src), "-o", str(tmp_path / "o.safetensors"), "--dry-run")
    assert result.returncode == 0, result.stderr
    assert "joint_blocks.0.context_block.attn.qkv.weight rows 0:32  ×1.5  (dit.joint.q)" in result.stdout
    assert "x_block" not in result.stdout and "ln_q" not in result.stdout
    assert not (tmp_path / "o.safetensors").exists()


@pytest.mark.parametrize("body, message", [
    ('[dit.self]\nq = 1.2\n', "[dit.self]: q = 1.2 matches no tensor"),
    ('[dit.joint]\nblocks = ["J07"]\nv = 1.2\n', "[dit.joint]: m.safetensors has no block J07 with"),
])
def test_a_recipe_that_matches_nothing_is_one_clear_error(tmp_path, body, message):
    src = write_checkpoint(tmp_path / "m.safetensors", "sd35_large")
    (tmp_path / "r.toml").write_text(f'schema = 1\nname = "r"\n{body}')
    result = run("bake", str(tmp_path / "r.toml"), str(src), "-o", str(tmp_path / "o.safetensors"))
    assert result.returncode == 2
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1


# --- inspect -----------------------------------------------------------------------------------------------------

def test_inspect_shows_model_labels_streams_qk_norm_encoders_and_quantisation(tmp_path):
    path = write_checkpoint(tmp_path / "aio.safetensors", "sd35_medium", "comfy", dtype="scaled_fp8")
    result = run("inspect", "--json", str(path))
    assert result.returncode == 0, result.stderr
    info = json.loads(result.stdout)
    assert info["architecture"] == "sd35-medium" and info["qk_norm"] is True
    assert list(info["attention_blocks"]) == ["J00", "J01", "J02"]
    assert info["attention_blocks"]["J00"]["attn"] == ["joint", "self"]
    assert info["attention_blocks"]["J02"] == {"depth": 1, "attn": ["joint"], "streams": ["image", "text"], "qk_norm": True}
    assert info["text_encoder_attention_layers"] == {"clip_g": 2, "clip_l": 2, "t5xxl": 2}
    assert info["quantisation"].startswith("scaled fp8")
    text = run("inspect", str(write_checkpoint(tmp_path / "m.safetensors", "sd3_medium"))).stdout
    assert "architecture: sd3-medium" in text and "qk-norm:      no" in text and "quantisation" not in text


# --- scaled fp8 ---------------------------------------------------------------------------------------------------

@torch.no_grad()
def test_scaled_fp8_round_trip(tmp_path):
    """Whole weights through scale_weight (fp8 bytes untouched), qkv v rows requantised in fp8, norm weights in
    their own dtype, scale_input never; the dequantised baked model equals the hooked dequantised original."""
    src = write_checkpoint(tmp_path / "m.safetensors", "sd35_medium", "comfy", dtype="scaled_fp8")
    factors = {"q": 2.0, "k": 0.5, "v": 0.5, "out": 0.5}   # powers of two: exact in every dtype involved
    body = f'[dit.joint]\nstream = "image"\n{factor_lines(factors)}'
    plan = make_plan(recipe(body), detect(src))
    lines = "\n".join(plan.describe())
    p = MODEL_PREFIX + "joint_blocks.0.x_block.attn."
    assert f"{p}proj.scale_weight  ×0.5  (dit.joint.out (via scale_weight))" in lines
    assert f"{p}qkv.weight rows 64:96  ×0.5  (dit.joint.v, requantised in fp8 e4m3fn; the tensor: 1,024 rounded to nearest, " \
        "0 clipped)" in lines
    out = tmp_path / "o.safetensors"
    bake(recipe(body), src, out, progress=False)
    a, b = load_file(str(src)), load_file(str(out))
    assert a[p + "proj.weight"].view(torch.uint8).equal(b[p + "proj.weight"].view(torch.uint8))
    assert b[p + "proj.scale_weight"] == (a[p + "proj.scale_weight"] * 0.5)
    assert all(torch.equal(a[k], b[k]) for k in a if k.endswith((".scale_input", "scaled_fp8")))
    assert b[p + "qkv.weight"][:64].view(torch.uint8).equal(a[p + "qkv.weight"][:64].view(torch.uint8))
    assert torch.equal(b[p + "qkv.weight"][64:].float(), (a[p + "qkv.weight"][64:].float() * 0.5).to(torch.float8_e4m3fn).float())
    assert b[p + "ln_q.weight"].dtype == torch.bfloat16 and torch.equal(b[p + "ln_q.weight"], a[p + "ln_q.weight"] * 2)
    plain, patched = to_diffusers("sd35_medium", dequantised(src)), to_diffusers("sd35_medium", dequantised(src))
    hook_outputs(patched, joint_hooks("sd35_medium", ["image"], factors))
    compare(forward(to_diffusers("sd35_medium", dequantised(out))), forward(patched), forward(plain), rtol=1e-4)


# --- text encoders inside an SD3 all-in-one file -------------------------------------------------------------------

CLIP_FACTORS = {"q": 1.25, "k": 0.75, "v": 1.5, "out": 0.6}
CLIP_PROJ = {"q": "q_proj", "k": "k_proj", "v": "v_proj", "out": "out_proj"}


def test_clip_section_is_comfyui_node_then_save_on_clip_l_and_clip_g(tmp_path):
    """[clip] = CLIPAttentionMultiply + save: every q/k/v/out_proj weight and bias of CLIP-L and CLIP-G is the
    float32 product rounded to the stored dtype; every other tensor keeps its bytes."""
    src = write_checkpoint(tmp_path / "aio.safetensors", "sd35_medium", "comfy", dtype=torch.float16)
    out = tmp_path / "o.safetensors"
    bake(recipe(f"[clip]\n{factor_lines(CLIP_FACTORS)}"), src, out, progress=False)
    a, b = load_file(str(src)), load_file(str(out))
    changed = 0
    for k in a:
        f = next((f for p, f in CLIP_FACTORS.items() if k.startswith(("text_encoders.clip_l.", "text_encoders.clip_g."))
                  and f".self_attn.{CLIP_PROJ[p]}." in k), None)
        expected = a[k] if f is None else (a[k].float() * f).to(a[k].dtype)
        assert expected.view(torch.uint8).equal(b[k].view(torch.uint8)), k
        changed += f is not None
    assert changed == 2 * 2 * 4 * 2    # 2 encoders × 2 layers × 4 projections × weight and bias


@torch.no_grad()
@pytest.mark.parametrize("section, encoders", [("clip", ("clip_l", "clip_g")), ("text", ("t5xxl",))])
def test_text_encoder_factors_equal_hooks_on_the_hf_models(tmp_path, section, encoders):
    src = write_checkpoint(tmp_path / "aio.safetensors", "sd35_medium", "comfy")
    out = tmp_path / "o.safetensors"
    bake(recipe(f"[{section}]\n{factor_lines(CLIP_FACTORS)}"), src, out, progress=False)
    originals = build_text_encoders(FAMILY)
    ids = torch.randint(2, 64, (1, 7), generator=torch.Generator().manual_seed(3))
    for name in encoders:
        config = originals[name].config
        if name == "t5xxl":
            cls, names = T5EncoderModel, {"q": "q", "k": "k", "v": "v", "out": "o"}
            load = lambda path: convert_sd3_t5_checkpoint_to_diffusers(load_file(str(path)))  # noqa: E731
        else:
            cls, names = CLIPTextModelWithProjection, CLIP_PROJ
            load = lambda path: convert_ldm_clip_checkpoint(  # noqa: E731
                load_file(str(path)), remove_prefix=f"text_encoders.{name}.transformer.")
        plain, patched, baked = (load_strict(cls(config), load(p)) for p in (src, src, out))
        hooks = {m: CLIP_FACTORS[p] for m, _ in plain.named_modules() for p, n in names.items()
                 if m.endswith(f"{'SelfAttention' if name == 't5xxl' else 'self_attn'}.{n}")}
        assert len(hooks) == 2 * 4
        hook_outputs(patched, hooks)
        compare(baked(ids).last_hidden_state, patched(ids).last_hidden_state, plain(ids).last_hidden_state, rtol=1e-5)


def test_synth_cli_writes_sd35_medium(tmp_path):
    out = tmp_path / "out.safetensors"
    result = run("synth", "sd35_medium", str(out))
    assert result.returncode == 0, result.stderr
    assert detect(out).architecture == "sd35-medium"
    assert {t.dtype for t in detect(out).files[0].header.tensors} == {"F16"}
    shutil.rmtree(tmp_path, ignore_errors=True)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float8_e4m3fn, torch.float8_e5m2])
def test_every_stored_dtype_is_scaled_by_the_one_rule(tmp_path, dtype):
    """float32 product rounded to nearest in the stored dtype, for norm weights and fused row ranges alike."""
    src = write_checkpoint(tmp_path / "m.safetensors", "sd35_large", "comfy", dtype=dtype)
    out = tmp_path / "o.safetensors"
    bake(recipe('[dit.joint]\nstream = "text"\nq = 1.25\nv = 0.75\n'), src, out, progress=False)
    a, b = load_file(str(src)), load_file(str(out))
    p = MODEL_PREFIX + "joint_blocks.1.context_block.attn."
    bits = lambda t: t.view(torch.uint8)  # noqa: E731
    assert bits(b[p + "ln_q.weight"]).equal(bits((a[p + "ln_q.weight"].float() * 1.25).to(dtype)))
    assert bits(b[p + "qkv.weight"][2 * H:]).equal(bits((a[p + "qkv.weight"][2 * H:].float() * 0.75).to(dtype)))
    assert bits(b[p + "qkv.weight"][:2 * H]).equal(bits(a[p + "qkv.weight"][:2 * H]))
    x = p.replace("context_block", "x_block")
    assert bits(b[x + "ln_q.weight"]).equal(bits(a[x + "ln_q.weight"]))
