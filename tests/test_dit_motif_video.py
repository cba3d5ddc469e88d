"""Motif-Video: dual-stream blocks (video / text streams) and single-stream blocks baked as `[dit.joint]` (the single
blocks' attention columns of the fused `proj_out`), the optional text cross-attention as `[dit.cross]`, all shown equal
to run-time hooks on the real `MotifVideoTransformer3DModel` (its single file has diffusers' names). In float32: its
timestep embedding computes in float32 whatever the model's dtype."""

import copy

import diffusers
import pytest
import torch
from safetensors.torch import load_file

from _dit import compare, dequantised, recipe, run
from _helpers import load_strict
from ckptbend.bake import bake
from ckptbend.layouts import blocks_with_attention, detect
from ckptbend.synth import dit
from ckptbend.synth import motif_video as V

pytestmark = pytest.mark.usefixtures("one_thread_no_grad")
CONFIG = V.CONFIGS["motif_video"]
JOINT = {"image": {"q": "norm_q", "k": "norm_k", "v": "to_v", "out": "to_out.0"},
         "text": {"q": "norm_added_q", "k": "norm_added_k", "v": "add_v_proj", "out": "to_add_out"}}
FACTORS = {"q": 1.6, "k": 0.7, "v": 1.8, "out": 0.6}


@pytest.fixture(scope="module")
def model():
    return dit.build(V.FAMILY, "motif_video")


def load(path, layout):
    fresh = diffusers.MotifVideoTransformer3DModel(**CONFIG).eval()
    if layout == "diffusers":
        return load_strict(fresh, load_file(next((path / "transformer").glob("*.safetensors")))).float()
    state = {k.removeprefix("model.diffusion_model."): v.float() for k, v in dequantised(path).items()
             if not k.startswith(("text_encoders.", "vae."))}
    return load_strict(fresh, state).float()


def forward(m):
    g = torch.Generator().manual_seed(11)
    return m(hidden_states=torch.randn(1, 4, 2, 4, 4, generator=g, dtype=torch.float32),
             timestep=torch.tensor([0.4], dtype=torch.float32),
             encoder_hidden_states=torch.randn(1, 5, 24, generator=g, dtype=torch.float32), return_dict=False)[0]


def scale_attention_output(mod, args, f):
    """The single block's attention output (the first part of what the fused proj_out reads) times f."""
    x = args[0].clone()
    x[..., :mod.out_features] *= f
    return (x,)


def hooked(m, section, factors, streams=("image", "text")):
    m = copy.deepcopy(m).float()
    for b in (0, 1):
        for proj, f in factors.items():
            def hook(mod, a, out, f=f):
                return out * f
            if section == "cross":
                for kind in ("transformer_blocks", "single_transformer_blocks"):
                    m.get_submodule(f"{kind}.{b}.cross_attn.{JOINT['image'][proj]}").register_forward_hook(hook)
                continue
            for s in streams:
                m.get_submodule(f"transformer_blocks.{b}.attn.{JOINT[s][proj]}").register_forward_hook(hook)
            if proj == "out":
                m.get_submodule(f"single_transformer_blocks.{b}.proj_out").register_forward_pre_hook(
                    lambda mod, a, f=f: scale_attention_output(mod, a, f))
            else:
                m.get_submodule(f"single_transformer_blocks.{b}.attn.{JOINT['image'][proj]}").register_forward_hook(hook)
    return m


def body(section, factors):
    return f"[dit.{section}]\n" + "".join(f"{p} = {f}\n" for p, f in factors.items())


@pytest.mark.parametrize("layout", ["single", "single_prefixed", "diffusers"])
@pytest.mark.parametrize("section", ["joint", "cross"])
def test_bake_equals_runtime_multiplication(tmp_path, synth_file, model, layout, section):
    src = synth_file("motif_video", layout)
    ckpt = detect(src)
    assert ckpt.architecture == "motif-video" and blocks_with_attention(ckpt) == ["D00", "D01", "S00", "S01"]
    out = tmp_path / ("out" if layout == "diffusers" else "out.safetensors")
    bake(recipe(body(section, FACTORS)), src, out, durable=False)
    compare(forward(load(out, layout)), forward(hooked(model, section, FACTORS)), forward(copy.deepcopy(model).float()),
            rtol=1e-4)


@pytest.mark.parametrize("stream", ["image", "text"])
def test_one_stream_of_the_dual_blocks(tmp_path, synth_file, model, stream):
    out = tmp_path / "out.safetensors"
    bake(recipe(f'[dit.joint]\nstream = "{stream}"\n' + "".join(f"{p} = {f}\n" for p, f in FACTORS.items())),
         synth_file("motif_video"), out, durable=False)
    reference = copy.deepcopy(model).float()
    for b in (0, 1):
        for proj, f in FACTORS.items():
            reference.get_submodule(f"transformer_blocks.{b}.attn.{JOINT[stream][proj]}").register_forward_hook(
                lambda mod, a, o, f=f: o * f)
    compare(forward(load(out, "single")), forward(reference), forward(copy.deepcopy(model).float()), rtol=1e-4)


def test_quantised_file_and_inspect(tmp_path, synth_file):
    src = synth_file("motif_video", "single_prefixed", "scaled_fp8")
    factors = {"v": 0.5, "out": 0.5}
    bake(recipe(body("joint", factors)), src, tmp_path / "q.safetensors", durable=False)
    plain = load(src, "single_prefixed")
    compare(forward(load(tmp_path / "q.safetensors", "single_prefixed")), forward(hooked(plain, "joint", factors)),
            forward(plain), rtol=1e-4)
    r = run("inspect", synth_file("motif_video", "comfy"))
    assert r.returncode == 0 and "architecture: motif-video" in r.stdout and "S01" in r.stdout
