"""Baked == runtime-patched, shown numerically on the real diffusers / transformers model classes.

The reference is the model ComfyUI's nodes produce at run time: the original weights, with the
outputs of each matched projection (q, k, v, out) multiplied in the forward pass. The baked file is
loaded through diffusers' own single-file conversion code (or `from_pretrained` for folders), so the
key layouts are checked against diffusers, not against ckptbend's own tables.
"""

import re

import pytest
import torch
from diffusers.loaders.single_file_utils import (
    convert_ldm_clip_checkpoint,
    convert_ldm_unet_checkpoint,
    convert_open_clip_checkpoint,
)
from safetensors.torch import load_file

from ckptbend.bake import bake
from ckptbend.recipe import parse_recipe
from ckptbend.synth import build_models, write_checkpoint
from _helpers import fresh, load_strict

torch.manual_seed(0)
PROJ = {"to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "out",
        "q_proj": "q", "k_proj": "k", "v_proj": "v", "out_proj": "out"}
UNET_MODULE = re.compile(r"(attn1|attn2)\.(to_q|to_k|to_v|to_out\.0)$")
CLIP_MODULE = re.compile(r"self_attn\.(q_proj|k_proj|v_proj|out_proj)$")
# The block-weight notation is defined on the original layout: input_blocks.N → IN{N:02}.
LDM_LABEL = re.compile(r"(input_blocks|middle_block|output_blocks)\.(\d+)\..*?(?:transformer_blocks|time_stack)\.(\d+)\.")


def label_and_depth(ldm_key):
    group, n, depth = LDM_LABEL.search(ldm_key).groups()
    prefix = {"input_blocks": "IN", "output_blocks": "OUT"}.get(group)
    return ("M00" if prefix is None else f"{prefix}{int(n):02d}"), int(depth)


def scale_outputs(model, factor_of):
    """Multiply the output of every Linear `factor_of(module_name)` names: the run-time patch."""
    patched = 0
    for name, module in model.named_modules():
        f = factor_of(name)
        if f != 1.0:
            module.register_forward_hook(lambda m, args, out, f=f: out * f)
            patched += 1
    assert patched, "the run-time patch must touch something, or the comparison proves nothing"


def ldm_names(ldm_state, converted, prefix):
    """diffusers key → original key, read off diffusers' converter (it moves the same tensor objects)."""
    by_id = {id(t): k for k, t in ldm_state.items() if k.startswith(prefix)}
    return {k: by_id[id(t)] for k, t in converted.items() if id(t) in by_id}


def unet_inputs(unet, batch=2, size=16):
    g = torch.Generator().manual_seed(1)
    cfg = unet.config
    kwargs = {"encoder_hidden_states": torch.randn(batch, 7, cfg.cross_attention_dim, generator=g)}
    if getattr(cfg, "addition_embed_type", None) == "text_time":
        text_dim = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
        kwargs["added_cond_kwargs"] = {"text_embeds": torch.randn(batch, text_dim, generator=g),
                                       "time_ids": torch.randn(batch, 6, generator=g)}
    sample = torch.randn(batch, cfg.in_channels, size, size, generator=g)
    return sample, torch.tensor([500, 20]), kwargs


def unet_from_ldm(template, state):
    converted = convert_ldm_unet_checkpoint(state, dict(template.config))
    return load_strict(fresh(template), converted), converted


def clip_from_ldm(template, state, prefix, openclip):
    if openclip:
        converted = convert_open_clip_checkpoint(template, state, prefix=prefix)
    else:
        converted = convert_ldm_clip_checkpoint(state, remove_prefix=prefix)
    # transformers 5's CLIPTextModel names its parameters without the `text_model.` prefix real files use.
    # Real files also carry the `position_ids` buffer, which transformers 5 no longer persists.
    if "embeddings.token_embedding.weight" in template.state_dict():
        converted = {k.removeprefix("text_model."): v for k, v in converted.items()
                     if not k.endswith("embeddings.position_ids")}
    return load_strict(fresh(template), converted), converted


def assert_close(baked, patched, plain):
    assert not torch.allclose(patched, plain, rtol=1e-3, atol=1e-5), "the multipliers must change the output"
    torch.testing.assert_close(baked, patched, rtol=1e-4, atol=1e-5)


@torch.no_grad()
def check_unet(models, src, out, factor_of_site, prefix="model.diffusion_model."):
    """Baked UNet vs original UNet patched at run time by `factor_of_site(attn, proj, label, depth)`."""
    original, baked = load_file(src), load_file(out)
    plain, converted = unet_from_ldm(models["unet"], original)
    names = ldm_names(original, converted, prefix)
    patched, _ = unet_from_ldm(models["unet"], original)
    baked_model, _ = unet_from_ldm(models["unet"], baked)

    def factor_of(module):
        m = UNET_MODULE.search(module)
        if not m:
            return 1.0
        label, depth = label_and_depth(names[module + ".weight"])
        return factor_of_site(m[1], PROJ[m[2]], label, depth)

    scale_outputs(patched, factor_of)
    sample, t, kwargs = unet_inputs(models["unet"])
    assert_close(baked_model(sample, t, **kwargs).sample, patched(sample, t, **kwargs).sample,
                 plain(sample, t, **kwargs).sample)


@torch.no_grad()
def check_clip(models, component, src, out, prefix, openclip, factors):
    original, baked = load_file(src), load_file(out)
    plain, _ = clip_from_ldm(models[component], original, prefix, openclip)
    patched, _ = clip_from_ldm(models[component], original, prefix, openclip)
    baked_model, _ = clip_from_ldm(models[component], baked, prefix, openclip)
    scale_outputs(patched, lambda n: factors.get(PROJ[m[1]], 1.0) if (m := CLIP_MODULE.search(n)) else 1.0)
    ids = torch.randint(0, plain.config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(2))
    assert_close(baked_model(ids).last_hidden_state, patched(ids).last_hidden_state, plain(ids).last_hidden_state)


ALL_FOUR = """
schema = 1
name = "all-four"
[unet.self]
q = 1.3
k = 0.8
v = 1.2
out = 0.9
[unet.cross]
q = 0.7
k = 1.4
v = 0.6
out = 1.1
[clip]
q = 1.25
k = 0.75
v = 1.5
out = 0.5
"""
SELF = {"q": 1.3, "k": 0.8, "v": 1.2, "out": 0.9}
CROSS = {"q": 0.7, "k": 1.4, "v": 0.6, "out": 1.1}
CLIP = {"q": 1.25, "k": 0.75, "v": 1.5, "out": 0.5}


def node_factor(attn, proj, label, depth):
    return (SELF if attn == "attn1" else CROSS)[proj]


@pytest.mark.parametrize("arch, clip", [
    ("sd1", [("clip_l", "cond_stage_model.transformer.", False)]),
    ("sd2", [("clip_h", "cond_stage_model.model.", True)]),
])
def test_self_cross_and_clip_in_single_files(tmp_path, arch, clip):
    models = build_models(arch)
    src = write_checkpoint(tmp_path / "in.safetensors", arch)
    bake(parse_recipe(ALL_FOUR), src, tmp_path / "out.safetensors", progress=False)
    check_unet(models, src, tmp_path / "out.safetensors", node_factor)
    for component, prefix, openclip in clip:
        check_clip(models, component, src, tmp_path / "out.safetensors", prefix, openclip, CLIP)


SELECTORS = """
schema = 1
name = "per-block"
[[unet.self]]
blocks = ["IN04", "output"]
q = 1.5
[[unet.self]]
depth = [1]
q = 2.0
k = 0.5
[[unet.cross]]
blocks = ["M00", "IN07"]
depth = [0]
v = 1.7
[[clip]]
encoders = ["clip_g"]
out = 0.6
"""


def selector_factor(attn, proj, label, depth):
    f = 1.0
    if attn == "attn1" and proj == "q" and (label == "IN04" or label.startswith("OUT")):
        f *= 1.5
    if attn == "attn1" and depth == 1:
        f *= {"q": 2.0, "k": 0.5}.get(proj, 1.0)
    if attn == "attn2" and proj == "v" and label in ("M00", "IN07") and depth == 0:
        f *= 1.7
    return f


def test_selectors_and_encoder_choice_in_an_sdxl_file(tmp_path):
    models = build_models("sdxl")
    src = write_checkpoint(tmp_path / "in.safetensors", "sdxl")
    bake(parse_recipe(SELECTORS), src, tmp_path / "out.safetensors", progress=False)
    check_unet(models, src, tmp_path / "out.safetensors", selector_factor)
    check_clip(models, "clip_g", src, tmp_path / "out.safetensors", "conditioner.embedders.1.model.", True,
               {"out": 0.6})
    # CLIP-L was not selected: its tensors are untouched.
    a, b = load_file(src), load_file(tmp_path / "out.safetensors")
    clip_l = [k for k in a if k.startswith("conditioner.embedders.0.")]
    assert clip_l and all(torch.equal(a[k], b[k]) for k in clip_l)


def test_sdxl_refiner_clip_g_only(tmp_path):
    models = build_models("sdxl_refiner")
    src = write_checkpoint(tmp_path / "in.safetensors", "sdxl_refiner")
    bake(parse_recipe(ALL_FOUR), src, tmp_path / "out.safetensors", progress=False)
    check_unet(models, src, tmp_path / "out.safetensors", node_factor)
    check_clip(models, "clip_g", src, tmp_path / "out.safetensors", "conditioner.embedders.0.model.", True, CLIP)


@torch.no_grad()
def test_diffusers_folder_loads_with_from_pretrained_and_matches(tmp_path):
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    models = build_models("sdxl")
    src = write_checkpoint(tmp_path / "model", "sdxl", layout="diffusers")
    bake(parse_recipe(ALL_FOUR), src, tmp_path / "baked", progress=False)

    unet, info = UNet2DConditionModel.from_pretrained(tmp_path / "baked" / "unet", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    plain = UNet2DConditionModel.from_pretrained(src / "unet").eval()
    patched = UNet2DConditionModel.from_pretrained(src / "unet").eval()
    scale_outputs(patched, lambda n: node_factor(m[1], PROJ[m[2]], None, None) if (m := UNET_MODULE.search(n)) else 1.0)
    sample, t, kwargs = unet_inputs(plain)
    assert_close(unet.eval()(sample, t, **kwargs).sample, patched(sample, t, **kwargs).sample,
                 plain(sample, t, **kwargs).sample)

    ids = torch.randint(0, 100, (2, 9), generator=torch.Generator().manual_seed(3))
    for sub, cls in (("text_encoder", CLIPTextModel), ("text_encoder_2", CLIPTextModelWithProjection)):
        baked, info = cls.from_pretrained(tmp_path / "baked" / sub, output_loading_info=True)
        assert not info["missing_keys"] and not info["unexpected_keys"]
        plain, patched = cls.from_pretrained(src / sub).eval(), cls.from_pretrained(src / sub).eval()
        scale_outputs(patched, lambda n: CLIP[PROJ[m[1]]] if (m := CLIP_MODULE.search(n)) else 1.0)
        assert_close(baked.eval()(ids).last_hidden_state, patched(ids).last_hidden_state, plain(ids).last_hidden_state)
    assert models  # built from the same configs the folder was written with


TEMPORAL = """
schema = 1
name = "temporal"
[unet.temporal]
self_structural = 0.8
self_temporal = 1.6
cross_structural = 1.2
cross_temporal = 0.5
[unet.self]
q = 1.1
"""


@torch.no_grad()
def test_temporal_multipliers_on_a_video_unet(tmp_path):
    from diffusers import UNetSpatioTemporalConditionModel

    src = write_checkpoint(tmp_path / "model", "svd", layout="diffusers")
    bake(parse_recipe(TEMPORAL), src, tmp_path / "baked", progress=False)
    baked = UNetSpatioTemporalConditionModel.from_pretrained(tmp_path / "baked" / "unet").eval()
    plain = UNetSpatioTemporalConditionModel.from_pretrained(src / "unet").eval()
    patched = UNetSpatioTemporalConditionModel.from_pretrained(src / "unet").eval()

    def factor(name):
        m = UNET_MODULE.search(name)
        if not m:
            return 1.0
        f = 1.1 if (m[1], m[2]) == ("attn1", "to_q") else 1.0
        if m[2] == "to_out.0":
            temporal = "temporal_transformer_blocks" in name
            f *= {("attn1", False): 0.8, ("attn1", True): 1.6, ("attn2", False): 1.2, ("attn2", True): 0.5}[
                (m[1], temporal)]
        return f

    scale_outputs(patched, factor)
    cfg = plain.config
    g = torch.Generator().manual_seed(4)
    sample = torch.randn(1, 3, cfg.in_channels, 16, 16, generator=g)
    hidden = torch.randn(1, 1, cfg.cross_attention_dim, generator=g)
    time_ids = torch.randn(1, 3, generator=g)   # fps, motion bucket, noise augmentation
    run = lambda m: m(sample, torch.tensor([10.0]), hidden, time_ids).sample  # noqa: E731
    assert_close(run(baked), run(patched), run(plain))
