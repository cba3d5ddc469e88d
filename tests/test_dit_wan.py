"""Wan 2.1 / 2.2 and LTX-Video: file layouts checked against diffusers' own single-file converters, and
bakes shown equal to the run-time multiplication on the real diffusers classes (dit-layouts.md §11).

The reference is always the ORIGINAL model with forward hooks multiplying q after its qk-norm, k after
its qk-norm, v, or the attention output by the factor; the baked file is read back through diffusers'
converter (or `from_pretrained` for folders) into a fresh model, so ckptbend's tables are never the judge.
"""

import copy
import re
import shutil
from pathlib import Path

import diffusers
import pytest
import torch
import transformers
from click.testing import CliRunner
from diffusers.loaders.single_file_utils import (
    convert_ltx_transformer_checkpoint_to_diffusers,
    convert_sd3_t5_checkpoint_to_diffusers,
    convert_wan_transformer_to_diffusers,
    infer_diffusers_model_type,
)
from safetensors.torch import load_file, save_file

from ckptbend.bake import bake
from ckptbend.cli import cli
from ckptbend.errors import CkptbendError
from ckptbend.layouts import blocks_with_attention, detect
from ckptbend.plan import make_plan
from ckptbend.recipe import parse_recipe
from ckptbend.safetensors_io import TensorInfo, header_bytes
from ckptbend.synth import wan as W
from ckptbend.synth import write_checkpoint
from ckptbend.synth.catalog import SCALED_FP8
from _helpers import load_strict

WAN_ARCHES = ("wan21_t2v", "wan21_i2v", "wan22_ti2v", "wan22_i2v")
CONVERTER = {"wan": convert_wan_transformer_to_diffusers, "ltx": convert_ltx_transformer_checkpoint_to_diffusers}
TOL = 1e-5          # fp32 files read into float64 models: one rounding of each scaled tensor
FACTORS = {"self": {"q": 1.7, "k": 0.6, "v": 1.9, "out": 0.55}, "cross": {"q": 1.3, "k": 0.8, "v": 1.4, "out": 0.7}}
RECIPE = parse_recipe("schema = 1\nname = \"t\"\n" + "".join(
    f"[dit.{a}]\n" + "".join(f"{k} = {v}\n" for k, v in fs.items()) for a, fs in FACTORS.items()))


def family(arch):
    return "ltx" if arch == "ltx_video" else "wan"


@pytest.fixture(scope="module")
def models():
    return {arch: W.build_models(arch) for arch in (*WAN_ARCHES, "ltx_video")}


def fresh_dit(arch):
    cls, config, _, _ = W.ARCHES[arch]
    return getattr(diffusers, cls)(**config).eval()


def model_part(state):
    """The transformer's tensors of a single file (ComfyUI all-in-one: not the text encoder or the VAE)."""
    return {k: v for k, v in state.items() if not k.startswith(("text_encoders.", "vae."))}


def dequantised(state):
    """A ComfyUI scaled-fp8 dict as its loader computes the weights: fp8 × scale_weight; markers dropped."""
    out = {}
    for k, v in state.items():
        if k.endswith(("scale_weight", "scale_input", "scaled_fp8")):
            continue
        scale = state.get(k.removesuffix("weight") + "scale_weight") if k.endswith(".weight") else None
        out[k] = v.double() * scale.double() if scale is not None else v.double()
    return out


def load_dit(arch, path, layout, dtype=torch.float64):
    """A baked or synthetic file, read the way diffusers reads it, into a fresh model of the real class."""
    if layout == "diffusers":
        # from_pretrained needs `accelerate` for Wan (fp32-kept modules): the same config and weights, by hand
        cls = getattr(diffusers, W.ARCHES[arch][0])
        model = cls.from_config(cls.load_config(path / "transformer")).eval()
        weights = {k: v for f in sorted((path / "transformer").glob("*.safetensors")) for k, v in load_file(f).items()}
        return load_strict(model, weights).to(dtype)
    state = dequantised(model_part(load_file(path)))
    if layout != "transformer_diffusers":
        state = CONVERTER[family(arch)](dict(state))
    return load_strict(fresh_dit(arch), state).to(dtype)


def inputs(arch, dtype=torch.float64):
    g = torch.Generator().manual_seed(123)

    def r(*shape):
        return torch.randn(*shape, generator=g, dtype=dtype)
    t = torch.tensor([0.37], dtype=dtype)
    if arch == "ltx_video":
        return dict(hidden_states=r(1, 8, 8), encoder_hidden_states=r(1, 5, 24), timestep=t,
                    encoder_attention_mask=torch.ones(1, 5, dtype=torch.long), num_frames=2, height=2, width=2,
                    return_dict=False)
    config = W.ARCHES[arch][1]
    image = "image_dim" in config
    # diffusers' Wan I2V attention takes the first len-512 context tokens as the image's: exactly 512 text tokens.
    d = dict(hidden_states=r(1, config["in_channels"], 2, 4, 4), timestep=t,
             encoder_hidden_states=r(1, 512 if image else 5, 24), return_dict=False)
    if image:
        d["encoder_hidden_states_image"] = r(1, 3, 20)
    return d


def forward(model, arch):
    with torch.no_grad():
        return model(**inputs(arch))[0]


def hook_points(arch, attn, proj, block):
    """The submodules whose outputs are q after the norm, k after the norm, v, or the attention output."""
    b = f"transformer_blocks.{block}." if arch == "ltx_video" else f"blocks.{block}."
    a = b + ("attn1." if attn == "self" else "attn2.")
    points = {"q": ["norm_q"], "k": ["norm_k"], "v": ["to_v"], "out": ["to_out.0"]}[proj]
    if attn == "cross" and "image_dim" in W.ARCHES[arch][1]:
        points += {"k": ["norm_added_k"], "v": ["add_v_proj"]}.get(proj, [])
    return [a + p for p in points]


def hooked(model, arch, factors, blocks=(0, 1)):
    """A float64 copy of `model` whose hooked outputs are multiplied at run time: {(attn, proj): f}."""
    m = copy.deepcopy(model).double()
    for (attn, proj), f in factors.items():
        for block in blocks:
            for point in hook_points(arch, attn, proj, block):
                m.get_submodule(point).register_forward_hook(lambda mod, args, out, f=f: out * f)
    return m


def all_factors():
    return {(a, p): f for a, fs in FACTORS.items() for p, f in fs.items()}


def compare(baked, reference, original):
    effect = (reference - original).abs().max().item()
    err = (baked - reference).abs().max().item()
    assert effect > 1e-3, "the run-time multiplication must change the output, or nothing is shown"
    assert err <= TOL * max(1.0, effect), (err, effect)
    return effect


# --- layouts against diffusers' converters ----------------------------------------------------------

@pytest.mark.parametrize("arch", (*WAN_ARCHES, "ltx_video"))
@pytest.mark.parametrize("layout", ["single", "comfy", "transformer_diffusers", "diffusers"])
def test_layout_loads_strict_through_diffusers(tmp_path, models, arch, layout):
    path = write_checkpoint(tmp_path / "x", arch, layout=layout)
    loaded = load_dit(arch, path, layout, torch.float32)
    want = models[arch]["dit"].state_dict()
    for key, t in loaded.state_dict().items():
        assert torch.equal(t, want[key]), key
    ckpt = detect(path)
    assert blocks_with_attention(ckpt) == ["B00", "B01"]
    text = W.ARCHES[arch][2]
    expected = {"single": {"dit"}, "transformer_diffusers": {"dit"}}.get(layout, {"dit", text})
    assert set(ckpt.components) == expected


@pytest.mark.parametrize("arch, name", [("wan21_t2v", "wan21-t2v"), ("wan21_i2v", "wan21-i2v"),
                                        ("wan22_ti2v", "wan22-ti2v"), ("wan22_i2v", "wan22-i2v"),
                                        ("ltx_video", "ltx-video")])
@pytest.mark.parametrize("layout, kind", [("single", "dit"), ("comfy", "single-file"),
                                          ("transformer_diffusers", "dit"), ("diffusers", "diffusers-folder")])
def test_architecture_names(tmp_path, arch, name, layout, kind):
    ckpt = detect(write_checkpoint(tmp_path / "x", arch, layout=layout, dtype=torch.float16))
    assert (ckpt.architecture, ckpt.kind) == (name, kind)
    assert ckpt.qk_norm   # Wan and LTX normalise q and k after projection (LTX alone also has UNet-node sites)


def sparse_file(path, state):
    tensors, offset = [], 0
    for name, t in state.items():
        nbytes = t.numel() * 2
        tensors.append(TensorInfo(name, "BF16", tuple(t.shape), offset, offset + nbytes))
        offset += nbytes
    head = header_bytes({"format": "pt"}, tensors)
    with open(path, "wb") as f:
        f.write(head)
        f.truncate(len(head) + offset)
    return path


FULL = {   # published sizes (dit-layouts.md §4, §8)
    "wan21-t2v-1.3b": ("WanTransformer3DModel", dict(num_attention_heads=12, ffn_dim=8960, num_layers=30), "wan-t2v-1.3B"),
    "wan21-t2v-14b": ("WanTransformer3DModel", dict(num_attention_heads=40, ffn_dim=13824, num_layers=40), "wan-t2v-14B"),
    "wan21-i2v-14b": ("WanTransformer3DModel", dict(num_attention_heads=40, ffn_dim=13824, num_layers=40,
                                                    in_channels=36, image_dim=1280, added_kv_proj_dim=5120), "wan-i2v-14B"),
    "wan22-i2v-a14b": ("WanTransformer3DModel", dict(num_attention_heads=40, ffn_dim=13824, num_layers=40,
                                                     in_channels=36), "wan-i2v-14B"),
    "wan22-ti2v-5b": ("WanTransformer3DModel", dict(num_attention_heads=24, ffn_dim=14336, num_layers=30,
                                                    in_channels=48, out_channels=48), "wan-i2v-14B"),
    "ltx-video-2b": ("LTXVideoTransformer3DModel", dict(num_layers=28, attention_head_dim=64,
                                                        cross_attention_dim=2048), "ltx-video"),
    "ltx-video-13b": ("LTXVideoTransformer3DModel", dict(num_layers=48, attention_head_dim=128,
                                                         cross_attention_dim=4096), "ltx-video-0.9.7"),
}


@pytest.mark.parametrize("ours", FULL)
def test_full_size_names_agree_with_diffusers_sniffer(tmp_path, ours):
    cls, config, theirs = FULL[ours]
    with torch.device("meta"):
        model = getattr(diffusers, cls)(**config)
    arch = "ltx_video" if cls.startswith("LTX") else "wan21_t2v"
    state = {W.MODEL_PREFIX + k: v for k, v in W.original_state_dict(arch, model).items()}
    # diffusers knows Wan 2.1's three sizes (the 2.2 layouts fall to its i2v branch) and LTX by block count.
    assert infer_diffusers_model_type(state) == theirs
    ckpt = detect(sparse_file(tmp_path / "full.safetensors", state))
    assert ckpt.architecture == ours
    assert len(blocks_with_attention(ckpt)) == config["num_layers"]


def test_text_encoders_load_through_real_loaders(tmp_path, models):
    """The UMT5 file and the all-in-one text parts load strictly: transformers' from_pretrained for the
    separate file, diffusers' own all-in-one T5 extraction for LTX."""
    for arch in ("wan21_t2v", "ltx_video"):
        text = W.ARCHES[arch][2]
        encoder = models[arch][text]
        folder = tmp_path / arch
        folder.mkdir()
        encoder.config.save_pretrained(folder)
        shutil.copy(write_checkpoint(tmp_path / f"{arch}.te", arch, layout="text_encoder"), folder / "model.safetensors")
        loaded = type(encoder).from_pretrained(folder)
        assert all(torch.equal(loaded.state_dict()[k], v) for k, v in encoder.state_dict().items())
        assert detect(tmp_path / f"{arch}.te").architecture == f"{text}-only"
    comfy = load_file(write_checkpoint(tmp_path / "ltx.comfy", "ltx_video", layout="comfy"))
    t5 = load_strict(type(models["ltx_video"]["t5xxl"])(models["ltx_video"]["t5xxl"].config),
                     convert_sd3_t5_checkpoint_to_diffusers(comfy))
    assert all(torch.equal(t5.state_dict()[k], v) for k, v in models["ltx_video"]["t5xxl"].state_dict().items())


# --- equivalence: baked == run-time multiplication ----------------------------------------------------

@pytest.mark.parametrize("arch", ["wan21_t2v", "wan21_i2v", "ltx_video"])
@pytest.mark.parametrize("layout", ["single", "comfy", "diffusers"])
def test_bake_equals_runtime_multiplication(tmp_path, models, arch, layout):
    src = write_checkpoint(tmp_path / "src", arch, layout=layout)
    out = tmp_path / "out"
    bake(RECIPE, src, out, durable=False)
    original = models[arch]["dit"]
    base = forward(copy.deepcopy(original).double(), arch)
    baked = forward(load_dit(arch, out, layout), arch)
    compare(baked, forward(hooked(original, arch, all_factors()), arch), base)
    # each kind alone, on one block, too (a combined pass could hide a factor applied twice elsewhere)
    for attn in ("self", "cross"):
        for proj, f in FACTORS[attn].items():
            recipe = parse_recipe(f'schema = 1\nname = "t"\n[dit.{attn}]\nblocks = ["B01"]\n{proj} = {f}\n')
            one = tmp_path / f"{attn}-{proj}"
            bake(recipe, src, one, durable=False)
            compare(forward(load_dit(arch, one, layout), arch),
                    forward(hooked(original, arch, {(attn, proj): f}, blocks=(1,)), arch), base)


def test_i2v_image_keys_and_values_are_in_cross(tmp_path, models):
    """The image half of I2V's cross-attention alone: its k (norm_k_img) and v (v_img) act and are baked."""
    arch = "wan21_i2v"
    src = write_checkpoint(tmp_path / "src", arch)
    original = models[arch]["dit"]
    base = forward(copy.deepcopy(original).double(), arch)
    plan = make_plan(parse_recipe('schema = 1\nname = "t"\n[dit.cross]\nk = 0.8\nv = 1.4\n'), detect(src))
    edited = {e.key for e in plan.edits}
    assert {"blocks.0.cross_attn.norm_k_img.weight", "blocks.0.cross_attn.v_img.weight",
            "blocks.0.cross_attn.v_img.bias"} <= edited
    # scale only the image part in the original file by hand, as §11 says, and compare with image-only hooks
    state = load_file(src)
    for b in (0, 1):
        for key, f in ((f"blocks.{b}.cross_attn.norm_k_img.weight", 0.8), (f"blocks.{b}.cross_attn.v_img.weight", 1.4),
                       (f"blocks.{b}.cross_attn.v_img.bias", 1.4)):
            state[key] = state[key] * f
    model = load_strict(fresh_dit(arch), convert_wan_transformer_to_diffusers(state)).double()
    reference = copy.deepcopy(original).double()
    for b in (0, 1):
        reference.get_submodule(f"blocks.{b}.attn2.norm_added_k").register_forward_hook(lambda m, a, o: o * 0.8)
        reference.get_submodule(f"blocks.{b}.attn2.add_v_proj").register_forward_hook(lambda m, a, o: o * 1.4)
    compare(forward(model, arch), forward(reference, arch), base)


@pytest.mark.parametrize("arch", ["wan21_i2v", "ltx_video"])
def test_scaling_the_projection_instead_of_the_norm_is_cancelled(tmp_path, models, arch):
    src = write_checkpoint(tmp_path / "src", arch)
    state = load_file(src)
    original = models[arch]["dit"]
    base = forward(copy.deepcopy(original).double(), arch)
    proper = (forward(hooked(original, arch, {("self", "q"): 1.7, ("cross", "k"): 0.6}), arch) - base).abs().max().item()
    names = {"wan": (r"self_attn\.q\.", r"cross_attn\.k\."), "ltx": (r"attn1\.to_q\.", r"attn2\.to_k\.")}[family(arch)]
    literal = {k: v * (1.7 if re.search(names[0], k) else 0.6) if re.search("|".join(names), k) else v
               for k, v in state.items()}
    assert sum(not torch.equal(literal[k], state[k]) for k in state) == 8   # 2 blocks × (q, k) × (weight, bias)
    moved = (forward(load_strict(fresh_dit(arch), CONVERTER[family(arch)](literal)).double(), arch) - base).abs().max()
    assert proper > 1e-2 and moved < 1e-3 * proper


def test_ltx_unet_sections_are_comfyui_literal_and_warn(tmp_path, models):
    """[unet.self]/[unet.cross] on LTX scale to_q/to_k/to_v/to_out.0 weight and bias, exactly as ComfyUI's
    nodes + save do (float32 multiply, round to nearest): byte for byte; q/k warn and point to [dit.*]."""
    src = write_checkpoint(tmp_path / "src.safetensors", "ltx_video", dtype=torch.bfloat16)
    recipe = parse_recipe('schema = 1\nname = "t"\n[unet.self]\nq = 1.5\nv = 1.25\n[unet.cross]\nk = 0.5\nout = 0.75\n'
                          '[unet.temporal]\nself_structural = 1.1\ncross_structural = 0.9\n')
    result = bake(recipe, src, tmp_path / "out.safetensors", durable=False)
    warnings = result.plan.warnings
    assert len(warnings) == 2 and all("cancelled by this model's qk-norm" in w for w in warnings)
    assert "[dit.self]" in warnings[0] and "[dit.cross]" in warnings[1]
    before, after = load_file(src), load_file(tmp_path / "out.safetensors")
    literal = {r"attn1\.to_q\.": (1.5,), r"attn1\.to_v\.": (1.25,), r"attn2\.to_k\.": (0.5,),
               r"attn2\.to_out\.0\.": (0.75, 0.9), r"attn1\.to_out\.0\.": (1.1,)}
    touched = 0
    for key, t in before.items():
        factors = next((fs for pattern, fs in literal.items() if re.search(pattern, key)), ())
        want = t.float()
        for f in factors:   # chained nodes: one float32 product, one rounding into the stored dtype
            want = want * f
        assert torch.equal(after[key].view(torch.int16), want.to(t.dtype).view(torch.int16)), key
        touched += bool(factors)
    assert touched == 2 * 5 * 2   # blocks × projections × (weight, bias)


# --- plan, dry run, inspect -----------------------------------------------------------------------------

SECTION_11 = {   # dit-layouts.md §11: what each factor scales, in original names (block 0)
    ("self", "q"): {"blocks.0.self_attn.norm_q.weight"},
    ("self", "k"): {"blocks.0.self_attn.norm_k.weight"},
    ("self", "v"): {"blocks.0.self_attn.v.weight", "blocks.0.self_attn.v.bias"},
    ("self", "out"): {"blocks.0.self_attn.o.weight", "blocks.0.self_attn.o.bias"},
    ("cross", "q"): {"blocks.0.cross_attn.norm_q.weight"},
    ("cross", "k"): {"blocks.0.cross_attn.norm_k.weight", "blocks.0.cross_attn.norm_k_img.weight"},
    ("cross", "v"): {"blocks.0.cross_attn.v.weight", "blocks.0.cross_attn.v.bias",
                     "blocks.0.cross_attn.v_img.weight", "blocks.0.cross_attn.v_img.bias"},
    ("cross", "out"): {"blocks.0.cross_attn.o.weight", "blocks.0.cross_attn.o.bias"},
}
LTX_11 = {(a, p): {f"transformer_blocks.0.{n}.{t}" for t in ts}
          for a, n in (("self", "attn1"), ("cross", "attn2"))
          for p, ts in (("q", ["q_norm.weight"]), ("k", ["k_norm.weight"]), ("v", ["to_v.weight", "to_v.bias"]),
                        ("out", ["to_out.0.weight", "to_out.0.bias"]))}


@pytest.mark.parametrize("arch, table", [("wan21_i2v", SECTION_11), ("ltx_video", LTX_11)])
def test_dry_run_lists_what_section_11_says(tmp_path, arch, table):
    src = write_checkpoint(tmp_path / "src.safetensors", arch, dtype=torch.float16)
    for (attn, proj), keys in table.items():
        (tmp_path / "r.toml").write_text(f'schema = 1\nname = "t"\n[dit.{attn}]\nblocks = ["B00"]\n{proj} = 1.5\n')
        r = CliRunner().invoke(cli, ["bake", str(tmp_path / "r.toml"), str(src), "-o", str(tmp_path / "o"), "--dry-run"])
        assert r.exit_code == 0, r.output
        lines = [line for line in r.stdout.splitlines() if not line.startswith("#")]
        assert {line.split()[0] for line in lines} == keys, (attn, proj)
        assert all(f"×1.5  (dit.{attn}.{proj})" in line for line in lines)
    assert not (tmp_path / "o").exists()


def test_unet_sections_match_nothing_on_wan(tmp_path):
    """ComfyUI's UNet nodes patch 0 tensors on Wan (dit-layouts.md §0): so does [unet.self] here."""
    src = write_checkpoint(tmp_path / "src.safetensors", "wan21_t2v", dtype=torch.float16)
    (tmp_path / "r.toml").write_text('schema = 1\nname = "t"\n[unet.self]\nv = 1.5\n')
    r = CliRunner().invoke(cli, ["bake", str(tmp_path / "r.toml"), str(src), "-o", str(tmp_path / "o")])
    assert r.exit_code == 2
    assert r.stderr.strip().splitlines() == [r.stderr.strip()] and "matches no tensor" in r.stderr


@pytest.mark.parametrize("arch, layout, needles", [
    ("wan21_i2v", "comfy", ["architecture: wan21-i2v", "B00   cross self", "B01   cross self", "umt5xxl: 2 attention layers",
                            "blocks.N.cross_attn.norm_k_img.weight"]),
    ("ltx_video", "diffusers", ["architecture: ltx-video", "B01   attn1 attn2 cross self", "t5xxl: 2 attention layers",
                                "transformer_blocks.N.attn1.norm_q.weight", "qk-norm; q/k multipliers of the UNet nodes cancel"]),
])
def test_inspect_shows_model_blocks_qk_norm_and_text_encoders(tmp_path, arch, layout, needles):
    src = write_checkpoint(tmp_path / "src", arch, layout=layout, dtype=torch.float16)
    r = CliRunner().invoke(cli, ["inspect", str(src)])
    assert r.exit_code == 0, r.output
    for needle in needles:
        assert needle in r.stdout, needle


# --- scaled fp8 -------------------------------------------------------------------------------------

def test_scaled_fp8_round_trip(tmp_path, models):
    arch = "wan21_t2v"
    src = write_checkpoint(tmp_path / "src.safetensors", arch, dtype=SCALED_FP8)
    r = CliRunner().invoke(cli, ["inspect", str(src)])
    assert "quantisation: scaled fp8 (" in r.stdout
    factors = {("self", "q"): 1.5, ("self", "v"): 1.25, ("self", "out"): 0.5, ("cross", "k"): 0.75}
    recipe = parse_recipe('schema = 1\nname = "t"\n[dit.self]\nq = 1.5\nv = 1.25\nout = 0.5\n[dit.cross]\nk = 0.75\n')
    result = bake(recipe, src, tmp_path / "out.safetensors", durable=False)
    lines = result.plan.describe()
    assert "blocks.0.self_attn.v.scale_weight  ×1.25  (dit.self.v (via scale_weight))" in lines
    assert not any("requantised" in line for line in lines)
    before, after = load_file(src), load_file(tmp_path / "out.safetensors")
    for b in (0, 1):
        p = f"blocks.{b}.self_attn."
        for proj, f in (("v", 1.25), ("o", 0.5)):
            assert after[p + proj + ".weight"].dtype == torch.float8_e4m3fn
            assert torch.equal(after[p + proj + ".weight"].view(torch.uint8), before[p + proj + ".weight"].view(torch.uint8))
            assert torch.equal(after[p + proj + ".scale_weight"], before[p + proj + ".scale_weight"] * f)
            assert torch.equal(after[p + proj + ".scale_input"], before[p + proj + ".scale_input"])
            assert torch.equal(after[p + proj + ".bias"], (before[p + proj + ".bias"].float() * f).to(torch.bfloat16))
        assert torch.equal(after[p + "norm_q.weight"], (before[p + "norm_q.weight"].float() * 1.5).to(torch.bfloat16))
    # what a loader computes: the baked dequantised model == the dequantised original with run-time hooks
    original = load_dit(arch, src, "single")
    base = forward(original, arch)
    reference = forward(hooked(original, arch, factors), arch)
    baked = forward(load_dit(arch, tmp_path / "out.safetensors", "single"), arch)
    effect = (reference - base).abs().max().item()
    assert effect > 1e-2 and (baked - reference).abs().max().item() < 0.02 * effect   # bf16 rounding of bias / norm


# --- [text] on UMT5 (Wan) and T5 (LTX) ---------------------------------------------------------------------

TEXT = {"q": 1.7, "k": 0.6, "v": 1.9, "out": 0.55}


@pytest.mark.parametrize("arch, layout", [("wan21_t2v", "text_encoder"), ("wan21_t2v", "comfy"),
                                          ("ltx_video", "text_encoder"), ("ltx_video", "comfy")])
def test_text_section_equals_scaling_attention_outputs(tmp_path, models, arch, layout):
    text = W.ARCHES[arch][2]
    encoder = models[arch][text]
    src = write_checkpoint(tmp_path / "src.safetensors", arch, layout=layout)
    recipe = parse_recipe('schema = 1\nname = "t"\n[text]\n' + "".join(f"{k} = {v}\n" for k, v in TEXT.items()))
    bake(recipe, src, tmp_path / "out.safetensors", durable=False)
    prefix = f"text_encoders.{text}.transformer." if layout == "comfy" else ""
    state = {k.removeprefix(prefix): v for k, v in load_file(tmp_path / "out.safetensors").items() if k.startswith(prefix)}
    if layout == "comfy":
        state = {k: v for k, v in state.items() if not k.startswith(W.MODEL_PREFIX)}
    baked = load_strict(type(encoder)(encoder.config), state).double()
    reference = copy.deepcopy(encoder).double()
    hooks = 0
    for name, module in reference.named_modules():
        if m := re.search(r"SelfAttention\.([qkvo])$", name):
            f = TEXT["out" if m[1] == "o" else m[1]]
            module.register_forward_hook(lambda mod, a, o, f=f: o * f)
            hooks += 1
    assert hooks == 4 * encoder.config.num_layers
    ids = torch.randint(0, 64, (1, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        plain = copy.deepcopy(encoder).double()(input_ids=ids).last_hidden_state
        compare(baked(input_ids=ids).last_hidden_state, reference(input_ids=ids).last_hidden_state, plain)


# --- the synth command ----------------------------------------------------------------------------------

def test_synth_command_and_bad_layout(tmp_path):
    r = CliRunner().invoke(cli, ["synth", "wan21_t2v", str(tmp_path / "out.safetensors")])
    assert r.exit_code == 0, r.output
    assert detect(tmp_path / "out.safetensors").architecture == "wan21-t2v"
    r = CliRunner().invoke(cli, ["synth", "wan21_t2v", str(tmp_path / "o2"), "--layout", "unet"])
    assert r.exit_code == 2
    assert r.stderr.strip() == "error: synth: wan21_t2v has no layout 'unet' (one of single, comfy, " \
                               "transformer_diffusers, diffusers, text_encoder)"


def test_shipped_wan_recipe_bakes_on_wan(tmp_path):
    """Its blocks B00–B14 (the first half of the 1.3B's 30) must exist: a tiny Wan with 30 blocks."""
    cls, config, _, _ = W.ARCHES["wan21_i2v"]
    model = getattr(diffusers, cls)(**{**config, "num_layers": 30})
    save_file({k: v.contiguous() for k, v in W.original_state_dict("wan21_i2v", model).items()},
              tmp_path / "src.safetensors")
    recipe = parse_recipe((Path(__file__).resolve().parent.parent / "recipes" / "wan-prompt-adherence.toml").read_text())
    plan = make_plan(recipe, detect(tmp_path / "src.safetensors"))
    reasons = {r for e in plan.edits for seg in e.segments for r in seg.reasons}
    assert reasons == {"dit.cross.k", "dit.cross.v", "dit.self.q"} and not plan.warnings
    with pytest.raises(CkptbendError, match="has no block B02, B03"):   # the 2-block tiny Wan lacks B02–B14
        make_plan(recipe, detect(write_checkpoint(tmp_path / "tiny.safetensors", "wan21_i2v")))
