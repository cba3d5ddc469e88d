"""diffusers → original (LDM / generative-models) names for SD UNets and VAEs; the inverse of
diffusers' single-file converters, which tests/test_synth.py checks it against."""

from __future__ import annotations

import re

from ..errors import CkptbendError


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
