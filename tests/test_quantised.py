"""ComfyUI's quantised safetensors (comfy_quant formats and scaled fp8): files made by synth equal what
comfy-kitchen's own quantisers write, and baked files, dequantised by comfy-kitchen's layouts as ComfyUI
loads them, equal f × the original — exactly where a scale takes the factor, and within the format's own
rounding where codes or block scales are requantised (bounds below). Nothing is clipped silently."""

import json
import math

import pytest
import torch
from safetensors.torch import load_file, save_file

from _comfy_kitchen import ck, dequantised
from _dit import run
from ckptbend.formats import codecs
from ckptbend.synth import flux as synth_flux
from ckptbend.synth.files import write_safetensors
from ckptbend.synth.quantised import QUANTISED, _layer, quantise

H = 32                                   # the tiny Flux width
RECIPE = 'schema = 1\nname = "t"\n[dit.joint]\nv = 1.5\nout = 0.75\n'
FORMATS = ["scaled_fp8", "fp8mixed", "float8_e5m2", "int8", "int8_channel", "int8_convrot", "nvfp4", "mxfp8"]


@pytest.fixture(scope="module")
def state():
    """The tiny Flux.1-dev transformer in BFL's names, float32."""
    return synth_flux.to_original("flux_dev", synth_flux.build_transformer("flux_dev", "tiny", 0).state_dict())


# Forms synth does not write, made by comfy-kitchen's own quantisers on the layers synth's fp8mixed quantises.
KITCHEN = {"mxfp8": ("TensorCoreMXFP8Layout", {}, "mxfp8"),
           "float8_e5m2": ("TensorCoreFP8Layout", {"dtype": torch.float8_e5m2}, "float8_e5m2"),
           "int8_channel": ("TensorWiseINT8Layout", {"per_channel": True}, "int8_tensorwise")}


def _kitchen(state, form):
    import comfy_kitchen.tensor

    layout, options, name = KITCHEN[form]
    cls = getattr(comfy_kitchen.tensor, layout)
    out = quantise(state, "", "fp8mixed")
    for key in [k for k in out if k.endswith(".comfy_quant")]:
        layer = key.removesuffix(".comfy_quant")
        with ck.registry.use_backend("eager"):
            q, params = cls.quantize(state[layer + ".weight"].float(), **options)
        out.pop(layer + ".weight_scale")
        out.update({f"{layer}.weight{suffix}": t for suffix, t in cls.state_dict_tensors(q, params).items()})
        out[key] = torch.tensor(list(json.dumps({"format": name}).encode()), dtype=torch.uint8)
    return out


@pytest.fixture(scope="module")
def files(tmp_path_factory, state):
    root, made = tmp_path_factory.mktemp("quantised"), {}

    def make(form):
        if form not in made:
            made[form] = root / f"{form}.safetensors"
            tensors = _kitchen(state, form) if form in KITCHEN else quantise(state, "", form)
            if form in KITCHEN:
                save_file(tensors, str(made[form]))
            else:
                write_safetensors(made[form], tensors, None)
        return made[form]
    return make


def bake(src, tmp_path, body=RECIPE, *extra):
    (tmp_path / "r.toml").write_text(body)
    out = tmp_path / "out.safetensors"
    r = run("bake", tmp_path / "r.toml", src, "-o", out, "-q", *extra)
    assert r.returncode == 0, r.stderr
    return out, r


def factors(key: str, shape, v=1.5, out=0.75) -> torch.Tensor:
    """What RECIPE asks of a tensor of the tiny Flux (element by element)."""
    f = torch.ones(shape, dtype=torch.float64)
    if key.endswith(("qkv.weight", "linear1.weight")):
        f[2 * H:3 * H] = v
    elif key.endswith("proj.weight"):
        f *= out
    elif key.endswith("linear2.weight"):
        f[:, :H] = out
    return f


# --- synth writes what comfy-kitchen writes ------------------------------------------------------------

@pytest.mark.parametrize("form", ["fp8mixed", "int8", "int8_convrot", "nvfp4"])
def test_synth_forms_equal_comfy_kitchen_quantisers(state, form):
    from comfy_kitchen.tensor import TensorCoreFP8Layout, TensorCoreNVFP4Layout, TensorWiseINT8Layout

    layout, options, names = {
        "fp8mixed": (TensorCoreFP8Layout, {}, {"scale": "weight_scale"}),
        "int8": (TensorWiseINT8Layout, {}, {"scale": "weight_scale"}),
        "int8_convrot": (TensorWiseINT8Layout, {"per_channel": True, "convrot": True, "convrot_groupsize": 16},
                         {"scale": "weight_scale"}),
        "nvfp4": (TensorCoreNVFP4Layout, {}, {"scale": "weight_scale_2", "block_scale": "weight_scale"}),
    }[form]
    for key in ("double_blocks.0.img_attn.qkv.weight", "single_blocks.1.linear2.weight"):
        mine = _layer(key.removesuffix(".weight"), state[key], form)
        with ck.registry.use_backend("eager"):
            q, params = layout.quantize(state[key].float(), **options)
        assert mine["weight"].dtype == q.dtype and torch.equal(mine["weight"].view(torch.uint8), q.view(torch.uint8))
        for field, suffix in names.items():
            theirs = getattr(params, field)
            assert mine[suffix].dtype == theirs.dtype and mine[suffix].shape == theirs.shape, (field, form)
            assert torch.equal(mine[suffix].reshape(-1).view(torch.uint8), theirs.reshape(-1).view(torch.uint8)), \
                (field, form)
        conf = json.loads(bytes(mine["comfy_quant"].tolist()))
        assert conf["format"] == ("float8_e4m3fn" if form == "fp8mixed" else "nvfp4" if form == "nvfp4"
                                  else "int8_tensorwise")
        assert conf.get("convrot_groupsize") == (16 if form == "int8_convrot" else None)


def test_tiled_block_scale_layout_is_comfy_kitchens():
    from comfy_kitchen.float_utils import to_blocked

    for rows, cols in ((96, 2), (200, 9), (128, 4)):
        grid = torch.arange(1, rows * cols + 1, dtype=torch.int32).reshape(rows, cols)   # padding stays 0
        theirs = to_blocked(grid, flatten=True)
        mine = torch.zeros(math.prod(codecs.tiled_shape(rows, cols)), dtype=torch.int32)
        mine[torch.from_numpy(codecs.tiled_index(rows, cols).reshape(-1).copy())] = grid.reshape(-1)
        assert torch.equal(mine, theirs)


# --- the bake, read back by comfy-kitchen --------------------------------------------------------------

# Where a format's scales take the factor (exact up to float32) and where its values are requantised.
EXACT = {"scaled_fp8": ("proj",), "fp8mixed": ("proj",), "float8_e5m2": ("proj",), "nvfp4": ("proj",), "mxfp8": (),
         "int8": ("proj", "qkv", "linear1"), "int8_channel": ("proj", "qkv", "linear1"),
         "int8_convrot": ("proj", "qkv", "linear1")}


def _bound(form, expected, baked_file, key):
    """How far a requantised value may be from f × source: half a step of the format where it lands.
    fp8 e4m3 codes and fp8 block scales: 2^-4 relative (3 mantissa bits), plus half the smallest subnormal
    step (2^-10 of the scale) absolute; e5m2: 2^-3 and 2^-17; int8: half a code (0.5 × the row's scale;
    ConvRot's rotation spreads a group's rounding: √group × that); mxfp8: as fp8, the block's power of two
    bounded by 4·max|f·x|/448."""
    state, layer = load_file(str(baked_file)), key.removesuffix(".weight")
    if form in ("scaled_fp8", "fp8mixed", "float8_e5m2"):
        scale = state.get(layer + ".scale_weight", state.get(layer + ".weight_scale")).double()
        mantissa, subnormal = (3, 17) if form == "float8_e5m2" else (4, 10)
        return 2 ** -mantissa * expected.abs() + 2 ** -subnormal * scale
    if form == "nvfp4":
        return 2 ** -4 * expected.abs() + 6 * 2 ** -10 * state[layer + ".weight_scale_2"].double()
    if form == "mxfp8":
        return 2 ** -4 * expected.abs() + 2 ** -10 * 4 * expected.abs().max() / 448
    step = state[layer + ".weight_scale"].double().reshape(-1, 1)
    return 0.5 * step.expand(expected.shape) * (4 if form == "int8_convrot" else 1) + 1e-7


def _at_the_edge(form, y, baked_file, key):
    """Where a value was clipped: at the format's largest value × the baked scale (fp8 and int8 codes)."""
    largest = {"scaled_fp8": 448, "fp8mixed": 448, "float8_e5m2": 57344, "int8": 127, "int8_channel": 127}
    if form not in largest:
        return torch.zeros_like(y, dtype=torch.bool)
    state, layer = load_file(str(baked_file)), key.removesuffix(".weight")
    scale = state.get(layer + ".scale_weight", state.get(layer + ".weight_scale")).double().reshape(-1, 1)
    return y.abs() >= largest[form] * scale * (1 - 1e-6)


@pytest.mark.parametrize("form", FORMATS)
def test_baked_equals_factor_times_source_through_comfy_kitchen(files, tmp_path, form):
    """Every value within the format's rounding of f × source, or — where the rule found clipping a few
    values to lose less than raising the scale — at the format's edge, and then the bake says so."""
    src = files(form)
    out, r = bake(src, tmp_path)
    before, after = dequantised(src), dequantised(out)
    clipped = 0
    assert before.keys() == after.keys()
    checked = 0
    for key, x in before.items():
        y, f = after[key], factors(key, x.shape)
        if key.endswith("bias") or "norm" in key or torch.all(f == 1):
            if not key.endswith("bias"):
                assert torch.equal(y, x), key          # untouched
            continue
        expected = f * x
        if any(part in key for part in EXACT[form]):
            assert (y - expected).abs().max() <= 1e-6 * expected.abs().max(), key
        else:
            outside = (y - expected).abs() > _bound(form, expected, out, key)
            assert torch.all(_at_the_edge(form, y, out, key)[outside]), key
            clipped += int(outside.sum())
        checked += 1
    assert checked == 12                             # 4 qkv, 4 proj, 2 linear1, 2 linear2
    assert "clipped to it" in r.stderr or not clipped
    assert run("verify", out, "--source", src).returncode == 0    # the recorded bake recomputes byte for byte


def test_power_of_two_factors_on_mxfp8_move_only_exponents(files, tmp_path):
    src = files("mxfp8")
    out, _ = bake(src, tmp_path, RECIPE.replace("1.5", "2.0").replace("0.75", "0.5"))
    a, b = load_file(str(src)), load_file(str(out))
    changed = {k for k in a if not torch.equal(a[k].view(torch.uint8), b[k].view(torch.uint8))}
    assert changed and all(k.endswith((".weight_scale", "bias")) for k in changed)    # codes byte for byte
    before, after = dequantised(src), dequantised(out)
    for key in ("double_blocks.0.img_attn.qkv.weight", "single_blocks.0.linear2.weight"):
        assert torch.equal(after[key], factors(key, before[key].shape, 2.0, 0.5) * before[key])


def test_int8_rows_become_per_channel_and_run_in_comfy_kitchens_int8_matmul(files, tmp_path):
    """A per-tensor int8 scale becomes [out, 1] (what comfy-kitchen's per-channel int8 writes, and what its
    int8 matmul and ComfyUI's loader take), so v rows are exact; the layer computes f × the original."""
    src = files("int8")
    out, _ = bake(src, tmp_path)
    a, b = load_file(str(src)), load_file(str(out))
    p = "double_blocks.0.img_attn.qkv."
    assert a[p + "weight_scale"].shape == () and b[p + "weight_scale"].shape == (3 * H, 1)
    assert torch.equal(a[p + "weight"], b[p + "weight"])
    x = torch.randn(5, H, generator=torch.Generator().manual_seed(0))
    with ck.registry.use_backend("eager"):
        ya = ck.int8_linear(x, a[p + "weight"], a[p + "weight_scale"], None, torch.float32)
        yb = ck.int8_linear(x, b[p + "weight"], b[p + "weight_scale"], None, torch.float32)
    f = factors(p + "weight", (3 * H,)).float()
    assert (yb - ya * f).abs().max() <= 1e-6 * ya.abs().max()
    assert (ya[:, 2 * H:] - ya[:, 2 * H:] * 1.5).abs().max() > 0.1      # the factor shows


# --- issue 19: never clip silently, measure what requantisation achieves, diff, synth ------------------

def test_ranges_covering_a_whole_scaled_fp8_tensor_go_to_its_scale(tmp_path):
    """SD3-medium q = k = v = 1.2 covers the whole qkv: one factor on scale_weight, codes byte for byte."""
    from ckptbend.synth import write_checkpoint

    src = write_checkpoint(tmp_path / "sd3.safetensors", "sd3_medium", "single", dtype="scaled_fp8")
    out, r = bake(src, tmp_path, 'schema = 1\nname = "t"\n[dit.joint]\nq = 1.2\nk = 1.2\nv = 1.2\n')
    a, b = load_file(str(src)), load_file(str(out))
    p = "joint_blocks.0.x_block.attn.qkv."
    assert torch.equal(a[p + "weight"].view(torch.uint8), b[p + "weight"].view(torch.uint8))
    assert torch.equal(b[p + "scale_weight"], a[p + "scale_weight"] * 1.2)


def _requantised(codes: torch.Tensor, ratio: torch.Tensor) -> torch.Tensor:
    """fp8 e4m3fn codes × ratio per row, rounded to nearest and clipped at 448 (torch's own conversion)."""
    return (codes.float() * ratio[:, None]).clamp(-448, 448).to(torch.float8_e4m3fn)


@pytest.mark.parametrize("outlier", [None, 320.0])
def test_scaled_fp8_rows_take_the_way_nearer_f_times_source_and_say_what_clips(files, tmp_path, outlier):
    """Flux v = 1.5 on scaled fp8 rows: of requantising the v rows (which may clip) and raising the scale by
    1.5 (q and k rows requantised by 1/1.5, nothing clips), the bake takes the one whose weight is nearer to
    f × source in Σ(y − f·x)², computed here independently; what it clips it counts, in the dry run and the
    bake. The tiny model's v rows hold large codes (raising wins); with small v codes but one outlier, clipping
    that one loses less than rounding 2,048 q and k values (requantising wins, and says so)."""
    src, key, v = files("scaled_fp8"), "double_blocks.0.img_attn.qkv", slice(2 * H, 3 * H)
    if outlier:
        def small_v(state):
            codes = state[key + ".weight"].float()
            codes[v] = (codes[v] / 8).round()
            codes[2 * H, 0] = outlier
            state[key + ".weight"] = codes.to(torch.float8_e4m3fn)
        src = _rewrite(src, tmp_path / "outlier.safetensors", small_v)
    state = load_file(str(src))
    codes, scale = state[key + ".weight"], state[key + ".scale_weight"].double()
    f = torch.ones(3 * H, dtype=torch.float64)
    f[v] = 1.5
    wanted = codes.double() * scale * f[:, None]
    plain = _requantised(codes, f.float())
    raised = _requantised(codes, (f / 1.5).float())
    error = {"plain": float(((plain.double() * scale - wanted) ** 2).sum()),
             "raised": float(((raised.double() * scale * 1.5 - wanted) ** 2).sum())}
    clipped = int(((codes[v].float() * 1.5).abs() > 448).sum())
    assert (clipped > 0) and (error["plain"] < error["raised"]) == bool(outlier)
    way = "plain" if error["plain"] < error["raised"] else "raised"

    (tmp_path / "r.toml").write_text(RECIPE)
    r = run("bake", tmp_path / "r.toml", src, "-o", tmp_path / "x.safetensors", "--dry-run")
    line = next(line for line in r.stdout.splitlines() if line.startswith(key + ".weight"))
    if way == "plain":
        assert line.startswith(f"{key}.weight rows 64:96  ×1.5  (dit.joint.v, requantised in fp8 e4m3fn; "
                               f"the tensor: 1,024 rounded to nearest, {clipped:,} clipped)")
        assert f"{key}.weight: {clipped:,} requantised fp8 e4m3fn codes exceeded" in r.stderr
    else:
        assert line.startswith(f"{key}.weight rows 0:64  ×0.666667  (not in a range: ×1 overall, the scale taking")
        assert line.endswith("the tensor: 2,048 rounded to nearest, 0 clipped)") and "clipped to it" not in r.stderr
    (tmp_path / way).mkdir()
    out, r = bake(src, tmp_path / way)
    after = load_file(str(out))
    expected = plain if way == "plain" else raised
    assert torch.equal(after[key + ".weight"].view(torch.uint8), expected.view(torch.uint8))
    assert torch.equal(after[key + ".scale_weight"], state[key + ".scale_weight"] * (1.5 if way == "raised" else 1))
    assert ("clipped to it" in r.stderr) == (way == "plain")     # the bake says it too


def test_fp8_norm_vectors_warn_when_the_achieved_factor_departs(tmp_path):
    """fp8-stored qk-norm vectors (no scale beside them) cannot take ×1.05 finely: warned with the measure."""
    from ckptbend.synth import write_checkpoint

    src = write_checkpoint(tmp_path / "f.safetensors", "flux_dev", "single", dtype=torch.float8_e4m3fn)
    (tmp_path / "r.toml").write_text('schema = 1\nname = "t"\n[dit.joint]\nq = 1.05\nk = 1.05\n')
    for extra in (["--dry-run"], []):
        r = run("bake", tmp_path / "r.toml", src, "-o", tmp_path / "o.safetensors", "--force", *extra)
        assert r.returncode == 0
        warned = [w for w in r.stderr.splitlines() if "query_norm.scale" in w and "achieved ×" in w]
        assert warned and "least-squares" in warned[0] and "fp8 e4m3fn" in warned[0]


def test_diff_reports_each_quantised_layer_by_its_effective_weight(files, tmp_path):
    src = files("int8")
    out, _ = bake(src, tmp_path)
    r = run("diff", src, out)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert "double_blocks.0.img_attn.proj.weight (effective: int8 × weight_scale): ×0.75 scaled, " \
           "max deviation 0.00e+00" in lines or any(
        line.startswith("double_blocks.0.img_attn.proj.weight (effective: int8 × weight_scale): ×0.75 scaled")
        for line in lines)
    assert not any(".weight_scale" in line or ".comfy_quant" in line for line in lines)
    # a 0-D tensor outside a layer compares as one value
    a = load_file(str(src))
    a["extra.scale_input"] = torch.tensor(1.0)
    save_file(a, str(tmp_path / "a.safetensors"))
    a["extra.scale_input"] = torch.tensor(2.0)
    save_file(a, str(tmp_path / "b.safetensors"))
    r = run("diff", tmp_path / "a.safetensors", tmp_path / "b.safetensors")
    assert r.returncode == 0 and r.stdout.startswith("extra.scale_input: ×2 scaled")


@pytest.mark.parametrize("arch", ["flux_dev", "sd3_medium", "wan21_t2v"])
def test_synth_quantised_forms_agree_with_help(tmp_path, arch):
    help_text = run("synth", "--help").stdout
    assert "scaled_fp8|" not in help_text.split("--dtype")[0]          # a dtype, not a layout
    for form in QUANTISED:
        assert form in help_text
    for layout in ("single", "comfy"):
        r = run("synth", arch, tmp_path / f"{layout}.safetensors", "--layout", layout, "--dtype", "scaled_fp8")
        assert r.returncode == 0, r.stderr
    r = run("synth", arch, tmp_path / "d", "--layout", "diffusers", "--dtype", "nvfp4")
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "single-file form" in r.stderr


# --- what the file says, whatever way it says it ---------------------------------------------------------

def _rewrite(src, dst, change, metadata=None):
    state = load_file(str(src))
    change(state)
    save_file(state, str(dst), metadata=metadata)
    return dst


def test_a_per_tensor_scale_beside_fp8_takes_the_factor_marker_or_not(files, tmp_path):
    plain_codes = "double_blocks.0.img_attn.proj.weight"
    no_marker = _rewrite(files("scaled_fp8"), tmp_path / "a.safetensors", lambda s: s.pop("scaled_fp8"))

    def renamed(s):
        s.pop("scaled_fp8")
        for k in [k for k in s if k.endswith((".scale_weight", ".scale_input"))]:
            v = s.pop(k)
            if k.endswith(".scale_weight"):
                s[k.replace(".scale_weight", ".weight_scale")] = v
    weight_scale = _rewrite(files("scaled_fp8"), tmp_path / "b.safetensors", renamed)
    for src, scale in ((no_marker, ".scale_weight"), (weight_scale, ".weight_scale")):
        (tmp_path / src.stem).mkdir()
        out, _ = bake(src, tmp_path / src.stem)
        a, b = load_file(str(src)), load_file(str(out))
        assert torch.equal(a[plain_codes].view(torch.uint8), b[plain_codes].view(torch.uint8))
        layer = plain_codes.removesuffix(".weight")
        assert torch.equal(b[layer + scale], a[layer + scale] * 0.75)


def test_layers_declared_in_quantization_metadata(files, tmp_path):
    layers = {}

    def drop_entries(s):
        for k in [k for k in s if k.endswith(".comfy_quant")]:
            layers[k.removesuffix(".comfy_quant")] = json.loads(bytes(s.pop(k).tolist()))
    src = _rewrite(files("fp8mixed"), tmp_path / "m.safetensors", drop_entries)
    src = _rewrite(src, src, lambda s: None, {"_quantization_metadata": json.dumps({"layers": layers})})
    (tmp_path / "o").mkdir()
    out, _ = bake(src, tmp_path / "o")
    a, b = load_file(str(src)), load_file(str(out))
    p = "double_blocks.0.img_attn.proj."
    assert torch.equal(a[p + "weight"].view(torch.uint8), b[p + "weight"].view(torch.uint8))
    assert torch.equal(b[p + "weight_scale"], a[p + "weight_scale"] * 0.75)


@pytest.mark.parametrize("name", ["awq_w4a16", "w4a4"])
def test_formats_ckptbend_cannot_scale_are_refused_by_name(files, tmp_path, name):
    def relabel(s):
        s["double_blocks.0.img_attn.qkv.comfy_quant"] = torch.tensor(list(json.dumps({"format": name}).encode()),
                                                                      dtype=torch.uint8)
    src = _rewrite(files("int8"), tmp_path / "m.safetensors", relabel)
    (tmp_path / "r.toml").write_text(RECIPE)
    r = run("bake", tmp_path / "r.toml", src, "-o", tmp_path / "o.safetensors")
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and not (tmp_path / "o.safetensors").exists()
    assert "double_blocks.0.img_attn.qkv.weight" in r.stderr and name in r.stderr and "refusing" in r.stderr


@pytest.mark.parametrize("form, shown", [("int8_convrot", "int8_tensorwise + convrot (group 16)"), ("nvfp4", "nvfp4"),
                                         ("scaled_fp8", "scaled fp8 (fp8 × scale_weight)")])
def test_inspect_shows_formats_and_counts(files, form, shown):
    names = load_file(str(files(form))).keys()
    n = sum(k.endswith(".scale_weight" if form == "scaled_fp8" else ".comfy_quant") for k in names)
    r = run("inspect", files(form))
    line = next(line for line in r.stdout.splitlines() if line.startswith("  quantisation:"))
    assert line == f"  quantisation: {shown} ×{n} layers" and n >= 20
