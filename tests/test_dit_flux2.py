"""Flux.2 (dev, klein): every file form checked against diffusers' own single-file converter and class, and bakes
checked against the run-time definition on the real `Flux2Transformer2DModel`: the baked model's forward equals
the original's with q (after its qk-norm), k, v or the attention output multiplied by hooks. In the parallel
single blocks v and the attention output have no module of their own: the hooks multiply the v part of
`to_qkv_mlp_proj`'s output and the attention part of `to_out`'s input."""

import json

import pytest
import torch
from diffusers import Flux2Transformer2DModel
from diffusers.loaders.single_file_utils import convert_flux2_transformer_checkpoint_to_diffusers, infer_diffusers_model_type
from safetensors.torch import load_file, save_file

from _comfy_kitchen import dequantised
from _dit import compare, load_strict, recipe, run
from ckptbend.bake import bake
from ckptbend.errors import CkptbendError
from ckptbend.layouts import detect
from ckptbend.plan import make_plan
from ckptbend.synth import write_checkpoint
from ckptbend.synth.dit import MODEL_PREFIX, build
from ckptbend.synth.flux2 import CONFIGS, FAMILIES, build_full, to_original

pytestmark = pytest.mark.usefixtures("one_thread_no_grad")
H = 32
NAMES = {"flux2_dev": "flux2-dev", "flux2_klein": "flux2-klein"}
DIFFUSERS_LAYOUTS = ("transformer_diffusers",)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root, made = tmp_path_factory.mktemp("flux2"), {}

    def get(arch, layout, dtype=None):
        if (arch, layout, dtype) not in made:
            name = f"{arch}-{layout}-{dtype}" + ("" if layout == "diffusers" else ".safetensors")
            made[arch, layout, dtype] = write_checkpoint(root / name, arch, layout, dtype=dtype)
        return made[arch, layout, dtype]
    return get


_MODELS = {}


def original(arch):
    if arch not in _MODELS:
        _MODELS[arch] = build(FAMILIES[arch], arch).double()
    return _MODELS[arch]


def to_diffusers(arch, state, layout="single"):
    """A file's transformer tensors → a strict-loaded float64 Flux2Transformer2DModel, through diffusers' converter."""
    state = {k.removeprefix(MODEL_PREFIX): v.double() for k, v in state.items() if v.is_floating_point()}
    if layout not in DIFFUSERS_LAYOUTS:
        state = convert_flux2_transformer_checkpoint_to_diffusers(dict(state))
    return load_strict(Flux2Transformer2DModel(**CONFIGS[arch]).double(), state)


def forward(model, arch):
    g = torch.Generator().manual_seed(123)
    ids = torch.zeros(8, 4)
    ids[:, 1], ids[:, 2] = torch.arange(2).repeat_interleave(4), torch.arange(4).repeat(2)
    text_ids = torch.zeros(5, 4)
    text_ids[:, 3] = torch.arange(5)
    guidance = torch.tensor([3.5], dtype=torch.float64) if CONFIGS[arch]["guidance_embeds"] else None
    return model(hidden_states=torch.randn(1, 8, 8, generator=g, dtype=torch.float64),
                 encoder_hidden_states=torch.randn(1, 5, 24, generator=g, dtype=torch.float64),
                 timestep=torch.tensor([0.37], dtype=torch.float64), img_ids=ids, txt_ids=text_ids,
                 guidance=guidance, return_dict=False)[0]


# Run-time multiplies (dit-layouts.md §11) on diffusers' modules: (module, how) per block kind, stream and factor.
DOUBLE = {"image": {"q": "attn.norm_q", "k": "attn.norm_k", "v": "attn.to_v", "out": "attn.to_out.0"},
          "text": {"q": "attn.norm_added_q", "k": "attn.norm_added_k", "v": "attn.add_v_proj", "out": "attn.to_add_out"}}
SINGLE = {"q": "attn.norm_q", "k": "attn.norm_k", "v": "attn.to_qkv_mlp_proj", "out": "attn.to_out"}


def _columns(lo, hi, f):
    def scale(t):
        t = t.clone()
        t[..., lo:hi] *= f
        return t
    return scale


def hooked(model, factors, stream=None, blocks=None):
    """Register the run-time multiplies; single blocks: v = columns [2h, 3h) of the fused projection's output,
    out = the attention part [0, h) of the fused output projection's input."""
    handles = []
    for group, attr in (("D", "transformer_blocks"), ("S", "single_transformer_blocks")):
        for i, block in enumerate(getattr(model, attr)):
            if blocks is not None and f"{group}{i:02d}" not in blocks:
                continue
            for s in (("image", "text") if group == "D" else (None,)):
                if stream is not None and s != stream:
                    continue
                for proj, f in factors.items():
                    module = block.get_submodule(DOUBLE[s][proj] if group == "D" else SINGLE[proj])
                    if group == "S" and proj == "v":
                        handles.append(module.register_forward_hook(lambda m, a, out, f=f: _columns(2 * H, 3 * H, f)(out)))
                    elif group == "S" and proj == "out":
                        handles.append(module.register_forward_pre_hook(lambda m, a, f=f: (_columns(0, H, f)(a[0]),)))
                    else:
                        handles.append(module.register_forward_hook(lambda m, a, out, f=f: out * f))
    assert handles
    return handles


def reference(arch, factors, stream=None, blocks=None, model=None):
    model = model or original(arch)
    handles = hooked(model, factors, stream, blocks)
    try:
        return forward(model, arch)
    finally:
        for h in handles:
            h.remove()


def lines(factors):
    return "".join(f"{k} = {v}\n" for k, v in factors.items())


def bake_to(tmp_path, body, src):
    out = tmp_path / ("out" if src.is_dir() else "out.safetensors")
    bake(recipe(body), src, out, progress=False)
    return out


# --- layouts against diffusers -------------------------------------------------------------------------------------

@pytest.mark.parametrize("arch", ["flux2_dev", "flux2_klein"])
@pytest.mark.parametrize("layout", ["single", "single_prefixed", "comfy", "transformer_diffusers"])
def test_layout_loads_strict_through_diffusers_converter(files, arch, layout):
    path = files(arch, layout)
    model = to_diffusers(arch, load_file(str(path)), layout)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in original(arch).state_dict().items())
    ckpt = detect(path)
    assert (ckpt.architecture, ckpt.kind, ckpt.qk_norm) == (NAMES[arch], "dit", True)
    if layout in ("single", "single_prefixed"):   # diffusers' sniffer knows the file as Flux.2 too
        assert infer_diffusers_model_type(load_file(str(path))) == "flux-2-dev"


def test_diffusers_folder_is_read_sub_folder_by_sub_folder(files):
    folder = files("flux2_klein", "diffusers")
    assert json.loads((folder / "model_index.json").read_text())["_class_name"] == "Flux2KleinPipeline"
    ckpt = detect(folder)
    assert (ckpt.kind, ckpt.architecture, ckpt.components) == ("diffusers-folder", "flux2-klein", ["dit"])
    loaded = Flux2Transformer2DModel.from_pretrained(folder / "transformer").double()
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in original("flux2_klein").state_dict().items())


def test_sites_follow_section_11(files):
    """q/k on the norm weights, v on rows [2h, 3h) of qkv / linear1 (whose length is 3h + 2·MLP), out on proj or
    linear2's attention columns [0, h) (whose width is h + MLP); no bias anywhere."""
    got = {(s.key, s.proj): (s.rows, s.cols, s.fused, s.stream, s.block) for s in detect(files("flux2_dev", "single")).sites}
    mlp = 3 * H
    assert got["double_blocks.1.txt_attn.qkv.weight", "v"] == ((2 * H, 3 * H), None, 3 * H, "text", "D01")
    assert got["double_blocks.0.img_attn.norm.query_norm.scale", "q"] == (None, None, None, "image", "D00")
    assert got["double_blocks.0.img_attn.proj.weight", "out"] == (None, None, None, "image", "D00")
    assert got["single_blocks.1.linear1.weight", "v"] == ((2 * H, 3 * H), None, 3 * H + 2 * mlp, None, "S01")
    assert got["single_blocks.1.linear2.weight", "out"] == (None, (0, H), H + mlp, None, "S01")
    assert got["single_blocks.0.norm.key_norm.scale", "k"][4] == "S00"
    assert len(got) == 2 * 2 * 4 + 2 * 4
    diffusers = {(s.key, s.proj): (s.rows, s.cols) for s in detect(files("flux2_dev", "transformer_diffusers")).sites}
    assert diffusers["single_transformer_blocks.0.attn.to_qkv_mlp_proj.weight", "v"] == ((2 * H, 3 * H), None)
    assert diffusers["single_transformer_blocks.0.attn.to_out.weight", "out"] == (None, (0, H))
    assert diffusers["transformer_blocks.0.attn.add_v_proj.weight", "v"] == (None, None)


# --- equivalence: baked == run-time multiply -------------------------------------------------------------------------

CASES = [   # (recipe body, factors, stream, blocks)
    ('stream = "image"\n', {"q": 1.7, "k": 0.6, "v": 1.9, "out": 0.55}, "image", ["D00", "D01"]),
    ('stream = "text"\n', {"q": 1.6, "k": 0.7, "v": 1.4, "out": 0.6}, "text", ["D00", "D01"]),
    ('blocks = ["single"]\n', {"q": 1.3, "k": 0.8, "v": 1.5, "out": 0.7}, None, ["S00", "S01"]),
    ("", {"q": 1.3, "k": 0.8, "v": 1.4, "out": 0.7}, None, None),
]


@pytest.mark.parametrize("selector,factors,stream,blocks", CASES)
def test_bake_equals_runtime_multiply(files, tmp_path, selector, factors, stream, blocks):
    out = bake_to(tmp_path, f"[dit.joint]\n{selector}{lines(factors)}", files("flux2_dev", "single"))
    baked = forward(to_diffusers("flux2_dev", load_file(str(out))), "flux2_dev")
    compare(baked, reference("flux2_dev", factors, stream, blocks), forward(original("flux2_dev"), "flux2_dev"))


@pytest.mark.parametrize("arch,layout", [("flux2_klein", "single"), ("flux2_dev", "single_prefixed"),
                                         ("flux2_klein", "comfy"), ("flux2_dev", "transformer_diffusers")])
def test_bake_equals_runtime_multiply_in_every_form(files, tmp_path, arch, layout):
    selector, factors, stream, blocks = CASES[-1]
    out = bake_to(tmp_path, f"[dit.joint]\n{lines(factors)}", files(arch, layout))
    baked = forward(to_diffusers(arch, load_file(str(out)), layout), arch)
    compare(baked, reference(arch, factors), forward(original(arch), arch))


def test_bake_of_a_diffusers_folder_equals_runtime_multiply(files, tmp_path):
    factors = CASES[-1][1]
    out = bake_to(tmp_path, f"[dit.joint]\n{lines(factors)}", files("flux2_klein", "diffusers"))
    baked = forward(Flux2Transformer2DModel.from_pretrained(out / "transformer").double(), "flux2_klein")
    compare(baked, reference("flux2_klein", factors), forward(original("flux2_klein"), "flux2_klein"))


@pytest.mark.parametrize("form,rtol", [("scaled_fp8", 1e-4), ("fp8mixed", 1e-4), ("nvfp4", 1e-4), ("int8_convrot", 2e-3)])
def test_quantised_files_bake_to_the_hooked_dequantised_model(files, tmp_path, form, rtol):
    """Powers of two (exact in fp8, e2m1 and bf16): the dequantised bake equals the dequantised original with the
    hooks. int8 with ConvRot: linear2's attention columns are rotated together with MLP columns, so they are
    requantised in int8 (the rest is exact: whole weights and rows go to the per-row scales)."""
    src = files("flux2_dev", "single", form)
    assert detect(src).architecture == "flux2-dev"
    factors = {"q": 2.0, "k": 0.5, "v": 0.5, "out": 0.5}
    out = bake_to(tmp_path, f"[dit.joint]\n{lines(factors)}", src)
    plain = to_diffusers("flux2_dev", dequantised(src))
    ref = reference("flux2_dev", factors, model=plain)
    compare(forward(to_diffusers("flux2_dev", dequantised(out)), "flux2_dev"), ref, forward(plain, "flux2_dev"), rtol=rtol)


def test_scaling_the_projection_instead_of_the_norm_is_cancelled(files):
    """ComfyUI's literal way (the q rows of linear1) against ckptbend's (the norm weight): the RMSNorm undoes it."""
    state = {k: v.double() for k, v in load_file(str(files("flux2_dev", "single"))).items()}
    base = forward(original("flux2_dev"), "flux2_dev")
    literal = dict(state, **{"single_blocks.0.linear1.weight": torch.cat([state["single_blocks.0.linear1.weight"][:H] * 1.7,
                                                                        state["single_blocks.0.linear1.weight"][H:]])})
    leak = (forward(to_diffusers("flux2_dev", literal), "flux2_dev") - base).abs().max().item()
    effect = (reference("flux2_dev", {"q": 1.7}, blocks=["S00"]) - base).abs().max().item()
    assert effect > 1e-2 and leak < 1e-3 * effect, (effect, leak)


# --- what the user sees ------------------------------------------------------------------------------------------

def test_inspect_names_model_blocks_streams_and_qk_targets(files):
    r = run("inspect", files("flux2_klein", "comfy"))
    assert r.returncode == 0, r.stderr
    assert "architecture: flux2-klein" in r.stdout
    assert "D01   joint (streams: image, text) qk-norm" in r.stdout and "S01   joint qk-norm" in r.stdout
    assert "[dit.*] q/k factors scale: model.diffusion_model.double_blocks.N.img_attn.norm.key_norm.scale" in r.stdout
    info = json.loads(run("inspect", "--json", files("flux2_dev", "single", "fp8mixed")).stdout)
    assert (info["architecture"], info["quantisation"]) == ("flux2-dev", "float8_e4m3fn ×20 layers")   # 2 × (2 qkv, 2 proj, 4 MLP) + 2 × 2


def test_plan_lists_the_fused_ranges(files):
    plan = make_plan(recipe('[dit.joint]\nblocks = ["S01"]\nv = 1.5\nout = 0.5\n'), detect(files("flux2_dev", "single")))
    text = "\n".join(plan.describe())
    assert f"single_blocks.1.linear1.weight rows {2 * H}:{3 * H}  ×1.5  (dit.joint.v)" in text
    assert f"single_blocks.1.linear2.weight columns 0:{H}  ×0.5  (dit.joint.out)" in text


def test_all_in_one_text_encoders_are_left_to_their_family(files, tmp_path):
    """A ComfyUI all-in-one Flux.2 file with a Qwen3 text encoder beside the model: the encoder is never part of
    the transformer, and a [dit.joint] bake leaves every byte of it."""
    from transformers import Qwen3Config, Qwen3Model

    torch.manual_seed(0)
    qwen3 = Qwen3Model(Qwen3Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=2, num_key_value_heads=1, head_dim=16))
    state = load_file(str(files("flux2_klein", "comfy")))
    state.update({f"text_encoders.qwen3_4b.transformer.model.{k}": v.contiguous() for k, v in qwen3.state_dict().items()})
    src = tmp_path / "aio.safetensors"
    save_file(state, str(src))
    ckpt = detect(src)
    assert ckpt.architecture == "flux2-klein"
    assert not any(s.key.startswith("text_encoders.") for s in ckpt.sites if s.component == "dit")
    out = bake_to(tmp_path, "[dit.joint]\nv = 1.5\n", src)
    after = load_file(str(out))
    assert all(torch.equal(after[k], v) for k, v in state.items() if k.startswith("text_encoders."))


# --- full size: released shapes, names, and the rows diffusers' unpatched converter cuts ------------------------------

def _sparse_file(path, shapes):
    header, offset = {}, 0
    for name, shape in shapes.items():
        n = 2 * int(torch.Size(shape).numel())
        header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    blob = json.dumps(header).encode()
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as f:
        f.write(len(blob).to_bytes(8, "little") + blob)
        f.truncate(8 + len(blob) + offset)
    return path


@pytest.mark.parametrize("name,width,double,single,params", [
    ("flux2-dev", 6144, 8, 48, 32.2e9), ("flux2-klein-4b", 3072, 5, 20, 3.9e9), ("flux2-klein-9b", 4096, 8, 24, 9.1e9)])
def test_released_sizes_are_named_and_cut_where_diffusers_cuts(tmp_path, name, width, double, single, params):
    model = build_full(name)
    assert abs(sum(p.numel() for p in model.parameters()) - params) < 0.05 * params   # the advertised sizes
    state = to_original(model.state_dict())
    ckpt = detect(_sparse_file(tmp_path / "m.safetensors", {k: v.shape for k, v in state.items()}))
    assert ckpt.architecture == name and len({s.block for s in ckpt.sites}) == double + single
    ranges = {(s.key, s.proj): (s.rows or s.cols) for s in ckpt.sites}
    last = f"single_blocks.{single - 1}."
    assert ranges[last + "linear1.weight", "v"] == (2 * width, 3 * width)
    assert ranges[last + "linear2.weight", "out"] == (0, width)

    def tagged(shape):   # row i (column j for linear2) holds its index; zero-stride, no memory
        return torch.arange(shape[0], dtype=torch.float32).reshape(-1, *([1] * (len(shape) - 1))).expand(*shape)
    converted = convert_flux2_transformer_checkpoint_to_diffusers({k: tagged(v.shape) for k, v in state.items()})
    v = converted[f"transformer_blocks.{double - 1}.attn.add_v_proj.weight"][:, 0]
    assert v.tolist() == list(map(float, range(*ranges[f"double_blocks.{double - 1}.txt_attn.qkv.weight", "v"])))


def test_full_sizes_are_single_files_only(tmp_path):
    with pytest.raises(CkptbendError, match="single layout"):
        write_checkpoint(tmp_path / "m.safetensors", "flux2_klein", "comfy", size="4b")


def test_flux2_is_never_taken_for_flux1_and_flux1_never_for_flux2(synth_file, files):
    assert detect(synth_file("flux_dev")).architecture == "flux-dev"
    state = load_file(str(files("flux2_dev", "single")))
    state.pop("double_stream_modulation_img.lin.weight")   # Flux.2 blocks without its marker: not Flux.1 either
    path = files("flux2_dev", "single").parent / "no-marker.safetensors"
    save_file(state, str(path))
    with pytest.raises(CkptbendError, match="Flux-style double/single blocks, but not Flux.1, Flux.2"):
        detect(path)
