"""MiniMax H3: one self-attention over packed text + video + audio rows per block, baked as `[dit.joint]` and shown
equal to run-time hooks on the real `MiniMaxH3Transformer3DModel`; the published single-file names are checked by
diffusers' own converter (the `[q; k; v]` stack), the text token refiner is left alone."""

import copy

import diffusers
import pytest
import torch
from diffusers.loaders.single_file_utils import convert_minimax_h3_transformer_checkpoint_to_diffusers
from safetensors.torch import load_file

from _dit import compare, dequantised, recipe, run
from _helpers import load_strict
from ckptbend.bake import bake
from ckptbend.layouts import blocks_with_attention, detect
from ckptbend.synth import dit
from ckptbend.synth import minimax_h3 as M

pytestmark = pytest.mark.usefixtures("one_thread_no_grad")
ARCH = "minimax_h3"
CONFIG = M.CONFIGS[ARCH]
HOOK = {"q": "norm_q", "k": "norm_k", "v": "to_v", "out": "to_out.0"}
FACTORS = {"q": 1.6, "k": 0.7, "v": 1.8, "out": 0.6}


@pytest.fixture(scope="module")
def model():
    return dit.build(M.FAMILY, ARCH)


def load(path, layout):
    fresh = diffusers.MiniMaxH3Transformer3DModel(**CONFIG).eval()
    if layout == "diffusers":
        return load_strict(fresh, load_file(next((path / "transformer").glob("*.safetensors")))).double()
    state = {k.removeprefix("model.diffusion_model."): v.float() for k, v in dequantised(path).items()}
    if layout != "transformer_diffusers":
        state = convert_minimax_h3_transformer_checkpoint_to_diffusers(state, config=CONFIG)
    return load_strict(fresh, state).double()


def forward(m):
    g = torch.Generator().manual_seed(6)

    def r(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64)
    text, video, audio = 4, 8, 3                      # packed as [text; video; audio]
    n = text + video + audio
    tags = torch.tensor([1] * text + [0] * video + [2] * audio)
    pos = torch.stack([torch.arange(n) % 2, torch.arange(n) % 3, torch.arange(n) % 4], dim=-1)
    return torch.cat([o.flatten() for o in m(
        hidden_states=r(1, video, 16), audio_hidden_states=r(1, audio, 6), encoder_hidden_states=r(1, text, 20),
        timestep=torch.tensor([0.4], dtype=torch.float64), timestep_indices=torch.zeros(n, dtype=torch.long),
        token_tags=tags, position_ids=pos, video_indices=torch.arange(text, text + video),
        audio_indices=torch.arange(text + video, n), text_indices=torch.arange(text), return_dict=False)])


def hooked(m, factors, blocks=(0, 1)):
    m = copy.deepcopy(m).double()
    for proj, f in factors.items():
        for b in blocks:
            m.get_submodule(f"transformer_blocks.{b}.attn.{HOOK[proj]}").register_forward_hook(
                lambda mod, a, out, f=f: out * f)
    return m


def test_single_file_names_are_diffusers_converters(model):
    back = convert_minimax_h3_transformer_checkpoint_to_diffusers(M.to_original(model.state_dict()), config=CONFIG)
    assert set(back) == set(model.state_dict())
    assert all(torch.equal(back[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize("layout", ["single", "single_prefixed", "transformer_diffusers", "diffusers"])
def test_named_and_blocks_found(synth_file, model, layout):
    ckpt = detect(synth_file(ARCH, layout))
    assert ckpt.architecture == "minimax-h3" and blocks_with_attention(ckpt) == ["B00", "B01"]
    assert {(s.attn, s.proj, s.stream) for s in ckpt.sites if s.block == "B01"} == {
        ("joint", p, None) for p in FACTORS}
    assert not any("refiner" in s.key for s in ckpt.sites)
    notes = [n.split(" (")[0].split(" ", 1)[1] for n in ckpt.left_alone]
    assert notes == ["tensors of MiniMax H3's text token refiner"]


@pytest.mark.parametrize("layout", ["single_prefixed", "transformer_diffusers", "diffusers"])
def test_bake_equals_runtime_multiplication(tmp_path, synth_file, model, layout):
    out = tmp_path / ("out" if layout == "diffusers" else "out.safetensors")
    bake(recipe("[dit.joint]\n" + "".join(f"{p} = {f}\n" for p, f in FACTORS.items())), synth_file(ARCH, layout),
         out, durable=False)
    compare(forward(load(out, layout)), forward(hooked(model, FACTORS)), forward(copy.deepcopy(model).double()))


@pytest.mark.parametrize("proj", list(FACTORS))
def test_each_factor_alone_on_one_block(tmp_path, synth_file, model, proj):
    out = tmp_path / "out.safetensors"
    bake(recipe(f'[dit.joint]\nblocks = ["B01"]\n{proj} = {FACTORS[proj]}\n'), synth_file(ARCH), out, durable=False)
    compare(forward(load(out, "single")), forward(hooked(model, {proj: FACTORS[proj]}, blocks=(1,))),
            forward(copy.deepcopy(model).double()))


def test_a_vsa_file_is_refused(tmp_path, synth_file):
    """ComfyUI knows VSA-trained H3 files by `attn.to_gate_compress`; diffusers has no such branch to prove a
    rule on."""
    from safetensors.torch import save_file

    from ckptbend.errors import CkptbendError
    state = load_file(synth_file(ARCH))
    state["blocks.0.attn.to_gate_compress.weight"] = torch.zeros(2, 24)
    save_file(state, tmp_path / "vsa.safetensors")
    with pytest.raises(CkptbendError, match="MiniMax H3 with a part ckptbend does not know"):
        detect(tmp_path / "vsa.safetensors")


def test_inspect_and_a_stream_matches_nothing(tmp_path, synth_file):
    r = run("inspect", synth_file(ARCH, "single_prefixed"))
    assert r.returncode == 0 and "architecture: minimax-h3" in r.stdout and "B01   joint" in r.stdout
    (tmp_path / "r.toml").write_text('schema = 1\nname = "r"\n[dit.joint]\nstream = "image"\nv = 1.5\n')
    r = run("bake", tmp_path / "r.toml", synth_file(ARCH), "-o", tmp_path / "o.safetensors")
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1
