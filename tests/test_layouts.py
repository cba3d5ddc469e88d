"""Layout detection on every supported layout, and the same multiplier for the same logical tensor."""

import pytest
import torch
from diffusers.loaders.single_file_utils import infer_diffusers_model_type

from ckptbend.errors import CkptbendError
from ckptbend.layouts import blocks_with_attention, detect
from ckptbend.plan import make_plan
from ckptbend.recipe import parse_recipe
from ckptbend.safetensors_io import TensorInfo, header_bytes
from ckptbend.synth import build_models, ldm_state_dict, write_checkpoint

SD1_BLOCKS = ["IN01", "IN02", "IN04", "IN05", "IN07", "IN08", "M00"] + [f"OUT{i:02d}" for i in range(3, 12)]
SDXL_BLOCKS = ["IN04", "IN05", "IN07", "IN08", "M00", "OUT00", "OUT01", "OUT02", "OUT03", "OUT04", "OUT05"]


@pytest.mark.parametrize("arch, layout, kind, architecture, components", [
    ("sd1", "single", "single-file", "sd1", {"unet", "clip_l", "vae"}),
    ("sd2", "single", "single-file", "sd2", {"unet", "clip_h", "vae"}),
    ("sdxl", "single", "single-file", "sdxl-base", {"unet", "clip_l", "clip_g", "vae"}),
    ("sdxl_refiner", "single", "single-file", "sdxl-refiner", {"unet", "clip_g", "vae"}),
    ("svd", "single", "single-file", "svd", {"unet", "vae"}),
    ("sd1", "diffusers", "diffusers-folder", "sd1", {"unet", "clip_l"}),
    ("sd2", "diffusers", "diffusers-folder", "sd2", {"unet", "clip_h"}),
    ("sdxl", "diffusers", "diffusers-folder", "sdxl-base", {"unet", "clip_l", "clip_g"}),
    ("sdxl_refiner", "diffusers", "diffusers-folder", "sdxl-refiner", {"unet", "clip_g"}),
    ("svd", "diffusers", "diffusers-folder", "svd", {"unet"}),
    ("sd1", "unet", "unet", "sd1", {"unet"}),           # a UNet alone: told by its structure
    ("sd1", "unet_bare", "unet", "sd1", {"unet"}),
    ("sdxl", "unet_diffusers", "unet", "sdxl-base", {"unet"}),
    ("sd1", "text_encoder", "text-encoder", "clip_l-only", {"clip_l"}),
    ("sdxl", "text_encoder_openclip", "text-encoder", "clip_g-only", {"clip_g"}),
])
def test_detects_every_layout(tmp_path, arch, layout, kind, architecture, components):
    ckpt = detect(write_checkpoint(tmp_path / "x.safetensors", arch, layout=layout))
    assert (ckpt.kind, ckpt.architecture) == (kind, architecture)
    assert set(ckpt.components) == components


UNET_RECIPE = parse_recipe("""
schema = 1
name = "layouts"
[unet.self]
q = 1.5
out = 0.5
[[unet.cross]]
blocks = ["IN04", "OUT07", "middle"]
k = 2.0
""")


def logical_plan(path):
    """(block, depth, attn, proj, weight|bias) → factors, independent of the file's key names."""
    ckpt = detect(path)
    plan = make_plan(UNET_RECIPE, ckpt, allow_missing=True)
    site_of = {(s.file, s.key): s for s in ckpt.sites}
    return {(s.block, s.depth, s.attn, s.proj, e.key.rsplit(".", 1)[1]): e.segments[0].factors
            for e in plan.edits for s in [site_of[(e.file, e.key)]]}


@pytest.mark.parametrize("arch, blocks", [("sd1", SD1_BLOCKS), ("sdxl", SDXL_BLOCKS)])
def test_same_logical_tensor_gets_the_same_factor_in_every_layout(tmp_path, arch, blocks):
    plans = {layout: logical_plan(write_checkpoint(tmp_path / layout, arch, layout=layout))
             for layout in ("single", "unet", "unet_bare", "unet_diffusers", "diffusers")}
    reference = plans["single"]
    assert {k[0] for k in reference} == set(blocks)
    for layout, plan in plans.items():
        assert plan == reference, layout
    assert blocks_with_attention(detect(tmp_path / "diffusers")) == blocks


def test_sdxl_depth_indices_come_from_the_file(tmp_path):
    ckpt = detect(write_checkpoint(tmp_path / "x.safetensors", "sdxl"))
    depths = {s.block: 0 for s in ckpt.sites if s.component == "unet"}
    for s in ckpt.sites:
        if s.component == "unet":
            depths[s.block] = max(depths[s.block], s.depth + 1)
    models = build_models("sdxl")
    per_level = models["unet"].config.transformer_layers_per_block
    assert depths["IN04"] == per_level[1] and depths["IN07"] == per_level[2] and depths["M00"] == per_level[-1]


def test_video_unet_time_stack_is_temporal(tmp_path):
    ckpt = detect(write_checkpoint(tmp_path / "x.safetensors", "svd"))
    temporal = [s for s in ckpt.sites if s.temporal]
    assert temporal and all(".time_stack." in s.key for s in temporal)
    assert all(".time_stack." not in s.key for s in ckpt.sites if not s.temporal)


def test_fused_openclip_rows_are_split_in_thirds(tmp_path):
    ckpt = detect(write_checkpoint(tmp_path / "x.safetensors", "sd2"))
    fused = [s for s in ckpt.sites if s.key.endswith("attn.in_proj_weight")]
    by_key = {}
    for s in fused:
        by_key.setdefault(s.key, []).append((s.proj, s.rows))
    width = models_width = build_models("sd2")["clip_h"].config.hidden_size
    assert width == models_width
    for key, parts in by_key.items():
        assert parts == [("q", (0, width)), ("k", (width, 2 * width)), ("v", (2 * width, 3 * width))], key


def sparse_checkpoint(path, arch):
    """A full-size file with real names and shapes whose data section is a hole (no disk used)."""
    tensors, offset = [], 0
    for name, t in ldm_state_dict(arch, build_models(arch, "full")).items():
        dtype = {torch.int64: "I64", torch.int32: "I32"}.get(t.dtype, "F16")
        nbytes = t.numel() * (8 if dtype == "I64" else 4 if dtype == "I32" else 2)
        tensors.append(TensorInfo(name, dtype, tuple(t.shape), offset, offset + nbytes))
        offset += nbytes
    head = header_bytes({"format": "pt"}, tensors)
    with open(path, "wb") as f:
        f.write(head)
        f.truncate(len(head) + offset)
    return {t.name: torch.empty(t.shape, device="meta") for t in tensors}


@pytest.mark.parametrize("arch, diffusers_type, ours", [
    ("sd1", "v1", "sd1"), ("sd2", "v2", "sd2"), ("sdxl", "xl_base", "sdxl-base"),
    ("sdxl_refiner", "xl_refiner", "sdxl-refiner"),
])
def test_full_size_detection_agrees_with_diffusers(tmp_path, arch, diffusers_type, ours):
    keys = sparse_checkpoint(tmp_path / "full.safetensors", arch)
    assert infer_diffusers_model_type(keys) == diffusers_type
    ckpt = detect(tmp_path / "full.safetensors")
    assert ckpt.architecture == ours
    expected_blocks = SDXL_BLOCKS if arch.startswith("sdxl") and arch != "sdxl_refiner" else None
    if arch in ("sd1", "sd2"):
        expected_blocks = SD1_BLOCKS
    if expected_blocks:
        assert blocks_with_attention(ckpt) == expected_blocks


def test_a_file_without_attention_is_rejected(tmp_path):
    from safetensors.torch import save_file

    save_file({"first_stage_model.decoder.conv_in.weight": torch.zeros(2, 2)}, tmp_path / "vae.safetensors")
    with pytest.raises(CkptbendError, match="not a supported checkpoint layout"):
        detect(tmp_path / "vae.safetensors")


@pytest.mark.parametrize("arch", ["sd1", "sd2", "sdxl"])
def test_inspect_counts_text_encoder_layers(tmp_path, arch):
    from ckptbend.report import describe

    models = build_models(arch)
    expected = {name: m.config.num_hidden_layers for name, m in models.items() if name.startswith("clip")}
    info = describe(detect(write_checkpoint(tmp_path / "x.safetensors", arch)))
    assert info["text_encoder_attention_layers"] == expected
