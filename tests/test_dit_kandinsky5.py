"""Kandinsky 5: its visual blocks' self- and cross-attention baked by the rule, shown equal to run-time hooks on the
real `Kandinsky5Transformer3DModel`; the text blocks left alone; named; an unknown block part refused.

The model runs in float32 here (its time embedding casts to float32) and rounds q and k to bfloat16 after RoPE (the
class's own `apply_rotary`), so baked and hooked runs may round a value differently: the tolerance is 2e-3 of the
output's scale, against effects of order 1."""

import copy

import diffusers
import pytest
import torch
from safetensors.torch import load_file, save_file

from _dit import compare, dequantised, recipe, run
from _helpers import load_strict
from ckptbend.bake import bake
from ckptbend.errors import CkptbendError
from ckptbend.layouts import blocks_with_attention, detect
from ckptbend.synth import dit
from ckptbend.synth import kandinsky5 as K

pytestmark = pytest.mark.usefixtures("one_thread_no_grad")
ARCH = "kandinsky5"
HOOK = {"q": "query_norm", "k": "key_norm", "v": "to_value", "out": "out_layer"}
ATTN = {"self": "self_attention", "cross": "cross_attention"}
FACTORS = {("self", "q"): 1.6, ("self", "k"): 0.7, ("self", "v"): 1.8, ("self", "out"): 0.6,
           ("cross", "q"): 1.3, ("cross", "k"): 0.8, ("cross", "v"): 1.4, ("cross", "out"): 0.75}


@pytest.fixture(scope="module")
def model():
    return dit.build(K.FAMILY, ARCH)


def load(path, layout):
    fresh = diffusers.Kandinsky5Transformer3DModel(**K.CONFIGS[ARCH]).eval()
    if layout == "diffusers":
        return load_strict(fresh, load_file(next((path / "transformer").glob("*.safetensors"))))
    state = {k.removeprefix("model.diffusion_model."): v.float() for k, v in dequantised(path).items()}
    return load_strict(fresh, state)


def forward(m):
    g = torch.Generator().manual_seed(4)

    def r(*shape):
        return torch.randn(*shape, generator=g)
    pos = (torch.arange(2), torch.arange(2), torch.arange(2))
    return m(hidden_states=r(1, 2, 4, 4, 4), encoder_hidden_states=r(1, 5, 24), timestep=torch.tensor([0.5]),
             pooled_projections=r(1, 20), visual_rope_pos=pos, text_rope_pos=torch.arange(5), return_dict=False)[0]


def hooked(m, factors):
    m = copy.deepcopy(m)
    for (attn, proj), f in factors.items():
        for b in (0, 1):
            m.get_submodule(f"visual_transformer_blocks.{b}.{ATTN[attn]}.{HOOK[proj]}").register_forward_hook(
                lambda mod, a, out, f=f: out * f)
    return m


def body(factors):
    return "".join(f"[dit.{a}]\n" + "".join(f"{p} = {f}\n" for (a2, p), f in factors.items() if a2 == a)
                   for a in ("self", "cross"))


@pytest.mark.parametrize("layout", ["single", "single_prefixed", "transformer_diffusers", "diffusers"])
def test_layouts_are_named_and_their_blocks_found(synth_file, model, layout):
    path = synth_file(ARCH, layout)
    ckpt = detect(path)
    assert ckpt.architecture == "kandinsky5" and blocks_with_attention(ckpt) == ["B00", "B01"]
    assert {(s.attn, s.proj) for s in ckpt.sites if s.block == "B01"} == set(FACTORS)
    assert not any("text_transformer_blocks" in s.key for s in ckpt.sites)
    assert [n.split(" (")[0] for n in ckpt.left_alone] == ["14 tensors of Kandinsky 5's text blocks"]   # 1 block
    loaded = load(path, layout).state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize("layout", ["single_prefixed", "diffusers"])
def test_bake_equals_runtime_multiplication(tmp_path, synth_file, model, layout):
    out = tmp_path / ("out" if layout == "diffusers" else "out.safetensors")
    bake(recipe(body(FACTORS)), synth_file(ARCH, layout), out, durable=False)
    compare(forward(load(out, layout)), forward(hooked(model, FACTORS)), forward(model), rtol=2e-3)


def test_scaled_fp8_bakes_by_the_rule(tmp_path, synth_file):
    src = synth_file(ARCH, "single", "scaled_fp8")
    factors = {("cross", "k"): 1.5, ("cross", "v"): 0.7, ("self", "out"): 1.25}
    bake(recipe(body(factors)), src, tmp_path / "out.safetensors", durable=False)
    original = load(src, "single")
    base, ref = forward(original), forward(hooked(original, factors))
    effect = (ref - base).abs().max().item()
    err = (forward(load(tmp_path / "out.safetensors", "single")) - ref).abs().max().item()
    assert effect > 1e-2 and err < 0.02 * effect      # bf16 biases and norms of the fp8 file round once more


def test_width_names_the_release_and_unknown_parts_are_refused(tmp_path, synth_file):
    state = load_file(synth_file(ARCH))
    state["visual_embeddings.in_layer.weight"] = torch.zeros(1792, 16)
    save_file(state, tmp_path / "lite.safetensors")
    assert detect(tmp_path / "lite.safetensors").architecture == "kandinsky5-lite-video"
    state["visual_transformer_blocks.1.audio_attention.to_query.weight"] = torch.zeros(4, 4)
    save_file(state, tmp_path / "odd.safetensors")
    with pytest.raises(CkptbendError, match="Kandinsky 5 with a part ckptbend does not know"):
        detect(tmp_path / "odd.safetensors")
    r = run("inspect", synth_file(ARCH, "single_prefixed"))
    assert r.returncode == 0 and "architecture: kandinsky5" in r.stdout and "B01   cross self" in r.stdout
