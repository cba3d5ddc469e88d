"""Synthetic Stable Diffusion checkpoints with the real key names and layouts real files use.

Every key comes from the real model classes (diffusers' `UNet2DConditionModel`,
`UNetSpatioTemporalConditionModel`, `AutoencoderKL`, `AutoencoderKLTemporalDecoder`; transformers'
`CLIPTextModel`, `CLIPTextModelWithProjection`): nothing here is a hand-written key list. The
original single-file ("LDM") names are produced by the diffusers → LDM renaming below, which
`tests/test_synth.py` checks against diffusers' own LDM → diffusers converters.

Two sizes:

- ``tiny``: small configs with the real *block structure* (same number of down/up blocks, resnets
  per block, attention positions, transformer depths > 1 where the real model has them), random
  weights; a single file is 1.2–1.5 MB in fp32 (SVD is the exception, ~10 MB: diffusers'
  spatio-temporal blocks hard-code 32 GroupNorm groups, so its channels cannot go below 32).
- ``full``: the real configs of SD 1.5, SD 2.1, SDXL base/refiner 1.0 and SVD, built on the
  ``meta`` device (no memory), written tensor by tensor with seeded random values (never zeros).

Architectures (``ARCHES``) and components (``build_models`` keys):

==============  ==========================================================================
sd1             unet, clip_l (CLIPTextModel), vae
sd2             unet (linear proj, cross dim = text width), clip_h (OpenCLIP ViT-H text tower as
                a CLIPTextModel, all layers), vae
sdxl            unet (text_time addition embedding, depth varies per level), clip_l,
                clip_g (CLIPTextModelWithProjection), vae
sdxl_refiner    unet, clip_g, vae
svd             unet (UNetSpatioTemporalConditionModel), vae (AutoencoderKLTemporalDecoder);
                no image encoder (SVD's OpenCLIP-H vision tower is not generated)
==============  ==========================================================================

Layouts (``LAYOUTS``): ``single`` (original LDM single file), ``diffusers`` (a pipeline folder,
optionally sharded), ``unet`` / ``unet_bare`` / ``unet_diffusers`` (UNet alone: LDM names with or
without ``model.diffusion_model.``, or diffusers names), ``text_encoder`` (one HF CLIP file, the
arch's diffusers ``text_encoder``, or ``text_encoder_2`` for the refiner) and
``text_encoder_openclip`` (one OpenCLIP text tower: CLIP-H for sd2, CLIP-G for SDXL).

SVD: diffusers has no single-file converter for SVD, so its LDM names cannot be checked against
diffusers. They are derived from generative-models (``sgm``) module definitions, see
``_unet_resnet_ldm`` / ``_unet_attention_ldm`` / ``_vae_resnet_ldm``.
"""

from __future__ import annotations

import copy
import json
import math
import os
import re
import struct
from pathlib import Path

import numpy as np
import torch

from .errors import CkptbendError

ARCHES = ("sd1", "sd2", "sdxl", "sdxl_refiner", "svd")
SIZES = ("tiny", "full")
LAYOUTS = ("single", "diffusers", "unet", "unet_bare", "unet_diffusers", "text_encoder", "text_encoder_openclip")
DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float8_e4m3fn, torch.float8_e5m2)

LDM_UNET_PREFIX = "model.diffusion_model."
LDM_VAE_PREFIX = "first_stage_model."

# ------------------------------------------------------------------------------------------------
# Configs. Each component: (class name in diffusers or transformers, constructor kwargs; for
# transformers classes the kwargs of CLIPTextConfig).
# ------------------------------------------------------------------------------------------------

_SD_DOWN = ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D")
_SD_UP = ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D")
_XL_DOWN = ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D")
_XL_UP = ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D")
_REFINER_DOWN = ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D")
_REFINER_UP = ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D")
_VAE_BLOCKS = {"down_block_types": ("DownEncoderBlock2D",) * 4, "up_block_types": ("UpDecoderBlock2D",) * 4}

# The tiny CLIP vocabulary is the synthetic tokenizer's: 256 byte symbols, the same with "</w>",
# then <|startoftext|> (512) and <|endoftext|> (513).
_TINY_VOCAB = 1000
_TINY_TOKENS = {"bos_token_id": 512, "eos_token_id": 513, "pad_token_id": 513}


def _tiny_clip(hidden, layers, act, projection):
    return {"vocab_size": _TINY_VOCAB, "hidden_size": hidden, "intermediate_size": 2 * hidden,
            "num_hidden_layers": layers, "num_attention_heads": 2, "max_position_embeddings": 77,
            "hidden_act": act, "projection_dim": projection, **_TINY_TOKENS}


_TINY_CLIP_L = ("CLIPTextModel", _tiny_clip(16, 2, "quick_gelu", 16))
_TINY_CLIP_G = ("CLIPTextModelWithProjection", _tiny_clip(32, 3, "gelu", 24))   # projection ≠ width on purpose
_TINY_VAE = ("AutoencoderKL", {"block_out_channels": (4, 8, 16, 16), "layers_per_block": 2, "norm_num_groups": 2,
                               "latent_channels": 4, "sample_size": 64, **_VAE_BLOCKS})
_TINY_UNET = {"sample_size": 8, "layers_per_block": 2, "norm_num_groups": 2}

TINY_CONFIGS = {
    "sd1": {
        "unet": ("UNet2DConditionModel", {**_TINY_UNET, "block_out_channels": (4, 8, 16, 16),
                                          "down_block_types": _SD_DOWN, "up_block_types": _SD_UP,
                                          "cross_attention_dim": 16, "attention_head_dim": 2}),
        "clip_l": _TINY_CLIP_L,
        "vae": _TINY_VAE,
    },
    "sd2": {
        "unet": ("UNet2DConditionModel", {**_TINY_UNET, "block_out_channels": (4, 8, 16, 16),
                                          "down_block_types": _SD_DOWN, "up_block_types": _SD_UP,
                                          "cross_attention_dim": 24, "attention_head_dim": (1, 2, 4, 4),
                                          "use_linear_projection": True}),
        "clip_h": ("CLIPTextModel", _tiny_clip(24, 3, "gelu", 24)),
        "vae": _TINY_VAE,
    },
    "sdxl": {
        "unet": ("UNet2DConditionModel", {**_TINY_UNET, "block_out_channels": (4, 8, 16),
                                          "down_block_types": _XL_DOWN, "up_block_types": _XL_UP,
                                          "transformer_layers_per_block": (1, 1, 2),
                                          "cross_attention_dim": 16 + 32, "attention_head_dim": (1, 2, 4),
                                          "use_linear_projection": True, "addition_embed_type": "text_time",
                                          "addition_time_embed_dim": 8,
                                          "projection_class_embeddings_input_dim": 6 * 8 + 24}),
        "clip_l": _TINY_CLIP_L,
        "clip_g": _TINY_CLIP_G,
        "vae": _TINY_VAE,
    },
    "sdxl_refiner": {
        "unet": ("UNet2DConditionModel", {**_TINY_UNET, "block_out_channels": (4, 8, 16, 16),
                                          "down_block_types": _REFINER_DOWN, "up_block_types": _REFINER_UP,
                                          "transformer_layers_per_block": 2,
                                          "cross_attention_dim": 32, "attention_head_dim": (1, 2, 4, 4),
                                          "use_linear_projection": True, "addition_embed_type": "text_time",
                                          "addition_time_embed_dim": 8,
                                          "projection_class_embeddings_input_dim": 5 * 8 + 24}),
        "clip_g": _TINY_CLIP_G,
        "vae": _TINY_VAE,
    },
    "svd": {
        # diffusers' spatio-temporal blocks hard-code GroupNorm(32 groups): 32 channels is the floor.
        "unet": ("UNetSpatioTemporalConditionModel", {"sample_size": 8, "in_channels": 8, "out_channels": 4,
                                                      "block_out_channels": (32, 32, 32, 32), "layers_per_block": 2,
                                                      "cross_attention_dim": 16, "num_attention_heads": (2, 2, 4, 4),
                                                      "addition_time_embed_dim": 8,
                                                      "projection_class_embeddings_input_dim": 3 * 8,
                                                      "num_frames": 4}),
        "vae": ("AutoencoderKLTemporalDecoder", {"block_out_channels": (32, 32, 32, 32), "layers_per_block": 2,
                                                 "latent_channels": 4, "sample_size": 64}),
    },
}

_CLIP_L = ("CLIPTextModel", {"vocab_size": 49408, "hidden_size": 768, "intermediate_size": 3072,
                             "num_hidden_layers": 12, "num_attention_heads": 12, "max_position_embeddings": 77,
                             "hidden_act": "quick_gelu", "projection_dim": 768,
                             "bos_token_id": 0, "eos_token_id": 2, "pad_token_id": 1})
_CLIP_G = ("CLIPTextModelWithProjection", {"vocab_size": 49408, "hidden_size": 1280, "intermediate_size": 5120,
                                           "num_hidden_layers": 32, "num_attention_heads": 20,
                                           "max_position_embeddings": 77, "hidden_act": "gelu", "projection_dim": 1280,
                                           "bos_token_id": 0, "eos_token_id": 2, "pad_token_id": 1})


def _vae(sample_size, scaling_factor, cls="AutoencoderKL"):
    kw = {"in_channels": 3, "out_channels": 3, "block_out_channels": (128, 256, 512, 512), "layers_per_block": 2,
          "latent_channels": 4, "sample_size": sample_size, "scaling_factor": scaling_factor}
    if cls == "AutoencoderKL":
        kw.update(norm_num_groups=32, **_VAE_BLOCKS)
    return (cls, kw)


_SD_UNET = {"layers_per_block": 2, "norm_num_groups": 32, "in_channels": 4, "out_channels": 4,
            "block_out_channels": (320, 640, 1280, 1280), "down_block_types": _SD_DOWN, "up_block_types": _SD_UP}

FULL_CONFIGS = {
    "sd1": {  # runwayml / stable-diffusion-v1-5
        "unet": ("UNet2DConditionModel", {**_SD_UNET, "sample_size": 64, "cross_attention_dim": 768,
                                          "attention_head_dim": 8}),
        "clip_l": _CLIP_L,
        "vae": _vae(512, 0.18215),
    },
    "sd2": {  # stabilityai / stable-diffusion-2-1 (768-v)
        "unet": ("UNet2DConditionModel", {**_SD_UNET, "sample_size": 96, "cross_attention_dim": 1024,
                                          "attention_head_dim": (5, 10, 20, 20), "use_linear_projection": True}),
        # OpenCLIP ViT-H/14 text tower, all 24 layers (the single file has them all; diffusers'
        # text_encoder keeps the first 23, see _diffusers_text_encoders).
        "clip_h": ("CLIPTextModel", {"vocab_size": 49408, "hidden_size": 1024, "intermediate_size": 4096,
                                     "num_hidden_layers": 24, "num_attention_heads": 16,
                                     "max_position_embeddings": 77, "hidden_act": "gelu", "projection_dim": 512,
                                     "bos_token_id": 0, "eos_token_id": 2, "pad_token_id": 1}),
        "vae": _vae(768, 0.18215),
    },
    "sdxl": {  # stabilityai / stable-diffusion-xl-base-1.0
        "unet": ("UNet2DConditionModel", {"sample_size": 128, "layers_per_block": 2, "norm_num_groups": 32,
                                          "block_out_channels": (320, 640, 1280), "down_block_types": _XL_DOWN,
                                          "up_block_types": _XL_UP, "transformer_layers_per_block": (1, 2, 10),
                                          "cross_attention_dim": 2048, "attention_head_dim": (5, 10, 20),
                                          "use_linear_projection": True, "addition_embed_type": "text_time",
                                          "addition_embed_type_num_heads": 64, "addition_time_embed_dim": 256,
                                          "projection_class_embeddings_input_dim": 2816}),
        "clip_l": _CLIP_L,
        "clip_g": _CLIP_G,
        "vae": _vae(1024, 0.13025),
    },
    "sdxl_refiner": {  # stabilityai / stable-diffusion-xl-refiner-1.0
        "unet": ("UNet2DConditionModel", {"sample_size": 128, "layers_per_block": 2, "norm_num_groups": 32,
                                          "block_out_channels": (384, 768, 1536, 1536),
                                          "down_block_types": _REFINER_DOWN, "up_block_types": _REFINER_UP,
                                          "transformer_layers_per_block": 4, "cross_attention_dim": 1280,
                                          "attention_head_dim": (6, 12, 24, 24), "use_linear_projection": True,
                                          "addition_embed_type": "text_time", "addition_time_embed_dim": 256,
                                          "projection_class_embeddings_input_dim": 2560}),
        "clip_g": _CLIP_G,
        "vae": _vae(1024, 0.13025),
    },
    "svd": {  # stabilityai / stable-video-diffusion-img2vid-xt
        "unet": ("UNetSpatioTemporalConditionModel", {"sample_size": 96, "in_channels": 8, "out_channels": 4,
                                                      "block_out_channels": (320, 640, 1280, 1280),
                                                      "layers_per_block": 2, "cross_attention_dim": 1024,
                                                      "num_attention_heads": (5, 10, 20, 20),
                                                      "transformer_layers_per_block": 1,
                                                      "addition_time_embed_dim": 256,
                                                      "projection_class_embeddings_input_dim": 768,
                                                      "num_frames": 25}),
        "vae": _vae(768, 0.18215, cls="AutoencoderKLTemporalDecoder"),
    },
}

# OpenCLIP text towers carry tensors the HF classes do not have: `logit_scale` (both) and, for SD 2's
# CLIP-H (a plain CLIPTextModel in diffusers), `text_projection` [width, embed_dim].
OPENCLIP_COMPONENTS = ("clip_h", "clip_g")
_CLIP_H_EMBED_DIM = {"tiny": 16, "full": 1024}

# Where each text encoder sits in a single file, and in which naming.
SINGLE_FILE_TEXT = {
    "sd1": {"clip_l": ("cond_stage_model.transformer.", "hf")},
    "sd2": {"clip_h": ("cond_stage_model.model.", "openclip")},
    "sdxl": {"clip_l": ("conditioner.embedders.0.transformer.", "hf"),
             "clip_g": ("conditioner.embedders.1.model.", "openclip")},
    "sdxl_refiner": {"clip_g": ("conditioner.embedders.0.model.", "openclip")},
    "svd": {},
}

# diffusers folder: sub-folder of each text encoder.
DIFFUSERS_TEXT = {
    "sd1": {"clip_l": "text_encoder"},
    "sd2": {"clip_h": "text_encoder"},
    "sdxl": {"clip_l": "text_encoder", "clip_g": "text_encoder_2"},
    "sdxl_refiner": {"clip_g": "text_encoder_2"},
    "svd": {},
}


def _check(arch, size="tiny", layout="single"):
    if arch not in ARCHES:
        raise CkptbendError(f"unknown architecture {arch!r} (one of {', '.join(ARCHES)})")
    if size not in SIZES:
        raise CkptbendError(f"unknown size {size!r} (one of {', '.join(SIZES)})")
    if layout not in LAYOUTS:
        raise CkptbendError(f"unknown layout {layout!r} (one of {', '.join(LAYOUTS)})")


def _component_class(name):
    import diffusers
    import transformers

    cls = getattr(diffusers, name, None) or getattr(transformers, name, None)
    if cls is None:
        raise CkptbendError(f"no model class {name!r} in diffusers or transformers")
    return cls


def _instantiate(class_name, kwargs):
    cls = _component_class(class_name)
    if class_name.startswith("CLIP"):
        from transformers import CLIPTextConfig

        return cls(CLIPTextConfig(**kwargs))
    return cls(**kwargs)


def build_models(arch: str, size: str = "tiny", seed: int = 0) -> dict[str, torch.nn.Module]:
    """The arch's component models: {"unet", text encoders ("clip_l" / "clip_h" / "clip_g"), "vae"}.

    ``tiny``: real modules with seeded random weights (every floating tensor is perturbed, so no
    tensor is all zeros or all ones). ``full``: real configs on the ``meta`` device (``seed`` is
    unused: values are drawn when the file is written).

    OpenCLIP towers (``clip_h``, ``clip_g``) carry an ``openclip_extra`` attribute: the tensors
    OpenCLIP files have and the HF class does not (``logit_scale``; ``text_projection`` for CLIP-H).
    """
    _check(arch, size)
    import diffusers  # noqa: F401  (import outside the RNG fork: first import may touch RNG state)
    import transformers  # noqa: F401

    configs = (TINY_CONFIGS if size == "tiny" else FULL_CONFIGS)[arch]
    models: dict[str, torch.nn.Module] = {}
    if size == "full":
        with torch.device("meta"):
            for name, (cls, kwargs) in configs.items():
                models[name] = _instantiate(cls, kwargs).eval()
        for name in OPENCLIP_COMPONENTS:
            if name in models:
                models[name].openclip_extra = _openclip_extra(name, models[name], size, None)
        return models

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for name, (cls, kwargs) in configs.items():
            models[name] = _instantiate(cls, kwargs).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, model in models.items():
            for tensor in model.state_dict().values():
                if tensor.is_floating_point():
                    tensor.add_(torch.randn(tensor.shape, generator=g, dtype=tensor.dtype) * 0.02)
            if name in OPENCLIP_COMPONENTS:
                model.openclip_extra = _openclip_extra(name, model, size, g)
    return models


def _openclip_extra(name, model, size, g):
    width = model.config.hidden_size
    shapes = {"logit_scale": ()}
    if name == "clip_h":
        shapes["text_projection"] = (width, _CLIP_H_EMBED_DIM[size])
    if g is None:
        return {k: torch.empty(s, device="meta") for k, s in shapes.items()}
    extra = {k: torch.randn(s, generator=g) * width ** -0.5 for k, s in shapes.items()}
    extra["logit_scale"] = torch.tensor(math.log(1 / 0.07)) + torch.randn((), generator=g) * 0.01
    return extra


# ------------------------------------------------------------------------------------------------
# diffusers → original (LDM / generative-models) names
# ------------------------------------------------------------------------------------------------

_UNET_TOP = {
    "conv_in.": "input_blocks.0.0.",
    "time_embedding.linear_1.": "time_embed.0.",
    "time_embedding.linear_2.": "time_embed.2.",
    "add_embedding.linear_1.": "label_emb.0.0.",      # SDXL / SVD: "sequential" class embedding
    "add_embedding.linear_2.": "label_emb.0.2.",
    "class_embedding.linear_1.": "label_emb.0.0.",
    "class_embedding.linear_2.": "label_emb.0.2.",
    "conv_norm_out.": "out.0.",
    "conv_out.": "out.2.",
}
_UNET_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
                "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}


def _rename_head(rest, table, where):
    head, dot, tail = rest.partition(".")
    if head not in table:
        raise KeyError(f"no original name for {where}{rest}")
    return table[head] + dot + tail


def _unet_resnet_ldm(rest, where):
    """ResnetBlock2D → ResBlock. SVD's SpatioTemporalResBlock → sgm's VideoResBlock, which *is* a
    ResBlock (spatial part, same names) plus ``time_stack`` (a 3-D ResBlock: in_layers / emb_layers /
    out_layers, no skip since channels match) and ``time_mixer`` (AlphaBlender, ``mix_factor``)."""
    if rest.startswith("spatial_res_block."):
        return _rename_head(rest[len("spatial_res_block."):], _UNET_RESNET, where)
    if rest.startswith("temporal_res_block."):
        return "time_stack." + _rename_head(rest[len("temporal_res_block."):], _UNET_RESNET, where)
    if rest.startswith("time_mixer."):
        return rest
    return _rename_head(rest, _UNET_RESNET, where)


def _unet_attention_ldm(rest):
    """Transformer2DModel keeps its names (norm, proj_in, transformer_blocks.D.attn1.to_q, …, proj_out).
    SVD's TransformerSpatioTemporalModel → sgm's SpatialVideoTransformer: ``temporal_transformer_blocks``
    are ``time_stack`` (VideoTransformerBlock: norm_in, ff_in, norm1, attn1, norm2, attn2, norm3, ff —
    the same names as diffusers' TemporalBasicTransformerBlock), ``time_pos_embed`` is a
    Sequential(linear, SiLU, linear) → indices 0 / 2, ``time_mixer.mix_factor`` is unchanged."""
    if rest.startswith("temporal_transformer_blocks."):
        return "time_stack." + rest[len("temporal_transformer_blocks."):]
    if rest.startswith("time_pos_embed.linear_1."):
        return "time_pos_embed.0." + rest[len("time_pos_embed.linear_1."):]
    if rest.startswith("time_pos_embed.linear_2."):
        return "time_pos_embed.2." + rest[len("time_pos_embed.linear_2."):]
    return rest


_UNET_BLOCK = re.compile(r"(down_blocks|up_blocks)\.(\d+)\.(resnets|attentions|downsamplers|upsamplers)\.(\d+)\.(.+)")
_MID_BLOCK = re.compile(r"mid_block\.(resnets|attentions)\.(\d+)\.(.+)")


def unet_key_to_ldm(key: str, config) -> str:
    """One diffusers UNet key → its original name (without ``model.diffusion_model.``)."""
    per = config["layers_per_block"]
    if not isinstance(per, int):
        raise CkptbendError("synth: layers_per_block must be an int")
    for old, new in _UNET_TOP.items():
        if key.startswith(old):
            return new + key[len(old):]
    if m := _UNET_BLOCK.fullmatch(key):
        group, b, kind, i, rest = m[1], int(m[2]), m[3], int(m[4]), m[5]
        if kind == "downsamplers":       # Downsample2D.conv → Downsample.op, in its own input block
            return f"input_blocks.{(b + 1) * (per + 1)}.0.op." + rest.removeprefix("conv.")
        if kind == "upsamplers":         # Upsample2D.conv → Upsample.conv after the last resnet (+ attention)
            has_attn = "CrossAttn" in config["up_block_types"][b]
            return f"output_blocks.{b * (per + 1) + per}.{2 if has_attn else 1}." + rest
        if group == "down_blocks":
            n = 1 + b * (per + 1) + i
            prefix = f"input_blocks.{n}."
        else:
            n = b * (per + 1) + i
            prefix = f"output_blocks.{n}."
        if kind == "resnets":
            return prefix + "0." + _unet_resnet_ldm(rest, key)
        return prefix + "1." + _unet_attention_ldm(rest)
    if m := _MID_BLOCK.fullmatch(key):
        kind, i, rest = m[1], int(m[2]), m[3]
        if kind == "resnets":
            return f"middle_block.{2 * i}." + _unet_resnet_ldm(rest, key)
        return f"middle_block.{2 * i + 1}." + _unet_attention_ldm(rest)
    raise KeyError(f"no original name for UNet key {key}")


def unet_to_ldm(state: dict, config) -> dict:
    """A diffusers UNet state dict → original names (no prefix). The same tensor objects."""
    out = {}
    for key, tensor in state.items():
        new = unet_key_to_ldm(key, config)
        if new in out:
            raise KeyError(f"two UNet keys map to {new}")
        out[new] = tensor
    return out


_VAE_TOP = {"encoder.conv_norm_out.": "encoder.norm_out.", "decoder.conv_norm_out.": "decoder.norm_out.",
            # SVD: sgm's AE3DConv is a Conv2d (conv_out) holding a Conv3d `time_mix_conv`.
            "decoder.time_conv_out.": "decoder.conv_out.time_mix_conv."}
_VAE_RESNET = {"norm1": "norm1", "conv1": "conv1", "norm2": "norm2", "conv2": "conv2",
               "conv_shortcut": "nin_shortcut", "time_emb_proj": "temb_proj"}
_VAE_TEMPORAL = {"norm1": "in_layers.0", "conv1": "in_layers.2", "norm2": "out_layers.0", "conv2": "out_layers.3"}
_VAE_ATTN = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out": "proj_out"}
_VAE_BLOCK = re.compile(r"(encoder|decoder)\.(down_blocks|up_blocks)\.(\d+)\."
                        r"(resnets|downsamplers|upsamplers)\.(\d+)\.(.+)")
_VAE_MID = re.compile(r"(encoder|decoder)\.mid_block\.(resnets|attentions)\.(\d+)\.(.+)")


def _vae_resnet_ldm(rest, where):
    """ResnetBlock2D → ResnetBlock (nin_shortcut). SVD decoder: SpatioTemporalResBlock → sgm's
    temporal_ae.VideoResBlock = ResnetBlock (spatial, same names) + ``time_stack`` (a 3-D ResBlock
    without time embedding: in_layers / out_layers) + ``mix_factor`` (a parameter of the block
    itself, "learned" merge strategy)."""
    if rest.startswith("spatial_res_block."):
        return _rename_head(rest[len("spatial_res_block."):], _VAE_RESNET, where)
    if rest.startswith("temporal_res_block."):
        return "time_stack." + _rename_head(rest[len("temporal_res_block."):], _VAE_TEMPORAL, where)
    if rest == "time_mixer.mix_factor":
        return "mix_factor"
    return _rename_head(rest, _VAE_RESNET, where)


def vae_key_to_ldm(key: str, n_up: int) -> str:
    for old, new in _VAE_TOP.items():
        if key.startswith(old):
            return new + key[len(old):]
    if m := _VAE_BLOCK.fullmatch(key):
        part, b, kind, i, rest = m[1], int(m[3]), m[4], int(m[5]), m[6]
        level = b if part == "encoder" else n_up - 1 - b      # the LDM decoder counts up levels from the bottom
        where = f"{part}.{'down' if part == 'encoder' else 'up'}.{level}."
        if kind == "resnets":
            return where + f"block.{i}." + _vae_resnet_ldm(rest, key)
        return where + ("downsample." if kind == "downsamplers" else "upsample.") + rest
    if m := _VAE_MID.fullmatch(key):
        part, kind, i, rest = m[1], m[2], int(m[3]), m[4]
        if kind == "resnets":
            return f"{part}.mid.block_{i + 1}." + _vae_resnet_ldm(rest, key)
        rest = rest.replace("to_out.0.", "to_out.")
        return f"{part}.mid.attn_{i + 1}." + _rename_head(rest, _VAE_ATTN, key)
    if key.split(".")[0] in ("encoder", "decoder", "quant_conv", "post_quant_conv"):
        return key                                             # conv_in, conv_out, quant convs
    raise KeyError(f"no original name for VAE key {key}")


def vae_to_ldm(state: dict, config) -> dict:
    """A diffusers VAE state dict → original names (no prefix). The mid-block attention's q/k/v/proj_out
    weights become 1×1 convolutions ([C, C, 1, 1]) as in the original files."""
    n_up = len(config["up_block_types"]) if "up_block_types" in config else len(config["block_out_channels"])
    out = {}
    for key, tensor in state.items():
        new = vae_key_to_ldm(key, n_up)
        if ".mid.attn_" in new and new.endswith(".weight") and tensor.ndim == 2:
            tensor = tensor[:, :, None, None]
        if new in out:
            raise KeyError(f"two VAE keys map to {new}")
        out[new] = tensor
    return out


def hf_clip_state_dict(model) -> dict:
    """HF CLIP text-encoder names as real files have them: ``text_model.…`` (+ ``text_projection.weight``).
    transformers 5's CLIPTextModel drops the ``text_model.`` prefix from its own state dict; it is put back."""
    state = model.state_dict()
    if not any(k.startswith("text_model.") for k in state):
        state = {"text_model." + k: v for k, v in state.items()}
    return state


_OPENCLIP_LAYER = {"self_attn.out_proj": "attn.out_proj", "layer_norm1": "ln_1", "layer_norm2": "ln_2",
                   "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj"}
_HF_LAYER = re.compile(r"text_model\.encoder\.layers\.(\d+)\.(.+)\.(weight|bias)")


def openclip_state_dict(model) -> dict:
    """An HF CLIP text model → OpenCLIP names (no prefix): ``transformer.resblocks.N.attn.in_proj_weight``
    [3d, d] (q rows 0:d, k d:2d, v 2d:3d), ``in_proj_bias``, ``attn.out_proj``, ``ln_1``, ``ln_2``,
    ``mlp.c_fc``, ``mlp.c_proj``, ``token_embedding.weight``, ``positional_embedding``, ``ln_final``,
    ``text_projection`` [d, embed] (HF's ``text_projection.weight`` transposed), ``logit_scale``."""
    out, qkv = {}, {}
    for key, t in hf_clip_state_dict(model).items():
        if key == "text_model.embeddings.token_embedding.weight":
            out["token_embedding.weight"] = t
        elif key == "text_model.embeddings.position_embedding.weight":
            out["positional_embedding"] = t
        elif key.startswith("text_model.final_layer_norm."):
            out["ln_final." + key.rsplit(".", 1)[1]] = t
        elif key == "text_projection.weight":
            out["text_projection"] = t.t().contiguous()
        elif m := _HF_LAYER.fullmatch(key):
            n, module, kind = int(m[1]), m[2], m[3]
            if module in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"):
                qkv.setdefault((n, kind), {})[module[10]] = t
            elif module in _OPENCLIP_LAYER:
                out[f"transformer.resblocks.{n}.{_OPENCLIP_LAYER[module]}.{kind}"] = t
            else:
                raise KeyError(f"no OpenCLIP name for {key}")
        elif key != "text_model.embeddings.position_ids":
            raise KeyError(f"no OpenCLIP name for {key}")
    for (n, kind), parts in qkv.items():
        out[f"transformer.resblocks.{n}.attn.in_proj_{kind}"] = torch.cat([parts["q"], parts["k"], parts["v"]])
    for name, t in getattr(model, "openclip_extra", {}).items():
        out.setdefault(name, t)
    return out


def _position_ids(model):
    return torch.arange(model.config.max_position_embeddings, dtype=torch.int64)[None]


def ddpm_schedule_buffers(steps=1000, beta_start=0.00085, beta_end=0.012) -> dict:
    """The 12 schedule buffers ldm's LatentDiffusion registers (``register_schedule``, scaled-linear
    betas, v_posterior 0), saved at the top level of SD 1.x / 2.x single files. Real values, float32."""
    betas = torch.linspace(beta_start ** 0.5, beta_end ** 0.5, steps, dtype=torch.float64) ** 2
    alphas = 1.0 - betas
    ac = torch.cumprod(alphas, 0)
    ac_prev = torch.cat([torch.ones(1, dtype=torch.float64), ac[:-1]])
    posterior_variance = betas * (1.0 - ac_prev) / (1.0 - ac)
    buffers = {
        "betas": betas, "alphas_cumprod": ac, "alphas_cumprod_prev": ac_prev,
        "sqrt_alphas_cumprod": ac.sqrt(), "sqrt_one_minus_alphas_cumprod": (1.0 - ac).sqrt(),
        "log_one_minus_alphas_cumprod": (1.0 - ac).log(), "sqrt_recip_alphas_cumprod": (1.0 / ac).sqrt(),
        "sqrt_recipm1_alphas_cumprod": (1.0 / ac - 1).sqrt(), "posterior_variance": posterior_variance,
        "posterior_log_variance_clipped": posterior_variance.clamp(min=1e-20).log(),
        "posterior_mean_coef1": betas * ac_prev.sqrt() / (1.0 - ac),
        "posterior_mean_coef2": (1.0 - ac_prev) * alphas.sqrt() / (1.0 - ac),
    }
    return {k: v.float() for k, v in buffers.items()}


def text_encoder_ldm(arch: str, name: str, model) -> dict:
    """One text encoder's single-file tensors, with the arch's prefix."""
    prefix, naming = SINGLE_FILE_TEXT[arch][name]
    if naming == "openclip":
        return {prefix + k: v for k, v in openclip_state_dict(model).items()}
    state = {prefix + k: v for k, v in hf_clip_state_dict(model).items()}
    # int64 [1, 77]: a persistent buffer in the transformers versions real files were saved with.
    state[prefix + "text_model.embeddings.position_ids"] = _position_ids(model)
    return state


def ldm_state_dict(arch: str, models) -> dict[str, torch.Tensor]:
    """The full original single-file state dict: every key → tensor (meta tensors for ``full`` models;
    integer buffers and the DDPM schedule are always real)."""
    _check(arch)
    out = {LDM_UNET_PREFIX + k: v for k, v in unet_to_ldm(models["unet"].state_dict(), models["unet"].config).items()}
    for name in SINGLE_FILE_TEXT[arch]:
        out.update(text_encoder_ldm(arch, name, models[name]))
    vae = vae_to_ldm(models["vae"].state_dict(), models["vae"].config)
    if arch == "svd":
        # SVD's first stage is sgm's AutoencodingEngine (Encoder + VideoDecoder + a regularizer), which
        # has no quant_conv / post_quant_conv; diffusers' AutoencoderKLTemporalDecoder has a quant_conv.
        vae = {k: v for k, v in vae.items() if not k.startswith("quant_conv.")}
    out.update({LDM_VAE_PREFIX + k: v for k, v in vae.items()})
    if arch in ("sd1", "sd2"):
        out.update(ddpm_schedule_buffers())
    return out


# ------------------------------------------------------------------------------------------------
# safetensors writing, one tensor at a time
# ------------------------------------------------------------------------------------------------

# Format dtype names and the order safetensors' writer lays tensors out in: by dtype (this rank,
# descending), then by name. Reproducing it makes a file byte-identical to `save_file`'s.
_ST_DTYPES = {
    torch.bool: ("BOOL", 0), torch.uint8: ("U8", 1), torch.int8: ("I8", 2),
    torch.float8_e5m2: ("F8_E5M2", 3), torch.float8_e4m3fn: ("F8_E4M3", 4),
    torch.int16: ("I16", 5), torch.float16: ("F16", 7), torch.bfloat16: ("BF16", 8),
    torch.int32: ("I32", 9), torch.float32: ("F32", 11), torch.float64: ("F64", 12), torch.int64: ("I64", 13),
}
_CHUNK = 1 << 23   # elements drawn at a time for random tensors


def _out_dtype(t, dtype):
    return dtype if dtype is not None and t.is_floating_point() else t.dtype


def _random_chunks(numel, dtype, rng):
    """Seeded random values in chunks of _CHUNK: random sign and mantissa, exponent 2^-5 or 2^-4, so
    |x| is in [1/32, 1/8) — never zero, inf or NaN in any float dtype, fp8 included. Built from the
    generator's raw bits, several times faster than uniform_ (this is most of a full-size write)."""
    for start in range(0, numel, _CHUNK):
        k = min(_CHUNK, numel - start)
        bits = rng.bit_generator.random_raw((k + 1) // 2).view(np.uint32)[:k]
        bits &= np.uint32(0x80FFFFFF)      # sign, lowest exponent bit, mantissa
        bits |= np.uint32(0x3D000000)      # exponent 122 (+1): 2^-5 or 2^-4
        yield torch.from_numpy(bits.view(np.float32)).to(dtype)


def _raw(t):
    return t.detach().contiguous().reshape(-1).view(torch.uint8).numpy()


def write_safetensors(path, tensors: dict, dtype=torch.float32, generator=None, metadata=None) -> Path:
    """Write ``tensors`` as a safetensors file, streaming: the header is built from shapes and dtypes,
    then each tensor is written in turn. Floating tensors are cast to ``dtype``; meta tensors are
    filled with values from ``generator`` (a ``numpy.random.Generator``; drawn in file order, chunk by
    chunk, so memory stays small).
    ``dtype=None`` keeps every tensor's dtype.
    The layout matches safetensors' own writer (dtype order, then name; space-padded header)."""
    path = Path(path)
    entries = []
    for name, t in tensors.items():
        out = _out_dtype(t, dtype)
        if out not in _ST_DTYPES:
            raise CkptbendError(f"synth: cannot write dtype {out}")
        entries.append((name, t, out))
    entries.sort(key=lambda e: (-_ST_DTYPES[e[2]][1], e[0]))
    header = {"__metadata__": dict(metadata if metadata is not None else {"format": "pt"})}
    offset = 0
    for name, t, out in entries:
        nbytes = t.numel() * out.itemsize
        header[name] = {"dtype": _ST_DTYPES[out][0], "shape": list(t.shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".synth-tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(struct.pack("<Q", len(blob)))
            f.write(blob)
            for name, t, out in entries:
                if t.is_meta:
                    if not out.is_floating_point:
                        raise CkptbendError(f"synth: no value for integer tensor {name}")
                    if generator is None:
                        raise CkptbendError("synth: meta tensors need a generator")
                    for chunk in _random_chunks(t.numel(), out, generator):
                        f.write(_raw(chunk))
                else:
                    f.write(_raw(t.to(out)))
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


_UNITS = {"B": 1, "KB": 10 ** 3, "MB": 10 ** 6, "GB": 10 ** 9, "TB": 10 ** 12,
          "KIB": 2 ** 10, "MIB": 2 ** 20, "GIB": 2 ** 30}


def _parse_size(size) -> int:
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", str(size))
    if not m or m[2].upper() not in _UNITS | {"": 1}:
        raise CkptbendError(f"synth: cannot read shard size {size!r} (e.g. 20KB, 5GB)")
    return int(float(m[1]) * _UNITS.get(m[2].upper(), 1))


def _write_weights(folder: Path, stem: str, tensors: dict, dtype, generator, shard_size, total_parameters=False):
    """``{stem}.safetensors``, or shards ``{stem}-0000i-of-0000n.safetensors`` + ``{stem}.safetensors.index.json``
    split greedily in state-dict order (as huggingface_hub's splitter does)."""
    if shard_size is None:
        write_safetensors(folder / f"{stem}.safetensors", tensors, dtype, generator)
        return
    limit = _parse_size(shard_size)
    shards, current, used = [], {}, 0
    for name, t in tensors.items():
        nbytes = t.numel() * _out_dtype(t, dtype).itemsize
        if current and used + nbytes > limit:
            shards.append(current)
            current, used = {}, 0
        current[name] = t
        used += nbytes
    shards.append(current)
    if len(shards) == 1:
        write_safetensors(folder / f"{stem}.safetensors", tensors, dtype, generator)
        return
    weight_map, total = {}, 0
    for i, shard in enumerate(shards, 1):
        fname = f"{stem}-{i:05d}-of-{len(shards):05d}.safetensors"
        write_safetensors(folder / fname, shard, dtype, generator)
        for name, t in shard.items():
            weight_map[name] = fname
            total += t.numel() * _out_dtype(t, dtype).itemsize
    meta = {"total_size": total}
    if total_parameters:
        meta = {"total_parameters": sum(t.numel() for t in tensors.values()), **meta}
    index = {"metadata": meta, "weight_map": dict(sorted(weight_map.items()))}
    (folder / f"{stem}.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


# ------------------------------------------------------------------------------------------------
# diffusers folders
# ------------------------------------------------------------------------------------------------

_PIPELINES = {
    "sd1": ("StableDiffusionPipeline", "PNDMScheduler", {"requires_safety_checker": False}),
    "sd2": ("StableDiffusionPipeline", "DDIMScheduler", {"requires_safety_checker": False}),
    "sdxl": ("StableDiffusionXLPipeline", "EulerDiscreteScheduler", {"force_zeros_for_empty_prompt": True}),
    "sdxl_refiner": ("StableDiffusionXLImg2ImgPipeline", "EulerDiscreteScheduler",
                     {"force_zeros_for_empty_prompt": False, "requires_aesthetics_score": True}),
    "svd": ("StableVideoDiffusionPipeline", "EulerDiscreteScheduler", {}),
}
_SCHEDULERS = {
    "sd1": {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear", "set_alpha_to_one": False,
            "skip_prk_steps": True, "steps_offset": 1},
    "sd2": {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear", "clip_sample": False,
            "set_alpha_to_one": False, "steps_offset": 1, "prediction_type": "v_prediction"},
    "sdxl": {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear", "steps_offset": 1,
             "timestep_spacing": "leading"},
    "svd": {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
            "prediction_type": "v_prediction", "use_karras_sigmas": True, "sigma_min": 0.002, "sigma_max": 700.0,
            "timestep_type": "continuous", "timestep_spacing": "leading", "steps_offset": 1},
}
_SCHEDULERS["sdxl_refiner"] = _SCHEDULERS["sdxl"]


def _diffusers_text_encoders(arch, models):
    """sub-folder → (model class name, config, HF-named tensors). SD 2's text_encoder is CLIP-H
    without its last layer (SD 2 conditions on the penultimate layer; diffusers' config has 23)."""
    out = {}
    for name, sub in DIFFUSERS_TEXT[arch].items():
        model = models[name]
        config = copy.deepcopy(model.config)
        state = hf_clip_state_dict(model)
        if arch == "sd2":
            last = config.num_hidden_layers - 1
            state = {k: v for k, v in state.items() if not k.startswith(f"text_model.encoder.layers.{last}.")}
            config.num_hidden_layers = last
        config.architectures = [type(model).__name__]
        out[sub] = (type(model).__name__, config, state)
    return out


def _tokenizer(folder: Path):
    """A tiny byte-level CLIP tokenizer (512 byte symbols + specials, no merges): real files use the
    49408-token CLIP vocabulary, which is not available offline."""
    from transformers import CLIPTokenizer

    symbols = [chr(c) for c in range(33, 127)] + [chr(c) for c in range(161, 173)] + [chr(c) for c in range(174, 256)]
    symbols += [chr(256 + i) for i in range(256 - len(symbols))]   # GPT-2's byte → unicode table
    vocab = {s: i for i, s in enumerate(symbols)}
    vocab.update({s + "</w>": i + 256 for i, s in enumerate(symbols)})
    vocab.update({"<|startoftext|>": 512, "<|endoftext|>": 513})
    CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77).save_pretrained(folder)


def _cast_copy(model, dtype):
    model = copy.deepcopy(model)
    with torch.no_grad():
        for t in list(model.parameters()) + list(model.buffers()):
            if t.is_floating_point():
                t.data = t.data.to(dtype)
    return model


def _write_diffusers(root: Path, arch, models, size, dtype, generator, shard_size):
    import diffusers

    root.mkdir(parents=True, exist_ok=True)
    pipeline, scheduler, extra = _PIPELINES[arch]
    index = {"_class_name": pipeline, "_diffusers_version": diffusers.__version__, **extra,
             "feature_extractor": [None, None], "image_encoder": [None, None]}   # SVD's: not generated
    if arch in ("sd1", "sd2"):
        index["safety_checker"] = [None, None]

    for sub in ("unet", "vae"):
        model = models[sub]
        index[sub] = ["diffusers", type(model).__name__]
        if size == "tiny":   # the model's own writer
            kwargs = {"max_shard_size": shard_size} if shard_size is not None else {}
            _cast_copy(model, dtype).save_pretrained(root / sub, safe_serialization=True, **kwargs)
        else:
            model.save_config(root / sub)
            _write_weights(root / sub, "diffusion_pytorch_model", model.state_dict(), dtype, generator, shard_size)

    texts = _diffusers_text_encoders(arch, models)
    if arch == "sdxl_refiner":
        index.update(text_encoder=[None, None], tokenizer=[None, None])
    for sub, (cls, config, state) in texts.items():
        index[sub] = ["transformers", cls]
        index[sub.replace("text_encoder", "tokenizer")] = ["transformers", "CLIPTokenizer"]
        config.dtype = dtype
        (root / sub).mkdir(parents=True, exist_ok=True)
        config.save_pretrained(root / sub)
        _write_weights(root / sub, "model", state, dtype, generator, shard_size, total_parameters=True)
        _tokenizer(root / sub.replace("text_encoder", "tokenizer"))

    getattr(diffusers, scheduler)(**_SCHEDULERS[arch]).save_config(root / "scheduler")
    index["scheduler"] = ["diffusers", scheduler]
    (root / "model_index.json").write_text(json.dumps(dict(sorted(index.items())), indent=2) + "\n")
    return root


# ------------------------------------------------------------------------------------------------
# entry point
# ------------------------------------------------------------------------------------------------

def layout_state_dict(arch: str, layout: str, models) -> dict[str, torch.Tensor]:
    """The tensors of a one-file layout (everything but ``diffusers``)."""
    _check(arch, layout=layout)
    if layout == "single":
        return ldm_state_dict(arch, models)
    if layout in ("unet", "unet_bare"):
        state = unet_to_ldm(models["unet"].state_dict(), models["unet"].config)
        prefix = LDM_UNET_PREFIX if layout == "unet" else ""
        return {prefix + k: v for k, v in state.items()}
    if layout == "unet_diffusers":
        return dict(models["unet"].state_dict())
    if layout == "text_encoder":
        texts = _diffusers_text_encoders(arch, models)
        if not texts:
            raise CkptbendError(f"synth: {arch} has no text encoder")
        return texts["text_encoder" if "text_encoder" in texts else "text_encoder_2"][2]
    if layout == "text_encoder_openclip":
        names = [n for n in SINGLE_FILE_TEXT[arch] if SINGLE_FILE_TEXT[arch][n][1] == "openclip"]
        if not names:
            raise CkptbendError(f"synth: {arch} has no OpenCLIP text encoder")
        return openclip_state_dict(models[names[0]])
    raise CkptbendError(f"synth: layout {layout!r} is not a single file")


def write_checkpoint(path, arch: str, layout: str = "single", size: str = "tiny", dtype=torch.float32,
                     seed: int = 0, shard_size=None) -> Path:
    """Write a synthetic checkpoint and return its path (a file, or the folder for ``diffusers``).

    ``dtype`` applies to floating tensors (fp32, fp16, bf16, fp8 e4m3fn / e5m2); integer buffers keep
    theirs. Deterministic for a given seed. ``shard_size`` (e.g. "20KB") shards the weights of a
    ``diffusers`` folder, with ``*.safetensors.index.json``.
    """
    _check(arch, size, layout)
    if dtype not in DTYPES:
        raise CkptbendError(f"synth: unsupported dtype {dtype}")
    if shard_size is not None and layout != "diffusers":
        raise CkptbendError("synth: shard_size applies to the diffusers layout only")
    path = Path(path)
    models = build_models(arch, size, seed)
    generator = np.random.default_rng(seed)   # values of meta (full-size) tensors
    if layout == "diffusers":
        return _write_diffusers(path, arch, models, size, dtype, generator, shard_size)
    return write_safetensors(path, layout_state_dict(arch, layout, models), dtype, generator)
