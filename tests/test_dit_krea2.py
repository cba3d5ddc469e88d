"""Krea 2: file forms checked against diffusers' own single-file converter and class, and bakes checked against the
run-time definition on the real `Krea2Transformer2DModel`: the baked model's forward equals the original's with q
(after its zero-centred qk-norm), k, v or the gated attention's output multiplied by hooks. The qk-norm weight w
acts as (1 + w): a q/k factor f makes it f·(1 + w) − 1, which plain scaling (f·w) would get wrong."""

import json

import pytest
import torch
from diffusers import Krea2Transformer2DModel
from diffusers.loaders.single_file_utils import convert_krea2_transformer_checkpoint_to_diffusers, infer_diffusers_model_type
from safetensors.torch import load_file

from _comfy_kitchen import dequantised
from _dit import compare, load_strict, recipe, run
from ckptbend.bake import bake
from ckptbend.layouts import detect
from ckptbend.plan import make_plan
from ckptbend.synth import write_checkpoint
from ckptbend.synth.dit import MODEL_PREFIX, build
from ckptbend.synth.krea2 import CONFIGS, FAMILY

pytestmark = pytest.mark.usefixtures("one_thread_no_grad")
ARCH = "krea2"
FACTORS = {"q": 1.7, "k": 0.6, "v": 1.9, "out": 0.55}
HOOK = {"q": "attn.norm_q", "k": "attn.norm_k", "v": "attn.to_v", "out": "attn.to_out.0"}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root, made = tmp_path_factory.mktemp("krea2"), {}

    def get(layout, dtype=None):
        if (layout, dtype) not in made:
            name = f"{layout}-{dtype}" + ("" if layout == "diffusers" else ".safetensors")
            made[layout, dtype] = write_checkpoint(root / name, ARCH, layout, dtype=dtype)
        return made[layout, dtype]
    return get


_MODEL = []


def original():
    if not _MODEL:
        _MODEL.append(build(FAMILY, ARCH).double())
    return _MODEL[0]


def to_diffusers(state, layout="single"):
    state = {k.removeprefix(MODEL_PREFIX): v.double() for k, v in state.items() if v.is_floating_point()}
    if layout not in ("transformer_diffusers", "diffusers"):
        state = convert_krea2_transformer_checkpoint_to_diffusers(dict(state))
    return load_strict(Krea2Transformer2DModel(**CONFIGS[ARCH]).double(), state)


def forward(model):
    g = torch.Generator().manual_seed(123)
    ids = torch.zeros(13, 3)
    ids[5:, 1], ids[5:, 2] = torch.arange(2).repeat_interleave(4), torch.arange(4).repeat(2)
    return model(hidden_states=torch.randn(1, 8, 8, generator=g, dtype=torch.float64),
                 encoder_hidden_states=torch.randn(1, 5, 3, 24, generator=g, dtype=torch.float64),
                 timestep=torch.tensor([0.37], dtype=torch.float64), position_ids=ids, return_dict=False)[0]


def reference(factors, blocks=None, model=None):
    model = model or original()
    handles = [block.get_submodule(HOOK[p]).register_forward_hook(lambda m, a, out, f=f: out * f)
               for i, block in enumerate(model.transformer_blocks) if blocks is None or f"B{i:02d}" in blocks
               for p, f in factors.items()]
    try:
        return forward(model)
    finally:
        for h in handles:
            h.remove()


def lines(factors):
    return "".join(f"{k} = {v}\n" for k, v in factors.items())


def bake_to(tmp_path, body, src):
    out = tmp_path / ("out" if src.is_dir() else "out.safetensors")
    bake(recipe(body), src, out, progress=False)
    return out


@pytest.mark.parametrize("layout", ["single", "single_prefixed", "comfy", "transformer_diffusers"])
def test_layout_loads_strict_through_diffusers_converter(files, layout):
    path = files(layout)
    model = to_diffusers(load_file(str(path)), layout)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in original().state_dict().items())
    ckpt = detect(path)
    assert (ckpt.architecture, ckpt.kind, ckpt.qk_norm) == ("krea2", "dit", True)
    if layout == "single":
        assert infer_diffusers_model_type(load_file(str(path))) == "krea2"
    assert not any("txtfusion" in s.key or "text_fusion" in s.key for s in ckpt.sites)   # the text fusion: left alone


@pytest.mark.parametrize("factors,blocks", [(FACTORS, None), ({"q": 1.5, "k": 1.4}, ["B01"]), ({"v": 1.9}, None),
                                            ({"out": 0.55}, ["B00"])])
def test_bake_equals_runtime_multiply(files, tmp_path, factors, blocks):
    selector = f"blocks = {json.dumps(blocks)}\n" if blocks else ""
    out = bake_to(tmp_path, f"[dit.joint]\n{selector}{lines(factors)}", files("single"))
    compare(forward(to_diffusers(load_file(str(out)))), reference(factors, blocks), forward(original()))


@pytest.mark.parametrize("layout", ["single_prefixed", "comfy", "transformer_diffusers", "diffusers"])
def test_bake_equals_runtime_multiply_in_every_form(files, tmp_path, layout):
    out = bake_to(tmp_path, f"[dit.joint]\n{lines(FACTORS)}", files(layout))
    state = load_file(str(out / "transformer" / "diffusion_pytorch_model.safetensors")) if layout == "diffusers" \
        else load_file(str(out))
    compare(forward(to_diffusers(state, layout)), reference(FACTORS), forward(original()))


def test_qk_norm_weight_is_scaled_as_one_plus_w(files, tmp_path):
    src = files("single")
    plan = make_plan(recipe('[dit.joint]\nblocks = ["B00"]\nq = 2.0\n'), detect(src))
    assert "blocks.0.attn.qknorm.qnorm.scale  ×2 of (w + 1)  (dit.joint.q)" in plan.describe()
    out = bake_to(tmp_path, '[dit.joint]\nblocks = ["B00"]\nq = 2.0\n', src)
    key = "blocks.0.attn.qknorm.qnorm.scale"
    w = load_file(str(src))[key]
    assert torch.allclose(load_file(str(out))[key], 2.0 * (w + 1) - 1, atol=1e-6)


@pytest.mark.parametrize("form", ["scaled_fp8", "fp8mixed"])
def test_quantised_files_bake_to_the_hooked_dequantised_model(files, tmp_path, form):
    """v and out by powers of two are exact in fp8; q/k land on the bf16 norm weights as bf16(f·(1 + w) − 1), which
    bf16 rounds (f·(1 + w) − 1 is not a power-of-two multiple of w), so they are checked by that rule."""
    src = files("single", form)
    factors = {"v": 0.5, "out": 0.5}
    out = bake_to(tmp_path, f"[dit.joint]\n{lines(factors)}q = 2.0\n", src)
    plain = to_diffusers(dequantised(src))
    baked = dequantised(out)
    key = "blocks.1.attn.qknorm.qnorm.scale"
    w = load_file(str(src))[key]
    assert w.dtype == torch.bfloat16 and torch.equal(load_file(str(out))[key], (2.0 * (w.float() + 1) - 1).bfloat16())
    baked = {k: (dequantised(src)[k] if k.endswith("qnorm.scale") else v) for k, v in baked.items()}   # q apart
    compare(forward(to_diffusers(baked)), reference(factors, model=plain), forward(plain), rtol=1e-4)


def test_inspect_and_diffusers_folder(files):
    r = run("inspect", files("comfy"))
    assert r.returncode == 0 and "architecture: krea2" in r.stdout and "B01   joint qk-norm" in r.stdout
    assert "model.diffusion_model.blocks.N.attn.qknorm.qnorm.scale (used as w + 1)" in r.stdout
    ckpt = detect(files("diffusers"))
    assert (ckpt.kind, ckpt.architecture, ckpt.components) == ("diffusers-folder", "krea2", ["dit"])


def test_released_config_is_named_from_its_header(tmp_path):
    """diffusers' default Krea2Transformer2DModel config (h 6144, 28 blocks) on the meta device, original names,
    a header-only sparse file: named krea2, B00–B27, the text fusion's attention left alone."""
    from ckptbend.synth.krea2 import to_original

    with torch.device("meta"):
        state = to_original(Krea2Transformer2DModel().state_dict())
    header, offset = {}, 0
    for k, v in state.items():
        n = 2 * v.numel()
        header[k], offset = {"dtype": "BF16", "shape": list(v.shape), "data_offsets": [offset, offset + n]}, offset + n
    blob = json.dumps(header).encode()
    path = tmp_path / "krea2.safetensors"
    with open(path, "wb") as f:
        f.write(len(blob).to_bytes(8, "little") + blob)
        f.truncate(8 + len(blob) + offset)
    ckpt = detect(path)
    assert ckpt.architecture == "krea2" and sorted({s.block for s in ckpt.sites}) == [f"B{i:02d}" for i in range(28)]
    assert len(ckpt.sites) == 28 * 4 and not any(s.key.startswith("txtfusion.") for s in ckpt.sites)
