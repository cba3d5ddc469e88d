"""HunyuanVideo 1.5: named (no longer taken for HunyuanVideo), its double blocks found in every naming, and bakes
shown equal to run-time hooks on the real `HunyuanVideo15Transformer3DModel`.

diffusers 0.42.1 has no single-file converter for 1.5, but its blocks, refiner and final layer are HunyuanVideo's:
the original-named files here are the diffusers state dict in HunyuanVideo's Tencent names (synth.flux_names), which
diffusers' own HunyuanVideo converter turns back into exactly the 1.5 state dict (checked below); the parts 1.5 adds
(ByT5 and image projections, time embedding) keep their diffusers names, the cond-type embedding ComfyUI's
detection name. ComfyUI's Flux-style names and Tencent's split q/k/v (`img_attn_q/k/v`) are derived from those."""

import copy

import diffusers
import pytest
import torch
from diffusers.loaders.single_file_utils import convert_hunyuan_video_transformer_to_diffusers
from safetensors.torch import load_file, save_file

from _dit import compare, recipe, run
from _helpers import load_strict
from ckptbend.bake import bake
from ckptbend.layouts import blocks_with_attention, detect
from ckptbend.synth import dit
from ckptbend.synth import hunyuan_video15 as H
from ckptbend.synth.flux_names import comfy_hunyuan_name, hunyuan_to_original

pytestmark = pytest.mark.usefixtures("one_thread_no_grad")
ARCH = "hunyuan_video15"
COND = ("cond_type_embed.weight", "cond_type_embedding.weight")       # diffusers' name, ComfyUI's detection key
HOOK = {("image", "q"): "norm_q", ("image", "k"): "norm_k", ("image", "v"): "to_v", ("image", "out"): "to_out.0",
        ("text", "q"): "norm_added_q", ("text", "k"): "norm_added_k", ("text", "v"): "add_v_proj",
        ("text", "out"): "to_add_out"}
FACTORS = {("image", "q"): 1.6, ("image", "k"): 0.7, ("image", "v"): 1.8, ("image", "out"): 0.6,
           ("text", "q"): 1.3, ("text", "k"): 0.8, ("text", "v"): 1.4, ("text", "out"): 0.75}


@pytest.fixture(scope="module")
def model():
    return dit.build(H.FAMILY, ARCH)


def tencent(state):
    """The diffusers state dict in HunyuanVideo's Tencent names, the parts 1.5 adds as said above."""
    out = hunyuan_to_original(state)
    taken = {id(v) for v in out.values()}
    rest = {k: v for k, v in state.items() if id(v) not in taken and not k.startswith(
        ("transformer_blocks.", "context_embedder.token_refiner.refiner_blocks.", "norm_out.linear."))}
    out.update({COND[1] if k == COND[0] else k: v for k, v in rest.items()})
    return out


def split_qkv(state):
    """Tencent's split projections: `img_attn_qkv` → `img_attn_q`, `_k`, `_v` (likewise txt)."""
    out = {}
    for k, v in state.items():
        if "_attn_qkv." in k and k.startswith("double_blocks."):
            for part, chunk in zip("qkv", v.chunk(3)):
                out[k.replace("_attn_qkv.", f"_attn_{part}.")] = chunk
        else:
            out[k] = v
    return out


def join_qkv(state):
    out = dict(state)
    for k in [k for k in state if "_attn_q." in k and k.startswith("double_blocks.")]:
        out[k.replace("_attn_q.", "_attn_qkv.")] = torch.cat([out.pop(k.replace("_attn_q.", f"_attn_{p}."))
                                                             for p in "qkv"])
    return out


COMFY_PREFIX = "model.model."   # ComfyUI saves HunyuanVideo under model.model. with its Flux-style names
NAMINGS = {
    "tencent": (lambda s: s, lambda s: s),
    "tencent15": (split_qkv, join_qkv),
    "comfy": (lambda s: {COMFY_PREFIX + comfy_hunyuan_name(k): v for k, v in s.items()}, None),
}


@pytest.fixture(scope="module")
def files(tmp_path_factory, model, synth_file):
    root, made = tmp_path_factory.mktemp("hy15"), {}
    base = tencent(model.state_dict())
    for naming, (write, _) in NAMINGS.items():
        save_file({k: v.contiguous() for k, v in write(base).items()}, root / f"{naming}.safetensors")
        made[naming] = root / f"{naming}.safetensors"
    made["transformer_diffusers"] = synth_file(ARCH, "transformer_diffusers")
    made["diffusers"] = synth_file(ARCH, "diffusers")
    return made


def load(path, naming, model):
    """A (baked) file back into a fresh float64 model of the real class, through diffusers' converter."""
    fresh = diffusers.HunyuanVideo15Transformer3DModel(**H.CONFIGS[ARCH]).eval()
    if naming == "diffusers":
        return load_strict(fresh, load_file(next((path / "transformer").glob("*.safetensors")))).double()
    state = load_file(path)
    if naming != "transformer_diffusers":
        if naming == "comfy":
            names = {COMFY_PREFIX + comfy_hunyuan_name(k): k for k in tencent(model.state_dict())}
            state = {names[k]: v for k, v in state.items()}
        elif naming == "tencent15":
            state = join_qkv(state)
        state = convert_hunyuan_video_transformer_to_diffusers(state)
        state = {COND[0] if k == COND[1] else k: v for k, v in state.items()}
    return load_strict(fresh, state).double()


def forward(m):
    g = torch.Generator().manual_seed(5)

    def r(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64)
    return m(hidden_states=r(1, 4, 2, 4, 4), timestep=torch.tensor([300.0], dtype=torch.float64),
             encoder_hidden_states=r(1, 5, 24), encoder_attention_mask=torch.ones(1, 5),
             encoder_hidden_states_2=r(1, 3, 20), encoder_attention_mask_2=torch.ones(1, 3), image_embeds=r(1, 4, 12),
             return_dict=False)[0]


def hooked(m, factors):
    m = copy.deepcopy(m).double()
    for key, f in factors.items():
        for b in (0, 1):
            m.get_submodule(f"transformer_blocks.{b}.attn.{HOOK[key]}").register_forward_hook(
                lambda mod, a, out, f=f: out * f)
    return m


def test_the_tencent_names_are_diffusers_hunyuanvideo_converters(model):
    back = convert_hunyuan_video_transformer_to_diffusers(tencent(model.state_dict()))
    back = {COND[0] if k == COND[1] else k: v for k, v in back.items()}
    assert set(back) == set(model.state_dict())
    assert all(torch.equal(back[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize("naming", ["tencent", "tencent15", "comfy", "transformer_diffusers", "diffusers"])
def test_named_and_every_block_found(files, model, naming):
    ckpt = detect(files[naming])
    assert ckpt.architecture == "hunyuan-video-1.5"
    assert blocks_with_attention(ckpt) == ["D00", "D01"]
    assert {(s.stream, s.proj) for s in ckpt.sites if s.block == "D01"} == set(FACTORS)
    assert all(not s.rows for s in ckpt.sites) if naming == "tencent15" else True   # v: img_attn_v whole
    loaded = load(files[naming], naming, model).float().state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize("naming", ["tencent", "tencent15", "comfy", "transformer_diffusers", "diffusers"])
def test_bake_equals_runtime_multiplication(tmp_path, files, model, naming):
    body = "".join(f'[[dit.joint]]\nstream = "{s}"\n{p} = {f}\n' for (s, p), f in FACTORS.items())
    out = tmp_path / ("out" if naming == "diffusers" else "out.safetensors")
    bake(recipe(body), files[naming], out, durable=False)
    compare(forward(load(out, naming, model)), forward(hooked(model, FACTORS)), forward(copy.deepcopy(model).double()))


def test_inspect_and_synth(files):
    r = run("inspect", files["comfy"])
    assert r.returncode == 0 and "architecture: hunyuan-video-1.5" in r.stdout and "D01" in r.stdout
    r = run("synth", ARCH, files["comfy"].parent / "x.safetensors")
    assert r.returncode == 2 and "has no layout 'single'" in r.stderr
