"""GGUF files (ComfyUI-GGUF's layout): read, detected, baked by the block-scale rule and read back by gguf-py.

The rule (formats/ggml.py): a factor on a whole tensor, whole rows or a column range of whole blocks multiplies
the fp16 scale fields (d, and dmin / m) of every reached block, one fp16 rounding each; the codes stay byte for
byte. Proven here twice over: scaling exactly those fields scales every value gguf-py dequantises (every type),
and baked files read back by gguf-py equal f × the original, up to that rounding, tensor by tensor."""

import re

import gguf
import numpy as np
import pytest

from _dit import run
from ckptbend.edits import Segment
from ckptbend.formats import ggml
from _gguf import FLUX, H, SDXL, WAN, bake, factors, made  # noqa: F401  (made: the module's fixture)
from ckptbend.synth.gguf import encode, random_blocks, write_gguf

def tensors(path) -> dict:
    """name → (ggml type, stored bytes, torch shape) as gguf-py reads the file."""
    reader = gguf.GGUFReader(path)
    out = {}
    for t in reader.tensors:
        field = reader.get_field(f"comfy.gguf.orig_shape.{t.name}")
        shape = tuple(int(field.parts[i][0]) for i in field.data) if field else tuple(int(d) for d in reversed(t.shape))
        out[t.name] = (t.tensor_type, np.array(t.data).reshape(-1).view(np.uint8), shape)
    return out


def rounding(raw: np.ndarray, qtype, f) -> np.ndarray:
    """How far one fp16 rounding of each of a block's scale fields, after × f, can move each value: a field s
    becomes s·f within 2^-11 |s·f| (2^-25 among fp16's subnormals), and a value is Σ field × its multiplier."""
    bt = ggml.BLOCK_TYPES[qtype.name]
    blocks, bound = raw.reshape(-1, bt.nbytes), 0.0
    for keep in range(len(bt.scales)):
        unit = blocks.copy()
        fields = ggml.scale_fields(unit, bt)
        value = np.abs(fields[keep].copy().view(np.float16).astype(np.float64))[:, None]
        for i, field in enumerate(fields):
            field[...] = np.float16(1.0 if i == keep else 0.0).view(np.uint16)
        multiplier = np.abs(gguf.quants.dequantize(unit, qtype).astype(np.float64)).reshape(len(blocks), -1)
        bound = bound + multiplier * (2 ** -11 * value * np.abs(f).reshape(len(blocks), -1) + 2 ** -25)
    return np.asarray(bound).reshape(-1) * (1 + 1e-9)


def assert_baked(arch, src, out):
    """Every tensor of `out` reads back as f × the same tensor of `src`: float tensors by the float rule, quantised
    ones up to one fp16 rounding of each block scale (2^-11 relative), their codes byte for byte."""
    a, b = tensors(src), tensors(out)
    assert list(a) == list(b)
    reached = 0
    for name, (qtype, raw, shape) in a.items():
        assert b[name][0] == qtype and b[name][2] == shape
        f = factors(arch, name, shape).reshape(-1)
        if (f == 1).all():
            assert np.array_equal(raw, b[name][1]), name
            continue
        reached += 1
        if qtype.name in ggml.FLOAT_TYPES:
            x = gguf.quants.dequantize(raw, qtype).astype(np.float64).reshape(-1)
            y = gguf.quants.dequantize(b[name][1], qtype).astype(np.float64).reshape(-1)
            assert np.allclose(y, f * x, rtol=2 ** -8, atol=2 ** -24), name      # one rounding (fp16 subnormals too)
            continue
        bt = ggml.BLOCK_TYPES[qtype.name]
        codes = [np.delete(r.reshape(-1, bt.nbytes), [o + i for o in bt.scales for i in (0, 1)], axis=1)
                 for r in (raw, b[name][1])]
        assert np.array_equal(*codes), f"{name}: codes changed"
        x = gguf.quants.dequantize(raw, qtype).astype(np.float64).reshape(-1)
        y = gguf.quants.dequantize(b[name][1], qtype).astype(np.float64).reshape(-1)
        assert (np.abs(y - f * x) <= rounding(raw, qtype, f) + 1e-6 * np.abs(f * x)).all(), name
    assert reached


# --- the rule's ground: which fields scale each type --------------------------------------------------

@pytest.mark.parametrize("name", sorted(ggml.BLOCK_TYPES))
def test_scaling_the_scale_fields_scales_every_value(name):
    """For every block type: ×2 on exactly its scale fields doubles every value gguf-py dequantises (exact), and
    ×0.75 gives 0.75 × each value up to one fp16 rounding of each field; nothing else of a block changes."""
    bt, rng = ggml.BLOCK_TYPES[name], np.random.default_rng(1)
    qtype = gguf.GGMLQuantizationType[name]
    raw = random_blocks(rng.standard_normal((4, 2 * bt.elements)).astype(np.float32), name, rng).reshape(-1)
    source = gguf.quants.dequantize(raw.reshape(-1, bt.nbytes), qtype).astype(np.float64).reshape(-1)
    assert np.abs(source).max() > 0
    for f in (2.0, 0.75):
        seg = Segment(None, (f,), ("t",))
        baked, _ = ggml.Blocks("t", name, raw.nbytes, 4, 2 * bt.elements, (seg,)).apply(raw.tobytes(), (4, 2 * bt.elements))
        y = gguf.quants.dequantize(np.frombuffer(baked, np.uint8).reshape(-1, bt.nbytes), qtype).reshape(-1)
        if f == 2.0:
            assert np.array_equal(y, 2 * source), name
        else:
            bound = rounding(raw, qtype, np.full(source.shape, f)) + 1e-6 * np.abs(f * source)
            assert (np.abs(y - f * source) <= bound).all(), name


# --- reading, detection, inspect -------------------------------------------------------------------------

def test_synth_writes_comfyui_gguf_layout(made):
    reader = gguf.GGUFReader(made("sdxl", "q4_k"))
    assert reader.get_field("general.architecture").contents() == "sdxl"
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    key = "input_blocks.7.0.out_layers.3.weight"
    assert types[key] == "Q4_K"
    assert reader.get_field(f"comfy.gguf.orig_shape.{key}").contents() == [16, 16, 3, 3]   # stored as [9, 256]
    assert all(types[n] == "F32" for n in types if n.endswith(".bias"))
    flux = {t.name: t.tensor_type.name for t in gguf.GGUFReader(made("flux", "q8_0")).tensors}
    assert flux["double_blocks.0.img_attn.qkv.weight"] == "Q8_0"
    assert flux["double_blocks.0.img_attn.norm.query_norm.scale"] == "F32"


@pytest.mark.parametrize("arch, expected", [("flux", "flux-dev"), ("wan", "wan21-t2v"), ("sdxl", "sdxl-base")])
def test_inspect_detects_and_lists_types(made, arch, expected):
    r = run("inspect", made(arch, "gguf-k_m"))
    assert r.returncode == 0, r.stderr
    assert f"architecture: {expected}" in r.stdout
    assert "quantisation: GGUF: " in r.stdout
    assert "general.architecture: " in r.stdout


# --- baking --------------------------------------------------------------------------------------------

CASES = [("flux", "q8_0"), ("flux", "q4_0"), ("flux", "q5_1"), ("flux", "iq4_nl"), ("flux", "gguf-f16"),
         ("flux", "gguf-bf16"), ("wan", "q8_0"), ("wan", "q4_1"), ("wan", "q5_0"), ("sdxl", "q4_k"),
         ("sdxl", "q5_k"), ("sdxl", "q6_k"), ("sdxl", "q2_k"), ("sdxl", "q3_k"), ("sdxl", "iq4_xs"),
         ("sdxl", "gguf-k_m")]


@pytest.mark.parametrize("arch, form", CASES)
def test_baked_gguf_reads_back_as_factor_times_original(made, tmp_path, arch, form):
    src = made(arch, form)
    out, _ = bake(src, tmp_path, {"flux": FLUX, "wan": WAN, "sdxl": SDXL}[arch])
    assert_baked(arch, src, out)
    assert run("verify", out, "--source", src).returncode == 0


def test_dry_run_verify_diff_provenance_and_import(made, tmp_path):
    src = made("flux", "q8_0")
    (tmp_path / "r.toml").write_text(FLUX)
    dry = run("bake", tmp_path / "r.toml", src, "-o", tmp_path / "x.gguf", "--dry-run")
    assert dry.returncode == 0 and not (tmp_path / "x.gguf").exists()
    assert "double_blocks.0.img_attn.qkv.weight rows 64:96  ×1.5  (dit.joint.v; Q8_0: ×f on the fp16 block " \
           "scales (d), codes unchanged)" in dry.stdout
    out, _ = bake(src, tmp_path, FLUX)
    before, after = gguf.GGUFReader(src), gguf.GGUFReader(out)
    for key, field in before.fields.items():      # every input KV kept, as it was
        if not key.startswith("GGUF."):
            assert after.fields[key].contents() == field.contents(), key
    assert after.fields["ckptbend.recipe"].contents().startswith("schema = 1")
    assert after.fields["ckptbend.source"].contents() == src.name
    assert len(after.fields["ckptbend.source_sha256"].contents()) == 64
    assert run("verify", out, "--source", src).returncode == 0
    lines = run("diff", src, out).stdout
    assert re.search(r"double_blocks\.0\.img_attn\.qkv\.weight rows 64:96 \(v\): ×1\.49\d+ scaled|×1\.50\d+ scaled", lines)
    assert "qkv.weight rows 0:64" not in lines
    imported = run("recipe", "import", out)
    assert imported.returncode == 0 and "v = 1.5" in imported.stdout
    # a changed byte is found by verify
    data = bytearray(out.read_bytes())
    data[-1] ^= 1
    (tmp_path / "bad.gguf").write_bytes(bytes(data))
    assert run("verify", tmp_path / "bad.gguf", "--source", src).returncode == 1


def test_a_sweep_writes_gguf_outputs_that_verify(made, tmp_path):
    src = made("wan", "q8_0")
    (tmp_path / "r.toml").write_text(WAN)
    r = run("bake", tmp_path / "r.toml", src, "-o", tmp_path / "grid", "--grid", "dit.self.v=1.0,2.0", "-q")
    assert r.returncode == 0, r.stderr
    outs = sorted((tmp_path / "grid").iterdir())
    assert [p.suffix for p in outs] == [".gguf", ".gguf"]
    for out in outs:
        assert run("verify", out, "--source", src).returncode == 0
        assert gguf.GGUFReader(out).get_field("general.architecture").contents() == "wan"


# --- hand-made files: cut blocks, refusals -----------------------------------------------------------------

def _flux_file(path, made, types: dict, arch_name="flux"):
    """The tiny Flux in GGUF, F32 throughout but `types`: name → (ggml type, stored shape)."""
    reader = gguf.GGUFReader(made("flux", "gguf-f16"))
    rng, entries, orig = np.random.default_rng(0), [], {}
    for t in reader.tensors:
        values = gguf.quants.dequantize(np.array(t.data), t.tensor_type).astype(np.float32)
        shape = tuple(int(d) for d in reversed(t.shape))
        qtype, stored = types.get(t.name, ("F32", shape))
        if stored != shape:
            orig[t.name] = shape
        data = encode(values.reshape(stored), qtype, rng)
        entries.append((t.name, qtype, data.shape, data.dtype, data.nbytes, lambda data=data: data))
    return write_gguf(path, arch_name, entries, orig)


def test_a_range_that_cuts_blocks_is_requantised_where_gguf_py_can():
    """Rows 1:4 of an [8, 48] tensor stored reshaped as Q8_0 [12, 32] start inside block 1 (elements 32–63): that
    block is requantised from f × its values by gguf-py's quantiser; the blocks wholly inside take f on their
    scales; the rest stay."""
    rng, qtype = np.random.default_rng(2), gguf.GGMLQuantizationType.Q8_0
    x = rng.standard_normal((8, 48)).astype(np.float32)
    raw = encode(x.reshape(12, 32), "Q8_0", rng).reshape(-1)
    seg = Segment((1, 4), (0.75,), ("t",))
    bt = ggml.BLOCK_TYPES["Q8_0"]
    cut = ggml.cut_blocks((seg,), 8, 48, bt)
    assert cut.tolist() == [1]
    baked, _ = ggml.Blocks("t", "Q8_0", raw.nbytes, 8, 48, (seg,), tuple(cut.tolist())).apply(raw.tobytes(), (8, 48))
    blocks, before = np.frombuffer(baked, np.uint8).reshape(-1, 34), raw.reshape(-1, 34)
    source = gguf.quants.dequantize(before, qtype).reshape(-1)
    f = np.ones(8 * 48, dtype=np.float32)
    f[48:192] = 0.75
    assert np.array_equal(blocks[1], gguf.quants.quantize((source * f)[32:64].reshape(1, 32), qtype).reshape(-1))
    assert np.array_equal(blocks[[0, *range(6, 12)]], before[[0, *range(6, 12)]])
    d = before[2:6, 0:2].copy().view(np.float16).astype(np.float32) * np.float32(0.75)
    assert np.array_equal(blocks[2:6, 0:2].view(np.float16), d.astype(np.float16))
    assert np.array_equal(blocks[2:6, 2:], before[2:6, 2:])


LINEAR2 = "single_blocks.0.linear2.weight"      # [32, 160]: its attention columns 0:32


RESHAPED = {"double_blocks.0.img_attn.qkv.weight": (12, 256), "double_blocks.0.img_attn.proj.weight": (4, 256),
            "single_blocks.0.linear1.weight": (28, 256)}


@pytest.mark.parametrize("qtype", ["Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "IQ4_XS", "IQ2_XXS", "IQ3_S"])
def test_row_ranges_map_through_orig_shape(made, tmp_path, qtype):
    """Flux's q|k|v and linear1 stored reshaped to [n / 256, 256] (comfy.gguf.orig_shape, as ComfyUI-GGUF stores
    SD tensors): the v rows 64:96 are elements 2048:3072, whole 256-element blocks of a K- or IQ-quant."""
    src = _flux_file(tmp_path / "k.gguf", made, {k: (qtype, shape) for k, shape in RESHAPED.items()})
    out, _ = bake(src, tmp_path, FLUX)
    assert_baked("flux", src, out)
    assert run("verify", out, "--source", src).returncode == 0


@pytest.mark.parametrize("qtype, stored, message", [
    ("Q4_K", (20, 256), "a range cuts 20 of its Q4_K blocks (256 values each), and gguf-py has no quantiser for "
                        "Q4_K to requantise them; refusing"),
    ("MXFP4", (32, 160), "stored as MXFP4 in a GGUF file: its block scales are powers of two (e8m0)"),
])
def test_what_cannot_be_scaled_is_refused_in_one_line(made, tmp_path, qtype, stored, message):
    src = _flux_file(tmp_path / "bad.gguf", made, {LINEAR2: (qtype, stored)})
    (tmp_path / "r.toml").write_text('schema = 1\nname = "t"\n[dit.joint]\nout = 0.75\n')
    r = run("bake", tmp_path / "r.toml", src, "-o", tmp_path / "out.gguf")
    assert r.returncode != 0 and len(r.stderr.strip().splitlines()) == 1
    assert f"{LINEAR2}: {message}" in r.stderr
    assert not (tmp_path / "out.gguf").exists()


def test_a_block_scale_past_fp16_is_refused(made, tmp_path):
    key = "double_blocks.0.img_attn.qkv.weight"
    src = _flux_file(tmp_path / "big.gguf", made, {key: ("Q8_0", (96, 32))})
    reader = gguf.GGUFReader(src)
    t = next(t for t in reader.tensors if t.name == key)
    data = np.array(t.data).reshape(-1, 34)
    data[:, 0:2] = np.frombuffer(np.float16(60000).tobytes(), np.uint8)   # d near fp16's largest
    blob = bytearray(src.read_bytes())
    blob[t.data_offset:t.data_offset + data.nbytes] = data.tobytes()
    src.write_bytes(bytes(blob))
    (tmp_path / "r.toml").write_text('schema = 1\nname = "t"\n[dit.joint]\nv = 1.5\n')
    r = run("bake", tmp_path / "r.toml", src, "-o", tmp_path / "out.gguf")
    assert r.returncode != 0 and f"{key}: ×1.5 takes a Q8_0 block scale past fp16's largest value" in r.stderr
    assert not (tmp_path / "out.gguf").exists()


@pytest.mark.parametrize("arch_name, message", [
    ("cosmos", "general.architecture says 'cosmos', but its tensors are flux-dev's; refusing to guess"),
    ("pixart", "general.architecture is 'pixart': not one of ComfyUI-GGUF's names"),
    ("sdxl", "general.architecture says 'sdxl', but its tensors are flux-dev's; refusing to guess"),
    ("t5", "general.architecture says 't5', but its tensors are flux-dev's; refusing to guess"),
])
def test_general_architecture_must_agree(made, tmp_path, arch_name, message):
    src = _flux_file(tmp_path / "x.gguf", made, {}, arch_name)
    r = run("inspect", src)
    assert r.returncode != 0 and message in r.stderr


def test_neither_safetensors_nor_gguf_says_what_it_is(tmp_path):
    (tmp_path / "m.safetensors").write_bytes(b"PK\x03\x04" + bytes(60))
    r = run("inspect", tmp_path / "m.safetensors")
    assert r.returncode != 0 and "not a valid safetensors file, nor GGUF: it is a zip archive" in r.stderr
    (tmp_path / "t.gguf").write_bytes(b"GGUF\x03\x00\x00\x00" + bytes(4))
    r = run("inspect", tmp_path / "t.gguf")
    assert r.returncode != 0 and "not a valid GGUF file" in r.stderr and len(r.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("damage, message", [
    ("truncated", "not a valid GGUF file: truncated or damaged (cannot reshape"),
    ("orig_shape", "comfy.gguf.orig_shape.double_blocks.0.img_attn.qkv.weight = [7, 7] does not hold the tensor's "
                   "3072 elements"),
    ("header", "not a valid GGUF file"),
])
def test_a_damaged_gguf_is_one_line(made, tmp_path, damage, message):
    src = made("flux", "q8_0")
    data = src.read_bytes()
    bad = tmp_path / "bad.gguf"
    if damage == "truncated":
        bad.write_bytes(data[:-4096])
    elif damage == "header":
        bad.write_bytes(data[:200])
    else:
        reader = gguf.GGUFReader(src)
        entries = [(t.name, t.tensor_type.name, np.array(t.data).shape, np.array(t.data).dtype, int(t.n_bytes),
                    lambda t=t: np.array(t.data)) for t in reader.tensors]
        write_gguf(bad, "flux", entries, {"double_blocks.0.img_attn.qkv.weight": (7, 7)})
    for command in (("inspect", bad), ("bake", tmp_path / "r.toml", bad, "-o", tmp_path / "o.gguf")):
        (tmp_path / "r.toml").write_text(FLUX)
        r = run(*command)
        assert r.returncode != 0 and message in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert not (tmp_path / "o.gguf").exists()


def test_output_data_starts_at_the_inputs_page_offset_and_rebakes_remake_the_padding(made, tmp_path):
    """The padding KV puts the output's data section at the input's offset within a 4096-byte page (the kernel's
    copies are faster between equal page offsets); it stays out of the metadata, so a re-bake remakes it."""
    from ckptbend.gguf_io import PAD_KEY, read_header

    src = made("flux", "q8_0")
    (tmp_path / "1").mkdir(), (tmp_path / "2").mkdir()
    once, _ = bake(src, tmp_path / "1", FLUX)
    twice, _ = bake(once, tmp_path / "2", FLUX)
    heads = [read_header(p) for p in (src, once, twice)]
    assert len({h.data_offset % 4096 for h in heads}) == 1
    assert heads[1].data_offset > heads[0].data_offset            # provenance was added: padding was needed
    assert all(PAD_KEY not in h.metadata for h in heads)
    fields = gguf.GGUFReader(twice).fields
    assert list(fields).count(PAD_KEY) == 1 and set(fields[PAD_KEY].contents()) <= {" "}
