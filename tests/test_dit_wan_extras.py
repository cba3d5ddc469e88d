"""Wan 2.2's extras: VACE's `vace_blocks` (self-attention over the control video and cross-attention to the text)
baked by the Wan rule and proven against the real `WanVACETransformer3DModel`; Animate 2's wrapped blocks found and
named (checked against diffusers' own converter) and baked by the Wan rule (shown on each attention module of the
real `WanAnimate2Transformer3DModel`: its full generation pass needs compiled flex attention); Fun Control and camera
models named; and every Wan file with a part ckptbend does not know (S2V, HuMo, Animate 1, ...) refused in one line
instead of baked as plain Wan."""

import copy

import diffusers
import pytest
import torch
from diffusers.loaders.single_file_utils import (convert_wan_animate_2_transformer_to_diffusers,
                                                 convert_wan_transformer_to_diffusers)
from safetensors.torch import load_file, save_file

from _dit import compare, recipe, run
from _helpers import load_strict
from ckptbend.bake import bake
from ckptbend.errors import CkptbendError
from ckptbend.layouts import blocks_with_attention, detect
from ckptbend.synth import wan as W

pytestmark = pytest.mark.usefixtures("one_thread_no_grad")
FACTORS = {("self", "q"): 1.7, ("self", "k"): 0.6, ("self", "v"): 1.9, ("self", "out"): 0.55,
           ("cross", "q"): 1.3, ("cross", "k"): 0.8, ("cross", "v"): 1.4, ("cross", "out"): 0.7}
HOOK = {"q": "norm_q", "k": "norm_k", "v": "to_v", "out": "to_out.0"}


@pytest.fixture(scope="module")
def vace():
    return W.build_models("wan_vace")["dit"]


def load(path, layout):
    model = diffusers.WanVACETransformer3DModel(**W.ARCHES["wan_vace"][1]).eval()
    if layout == "diffusers":
        state = load_file(next((path / "transformer").glob("*.safetensors")))
    else:
        state = {k: v for k, v in load_file(path).items() if not k.startswith("text_encoders.")}
        state = state if layout == "transformer_diffusers" else convert_wan_transformer_to_diffusers(state)
    return load_strict(model, state).double()


def forward(model):
    g = torch.Generator().manual_seed(3)

    def r(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64)
    return model(hidden_states=r(1, 4, 2, 4, 4), timestep=torch.tensor([0.3], dtype=torch.float64),
                 encoder_hidden_states=r(1, 5, 24), control_hidden_states=r(1, 8, 2, 4, 4), return_dict=False)[0]


def hooked(model, factors, where=("blocks", "vace_blocks")):
    m = copy.deepcopy(model).double()
    for (attn, proj), f in factors.items():
        for container in where:
            for b in (0, 1):
                name = f"{container}.{b}.{'attn1' if attn == 'self' else 'attn2'}.{HOOK[proj]}"
                m.get_submodule(name).register_forward_hook(lambda mod, a, out, f=f: out * f)
    return m


def body(factors, extra=""):
    return "".join(f"[dit.{a}]\n{extra}" + "".join(f"{p} = {f}\n" for (a2, p), f in factors.items() if a2 == a)
                   for a in ("self", "cross"))


@pytest.mark.parametrize("layout", ["single", "comfy", "transformer_diffusers", "diffusers"])
def test_vace_layouts_load_strict_and_are_named(synth_file, vace, layout):
    path = synth_file("wan_vace", layout)
    loaded = load(path, layout).float().state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in vace.state_dict().items())
    ckpt = detect(path)
    assert ckpt.architecture == "wan-vace"
    assert blocks_with_attention(ckpt) == ["B00", "B01", "V00", "V01"]
    vace_sites = {(s.attn, s.proj) for s in ckpt.sites if s.block == "V01"}
    assert vace_sites == set(FACTORS)          # the VACE blocks are no longer left alone


@pytest.mark.parametrize("layout", ["single", "diffusers"])
def test_vace_bake_equals_runtime_multiplication(tmp_path, synth_file, vace, layout):
    out = tmp_path / "out"
    bake(recipe(body(FACTORS)), synth_file("wan_vace", layout), out, durable=False)
    compare(forward(load(out, layout)), forward(hooked(vace, FACTORS)), forward(copy.deepcopy(vace).double()))


def test_vace_group_selects_only_the_vace_blocks(tmp_path, synth_file, vace):
    out = tmp_path / "out.safetensors"
    factors = {("cross", "k"): 1.6, ("cross", "v"): 0.7, ("self", "q"): 1.4}
    bake(recipe(body(factors, 'blocks = ["vace"]\n')), synth_file("wan_vace"), out, durable=False)
    compare(forward(load(out, "single")), forward(hooked(vace, factors, where=("vace_blocks",))),
            forward(copy.deepcopy(vace).double()))
    r = run("inspect", synth_file("wan_vace", "comfy"))
    assert "architecture: wan-vace" in r.stdout and "V01   cross self" in r.stdout


# --- Animate 2, Fun Control, camera: named, their blocks found --------------------------------------------------

def animate2_original(model):
    """Wan-AI's Animate 2 names: each block's modules inside `blocks.N.block.`, Wan's attention names."""
    names = {"to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "o", "add_k_proj": "k_img", "add_v_proj": "v_img",
             "norm_added_k": "norm_k_img"}
    out = {}
    for key, v in model.state_dict().items():
        if key.startswith("blocks."):
            i, rest = key.split(".", 2)[1:]
            for a, b in names.items():
                rest = rest.replace(f"_attn.{a}.", f"_attn.{b}.")
            key = f"blocks.{i}.block.{rest}"
        out[key] = v
    return out


def test_animate2_blocks_are_found_in_both_namings(tmp_path):
    model = diffusers.WanAnimate2Transformer3DModel(in_dim=8, dim=32, ffn_dim=48, freq_dim=32, text_dim=24, out_dim=4,
                                                    num_heads=2, num_layers=2)
    original = animate2_original(model)
    load_strict(diffusers.WanAnimate2Transformer3DModel.from_config(model.config),
                convert_wan_animate_2_transformer_to_diffusers(dict(original)))
    for name, state in (("orig", original), ("diff", model.state_dict())):
        save_file({k: v.contiguous() for k, v in state.items()}, tmp_path / f"{name}.safetensors")
        ckpt = detect(tmp_path / f"{name}.safetensors")
        assert ckpt.architecture == "wan-animate2" and blocks_with_attention(ckpt) == ["B00", "B01"]
        assert len([s for s in ckpt.sites if s.block == "B00"]) == 15   # as Wan I2V: 6 self, 9 cross tensors
    assert "blocks.1.block.cross_attn.norm_k_img.weight" in {s.key for s in detect(tmp_path / "orig.safetensors").sites}


@pytest.mark.parametrize("key, shape, name", [("ref_conv.weight", (32, 4, 2, 2), "wan22-fun-control"),
                                              ("control_adapter.conv.weight", (32, 64, 2, 2), "wan-camera")])
def test_input_adapters_without_attention_are_named(tmp_path, synth_file, key, shape, name):
    state = load_file(synth_file("wan21_t2v"))
    state[key] = torch.zeros(shape)
    save_file(state, tmp_path / "x.safetensors")
    ckpt = detect(tmp_path / "x.safetensors")
    assert ckpt.architecture == name and len(ckpt.sites) == len(detect(synth_file("wan21_t2v")).sites)


# --- what ckptbend does not know is refused -----------------------------------------------------------------

@pytest.mark.parametrize("key, what", [
    ("casual_audio_encoder.encoder.final_linear.weight", "Wan S2V"),
    ("face_adapter.fuser_blocks.0.k_norm.weight", "Wan-Animate"),
    ("audio_proj.audio_proj_glob_1.layer.bias", "Wan HuMo"),
    ("something_new.weight", "Wan"),
    ("vace_blocks.0.self_attn.to_qkv.weight", "Wan"),
    ("blocks.1.audio_cross_attn.q.weight", "Wan"),
])
def test_a_wan_file_with_an_unknown_part_is_refused(tmp_path, synth_file, key, what):
    state = {"model.diffusion_model." + k: v for k, v in load_file(synth_file("wan_vace")).items()}
    state["model.diffusion_model." + key] = torch.zeros(4)
    save_file(state, tmp_path / "x.safetensors")
    with pytest.raises(CkptbendError, match=f": {what} with a part ckptbend does not know "
                                            rf"\(model\.diffusion_model\.{key.replace('.', '.')}\)"):
        detect(tmp_path / "x.safetensors")
    r = run("inspect", tmp_path / "x.safetensors")
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1


def attention_outputs(model, hooks=None):
    """Every block's self-attention (Animate 2's dense reference pass, `kv_cache_mode="extract"`: its generation pass
    needs compiled flex attention) and cross-attention (text and CLIP image), on fixed inputs, in float64."""
    from diffusers.models.transformers.transformer_wan_animate_2 import WanAnimate2KVLayerCache

    m = copy.deepcopy(model).double()
    for (attn, proj), f in (hooks or {}).items():
        names = {"q": ["norm_q"], "k": ["norm_k"], "v": ["to_v"], "out": ["to_out.0"]}[proj]
        names += {("cross", "k"): ["norm_added_k"], ("cross", "v"): ["add_v_proj"]}.get((attn, proj), [])
        for b in (0, 1):
            for name in names:
                m.get_submodule(f"blocks.{b}.{attn}_attn.{name}").register_forward_hook(lambda mod, a, o, f=f: o * f)
    g = torch.Generator().manual_seed(8)
    x, text, image = (torch.randn(1, n, 32, generator=g, dtype=torch.float64) for n in (8, 5, 3))
    grid = torch.tensor([[2, 2, 2]])
    out = []
    for block in m.blocks:
        out.append(block.self_attn(x, rotary_emb=m._rope_freqs((0, 0, 0), x.device), grid_sizes=grid,
                                   kv_cache=WanAnimate2KVLayerCache(), kv_cache_mode="extract"))
        out.append(block.cross_attn(x, encoder_hidden_states=text, encoder_hidden_states_image=image))
    return torch.cat([o.flatten() for o in out])


def test_animate2_attentions_bake_by_the_wan_rule(tmp_path):
    model = diffusers.WanAnimate2Transformer3DModel(in_dim=8, dim=32, ffn_dim=48, freq_dim=32, text_dim=24, out_dim=4,
                                                    num_heads=2, num_layers=2).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():        # norm weights around 1, so q/k factors on them show
            p.copy_(0.5 + torch.rand(p.shape) if p.ndim == 1 and "norm" in name else torch.randn(p.shape) * 0.3)
    save_file({k: v.contiguous() for k, v in animate2_original(model).items()}, tmp_path / "a2.safetensors")
    bake(recipe(body(FACTORS)), tmp_path / "a2.safetensors", tmp_path / "out.safetensors", durable=False)
    baked = diffusers.WanAnimate2Transformer3DModel.from_config(model.config).eval()
    load_strict(baked, convert_wan_animate_2_transformer_to_diffusers(load_file(tmp_path / "out.safetensors")))
    with torch.no_grad():
        compare(attention_outputs(baked), attention_outputs(model, FACTORS), attention_outputs(model))
