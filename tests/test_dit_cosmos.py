"""Cosmos Predict2 and Anima (a Cosmos-Predict2 with its text adapter in the same file): self-attention baked as
`[dit.self]`, text cross-attention as `[dit.cross]`, both shown equal to run-time hooks on the real
`CosmosTransformer3DModel`. The original names are checked by diffusers' own Cosmos converter (under NVIDIA's `net.`
too); Anima's `llm_adapter` is left alone, byte for byte."""

import copy

import diffusers
import pytest
import torch
from diffusers.loaders.single_file_utils import convert_cosmos_transformer_checkpoint_to_diffusers
from safetensors.torch import load_file, save_file

from _dit import compare, dequantised, gguf_state, recipe, run
from _helpers import load_strict
from ckptbend.bake import bake
from ckptbend.gguf_io import is_gguf
from ckptbend.errors import CkptbendError
from ckptbend.layouts import blocks_with_attention, detect
from ckptbend.synth import cosmos as C
from ckptbend.synth import dit

pytestmark = pytest.mark.usefixtures("one_thread_no_grad")
CONFIG = C.CONFIGS["cosmos_predict2"]
HOOK = {"q": "norm_q", "k": "norm_k", "v": "to_v", "out": "to_out.0"}
FACTORS = {"q": 1.6, "k": 0.7, "v": 1.8, "out": 0.6}
PREFIX = ("model.diffusion_model.", "net.")


@pytest.fixture(scope="module")
def model():
    return dit.build(C.FAMILY, "cosmos_predict2")


def load(path, layout):
    fresh = diffusers.CosmosTransformer3DModel(**CONFIG).eval()
    if layout == "diffusers":
        return load_strict(fresh, load_file(next((path / "transformer").glob("*.safetensors")))).double()
    read = gguf_state if is_gguf(path) else dequantised
    state = {k: v.float() for k, v in read(path).items() if not k.startswith(("text_encoders.", "vae."))}
    state = {k.removeprefix(PREFIX[0]): v for k, v in state.items() if "llm_adapter." not in k}
    if layout != "transformer_diffusers":
        state = convert_cosmos_transformer_checkpoint_to_diffusers(state)
    return load_strict(fresh, state).double()


def forward(m):
    g = torch.Generator().manual_seed(7)
    return m(hidden_states=torch.randn(1, 4, 2, 4, 4, generator=g, dtype=torch.float64),
             timestep=torch.tensor([0.5], dtype=torch.float64),
             encoder_hidden_states=torch.randn(1, 5, 24, generator=g, dtype=torch.float64), return_dict=False)[0]


def hooked(m, attn, factors, blocks=(0, 1)):
    m = copy.deepcopy(m).double()
    for proj, f in factors.items():
        for b in blocks:
            m.get_submodule(f"transformer_blocks.{b}.{attn}.{HOOK[proj]}").register_forward_hook(
                lambda mod, a, out, f=f: out * f)
    return m


def body(section, factors, blocks=None):
    select = f'blocks = {blocks}\n'.replace("'", '"') if blocks else ""
    return f"[{section}]\n{select}" + "".join(f"{p} = {f}\n" for p, f in factors.items())


def test_original_names_are_diffusers_converters(model):
    state = model.state_dict()
    for prefix in ("", "net."):
        back = convert_cosmos_transformer_checkpoint_to_diffusers({prefix + k: v for k, v in C.to_original(state).items()})
        assert set(back) == set(state) and all(torch.equal(back[k], v) for k, v in state.items())


@pytest.mark.parametrize("arch,layout", [("cosmos_predict2", lay) for lay in
                                         ("single", "single_prefixed", "comfy", "transformer_diffusers", "diffusers")]
                         + [("anima", lay) for lay in ("single", "single_prefixed", "comfy")])
def test_named_and_blocks_found(synth_file, arch, layout):
    ckpt = detect(synth_file(arch, layout))
    assert ckpt.architecture == arch.replace("_", "-") and blocks_with_attention(ckpt) == ["B00", "B01"]
    assert {(s.attn, s.proj, s.stream) for s in ckpt.sites if s.block == "B01"} == {
        (a, p, None) for a in ("self", "cross") for p in FACTORS}
    assert not any("llm_adapter" in s.key for s in ckpt.sites)


@pytest.mark.parametrize("arch,layout", [("cosmos_predict2", "single"), ("cosmos_predict2", "transformer_diffusers"),
                                         ("cosmos_predict2", "diffusers"), ("anima", "single_prefixed")])
@pytest.mark.parametrize("section,attn", [("dit.self", "attn1"), ("dit.cross", "attn2")])
def test_bake_equals_runtime_multiplication(tmp_path, synth_file, model, arch, layout, section, attn):
    src = synth_file(arch, layout)
    out = tmp_path / ("out" if layout == "diffusers" else "out.safetensors")
    bake(recipe(body(section, FACTORS)), src, out, durable=False)
    compare(forward(load(out, layout)), forward(hooked(model, attn, FACTORS)), forward(copy.deepcopy(model).double()))
    if arch == "anima":
        before, after = load_file(str(src)), load_file(str(out))
        assert all(torch.equal(before[k], after[k]) for k in before if "llm_adapter." in k)


@pytest.mark.parametrize("proj", list(FACTORS))
def test_each_factor_alone_on_one_block(tmp_path, synth_file, model, proj):
    out = tmp_path / "out.safetensors"
    bake(recipe(body("dit.cross", {proj: FACTORS[proj]}, ["B01"])), synth_file("cosmos_predict2"), out, durable=False)
    compare(forward(load(out, "single")), forward(hooked(model, "attn2", {proj: FACTORS[proj]}, blocks=(1,))),
            forward(copy.deepcopy(model).double()))


def test_nvidia_net_prefix_and_scaled_fp8(tmp_path, synth_file, model):
    state = load_file(synth_file("cosmos_predict2"))
    save_file({"net." + k: v for k, v in state.items()}, tmp_path / "net.safetensors")
    assert detect(tmp_path / "net.safetensors").architecture == "cosmos-predict2"
    out = tmp_path / "out.safetensors"
    bake(recipe(body("dit.self", FACTORS)), tmp_path / "net.safetensors", out, durable=False)
    baked = {k.removeprefix("net."): v for k, v in load_file(str(out)).items()}
    save_file(baked, tmp_path / "bare.safetensors")
    compare(forward(load(tmp_path / "bare.safetensors", "single")), forward(hooked(model, "attn1", FACTORS)),
            forward(copy.deepcopy(model).double()))
    src = synth_file("cosmos_predict2", "single_prefixed", "scaled_fp8")
    bake(recipe(body("dit.cross", {"v": 0.5, "out": 0.5})), src, tmp_path / "q.safetensors", durable=False)
    plain = load(src, "single_prefixed")
    compare(forward(load(tmp_path / "q.safetensors", "single_prefixed")),
            forward(hooked(plain, "attn2", {"v": 0.5, "out": 0.5})), forward(plain), rtol=1e-4)


def test_cosmos1_and_unknown_parts_are_refused(tmp_path, synth_file):
    save_file({"net.blocks.block0.blocks.0.block.attn.to_q.0.weight": torch.zeros(2, 2)}, tmp_path / "c1.safetensors")
    with pytest.raises(CkptbendError, match="Cosmos 1.0"):
        detect(tmp_path / "c1.safetensors")
    state = load_file(synth_file("cosmos_predict2"))
    state["blocks.0.cross_attn.k_img.weight"] = torch.zeros(32, 32)
    save_file(state, tmp_path / "img.safetensors")
    with pytest.raises(CkptbendError, match="Cosmos Predict2 with a part ckptbend does not know"):
        detect(tmp_path / "img.safetensors")
    r = run("inspect", synth_file("anima", "comfy"))
    assert r.returncode == 0 and "architecture: anima" in r.stdout and "B01" in r.stdout


@pytest.mark.parametrize("arch", ["cosmos_predict2", "anima"])
def test_comfyui_gguf(tmp_path, synth_file, arch):
    """ComfyUI-GGUF's `cosmos` files (Predict2 and Anima); × 0.5 on Q8_0's fp16 scales is exact."""
    src = synth_file(arch, "single", "q8_0")
    assert detect(src).architecture == arch.replace("_", "-")
    bake(recipe(body("dit.cross", {"v": 0.5, "out": 0.5})), src, tmp_path / "q.gguf", durable=False)
    plain = load(src, "single")
    compare(forward(load(tmp_path / "q.gguf", "single")), forward(hooked(plain, "attn2", {"v": 0.5, "out": 0.5})),
            forward(plain))


def test_predict25_named_by_its_text_projection_and_image_context_refused(tmp_path):
    """Predict2.5 adds `crossattn_proj` (Cosmos-Reason1 features → text width); Transfer2.5's image context
    (`q_img`, `k_img`, `v_img`) has no rule here and its folder is refused."""
    config = dict(CONFIG, use_crossattn_projection=True, crossattn_proj_in_channels=40, encoder_hidden_states_channels=24)
    model = diffusers.CosmosTransformer3DModel(**config)
    save_file(C.to_original(model.state_dict()), tmp_path / "p25.safetensors")
    assert detect(tmp_path / "p25.safetensors").architecture == "cosmos-predict2.5"
    folder = tmp_path / "folder"
    image = diffusers.CosmosTransformer3DModel(**dict(CONFIG, img_context_dim_in=8, img_context_dim_out=32))
    image.save_config(folder / "transformer")
    save_file(image.state_dict(), folder / "transformer" / "diffusion_pytorch_model.safetensors")
    with pytest.raises(CkptbendError, match="image-context"):
        detect(folder)
