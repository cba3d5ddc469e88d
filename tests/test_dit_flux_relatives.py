"""Chroma1-HD, Chroma Radiance, and the Flux-style models ckptbend does not know.

Chroma1-HD is Chroma's layout (diffusers' Chroma single-file default). Chroma Radiance is Chroma's double and
single blocks (ComfyUI's ChromaRadiance builds them from Chroma's own classes) in pixel space: `img_in_patch`
for `img_in` and a NeRF-style MLP head (`nerf_*`, no attention) for `final_layer`. No diffusers class exists
for it, so its bake is proved through Chroma's: the same blocks get the same bytes, which
tests/test_dit_flux.py shows equal the run-time multiply on the real ChromaTransformer2DModel, and the
pixel-space parts are never touched. LongCat-Image (no pooled-text input) and Ovis-Image (a SwiGLU MLP) are
named as themselves (their bakes: tests/test_dit_longcat_ovis.py), never taken for Flux.1; other Flux-style
files, or a Flux-style file whose fused tensors disagree with its MLP, are refused in one line."""

import pytest
import torch
from diffusers import LongCatImageTransformer2DModel, OvisImageTransformer2DModel
from diffusers.loaders.single_file_utils import DIFFUSERS_DEFAULT_PIPELINE_PATHS, infer_diffusers_model_type
from safetensors.torch import load_file, save_file

from _dit import recipe, run
from ckptbend.bake import bake
from ckptbend.errors import CkptbendError
from ckptbend.layouts import detect
from ckptbend.synth.flux_names import radiance_shapes

BODY = '[dit.joint]\nq = 1.3\nk = 0.8\nv = 1.4\nout = 0.7\n'
PIXEL_PARTS = ("img_in_patch.", "nerf_")


def test_chroma1_hd_is_the_chroma_layout(synth_file):
    assert DIFFUSERS_DEFAULT_PIPELINE_PATHS["chroma"]["pretrained_model_name_or_path"] == "lodestones/Chroma1-HD"
    path = synth_file("chroma")
    assert infer_diffusers_model_type(load_file(str(path))) == "chroma" and detect(path).architecture == "chroma"


@pytest.mark.parametrize("layout", ["single", "comfy"])
def test_radiance_is_named_and_bakes_its_blocks_as_chroma(synth_file, tmp_path, layout):
    radiance, chroma = synth_file("chroma_radiance", layout), synth_file("chroma", layout)
    r, c = detect(radiance), detect(chroma)
    assert (r.architecture, c.architecture) == ("chroma-radiance", "chroma")
    assert [(s.key, s.proj, s.rows, s.cols, s.stream) for s in r.sites] == \
        [(s.key, s.proj, s.rows, s.cols, s.stream) for s in c.sites]
    outs = {}
    for name, src in (("r", radiance), ("c", chroma)):
        outs[name] = tmp_path / f"{name}.safetensors"
        bake(recipe(BODY), src, outs[name], progress=False)
    before, after, chroma_after = load_file(str(radiance)), load_file(str(outs["r"])), load_file(str(outs["c"]))
    blocks = [k for k in after if k.removeprefix("model.diffusion_model.").startswith(("double_blocks.", "single_blocks."))]
    assert blocks and all(torch.equal(after[k], chroma_after[k]) for k in blocks)   # the same blocks, the same bake
    assert any(not torch.equal(after[k], before[k]) for k in blocks)
    pixel = [k for k in before if k.removeprefix("model.diffusion_model.").startswith(PIXEL_PARTS)]
    assert pixel and all(torch.equal(after[k], before[k]) for k in pixel)


def test_radiance_inspect_and_a_chroma_recipe_apply(synth_file, tmp_path):
    out = run("inspect", synth_file("chroma_radiance")).stdout
    assert "architecture: chroma-radiance" in out and "S01   joint qk-norm" in out
    (tmp_path / "r.toml").write_text('schema = 1\nname = "r"\narchitecture = "chroma"\n' + BODY)
    r = run("bake", tmp_path / "r.toml", synth_file("chroma_radiance"), "-o", tmp_path / "o.safetensors", "--dry-run")
    assert r.returncode == 0, r.stderr
    (tmp_path / "f.toml").write_text('schema = 1\nname = "f"\narchitecture = "flux"\n' + BODY)
    r = run("bake", tmp_path / "f.toml", synth_file("chroma_radiance"), "-o", tmp_path / "o.safetensors", "--dry-run")
    assert r.returncode == 2 and "is written for flux" in r.stderr


def test_radiance_pixel_parts_have_comfyuis_released_shapes():
    """At the released size (h 3072, patch 16, NeRF width 64, ratio 4, 4 blocks, 8 frequencies) the shapes are
    those of ComfyUI's ChromaRadiance state dict (read from the class built at full size)."""
    shapes = radiance_shapes(3072, patch=16, width=64, ratio=4, depth=4, freqs=8, channels=3)
    assert shapes["img_in_patch.weight"] == (3072, 3, 16, 16)
    assert shapes["nerf_image_embedder.embedder.0.weight"] == (64, 67)
    assert shapes["nerf_blocks.3.param_generator.weight"] == (49152, 3072)
    assert shapes["nerf_final_layer_conv.conv.weight"] == (3, 64, 3, 3)
    assert len(shapes) == 7 + 4 * 3


def _refused(tmp_path, state, match):
    path = tmp_path / "m.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    with pytest.raises(CkptbendError, match=match) as e:
        detect(path)
    assert "\n" not in e.value.message
    r = run("inspect", path)
    assert r.returncode != 0 and "refusing rather than guessing" in r.stderr


def test_flux_style_files_that_are_neither_flux1_nor_longcat_are_refused(synth_file, tmp_path):
    state = load_file(str(synth_file("flux_dev")))
    no_pooled = {k: v for k, v in state.items() if not k.startswith("vector_in.")}   # a guidance input: not LongCat
    _refused(tmp_path, no_pooled, "Flux-style double/single blocks.*no pooled-text input, yet not LongCat-Image")
    assert detect(synth_file("flux_schnell")).architecture == "flux-schnell"   # LongCat's row never takes Flux.1


def test_ovis_mlp_names_on_flux1s_ungated_tensors_are_refused(synth_file, tmp_path):
    """Ovis-Image's MLP name on Flux.1's single blocks (linear1 q|k|v + M rows, not 2M): the fused lengths
    disagree, so the bake refuses in one line rather than cutting the wrong rows."""
    state = load_file(str(synth_file("flux_dev")))
    path = tmp_path / "m.safetensors"
    save_file({k.replace("img_mlp.0.", "img_mlp.gate_proj."): v for k, v in state.items()}, str(path))
    (tmp_path / "r.toml").write_text('schema = 1\nname = "r"\n[dit.joint]\nv = 1.5\n')
    r = run("bake", tmp_path / "r.toml", path, "-o", tmp_path / "o.safetensors")
    assert r.returncode == 2 and "linear1" in r.stderr and "not a layout ckptbend understands" in r.stderr
    assert "\n" not in r.stderr.strip()


@pytest.mark.parametrize("cls,kwargs,name", [
    (LongCatImageTransformer2DModel, dict(in_channels=8, num_layers=1, num_single_layers=1, attention_head_dim=16,
                                          num_attention_heads=2, joint_attention_dim=24, pooled_projection_dim=24,
                                          axes_dims_rope=[4, 6, 6]), "longcat-image"),
    (OvisImageTransformer2DModel, dict(in_channels=8, out_channels=8, num_layers=1, num_single_layers=1,
                                       attention_head_dim=16, num_attention_heads=2, joint_attention_dim=24,
                                       axes_dims_rope=(4, 6, 6)), "ovis-image"),
])
def test_diffusers_named_flux_derivatives_are_named(tmp_path, cls, kwargs, name):
    torch.manual_seed(0)
    path = tmp_path / "m.safetensors"
    save_file({k: v.contiguous() for k, v in cls(**kwargs).state_dict().items()}, str(path))
    assert detect(path).architecture == name
