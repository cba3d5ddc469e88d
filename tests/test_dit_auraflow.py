"""AuraFlow: double layers (image and text streams) and single layers baked as `[dit.joint]`, shown equal to run-time
hooks on the real `AuraFlowTransformer2DModel`; original names checked by diffusers' own converter. Its q/k norms
have no weight, so q/k factors are literal projection scalings that the norm cancels, and say so."""

import copy

import diffusers
import pytest
import torch
from diffusers.loaders.single_file_utils import convert_auraflow_transformer_checkpoint_to_diffusers
from safetensors.torch import load_file, save_file

from _dit import compare, dequantised, gguf_state, recipe, run
from _helpers import load_strict
from ckptbend.bake import bake
from ckptbend.gguf_io import is_gguf
from ckptbend.layouts import blocks_with_attention, detect
from ckptbend.layouts.auraflow import NORM_WITHOUT_WEIGHT
from ckptbend.synth import auraflow as A
from ckptbend.synth import dit

pytestmark = pytest.mark.usefixtures("one_thread_no_grad")
CONFIG = A.CONFIGS["auraflow"]
HOOK = {"image": {"q": "to_q", "k": "to_k", "v": "to_v", "out": "to_out.0"},
        "text": {"q": "add_q_proj", "k": "add_k_proj", "v": "add_v_proj", "out": "to_add_out"}}
VO = {"v": 1.8, "out": 0.6}


@pytest.fixture(scope="module")
def model():
    return dit.build(A.FAMILY, "auraflow")


def load(path, layout):
    fresh = diffusers.AuraFlowTransformer2DModel(**CONFIG).eval()
    if layout == "diffusers":
        return load_strict(fresh, load_file(next((path / "transformer").glob("*.safetensors")))).double()
    read = gguf_state if is_gguf(path) else dequantised
    state = {k: v.float() for k, v in read(path).items() if not k.startswith(("text_encoders.", "vae."))}
    state = {k.removeprefix("model.diffusion_model.").removeprefix("model."): v for k, v in state.items()}
    if layout != "transformer_diffusers":
        state = convert_auraflow_transformer_checkpoint_to_diffusers(state)
    return load_strict(fresh, state).double()


def forward(m):
    g = torch.Generator().manual_seed(8)
    return m(hidden_states=torch.randn(1, 4, 4, 4, generator=g, dtype=torch.float64),
             encoder_hidden_states=torch.randn(1, 5, 24, generator=g, dtype=torch.float64),
             timestep=torch.tensor([0.4], dtype=torch.float64), return_dict=False)[0]


def hooked(m, factors, streams=("image", "text"), single=True):
    """factors {proj: f} on the given streams of every double layer (and on every single layer)."""
    m = copy.deepcopy(m).double()
    hooks = [(f"joint_transformer_blocks.{b}.attn.{HOOK[s][p]}", f) for b in (0, 1) for s in streams
             for p, f in factors.items()]
    hooks += [(f"single_transformer_blocks.{b}.attn.{HOOK['image'][p]}", f) for b in (0, 1)
              for p, f in factors.items()] if single else []
    for name, f in hooks:
        m.get_submodule(name).register_forward_hook(lambda mod, a, out, f=f: out * f)
    return m


def body(factors, select=""):
    return "[dit.joint]\n" + select + "".join(f"{p} = {f}\n" for p, f in factors.items())


def test_original_names_are_diffusers_converters(model):
    state = model.state_dict()
    back = convert_auraflow_transformer_checkpoint_to_diffusers(A.to_original(state))
    assert set(back) == set(state) and all(torch.equal(back[k], v) for k, v in state.items())


@pytest.mark.parametrize("layout", ["single", "single_prefixed", "comfy", "transformer_diffusers", "diffusers"])
def test_bake_equals_runtime_multiplication(tmp_path, synth_file, model, layout):
    src = synth_file("auraflow", layout)
    ckpt = detect(src)
    assert ckpt.architecture == "auraflow" and blocks_with_attention(ckpt) == ["D00", "D01", "S00", "S01"]
    out = tmp_path / ("out" if layout == "diffusers" else "out.safetensors")
    result = bake(recipe(body(VO)), src, out, durable=False)
    assert not result.plan.warnings
    compare(forward(load(out, layout)), forward(hooked(model, VO)), forward(copy.deepcopy(model).double()))


@pytest.mark.parametrize("stream", ["image", "text"])
def test_one_stream_of_the_double_layers(tmp_path, synth_file, model, stream):
    out = tmp_path / "out.safetensors"
    bake(recipe(body(VO, f'stream = "{stream}"\n')), synth_file("auraflow"), out, durable=False)
    compare(forward(load(out, "single")), forward(hooked(model, VO, streams=(stream,), single=False)),
            forward(copy.deepcopy(model).double()))


def test_model_prefix_of_comfyuis_fallback(tmp_path, synth_file, model):
    """ComfyUI reads a model under `model.` when no other prefix is common (fal's all-in-one file)."""
    save_file({"model." + k: v for k, v in load_file(synth_file("auraflow")).items()}, tmp_path / "m.safetensors")
    assert detect(tmp_path / "m.safetensors").architecture == "auraflow"
    bake(recipe(body(VO)), tmp_path / "m.safetensors", tmp_path / "out.safetensors", durable=False)
    compare(forward(load(tmp_path / "out.safetensors", "single")), forward(hooked(model, VO)),
            forward(copy.deepcopy(model).double()))


@pytest.mark.parametrize("proj,stream", [("q", "image"), ("k", "text")])
def test_q_and_k_are_cancelled_by_the_weightless_norm_and_say_so(tmp_path, synth_file, model, proj, stream):
    plain = forward(copy.deepcopy(model).double())
    v_effect = (forward(hooked(model, {"v": 1.5})) - plain).abs().max().item()
    out = tmp_path / "out.safetensors"
    result = bake(recipe(body({proj: 1.5}, f'stream = "{stream}"\n')), synth_file("auraflow"), out, durable=False)
    assert result.plan.warnings == (f"[dit.joint]: {proj} = 1.5 has no effect: {NORM_WITHOUT_WEIGHT}",)
    literal = forward(hooked(model, {proj: 1.5}, streams=(stream,), single=False))
    baked = forward(load(out, "single"))
    assert (literal - plain).abs().max().item() < 1e-3 * v_effect          # the norm divides the factor away
    assert (baked - literal).abs().max().item() < 1e-6 * literal.abs().max().item()   # the bake is that scaling


def test_quantised_file_and_inspect(tmp_path, synth_file, model):
    src = synth_file("auraflow", "single_prefixed", "scaled_fp8")
    bake(recipe(body({"v": 0.5, "out": 0.5})), src, tmp_path / "q.safetensors", durable=False)
    plain = load(src, "single_prefixed")
    compare(forward(load(tmp_path / "q.safetensors", "single_prefixed")),
            forward(hooked(plain, {"v": 0.5, "out": 0.5})), forward(plain), rtol=1e-4)
    r = run("inspect", synth_file("auraflow", "comfy"))
    assert r.returncode == 0 and "architecture: auraflow" in r.stdout and "S01" in r.stdout


def test_comfyui_gguf(tmp_path, synth_file):
    """ComfyUI-GGUF's `aura` files: the model alone under its original names; × 0.5 on Q8_0's fp16 scales is exact."""
    src = synth_file("auraflow", "single", "q8_0")
    assert detect(src).architecture == "auraflow"
    bake(recipe(body({"v": 0.5, "out": 0.5})), src, tmp_path / "q.gguf", durable=False)
    plain = load(src, "single")
    compare(forward(load(tmp_path / "q.gguf", "single")), forward(hooked(plain, {"v": 0.5, "out": 0.5})),
            forward(plain))
