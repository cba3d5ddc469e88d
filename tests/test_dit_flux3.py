"""Flux.3 klein: file forms checked against diffusers' own single-file converter and class, and bakes checked
against the run-time definition on the real `Flux3Transformer2DModel`: the baked model's forward equals the
original's with q (after its qk-norm), k, v or the attention output of the chosen attentions multiplied by
hooks — per-mode blocks ([dit.self], streams image / reference / text) and joint single blocks ([dit.joint])."""

import json

import pytest
import torch
from diffusers import Flux3Transformer2DModel
from diffusers.loaders.single_file_utils import convert_flux3_transformer_checkpoint_to_diffusers, infer_diffusers_model_type
from safetensors.torch import load_file, save_file

from _comfy_kitchen import dequantised
from _dit import compare, load_strict, recipe, run
from ckptbend.bake import bake
from ckptbend.errors import CkptbendError
from ckptbend.layouts import detect
from ckptbend.synth import write_checkpoint
from ckptbend.synth.dit import MODEL_PREFIX, build
from ckptbend.synth.flux3 import CONFIGS, FAMILY

pytestmark = pytest.mark.usefixtures("one_thread_no_grad")
NAMES = {"flux3_klein": "flux3", "flux3_klein_base": "flux3-base"}   # tiny widths: the klein name needs h 3072
FACTORS = {"q": 1.7, "k": 0.6, "v": 1.9, "out": 0.55}
HOOK = {"q": "attn.norm_q", "k": "attn.norm_k", "v": "attn.to_v", "out": "attn.to_out.0"}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root, made = tmp_path_factory.mktemp("flux3"), {}

    def get(arch, layout, dtype=None):
        if (arch, layout, dtype) not in made:
            made[arch, layout, dtype] = write_checkpoint(root / f"{arch}-{layout}-{dtype}.safetensors", arch, layout,
                                                         dtype=dtype)
        return made[arch, layout, dtype]
    return get


_MODELS = {}


def original(arch):
    if arch not in _MODELS:
        _MODELS[arch] = build(FAMILY, arch).double()
    return _MODELS[arch]


def to_diffusers(arch, state, layout="single"):
    state = {k.removeprefix(MODEL_PREFIX): v.double() for k, v in state.items() if v.is_floating_point()}
    if layout != "transformer_diffusers":
        state = convert_flux3_transformer_checkpoint_to_diffusers(dict(state))
    return load_strict(Flux3Transformer2DModel(**CONFIGS[arch]).double(), state)


def forward(model, arch):
    g = torch.Generator().manual_seed(123)

    def ids(n, t):
        out = torch.zeros(n, 4)
        out[:, 0], out[:, 2] = t, torch.arange(n)
        return out
    flow = CONFIGS[arch]["flow_map"]
    return model(hidden_states=torch.randn(1, 8, 8, generator=g, dtype=torch.float64),
                 encoder_hidden_states=torch.randn(1, 5, 24, generator=g, dtype=torch.float64),
                 image_cond_hidden_states=torch.randn(1, 4, 8, generator=g, dtype=torch.float64),
                 timestep=torch.tensor([0.37], dtype=torch.float64), img_ids=ids(8, 0), txt_ids=ids(5, 0),
                 image_cond_ids=ids(4, 1), target_timestep=torch.tensor([0.2], dtype=torch.float64) if flow else None,
                 return_dict=False)[0]


def attentions(model, stream=None, blocks=None, section=None):
    """(label, module) of the attentions a selection reaches: [dit.self] the per-mode blocks, [dit.joint] the singles."""
    stacks = {"image": model.mode_blocks["image"], "reference": model.mode_blocks["image_cond"],
              "text": model.txt_mode_blocks}
    found = [(f"D{i:02d}", b) for s, stack in stacks.items() if section != "dit.joint" and stream in (None, s)
             for i, b in enumerate(stack)]
    if section != "dit.self" and stream is None:
        found += [(f"S{i:02d}", b) for i, b in enumerate(model.single_transformer_blocks)]
    return [b for label, b in found if blocks is None or label in blocks or ("double" in blocks and label[0] == "D")]


def reference(arch, factors, model=None, **selection):
    model = model or original(arch)
    handles = [b.get_submodule(HOOK[p]).register_forward_hook(lambda m, a, out, f=f: out * f)
               for b in attentions(model, **selection) for p, f in factors.items()]
    assert handles
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


@pytest.mark.parametrize("arch", ["flux3_klein", "flux3_klein_base"])
@pytest.mark.parametrize("layout", ["single", "single_prefixed", "comfy", "transformer_diffusers"])
def test_layout_loads_strict_through_diffusers_converter(files, arch, layout):
    path = files(arch, layout)
    model = to_diffusers(arch, load_file(str(path)), layout)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in original(arch).state_dict().items())
    ckpt = detect(path)
    assert (ckpt.architecture, ckpt.kind, ckpt.qk_norm) == (NAMES[arch], "dit", True)
    if layout == "single":
        assert infer_diffusers_model_type(load_file(str(path))) == \
            {"flux3_klein": "flux-3-image-distilled", "flux3_klein_base": "flux-3-image"}[arch]


STRONG = {"q": 3.0, "k": 0.3, "v": 4.0, "out": 3.0}   # the 4 reference tokens reach the output only weakly
CASES = [   # (section, selector lines, selection, factors)
    ("dit.self", 'stream = "image"\n', dict(stream="image"), FACTORS),
    ("dit.self", 'stream = "reference"\n', dict(stream="reference"), STRONG),
    ("dit.self", 'stream = "text"\nblocks = ["D01"]\n', dict(stream="text", blocks=["D01"]), STRONG),
    ("dit.self", "", dict(), FACTORS),
    ("dit.joint", 'blocks = ["S01"]\n', dict(blocks=["S01"]), FACTORS),
    ("dit.joint", "", dict(), FACTORS),
]


@pytest.mark.parametrize("section,selector,selection,factors", CASES)
def test_bake_equals_runtime_multiply(files, tmp_path, section, selector, selection, factors):
    out = bake_to(tmp_path, f"[{section}]\n{selector}{lines(factors)}", files("flux3_klein", "single"))
    baked = forward(to_diffusers("flux3_klein", load_file(str(out))), "flux3_klein")
    compare(baked, reference("flux3_klein", factors, section=section, **selection),
            forward(original("flux3_klein"), "flux3_klein"))


@pytest.mark.parametrize("arch,layout", [("flux3_klein_base", "comfy"), ("flux3_klein", "single_prefixed"),
                                         ("flux3_klein_base", "transformer_diffusers")])
def test_bake_equals_runtime_multiply_in_every_form(files, tmp_path, arch, layout):
    body = f"[dit.self]\n{lines(FACTORS)}[dit.joint]\n{lines(FACTORS)}"
    out = bake_to(tmp_path, body, files(arch, layout))
    compare(forward(to_diffusers(arch, load_file(str(out)), layout), arch), reference(arch, FACTORS),
            forward(original(arch), arch))


def test_diffusers_folder_is_read_by_its_transformer_config(tmp_path):
    """diffusers has no Flux.3 pipeline: a folder is told by its transformer/config.json (as save_pretrained writes)."""
    folder = tmp_path / "flux3" / "transformer"
    model = original("flux3_klein")
    model.save_config(folder)
    save_file({k: v.float() for k, v in model.state_dict().items()}, str(folder / "diffusion_pytorch_model.safetensors"))
    ckpt = detect(folder.parent)
    assert (ckpt.kind, ckpt.architecture) == ("diffusers-folder", "flux3")
    out = bake_to(tmp_path, f"[dit.joint]\n{lines(FACTORS)}", folder.parent)
    baked = to_diffusers("flux3_klein", load_file(str(out / "transformer" / "diffusion_pytorch_model.safetensors")),
                         "transformer_diffusers")
    compare(forward(baked, "flux3_klein"), reference("flux3_klein", FACTORS, section="dit.joint"),
            forward(original("flux3_klein"), "flux3_klein"))


@pytest.mark.parametrize("form", ["scaled_fp8", "fp8mixed"])
def test_quantised_files_bake_to_the_hooked_dequantised_model(files, tmp_path, form):
    src = files("flux3_klein", "single", form)
    factors = {"q": 2.0, "k": 0.5, "v": 0.5, "out": 0.5}   # exact in fp8 and bf16
    out = bake_to(tmp_path, f"[dit.self]\n{lines(factors)}[dit.joint]\n{lines(factors)}", src)
    plain = to_diffusers("flux3_klein", dequantised(src))
    ref = reference("flux3_klein", factors, model=plain)
    compare(forward(to_diffusers("flux3_klein", dequantised(out)), "flux3_klein"), ref, forward(plain, "flux3_klein"),
            rtol=1e-4)


def test_inspect_names_modes_as_streams(files):
    r = run("inspect", files("flux3_klein", "single_prefixed"))
    assert r.returncode == 0, r.stderr
    assert "architecture: flux3" in r.stdout
    assert "D01   self (streams: image, reference, text) qk-norm" in r.stdout and "S01   joint qk-norm" in r.stdout


def test_released_width_names_klein(files, tmp_path):
    """The klein name at klein's width (h 3072), from the header alone: a sparse file with the released shapes."""
    state = load_file(str(files("flux3_klein", "single")))
    header = {k: {"dtype": "BF16", "shape": [3072 if d == 32 else d for d in v.shape]} for k, v in state.items()}
    offset = 0
    for k, v in header.items():
        n = 2 * int(torch.Size(v["shape"]).numel())
        v["data_offsets"], offset = [offset, offset + n], offset + n
    blob = json.dumps(header).encode()
    path = tmp_path / "wide.safetensors"
    with open(path, "wb") as f:
        f.write(len(blob).to_bytes(8, "little") + blob)
        f.truncate(8 + len(blob) + offset)
    assert detect(path).architecture == "flux3-klein"


def test_unknown_modes_are_refused(files, tmp_path):
    state = load_file(str(files("flux3_klein", "single")))
    state.update({k.replace("content_mode_blocks.image.", "content_mode_blocks.video."): v.clone()
                  for k, v in state.items() if k.startswith("content_mode_blocks.image.")})
    save_file(state, str(tmp_path / "video.safetensors"))
    with pytest.raises(CkptbendError, match="content_mode_blocks.video.0.attn_out.weight is a Flux.3 part ckptbend does not know"):
        detect(tmp_path / "video.safetensors")


def test_a_stream_selector_on_a_model_without_streams_matches_nothing(synth_file, tmp_path):
    (tmp_path / "r.toml").write_text('schema = 1\nname = "r"\n[dit.self]\nstream = "reference"\nv = 1.2\n')
    r = run("bake", tmp_path / "r.toml", synth_file("wan21_t2v"), "-o", tmp_path / "o.safetensors")
    assert r.returncode == 2 and "matches no" in r.stderr


@pytest.mark.parametrize("flow_map,name", [(True, "flux3-klein"), (False, "flux3-klein-base")])
def test_released_config_is_named_from_its_header(tmp_path, flow_map, name):
    """diffusers' default Flux3Transformer2DModel config is klein's (h 3072, 5 per-mode blocks, 28 single blocks):
    built on the meta device, written as a header-only sparse file in BFL names, named and labelled."""
    from ckptbend.synth.flux3 import to_original

    with torch.device("meta"):
        model = Flux3Transformer2DModel(flow_map=flow_map)
    state = to_original(model.state_dict())
    header, offset = {}, 0
    for k, v in state.items():
        n = 2 * v.numel()
        header[k], offset = {"dtype": "BF16", "shape": list(v.shape), "data_offsets": [offset, offset + n]}, offset + n
    blob = json.dumps(header).encode()
    path = tmp_path / "klein.safetensors"
    with open(path, "wb") as f:
        f.write(len(blob).to_bytes(8, "little") + blob)
        f.truncate(8 + len(blob) + offset)
    ckpt = detect(path)
    assert ckpt.architecture == name
    labels = sorted({s.block for s in ckpt.sites})
    assert labels == [f"D{i:02d}" for i in range(5)] + [f"S{i:02d}" for i in range(28)]
    assert {s.stream for s in ckpt.sites if s.block == "D04"} == {"image", "reference", "text"}
