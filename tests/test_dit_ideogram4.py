"""Ideogram 4: a single-stream DiT baked as `[dit.joint]` and shown equal to run-time hooks on the real
`Ideogram4Transformer2DModel`. diffusers has no single-file converter for it: the original names are ComfyUI's
Ideogram 4 module's (`attention.qkv` = q | k | v, `attention.o`), split back by `synth.ideogram4.to_diffusers`.
v and out act on the weights exactly as hooks do, and both are cancelled by the RMSNorm on the attention output."""

import copy

import diffusers
import pytest
import torch
from safetensors.torch import load_file

from _dit import compare, dequantised, recipe, run
from _helpers import load_strict
from ckptbend.bake import bake
from ckptbend.layouts import blocks_with_attention, detect
from ckptbend.layouts.ideogram4 import OUTPUT_NORMED
from ckptbend.synth import dit
from ckptbend.synth import ideogram4 as I

pytestmark = pytest.mark.usefixtures("one_thread_no_grad")
ARCH = "ideogram4"
CONFIG = I.CONFIGS[ARCH]
HOOK = {"q": "norm_q", "k": "norm_k", "v": "to_v", "out": "to_out.0"}
QK = {"q": 1.6, "k": 0.7}


@pytest.fixture(scope="module")
def model():
    return dit.build(I.FAMILY, ARCH)


def load(path, layout):
    fresh = diffusers.Ideogram4Transformer2DModel(**CONFIG).eval()
    if layout == "diffusers":
        return load_strict(fresh, load_file(next((path / "transformer").glob("*.safetensors")))).double()
    state = {k.removeprefix("model.diffusion_model."): v.float() for k, v in dequantised(path).items()
             if not k.startswith(("text_encoders.", "vae."))}
    if layout != "transformer_diffusers":
        state = I.to_diffusers(state)
    return load_strict(fresh, state).double()


def forward(m):
    g = torch.Generator().manual_seed(4)
    text, image = 4, 6
    n = text + image
    pos = torch.zeros(1, n, 3, dtype=torch.long)
    pos[0, :text] = torch.arange(text)[:, None]
    pos[0, text:, 1], pos[0, text:, 2] = torch.arange(image) // 3 + 65536, torch.arange(image) % 3 + 65536
    indicator = torch.tensor([[3] * text + [2] * image])
    return m(hidden_states=torch.randn(1, n, 8, generator=g, dtype=torch.float64),
             timestep=torch.tensor([0.4], dtype=torch.float64),
             encoder_hidden_states=torch.randn(1, n, 24, generator=g, dtype=torch.float64), position_ids=pos,
             segment_ids=torch.ones(1, n, dtype=torch.long), indicator=indicator, return_dict=False)[0][:, text:]


def hooked(m, factors, blocks=(0, 1)):
    m = copy.deepcopy(m).double()
    for proj, f in factors.items():
        for b in blocks:
            m.get_submodule(f"layers.{b}.attention.{HOOK[proj]}").register_forward_hook(lambda mod, a, out, f=f: out * f)
    return m


def test_original_names_round_trip(model):
    state = model.state_dict()
    back = I.to_diffusers(I.to_original(state))
    assert set(back) == set(state) and all(torch.equal(back[k], v) for k, v in state.items())
    assert "layers.0.attention.qkv.weight" in I.to_original(state)


@pytest.mark.parametrize("layout", ["single", "single_prefixed", "comfy", "transformer_diffusers", "diffusers"])
def test_named_and_blocks_found(synth_file, layout):
    ckpt = detect(synth_file(ARCH, layout))
    assert ckpt.architecture == "ideogram4" and blocks_with_attention(ckpt) == ["B00", "B01"]
    assert {(s.attn, s.proj, s.stream) for s in ckpt.sites if s.block == "B01"} == {
        ("joint", p, None) for p in HOOK}


@pytest.mark.parametrize("layout", ["single", "single_prefixed", "transformer_diffusers", "diffusers"])
def test_q_k_bake_equals_runtime_multiplication(tmp_path, synth_file, model, layout):
    out = tmp_path / ("out" if layout == "diffusers" else "out.safetensors")
    result = bake(recipe("[dit.joint]\n" + "".join(f"{p} = {f}\n" for p, f in QK.items())), synth_file(ARCH, layout),
                  out, durable=False)
    assert not result.plan.warnings
    compare(forward(load(out, layout)), forward(hooked(model, QK)), forward(copy.deepcopy(model).double()))


@pytest.mark.parametrize("proj", ["q", "k"])
def test_each_qk_factor_alone_on_one_block(tmp_path, synth_file, model, proj):
    out = tmp_path / "out.safetensors"
    bake(recipe(f'[dit.joint]\nblocks = ["B01"]\n{proj} = {QK[proj]}\n'), synth_file(ARCH), out, durable=False)
    compare(forward(load(out, "single")), forward(hooked(model, {proj: QK[proj]}, blocks=(1,))),
            forward(copy.deepcopy(model).double()))


@pytest.mark.parametrize("proj", ["v", "out"])
def test_v_and_out_are_cancelled_by_the_output_norm_and_say_so(tmp_path, synth_file, model, proj):
    plain = forward(copy.deepcopy(model).double())
    q_effect = (forward(hooked(model, {"q": 1.5}, blocks=(0,))) - plain).abs().max().item()
    reference = forward(hooked(model, {proj: 1.5}, blocks=(0,)))
    out = tmp_path / "out.safetensors"
    result = bake(recipe(f'[dit.joint]\nblocks = ["B00"]\n{proj} = 1.5\n'), synth_file(ARCH), out, durable=False)
    assert result.plan.warnings == (f"[dit.joint]: {proj} = 1.5 has no effect: {OUTPUT_NORMED}",)
    baked = forward(load(out, "single"))
    assert (reference - plain).abs().max().item() < 1e-3 * q_effect          # the norm divides the factor away
    assert (baked - reference).abs().max().item() < 1e-6 * reference.abs().max().item()   # the literal scaling
                                                                              # (float32 file rounding)


@pytest.mark.parametrize("form", ["scaled_fp8", "fp8mixed"])
def test_quantised_file_bakes_the_v_rows(tmp_path, synth_file, form):
    src = synth_file(ARCH, "single_prefixed", form)
    out = tmp_path / "out.safetensors"
    bake(recipe('[dit.joint]\nv = 0.5\nq = 2.0\n'), src, out, durable=False)
    before, after = dequantised(src), dequantised(out)
    key = "model.diffusion_model.layers.1.attention."
    qkv_b, qkv_a = before[key + "qkv.weight"], after[key + "qkv.weight"]
    assert torch.equal(qkv_a[64:], 0.5 * qkv_b[64:]) and torch.equal(qkv_a[:64], qkv_b[:64])
    assert torch.equal(after[key + "norm_q.weight"], (2.0 * before[key + "norm_q.weight"]).bfloat16().double())


def test_inspect_and_an_unknown_part_is_refused(tmp_path, synth_file):
    from safetensors.torch import save_file

    from ckptbend.errors import CkptbendError
    r = run("inspect", synth_file(ARCH, "comfy"))
    assert r.returncode == 0 and "architecture: ideogram4" in r.stdout and "B01   joint" in r.stdout
    state = load_file(synth_file(ARCH))
    state["layers.0.attention.gate.weight"] = torch.zeros(2, 32)
    save_file(state, tmp_path / "x.safetensors")
    with pytest.raises(CkptbendError, match="Ideogram 4 with a part ckptbend does not know"):
        detect(tmp_path / "x.safetensors")
