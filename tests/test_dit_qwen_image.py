"""Qwen-Image: layouts checked by diffusers' own single-file mapping, and baked == run-time hooks on the real
`QwenImageTransformer2DModel` (dit-layouts.md §5, §11).

diffusers' single-file mapping for this class is the identity and strips no prefix, so a ComfyUI file
(`model.diffusion_model.…`) is loaded after removing the prefix here (a known diffusers limitation).
"""

import json

import pytest
import torch
from diffusers import QwenImageTransformer2DModel
from diffusers.loaders.single_file_model import SINGLE_FILE_LOADABLE_CLASSES
from safetensors.torch import load_file, save_file
from transformers import Qwen2_5_VLForConditionalGeneration

from ckptbend.bake import bake
from ckptbend.layouts import detect
from ckptbend.layouts.qwen_image import TEXT_DROPPED
from ckptbend.plan import make_plan
from ckptbend.synth import write_checkpoint
from ckptbend.synth.dit import MODEL_PREFIX, build, build_text_encoders
from ckptbend.synth.qwen_image import CONFIGS, FAMILY
from _dit import compare, hook_outputs, load_strict, recipe, run

ARCH = "qwen_image"
N_BLOCKS = 2
FACTORS = {"q": 1.7, "k": 0.6, "v": 1.9, "out": 0.55}
MODULE = {("image", "q"): "norm_q", ("image", "k"): "norm_k", ("image", "v"): "to_v", ("image", "out"): "to_out.0",
          ("text", "q"): "norm_added_q", ("text", "k"): "norm_added_k", ("text", "v"): "add_v_proj",
          ("text", "out"): "to_add_out"}
TEXT_PREFIX = "text_encoders.qwen25_7b.transformer."


def to_diffusers(state: dict) -> QwenImageTransformer2DModel:
    state = {k.removeprefix(MODEL_PREFIX): v.double() for k, v in state.items() if not k.startswith(TEXT_PREFIX)}
    mapped = SINGLE_FILE_LOADABLE_CLASSES["QwenImageTransformer2DModel"]["checkpoint_mapping_fn"](checkpoint=state)
    return load_strict(QwenImageTransformer2DModel(**CONFIGS[ARCH]).double(), mapped)


@torch.no_grad()
def forward(model):
    g = torch.Generator().manual_seed(123)
    return model(hidden_states=torch.randn(1, 8, 16, generator=g, dtype=torch.float64),
                 encoder_hidden_states=torch.randn(1, 5, 24, generator=g, dtype=torch.float64),
                 encoder_hidden_states_mask=torch.ones(1, 5, dtype=torch.long),
                 timestep=torch.tensor([0.37], dtype=torch.float64), img_shapes=[(1, 2, 4)], return_dict=False)[0]


def hooks_for(streams, factors, blocks=range(N_BLOCKS)):
    return {f"transformer_blocks.{i}.attn.{MODULE[(s, p)]}": f for i in blocks for s in streams for p, f in factors.items()}


def factor_lines(factors):
    return "".join(f"{k} = {v}\n" for k, v in factors.items())


@pytest.mark.parametrize("layout", ["single", "single_prefixed", "comfy", "transformer_diffusers"])
def test_layout_maps_strict_to_the_real_class(tmp_path, layout):
    path = write_checkpoint(tmp_path / "m.safetensors", ARCH, layout)
    model = to_diffusers(load_file(str(path)))
    reference = build(FAMILY, ARCH).double().state_dict()
    assert all(torch.equal(model.state_dict()[k], reference[k]) for k in reference)
    ckpt = detect(path)
    assert (ckpt.architecture, ckpt.qk_norm) == ("qwen-image", True)
    assert ckpt.kind == ("single-file" if layout == "comfy" else "dit")


def test_comfy_text_encoder_loads_with_from_pretrained(tmp_path):
    state = load_file(str(write_checkpoint(tmp_path / "aio.safetensors", ARCH, "comfy")))
    original = build_text_encoders(FAMILY)["qwen25_7b"]
    folder = tmp_path / "te"
    original.config.save_pretrained(folder)
    save_file({k.removeprefix(TEXT_PREFIX): v for k, v in state.items() if k.startswith(TEXT_PREFIX)},
              str(folder / "model.safetensors"), metadata={"format": "pt"})
    loaded = Qwen2_5_VLForConditionalGeneration.from_pretrained(folder)
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in original.state_dict().items())


def test_diffusers_folder_is_detected(tmp_path):
    root = write_checkpoint(tmp_path / "pipe", ARCH, "diffusers")
    assert json.loads((root / "model_index.json").read_text())["_class_name"] == "QwenImagePipeline"
    ckpt = detect(root)
    assert (ckpt.kind, ckpt.architecture, set(ckpt.components)) == ("diffusers-folder", "qwen-image", {"dit", "qwen25_7b"})
    model = QwenImageTransformer2DModel.from_pretrained(root / "transformer")
    assert all(torch.equal(model.state_dict()[k], v) for k, v in build(FAMILY, ARCH).state_dict().items())


@pytest.mark.parametrize("stream", ["image", "text", None])
@pytest.mark.parametrize("layout", ["single", "comfy"])
def test_joint_attention_per_stream(tmp_path, stream, layout):
    src = write_checkpoint(tmp_path / "m.safetensors", ARCH, layout)
    out = tmp_path / "o.safetensors"
    selector = f'stream = "{stream}"\n' if stream else ""
    bake(recipe(f"[dit.joint]\n{selector}{factor_lines(FACTORS)}"), src, out, progress=False)
    original = load_file(str(src))
    plain, patched, baked = to_diffusers(original), to_diffusers(original), to_diffusers(load_file(str(out)))
    hook_outputs(patched, hooks_for([stream] if stream else ["image", "text"], FACTORS))
    compare(forward(baked), forward(patched), forward(plain))


def test_plan_lists_norms_v_and_out_per_stream(tmp_path):
    plan = make_plan(recipe(f'[dit.joint]\nblocks = ["B01"]\n{factor_lines(FACTORS)}'),
                     detect(write_checkpoint(tmp_path / "m.safetensors", ARCH)))
    got = {(e.key, ", ".join(s.reasons)) for e in plan.edits for s in e.segments}
    b = "transformer_blocks.1.attn."
    assert got == {(b + "norm_q.weight", "dit.joint.q"), (b + "norm_k.weight", "dit.joint.k"),
                   (b + "to_v.weight", "dit.joint.v"), (b + "to_v.bias", "dit.joint.v"),
                   (b + "to_out.0.weight", "dit.joint.out"), (b + "to_out.0.bias", "dit.joint.out"),
                   (b + "norm_added_q.weight", "dit.joint.q"), (b + "norm_added_k.weight", "dit.joint.k"),
                   (b + "add_v_proj.weight", "dit.joint.v"), (b + "add_v_proj.bias", "dit.joint.v"),
                   (b + "to_add_out.weight", "dit.joint.out"), (b + "to_add_out.bias", "dit.joint.out")}


@torch.no_grad()
def test_projection_scaling_is_cancelled_and_last_block_text_q_out_are_dead(tmp_path):
    src = write_checkpoint(tmp_path / "m.safetensors", ARCH)
    original = {k: v.double() for k, v in load_file(str(src)).items()}
    plain = forward(to_diffusers(original))
    for proj, literal_key in (("q", "to_q"), ("k", "add_k_proj")):
        stream = "image" if literal_key.startswith("to_") else "text"
        literal = {k: v * FACTORS[proj] if k.startswith(f"transformer_blocks.0.attn.{literal_key}.") else v
                   for k, v in original.items()}
        proper = to_diffusers(original)
        hook_outputs(proper, hooks_for([stream], {proj: FACTORS[proj]}, blocks=[0]))
        effect = (forward(proper) - plain).abs().max().item()
        leak = (forward(to_diffusers(literal)) - plain).abs().max().item()
        assert effect > 1e-2 and leak < 1e-3 * effect, (proj, effect, leak)
    for proj, dead in (("q", True), ("out", True), ("k", False), ("v", False)):
        out = tmp_path / f"{proj}.safetensors"
        result = bake(recipe(f'[dit.joint]\nblocks = ["B01"]\nstream = "text"\n{proj} = 1.7\n'), src, out,
                      progress=False)
        change = (forward(to_diffusers(load_file(str(out)))) - plain).abs().max().item()
        assert (change == 0.0) if dead else change > 1e-3, (proj, change)
        assert [w for w in result.plan.warnings if "has no effect" in w] == (
            [f"[dit.joint]: {proj} = 1.7 has no effect: {TEXT_DROPPED}"] if dead else [])


def test_inspect_shows_blocks_streams_and_the_text_encoder(tmp_path):
    result = run("inspect", "--json", str(write_checkpoint(tmp_path / "aio.safetensors", ARCH, "comfy", dtype="scaled_fp8")))
    assert result.returncode == 0, result.stderr
    info = json.loads(result.stdout)
    assert info["architecture"] == "qwen-image" and info["qk_norm"] is True
    assert info["attention_blocks"] == {f"B0{i}": {"depth": 1, "attn": ["joint"], "streams": ["image", "text"], "qk_norm": True}
                                        for i in range(N_BLOCKS)}
    assert info["text_encoder_attention_layers"] == {"qwen25_7b": 2}
    assert info["quantisation"].startswith("scaled fp8")
