"""Sana: self-attention (linear attention) as `[dit.self]`, text cross-attention as `[dit.cross]`, shown equal to
run-time hooks on the real `SanaTransformer2DModel`; original names checked by diffusers' own converter. A q or k
factor on the linear self-attention cancels (numerator and denominator), and says so."""

import copy

import diffusers
import pytest
import torch
from diffusers.loaders.single_file_utils import convert_sana_transformer_to_diffusers
from safetensors.torch import load_file, save_file

from _dit import compare, dequantised, recipe, run
from _helpers import load_strict
from ckptbend.bake import bake
from ckptbend.layouts import blocks_with_attention, detect
from ckptbend.layouts.sana import LINEAR
from ckptbend.synth import dit
from ckptbend.synth import sana as S

pytestmark = pytest.mark.usefixtures("one_thread_no_grad")
CONFIG = S.CONFIGS["sana"]
HOOK = {"q": "to_q", "k": "to_k", "v": "to_v", "out": "to_out.0"}
CROSS = {"q": 1.6, "k": 0.7, "v": 1.8, "out": 0.6}
SELF = {"v": 1.8, "out": 0.6}


@pytest.fixture(scope="module")
def model():
    return dit.build(S.FAMILY, "sana")


def load(path, layout, config=CONFIG):
    fresh = diffusers.SanaTransformer2DModel(**config).eval()
    if layout == "diffusers":
        return load_strict(fresh, load_file(next((path / "transformer").glob("*.safetensors")))).double()
    state = {k: v.float() for k, v in dequantised(path).items() if not k.startswith(("text_encoders.", "vae."))}
    if layout != "transformer_diffusers":
        state = convert_sana_transformer_to_diffusers(state)
    return load_strict(fresh, state).double()


def forward(m):
    g = torch.Generator().manual_seed(9)
    return m(hidden_states=torch.randn(1, 4, 4, 4, generator=g, dtype=torch.float64),
             encoder_hidden_states=torch.randn(1, 5, 24, generator=g, dtype=torch.float64),
             timestep=torch.tensor([0.4], dtype=torch.float64), return_dict=False)[0]


def hooked(m, attn, factors, hook=HOOK, blocks=(0, 1)):
    m = copy.deepcopy(m).double()
    for proj, f in factors.items():
        for b in blocks:
            m.get_submodule(f"transformer_blocks.{b}.{attn}.{hook[proj]}").register_forward_hook(
                lambda mod, a, out, f=f: out * f)
    return m


def body(section, factors, select=""):
    return f"[{section}]\n{select}" + "".join(f"{p} = {f}\n" for p, f in factors.items())


def test_original_names_are_diffusers_converters(model):
    state = model.state_dict()
    back = convert_sana_transformer_to_diffusers(S.to_original(state))
    assert set(back) == set(state) and all(torch.equal(back[k], v) for k, v in state.items())


@pytest.mark.parametrize("layout", ["single", "single_prefixed", "comfy", "transformer_diffusers", "diffusers"])
@pytest.mark.parametrize("section,attn,factors", [("dit.self", "attn1", SELF), ("dit.cross", "attn2", CROSS)])
def test_bake_equals_runtime_multiplication(tmp_path, synth_file, model, layout, section, attn, factors):
    src = synth_file("sana", layout)
    ckpt = detect(src)
    assert ckpt.architecture == "sana" and blocks_with_attention(ckpt) == ["B00", "B01"]
    out = tmp_path / ("out" if layout == "diffusers" else "out.safetensors")
    result = bake(recipe(body(section, factors)), src, out, durable=False)
    assert not result.plan.warnings
    compare(forward(load(out, layout)), forward(hooked(model, attn, factors)), forward(copy.deepcopy(model).double()))


@pytest.mark.parametrize("proj", ["q", "k"])
def test_linear_self_attention_cancels_q_and_k_and_says_so(tmp_path, synth_file, model, proj):
    plain = forward(copy.deepcopy(model).double())
    v_effect = (forward(hooked(model, "attn1", {"v": 1.5})) - plain).abs().max().item()
    out = tmp_path / "out.safetensors"
    result = bake(recipe(body("dit.self", {proj: 1.5})), synth_file("sana"), out, durable=False)
    assert result.plan.warnings == (f"[dit.self]: {proj} = 1.5 has no effect: {LINEAR}",)
    literal = forward(hooked(model, "attn1", {proj: 1.5}))
    assert (literal - plain).abs().max().item() < 1e-6 * v_effect
    assert (forward(load(out, "single")) - literal).abs().max().item() < 1e-6 * literal.abs().max().item()


def test_cross_attention_qk_norm_of_a_diffusers_file(tmp_path):
    """Sana 1.5 normalises q and k (over all heads): the cross-attention's q/k land on those weights."""
    config = dict(CONFIG, qk_norm="rms_norm_across_heads")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(2)
        m = diffusers.SanaTransformer2DModel(**config).eval()
    dit.randomise(m, torch.Generator().manual_seed(3))
    save_file(m.state_dict(), tmp_path / "m.safetensors")
    factors = {"q": 4.0, "k": 3.0}
    bake(recipe(body("dit.cross", factors)), tmp_path / "m.safetensors", tmp_path / "o.safetensors", durable=False)
    compare(forward(load(tmp_path / "o.safetensors", "transformer_diffusers", config)),
            forward(hooked(m, "attn2", factors, hook={"q": "norm_q", "k": "norm_k"})), forward(copy.deepcopy(m).double()))


def test_quantised_file_and_inspect(tmp_path, synth_file):
    src = synth_file("sana", "single_prefixed", "scaled_fp8")
    bake(recipe(body("dit.cross", {"v": 0.5, "out": 0.5})), src, tmp_path / "q.safetensors", durable=False)
    plain = load(src, "single_prefixed")
    compare(forward(load(tmp_path / "q.safetensors", "single_prefixed")),
            forward(hooked(plain, "attn2", {"v": 0.5, "out": 0.5})), forward(plain), rtol=1e-4)
    r = run("inspect", synth_file("sana", "comfy"))
    assert r.returncode == 0 and "architecture: sana" in r.stdout and "B01" in r.stdout
