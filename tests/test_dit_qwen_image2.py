"""Qwen-Image Layered and Qwen-Image 2.1: layouts checked by diffusers' own single-file mapping / converter,
and baked == run-time hooks on the real `QwenImageTransformer2DModel` (Layered config) and
`QwenImage21Transformer2DModel` (single-stream, no biases); a 2.1 file is never taken for Qwen-Image.
"""

import json

import pytest
import torch
from diffusers import QwenImage21Transformer2DModel, QwenImageTransformer2DModel
from diffusers.loaders.single_file_model import SINGLE_FILE_LOADABLE_CLASSES
from safetensors.torch import load_file, save_file

from ckptbend.bake import bake
from ckptbend.errors import CkptbendError
from ckptbend.layouts import detect
from ckptbend.synth import write_checkpoint
from ckptbend.synth.dit import MODEL_PREFIX, build
from ckptbend.synth.qwen_image import CONFIGS, FAMILY, FAMILY_21
from _dit import compare, dequantised, hook_outputs, load_strict, recipe, run

CLASSES = {"qwen_image_layered": QwenImageTransformer2DModel, "qwen_image_21": QwenImage21Transformer2DModel}
FAMILIES = {"qwen_image_layered": FAMILY, "qwen_image_21": FAMILY_21}
ARCHITECTURE = {"qwen_image_layered": "qwen-image-layered", "qwen_image_21": "qwen-image-2.1"}
LAYOUTS = ["single", "single_prefixed", "comfy", "transformer_diffusers"]
FACTORS = {"q": 1.7, "k": 0.6, "v": 1.9, "out": 0.55}
MODULES = {"q": "norm_q", "k": "norm_k", "v": "to_v", "out": "to_out.0"}
TEXT_MODULES = {"q": "norm_added_q", "k": "norm_added_k", "v": "add_v_proj", "out": "to_add_out"}


def to_diffusers(arch, state: dict, layout="single"):
    state = {k.removeprefix(MODEL_PREFIX): v.double() for k, v in state.items()
             if not k.startswith("text_encoders.")}
    if layout != "transformer_diffusers":
        state = SINGLE_FILE_LOADABLE_CLASSES[CLASSES[arch].__name__]["checkpoint_mapping_fn"](checkpoint=state)
    return load_strict(CLASSES[arch](**CONFIGS[arch]).double(), state)


@torch.no_grad()
def forward(arch, model):
    g = torch.Generator().manual_seed(11)
    t = torch.tensor([0.4], dtype=torch.float64)
    text = torch.randn(1, 5, 24, generator=g, dtype=torch.float64)
    if arch == "qwen_image_21":
        return model(hidden_states=torch.randn(1, 8, 8, generator=g, dtype=torch.float64), encoder_hidden_states=text,
                     timestep=t, img_shapes=[[(1, 2, 4)]], img_mask=torch.tensor([[False] * 5 + [True] * 2]),
                     return_dict=False)[0]
    return model(hidden_states=torch.randn(1, 8, 16, generator=g, dtype=torch.float64), encoder_hidden_states=text,
                 encoder_hidden_states_mask=torch.ones(1, 5, dtype=torch.long), timestep=t, img_shapes=[[(1, 2, 4)]],
                 additional_t_cond=torch.tensor([1]), return_dict=False)[0]


def hooks(arch, factors, blocks=(0, 1)):
    streams = [MODULES] if arch == "qwen_image_21" else [MODULES, TEXT_MODULES]
    return {f"transformer_blocks.{i}.attn.{names[p]}": f for i in blocks for names in streams
            for p, f in factors.items()}


def models(arch, path, layout, read):
    if layout == "diffusers":
        return CLASSES[arch].from_pretrained(path / "transformer").double().eval()
    return to_diffusers(arch, read(path), layout)


def check_bake(arch, tmp_path, layout, dtype=None, read=load_file, rtol=1e-5):
    src = write_checkpoint(tmp_path / ("m" if layout == "diffusers" else "m.safetensors"), arch, layout, dtype=dtype)
    out = tmp_path / ("o" if layout == "diffusers" else "o.safetensors")
    body = "[dit.joint]\n" + "".join(f"{k} = {v}\n" for k, v in FACTORS.items())
    result = bake(recipe(body), src, out, progress=False)
    plain, patched, baked = models(arch, src, layout, read), models(arch, src, layout, read), models(arch, out, layout, read)
    hook_outputs(patched, hooks(arch, FACTORS))
    compare(forward(arch, baked), forward(arch, patched), forward(arch, plain), rtol=rtol)
    return result


@pytest.mark.parametrize("arch", list(CLASSES))
@pytest.mark.parametrize("layout", LAYOUTS)
def test_layout_maps_strict_to_the_real_class(tmp_path, arch, layout):
    path = write_checkpoint(tmp_path / "m.safetensors", arch, layout)
    model = to_diffusers(arch, load_file(str(path)), layout)
    reference = build(FAMILIES[arch], arch).double().state_dict()
    assert all(torch.equal(model.state_dict()[k], reference[k]) for k in reference)
    assert detect(path).architecture == ARCHITECTURE[arch]


@pytest.mark.parametrize("arch", list(CLASSES))
@pytest.mark.parametrize("layout", LAYOUTS + ["diffusers"])
def test_bake_equals_run_time_hooks(tmp_path, arch, layout):
    result = check_bake(arch, tmp_path, layout)
    assert not [w for w in result.plan.warnings if "has no effect" in w]


def test_qwen_image_21_scaled_fp8(tmp_path):
    result = check_bake("qwen_image_21", tmp_path, "single_prefixed", dtype="scaled_fp8", rtol=2e-2,
                        read=lambda p: {k: v for k, v in dequantised(p).items() if k.startswith(MODEL_PREFIX)})
    lines = result.plan.describe()
    assert f"{MODEL_PREFIX}transformer_blocks.0.attn.to_v.scale_weight  ×1.9  (dit.joint.v (via scale_weight))" in lines


def test_qwen_image_21_inspect_and_labels(tmp_path):
    result = run("inspect", "--json", str(write_checkpoint(tmp_path / "m.safetensors", "qwen_image_21", "comfy")))
    assert result.returncode == 0, result.stderr
    info = json.loads(result.stdout)
    assert info["architecture"] == "qwen-image-2.1" and info["qk_norm"] is True
    assert info["attention_blocks"] == {f"B0{i}": {"depth": 1, "attn": ["joint"], "streams": [], "qk_norm": True}
                                        for i in range(2)}
    assert info["dit_qk_targets"] == [f"{MODEL_PREFIX}transformer_blocks.N.attn.norm_{n}.weight" for n in "kq"]


def test_a_recipe_for_qwen_image_applies_to_layered_not_to_21(tmp_path):
    body = 'architecture = "qwen-image"\n[dit.joint]\nq = 1.2\n'
    bake(recipe(body), write_checkpoint(tmp_path / "l.safetensors", "qwen_image_layered"), tmp_path / "lo.safetensors",
         progress=False)
    with pytest.raises(CkptbendError, match="qwen-image-2.1"):
        bake(recipe(body), write_checkpoint(tmp_path / "q.safetensors", "qwen_image_21"), tmp_path / "qo.safetensors",
             progress=False)


@pytest.mark.parametrize("arch, extra", [("qwen_image_layered", "time_mod_proj.weight"),
                                         ("qwen_image_21", "img_mlp_gate.weight")])
def test_unknown_parts_are_refused_by_name(tmp_path, arch, extra):
    state = load_file(str(write_checkpoint(tmp_path / "m.safetensors", arch)))
    save_file({**state, extra: torch.ones(4)}, str(tmp_path / "x.safetensors"))
    result = run("inspect", str(tmp_path / "x.safetensors"))
    assert result.returncode != 0 and extra.split(".")[0] + ".*" in result.stderr and "refusing" in result.stderr
