"""ComfyUI's quantised single files, made from a model's state dict the way ComfyUI and comfy-kitchen write
them (tests/test_quantised.py checks each against comfy-kitchen's own quantisers, byte for byte):

============  =====================================================================================
scaled_fp8    the older form: every Linear weight of the model in float8_e4m3fn with a float32 scalar
              `<layer>.scale_weight` (max |w| / 448) and `<layer>.scale_input` (1.0), the marker
              `<model prefix>scaled_fp8` (empty, e4m3fn)
fp8mixed      comfy_quant {"format": "float8_e4m3fn"}: fp8 weight, float32 scalar `weight_scale`
int8          comfy_quant {"format": "int8_tensorwise"}: int8 weight, one float32 `weight_scale` (max |w| / 127)
int8_convrot  comfy_quant {"format": "int8_tensorwise", "convrot": true, "convrot_groupsize": G}: int8 of the
              weight rotated by a G × G Hadamard matrix per group of G input columns, float32 `weight_scale`
              per output channel [out, 1]; layers whose width G does not divide stay unrotated (no convrot
              entry), as ComfyUI's converter leaves them. G is 16 here, so tiny layers rotate (files: 256).
nvfp4         comfy_quant {"format": "nvfp4"}: e2m1 codes two per byte [out, in/2] (padded to 16 × 16), fp8
              e4m3 `weight_scale` per 16 inputs in cuBLAS's tiled layout, float32 `weight_scale_2`
============  =====================================================================================

The "mixed" forms quantise the Linear weights inside the transformer blocks only (as ComfyUI's *_fp8mixed,
*_int8_convrot and *_nvfp4 files keep embedders and final layers in bf16); scaled fp8 quantises every Linear
weight of the model. Everything else is bfloat16.
"""

from __future__ import annotations

import json
import re

import numpy as np
import torch

from ..formats import codecs
from .catalog import QUANTISED  # noqa: F401  (the forms this module writes)

CONVROT_GROUP = 16
# 2-D weights that are embeddings, not Linear layers (T5/UMT5): never quantised.
NOT_LINEAR = re.compile(r"(?:^|\.)(?:shared|embed_tokens|relative_attention_bias)\.weight$")
IN_A_BLOCK = re.compile(r"(?:^|\.)(?:[a-z_]*blocks?|layers)\.\d+\.")   # a transformer block's layer


def comfy_quant(conf: dict) -> torch.Tensor:
    return torch.tensor(list(json.dumps(conf).encode("utf-8")), dtype=torch.uint8)


def _fp8(w: torch.Tensor):
    scale = (w.abs().max() / 448.0).clamp(min=1e-12).reshape(())
    return (w * (1.0 / scale)).clamp(-448, 448).to(torch.float8_e4m3fn), scale


def _int8_rows(w: torch.Tensor):
    scale = (w.abs().amax(dim=1, keepdim=True) / 127.0).clamp(min=1e-30)
    return torch.round(w / scale).clamp(-128, 127).to(torch.int8), scale


def _int8_tensor(w: torch.Tensor):
    scale = (w.abs().max() / 127.0).clamp(min=1e-30).reshape(())
    return torch.round(w / scale).clamp(-128, 127).to(torch.int8), scale


def _rotated(w: torch.Tensor, group: int) -> torch.Tensor:
    h = torch.from_numpy(codecs.hadamard(group)).to(w.dtype)
    return (w.reshape(w.shape[0], -1, group) @ h.T).reshape(w.shape)


def _nvfp4(w: torch.Tensor):
    rows, cols = w.shape
    padded = torch.nn.functional.pad(w, (0, -cols % 16, 0, -rows % 16))
    tensor_scale = (w.abs().max() / (448.0 * 6.0)).to(torch.float32)
    blocks = padded.reshape(padded.shape[0], -1, 16)
    block_scale = (blocks.abs().amax(dim=-1) / 6.0 / tensor_scale).clamp(max=448.0).to(torch.float8_e4m3fn)
    total = tensor_scale * block_scale.to(torch.float32)
    safe = torch.where(total == 0, torch.ones_like(total), total)
    data = torch.where(total[..., None] == 0, 0.0, blocks / safe[..., None]).clamp(-6, 6)
    codes = codecs.pack_e2m1(codecs.to_e2m1(data.reshape(padded.shape).numpy()))
    grid = np.zeros(codecs.tiled_shape(*block_scale.shape), dtype=np.uint8).reshape(-1)
    grid[codecs.tiled_index(*block_scale.shape)] = block_scale.view(torch.uint8).numpy()
    tiled = torch.from_numpy(grid.reshape(codecs.tiled_shape(*block_scale.shape))).view(torch.float8_e4m3fn)
    return torch.from_numpy(codes), tiled, tensor_scale.reshape(())


def _layer(layer: str, w: torch.Tensor, how: str) -> dict[str, torch.Tensor]:
    w = w.float()
    if how == "fp8mixed":
        q, scale = _fp8(w)
        return {"weight": q, "weight_scale": scale, "comfy_quant": comfy_quant({"format": "float8_e4m3fn"})}
    if how == "int8":
        q, scale = _int8_tensor(w)
        return {"weight": q, "weight_scale": scale, "comfy_quant": comfy_quant({"format": "int8_tensorwise"})}
    if how == "int8_convrot":
        rotate = w.shape[1] % CONVROT_GROUP == 0
        q, scale = _int8_rows(_rotated(w, CONVROT_GROUP) if rotate else w)
        conf = {"format": "int8_tensorwise"} | ({"convrot": True, "convrot_groupsize": CONVROT_GROUP} if rotate else {})
        return {"weight": q, "weight_scale": scale, "comfy_quant": comfy_quant(conf)}
    if how == "nvfp4":
        q, block, tensor_scale = _nvfp4(w)
        return {"weight": q, "weight_scale": block, "weight_scale_2": tensor_scale,
                "comfy_quant": comfy_quant({"format": "nvfp4"})}
    scale = (w.abs().max() / 448.0).clamp(min=1e-12).reshape(())    # scaled_fp8: w / scale, as its converters did
    q = (w / scale).to(torch.float8_e4m3fn)
    return {"weight": q, "scale_weight": scale, "scale_input": torch.ones((), dtype=torch.float32)}


def quantise(state: dict[str, torch.Tensor], prefix: str, how: str) -> dict[str, torch.Tensor]:
    """The ComfyUI file form `how` of a checkpoint's tensors; the model is the part under `prefix`."""
    out = {prefix + "scaled_fp8": torch.empty(0, dtype=torch.float8_e4m3fn)} if how == "scaled_fp8" else {}
    for key, t in state.items():
        linear = (key.startswith(prefix) and key.endswith(".weight") and t.ndim == 2 and t.is_floating_point()
                  and not NOT_LINEAR.search(key))
        if linear and (how == "scaled_fp8" or IN_A_BLOCK.search(key[len(prefix):])):
            layer = key.removesuffix(".weight")
            out.update({f"{layer}.{suffix}": v for suffix, v in _layer(layer, t, how).items()})
        else:
            out[key] = t.to(torch.bfloat16) if t.is_floating_point() else t
    return out
