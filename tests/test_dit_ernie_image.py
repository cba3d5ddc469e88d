"""ERNIE-Image: layouts checked by diffusers' own single-file converter, and baked == run-time hooks on the
real `ErnieImageTransformer2DModel` (single-stream blocks over [image; text], per-head qk-norm, no biases)."""

import pytest
import torch
from diffusers import ErnieImageTransformer2DModel
from diffusers.loaders.single_file_utils import convert_ernie_image_transformer_checkpoint_to_diffusers
from safetensors.torch import load_file, save_file

from ckptbend.bake import bake
from ckptbend.layouts import detect
from ckptbend.synth import write_checkpoint
from ckptbend.synth.dit import MODEL_PREFIX, build
from ckptbend.synth.ernie_image import CONFIGS, FAMILY
from _dit import compare, dequantised, hook_outputs, load_strict, recipe, run

ARCH = "ernie_image"
LAYOUTS = ["single", "single_prefixed", "comfy", "transformer_diffusers"]
FACTORS = {"q": 1.7, "k": 0.6, "v": 1.9, "out": 0.55}
MODULE = {"q": "norm_q", "k": "norm_k", "v": "to_v", "out": "to_out.0"}


def to_diffusers(state: dict):
    state = convert_ernie_image_transformer_checkpoint_to_diffusers({k: v.double() for k, v in state.items()})
    return load_strict(ErnieImageTransformer2DModel(**CONFIGS[ARCH]).double(), state)


@torch.no_grad()
def forward(model):
    g = torch.Generator().manual_seed(3)
    return model(torch.randn(1, 8, 2, 4, generator=g, dtype=torch.float64), torch.tensor([0.4], dtype=torch.float64),
                 torch.randn(1, 5, 24, generator=g, dtype=torch.float64), torch.tensor([4]), return_dict=False)[0]


def models(path, layout, read):
    if layout == "diffusers":
        return ErnieImageTransformer2DModel.from_pretrained(path / "transformer").double().eval()
    return to_diffusers(read(path))


@pytest.mark.parametrize("layout", LAYOUTS)
def test_layout_maps_strict_to_the_real_class(tmp_path, layout):
    path = write_checkpoint(tmp_path / "m.safetensors", ARCH, layout)
    model = to_diffusers(load_file(str(path)))
    reference = build(FAMILY, ARCH).double().state_dict()
    assert all(torch.equal(model.state_dict()[k], reference[k]) for k in reference)
    assert detect(path).architecture == "ernie-image"


@pytest.mark.parametrize("layout, dtype", [(layout, None) for layout in LAYOUTS + ["diffusers"]] +
                         [("single_prefixed", "scaled_fp8")])
def test_bake_equals_run_time_hooks(tmp_path, layout, dtype):
    src = write_checkpoint(tmp_path / ("m" if layout == "diffusers" else "m.safetensors"), ARCH, layout, dtype=dtype)
    out = tmp_path / ("o" if layout == "diffusers" else "o.safetensors")
    read = load_file if dtype is None else (lambda p: {k: v for k, v in dequantised(p).items() if k.startswith(MODEL_PREFIX)})
    bake(recipe('[dit.joint]\nblocks = ["B01"]\n' + "".join(f"{k} = {v}\n" for k, v in FACTORS.items())), src, out,
         progress=False)
    plain, patched, baked = models(src, layout, read), models(src, layout, read), models(out, layout, read)
    hook_outputs(patched, {f"layers.1.self_attention.{MODULE[p]}": f for p, f in FACTORS.items()})
    compare(forward(baked), forward(patched), forward(plain), rtol=1e-5 if dtype is None else 2e-2)


def test_inspect_and_unknown_parts(tmp_path):
    path = write_checkpoint(tmp_path / "m.safetensors", ARCH)
    result = run("inspect", str(path))
    assert result.returncode == 0 and "ernie-image" in result.stdout and "B00   joint qk-norm" in result.stdout
    save_file({**load_file(str(path)), "refiner.0.weight": torch.ones(4)}, str(tmp_path / "x.safetensors"))
    result = run("inspect", str(tmp_path / "x.safetensors"))
    assert result.returncode != 0 and "refiner.*" in result.stderr and "refusing" in result.stderr
