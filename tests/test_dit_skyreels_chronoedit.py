"""SkyReels V2 and ChronoEdit: Wan blocks under other diffusers classes. SkyReels V2's diffusion-forcing files add an
fps embedding to the timestep modulation (no attention) and are named `skyreels-v2`; ChronoEdit has exactly Wan 2.1
I2V's keys. Both bake by the Wan rule, shown equal to run-time hooks on the real `SkyReelsV2Transformer3DModel` and
`ChronoEditTransformer3DModel`; their diffusers folders are named by class."""

import copy

import diffusers
import pytest
import torch
from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers
from safetensors.torch import load_file, save_file

from _dit import compare, recipe
from _helpers import load_strict
from ckptbend.bake import bake
from ckptbend.layouts import blocks_with_attention, detect
from ckptbend.synth import dit
from ckptbend.synth import wan as W

pytestmark = pytest.mark.usefixtures("one_thread_no_grad")
HOOK = {"q": "norm_q", "k": "norm_k", "v": "to_v", "out": "to_out.0"}
FACTORS = {("self", "q"): 1.7, ("self", "k"): 0.6, ("self", "v"): 1.9, ("self", "out"): 0.55,
           ("cross", "q"): 1.3, ("cross", "k"): 0.8, ("cross", "v"): 1.4, ("cross", "out"): 0.7}
SKY = W.ARCHES["skyreels_v2"][1]
CHRONO = W.ARCHES["wan21_i2v"][1]
# diffusers' Wan converter leaves SkyReels' `fps_projection.0/.2` (its nn.Sequential) as they are
FPS = {"fps_projection.0.": "fps_projection.net.0.proj.", "fps_projection.2.": "fps_projection.net.2."}


@pytest.fixture(scope="module")
def skyreels():
    return W.build_models("skyreels_v2")["dit"]


@pytest.fixture(scope="module")
def chrono():
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(3)
        model = diffusers.ChronoEditTransformer3DModel(**CHRONO).eval()
    dit.randomise(model, torch.Generator().manual_seed(4))
    return model


def load(cls, config, path, layout):
    model = cls(**config).eval()
    if layout == "diffusers":
        return load_strict(model, load_file(next((path / "transformer").glob("*.safetensors")))).double()
    state = {k.removeprefix("model.diffusion_model."): v for k, v in load_file(path).items()
             if not k.startswith(("text_encoders.", "vae."))}
    if layout != "transformer_diffusers":
        state = convert_wan_transformer_to_diffusers(state)
        for a, b in FPS.items():
            state = {k.replace(a, b): v for k, v in state.items()}
    return load_strict(model, state).double()


def forward(model, image=False):
    g = torch.Generator().manual_seed(5)

    def r(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64)
    extra = dict(encoder_hidden_states_image=r(1, 3, 20)) if image else dict(fps=[1])
    return model(hidden_states=r(1, CHRONO["in_channels"] if image else 4, 2, 4, 4),
                 timestep=torch.tensor([0.3], dtype=torch.float64), encoder_hidden_states=r(1, 5, 24),
                 return_dict=False, **extra)[0]


def hooked(model, factors):
    m = copy.deepcopy(model).double()
    for (attn, proj), f in factors.items():
        for b in (0, 1):
            name = f"blocks.{b}.{'attn1' if attn == 'self' else 'attn2'}.{HOOK[proj]}"
            m.get_submodule(name).register_forward_hook(lambda mod, a, out, f=f: out * f)
            if attn == "cross" and proj in ("k", "v") and m.blocks[b].attn2.add_k_proj is not None:   # image keys
                extra = {"k": "norm_added_k", "v": "add_v_proj"}[proj]
                m.get_submodule(f"blocks.{b}.attn2.{extra}").register_forward_hook(lambda mod, a, out, f=f: out * f)
    return m


def body(factors):
    return "".join(f"[dit.{a}]\n" + "".join(f"{p} = {f}\n" for (a2, p), f in factors.items() if a2 == a)
                   for a in ("self", "cross"))


@pytest.mark.parametrize("layout", ["single", "comfy", "transformer_diffusers", "diffusers"])
def test_skyreels_v2_is_named_and_bakes_by_the_wan_rule(tmp_path, synth_file, skyreels, layout):
    src = synth_file("skyreels_v2", layout)
    loaded = load(diffusers.SkyReelsV2Transformer3DModel, SKY, src, layout)
    assert all(torch.equal(loaded.state_dict()[k], v.double()) for k, v in skyreels.state_dict().items())
    ckpt = detect(src)
    assert ckpt.architecture == "skyreels-v2" and blocks_with_attention(ckpt) == ["B00", "B01"]
    out = tmp_path / ("out" if layout == "diffusers" else "out.safetensors")
    bake(recipe(body(FACTORS)), src, out, durable=False)
    compare(forward(load(diffusers.SkyReelsV2Transformer3DModel, SKY, out, layout)), forward(hooked(skyreels, FACTORS)),
            forward(copy.deepcopy(skyreels).double()))


def test_chronoedit_files_are_wan_i2v_and_bake_by_the_wan_rule(tmp_path, chrono):
    save_file({k: v.contiguous() for k, v in W.original_state_dict("wan21_i2v", chrono).items()},
              tmp_path / "chrono.safetensors")
    assert detect(tmp_path / "chrono.safetensors").architecture == "wan21-i2v"
    bake(recipe(body(FACTORS)), tmp_path / "chrono.safetensors", tmp_path / "out.safetensors", durable=False)
    compare(forward(load(diffusers.ChronoEditTransformer3DModel, CHRONO, tmp_path / "out.safetensors", "single"),
                    image=True),
            forward(hooked(chrono, FACTORS), image=True), forward(copy.deepcopy(chrono).double(), image=True))
    folder = tmp_path / "folder"
    chrono.save_config(folder / "transformer")
    save_file(chrono.state_dict(), folder / "transformer" / "diffusion_pytorch_model.safetensors")
    ckpt = detect(folder)
    assert ckpt.architecture == "chronoedit" and blocks_with_attention(ckpt) == ["B00", "B01"]
    bake(recipe(body(FACTORS)), folder, tmp_path / "baked", durable=False)
    compare(forward(load(diffusers.ChronoEditTransformer3DModel, CHRONO, tmp_path / "baked", "diffusers"), image=True),
            forward(hooked(chrono, FACTORS), image=True), forward(copy.deepcopy(chrono).double(), image=True))
