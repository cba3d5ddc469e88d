"""HunyuanVideo: Tencent's names, ComfyUI's (Flux-style, under `model.model.`), diffusers' names and folders,
checked against diffusers' own converter and class; bakes against run-time hooks on the real
`HunyuanVideoTransformer3DModel` (same double/single structure as Flux, joint order [image; text])."""

from pathlib import Path

import pytest
import torch
import transformers
from diffusers import HunyuanVideoTransformer3DModel
from diffusers.loaders.single_file_utils import infer_diffusers_model_type
from safetensors.torch import load_file

import _dit_flux as F
from ckptbend.bake import bake
from ckptbend.layouts import detect
from ckptbend.recipe import parse_recipe
from ckptbend.synth import write_checkpoint
from ckptbend.synth import flux as synth_flux
from _helpers import load_strict

ARCH = "hunyuan_video"
H = synth_flux.H


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("hunyuan")
    made = {}

    def get(layout):
        if layout not in made:
            name = f"hy-{layout}" + ("" if layout == "diffusers" else ".safetensors")
            scaled = layout == "scaled_fp8"   # ComfyUI's scaled fp8: the single layout in that dtype
            made[layout] = write_checkpoint(root / name, ARCH, layout="single" if scaled else layout,
                                           dtype="scaled_fp8" if scaled else torch.float32)
        return made[layout]
    return get


def bake_to(tmp_path, body, src):
    out = tmp_path / ("out" if Path(src).is_dir() else "out.safetensors")
    bake(parse_recipe('schema = 1\nname = "t"\n' + body), src, out, progress=False)
    return out


@pytest.mark.parametrize("layout", ["single", "comfy", "transformer_diffusers", "scaled_fp8"])
def test_layout_loads_strict_through_diffusers_converter(files, layout):
    path = files(layout)
    ckpt = detect(path)
    assert ckpt.architecture == "hunyuan-video"
    assert ckpt.kind == ("single-file" if layout == "comfy" else "dit")
    got, expected = F.load_transformer(ARCH, path, layout).state_dict(), F.model(ARCH).state_dict()
    if layout == "scaled_fp8":
        assert all((got[k] - v).abs().max() <= 0.07 * v.abs().max() for k, v in expected.items())
    else:
        assert all(torch.equal(got[k], v) for k, v in expected.items())
    if layout == "single":
        assert infer_diffusers_model_type(load_file(path)) == "hunyuan-video"


def test_comfy_file_holds_model_model_prefix_and_encoders(files):
    state = load_file(files("comfy"))
    assert "model.model.double_blocks.0.img_attn.norm.query_norm.scale" in state   # ComfyUI's Flux-style names
    assert "model.model.txt_in.individual_token_refiner.blocks.0.self_attn.qkv.weight" in state
    llama = {k.removeprefix("text_encoders.llama.transformer.model."): v for k, v in state.items()
             if k.startswith("text_encoders.llama.transformer.")}
    encoders = synth_flux.build_text_encoders(ARCH)
    load_strict(transformers.LlamaModel(encoders["llama"][0].config), llama)
    assert {"dit", "clip_l", "llama"} == set(detect(files("comfy")).components)


def test_diffusers_folder(files):
    folder = files("diffusers")
    loaded = HunyuanVideoTransformer3DModel.from_pretrained(folder / "transformer").double()
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in F.model(ARCH).state_dict().items())
    ckpt = detect(folder)
    assert ckpt.kind == "diffusers-folder" and ckpt.architecture == "hunyuan-video"
    assert set(ckpt.components) == {"dit", "llama", "clip_l"}
    assert {s.component for s in ckpt.sites} == {"dit", "llama", "clip_l"}


def test_sites_follow_section_11_and_leave_the_token_refiner(files):
    ckpt = detect(files("single"))
    keys = {(s.key, s.proj, s.rows, s.cols, s.stream, s.block) for s in ckpt.sites}
    assert ("double_blocks.1.txt_attn_q_norm.weight", "q", None, None, "text", "D01") in keys
    assert ("double_blocks.0.img_attn_qkv.bias", "v", (2 * H, 3 * H), None, "image", "D00") in keys
    assert ("double_blocks.0.img_attn_proj.bias", "out", None, None, "image", "D00") in keys
    assert ("single_blocks.1.k_norm.weight", "k", None, None, None, "S01") in keys
    assert ("single_blocks.0.linear2.weight", "out", None, (0, H), None, "S00") in keys
    assert not any("linear2.bias" in k[0] or "individual_token_refiner" in k[0] for k in keys)


CASES = [
    ('[dit.joint]\nstream = "text"\nq = 1.7\nv = 1.5\n', {"q": 1.7, "v": 1.5}, None, "text"),
    ('[dit.joint]\nblocks = ["single"]\nk = 0.6\nout = 0.55\n', {"k": 0.6, "out": 0.55}, ["S00", "S01"], None),
    ('[dit.joint]\nq = 1.3\nk = 0.8\nv = 1.4\nout = 0.7\n', {"q": 1.3, "k": 0.8, "v": 1.4, "out": 0.7}, None, None),
]


@pytest.mark.parametrize("layout,case", [("single", 0), ("single", 1), ("single", 2),
                                         ("comfy", 2), ("transformer_diffusers", 2)])
def test_bake_equals_runtime_multiply(files, tmp_path, layout, case):
    body, factors, blocks, stream = CASES[case]
    baked = F.forward(F.load_transformer(ARCH, bake_to(tmp_path, body, files(layout)), layout), ARCH)
    ref = F.reference(ARCH, factors, blocks, stream)
    effect = (ref - F.forward(F.model(ARCH), ARCH)).abs().max().item()
    assert effect > 1e-3
    assert (baked - ref).abs().max().item() <= 1e-5 * max(1.0, ref.abs().max().item())


def test_bake_of_a_diffusers_folder_reaches_the_transformer_and_llama(files, tmp_path):
    src = files("diffusers")
    out = bake_to(tmp_path, '[dit.joint]\nstream = "image"\nout = 0.55\n[text]\nencoders = ["llama"]\nk = 1.2\n', src)
    baked = F.forward(HunyuanVideoTransformer3DModel.from_pretrained(out / "transformer").double(), ARCH)
    ref = F.reference(ARCH, {"out": 0.55}, None, "image")
    assert (baked - ref).abs().max() <= 1e-5 * max(1.0, ref.abs().max().item())
    before, after = load_file(src / "text_encoder" / "model.safetensors"), load_file(out / "text_encoder" / "model.safetensors")
    changed = sorted(k for k in before if not torch.equal(before[k], after[k]))
    assert changed == ["layers.0.self_attn.k_proj.weight", "layers.1.self_attn.k_proj.weight"]
