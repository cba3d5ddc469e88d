"""Mochi: joint attention with a video and a text stream baked as `[dit.joint]`, shown equal to run-time hooks on the
real `MochiTransformer3DModel`; original names checked by diffusers' own converter (48 blocks, tiny width). The last
block's text q is dead (its text output is dropped) and says so."""

import copy

import diffusers
import pytest
import torch
from diffusers.loaders.single_file_utils import convert_mochi_transformer_checkpoint_to_diffusers
from safetensors.torch import load_file

from _dit import compare, dequantised, recipe, run
from _helpers import load_strict
from ckptbend.bake import bake
from ckptbend.layouts import blocks_with_attention, detect
from ckptbend.layouts.mochi import PRE_ONLY
from ckptbend.synth import dit
from ckptbend.synth import mochi as M

pytestmark = pytest.mark.usefixtures("one_thread_no_grad")
CONFIG = M.CONFIGS["mochi"]
HOOK = {"image": {"q": "norm_q", "k": "norm_k", "v": "to_v", "out": "to_out.0"},
        "text": {"q": "norm_added_q", "k": "norm_added_k", "v": "add_v_proj", "out": "to_add_out"}}
FACTORS = {"q": 1.6, "k": 0.7, "v": 1.8, "out": 0.6}
BLOCKS = (0, 20, 47)


@pytest.fixture(scope="module")
def model():
    return dit.build(M.FAMILY, "mochi")


def load(path, layout):
    fresh = diffusers.MochiTransformer3DModel(**CONFIG).eval()
    if layout == "diffusers":
        return load_strict(fresh, load_file(next((path / "transformer").glob("*.safetensors")))).double()
    state = {k: v.float() for k, v in dequantised(path).items() if not k.startswith(("text_encoders.", "vae."))}
    if layout != "transformer_diffusers":
        state = convert_mochi_transformer_checkpoint_to_diffusers(state)
    return load_strict(fresh, state).double()


def forward(m):
    g = torch.Generator().manual_seed(10)
    return m(hidden_states=torch.randn(1, 4, 2, 4, 4, generator=g, dtype=torch.float64),
             encoder_hidden_states=torch.randn(1, 5, 24, generator=g, dtype=torch.float64),
             timestep=torch.tensor([0.4], dtype=torch.float64), encoder_attention_mask=torch.ones(1, 5),
             return_dict=False)[0]


def hooked(m, factors, streams=("image", "text")):
    m = copy.deepcopy(m).double()
    for stream in streams:
        for proj, f in factors.items():
            for b in BLOCKS:
                if (name := HOOK[stream][proj]) == "to_add_out" and b == 47:
                    continue                                        # the last block has no text output
                m.get_submodule(f"transformer_blocks.{b}.attn1.{name}").register_forward_hook(
                    lambda mod, a, out, f=f: out * f)
    return m


def body(factors, select=""):
    return '[dit.joint]\nblocks = ["B00", "B20", "B47"]\n' + select + "".join(f"{p} = {f}\n" for p, f in factors.items())


def test_original_names_are_diffusers_converters(model):
    state = model.state_dict()
    back = convert_mochi_transformer_checkpoint_to_diffusers(M.to_original(state))
    assert set(back) == set(state) and all(torch.equal(back[k], v) for k, v in state.items())


@pytest.mark.parametrize("layout", ["single", "single_prefixed", "transformer_diffusers", "diffusers"])
def test_bake_equals_runtime_multiplication(tmp_path, synth_file, model, layout):
    src = synth_file("mochi", layout)
    ckpt = detect(src)
    assert ckpt.architecture == "mochi" and len(blocks_with_attention(ckpt)) == 48
    out = tmp_path / ("out" if layout == "diffusers" else "out.safetensors")
    bake(recipe(body(FACTORS, 'stream = "image"\n')), src, out, durable=False)
    compare(forward(load(out, layout)), forward(hooked(model, FACTORS, ("image",))), forward(copy.deepcopy(model).double()))


def test_text_stream_and_the_pre_only_last_block(tmp_path, synth_file, model):
    out = tmp_path / "out.safetensors"
    result = bake(recipe(body(FACTORS, 'stream = "text"\n')), synth_file("mochi", "comfy"), out, durable=False)
    assert not result.plan.warnings                                 # B00 and B20's text q act
    compare(forward(load(out, "comfy")), forward(hooked(model, FACTORS, ("text",))), forward(copy.deepcopy(model).double()))
    r = bake(recipe('[dit.joint]\nblocks = ["B47"]\nstream = "text"\nq = 1.5\n'), synth_file("mochi"),
             tmp_path / "dead.safetensors", durable=False)
    assert r.plan.warnings == (f"[dit.joint]: q = 1.5 has no effect: {PRE_ONLY}",)


def test_quantised_file_and_inspect(tmp_path, synth_file):
    src = synth_file("mochi", "single_prefixed", "scaled_fp8")
    factors = {"v": 0.5, "out": 0.5}
    bake(recipe(body(factors)), src, tmp_path / "q.safetensors", durable=False)
    plain = load(src, "single_prefixed")
    compare(forward(load(tmp_path / "q.safetensors", "single_prefixed")), forward(hooked(plain, factors)),
            forward(plain), rtol=1e-4)
    r = run("inspect", synth_file("mochi", "comfy"))
    assert r.returncode == 0 and "architecture: mochi" in r.stdout and "B47" in r.stdout
