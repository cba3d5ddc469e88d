"""Quantised safetensors read as ComfyUI reads them: each `<layer>.comfy_quant` entry picks a comfy-kitchen
layout (PyPI `comfy-kitchen`, CPU eager backend) whose own `dequantize` gives the layer's weight; ComfyUI's
older scaled fp8 (marker + scale_weight) is first renamed to a float8_e4m3fn layer, as ComfyUI's
`convert_old_quants` does. Nothing here re-implements a format: the host's library does the arithmetic."""

import json

import pytest
import torch
from safetensors.torch import load_file

ck = pytest.importorskip("comfy_kitchen")
from comfy_kitchen.tensor import (TensorCoreFP8Layout, TensorCoreMXFP8Layout, TensorCoreNVFP4Layout,  # noqa: E402
                                  TensorWiseINT8Layout)

MARKER = "scaled_fp8"


def _old_quants(state: dict) -> dict:
    """ComfyUI's renaming of a scaled-fp8 file (marker, scale_weight) to comfy_quant layers."""
    markers = [k for k in state if k == MARKER or k.endswith("." + MARKER)]
    if not markers:
        return state
    out = {k: v for k, v in state.items() if k not in markers}
    for k in list(out):
        if k.endswith(".scale_weight"):
            layer = k.removesuffix(".scale_weight")
            out[layer + ".weight_scale"] = out.pop(k)
            out[layer + ".comfy_quant"] = torch.tensor(list(b'{"format": "float8_e4m3fn"}'), dtype=torch.uint8)
        elif k.endswith(".scale_input"):
            out.pop(k)
    return out


def _params(fmt: str, conf: dict, scales: dict, shape):
    common = {"orig_dtype": torch.float32, "orig_shape": shape}
    if fmt in ("float8_e4m3fn", "float8_e5m2"):
        return TensorCoreFP8Layout, TensorCoreFP8Layout.Params(scale=scales["weight_scale"], **common)
    if fmt == "int8_tensorwise":
        rotation = {"convrot": True, "convrot_groupsize": conf.get("convrot_groupsize", 256)} \
            if conf.get("convrot") else {}
        return TensorWiseINT8Layout, TensorWiseINT8Layout.Params(scale=scales["weight_scale"], **rotation, **common)
    if fmt == "nvfp4":
        return TensorCoreNVFP4Layout, TensorCoreNVFP4Layout.Params(
            scale=scales["weight_scale_2"], block_scale=scales["weight_scale"].view(torch.float8_e4m3fn), **common)
    if fmt == "mxfp8":
        return TensorCoreMXFP8Layout, TensorCoreMXFP8Layout.Params(
            scale=scales["weight_scale"].view(torch.float8_e8m0fnu), **common)
    raise AssertionError(f"no comfy-kitchen layout for {fmt}")


def dequantised(path) -> dict[str, torch.Tensor]:
    """Every weight of a file as the model would get it (float64): quantised layers through comfy-kitchen's
    layouts, the rest as stored; scales and comfy_quant entries consumed."""
    state = _old_quants(load_file(str(path)))
    out, used = {}, set()
    for key in sorted(k for k in state if k.endswith(".comfy_quant")):
        layer = key.removesuffix(".comfy_quant")
        conf = json.loads(bytes(state[key].tolist()))
        weight = state[layer + ".weight"]
        names = [f"{layer}.{s}" for s in ("weight_scale", "weight_scale_2") if f"{layer}.{s}" in state]
        scales = {n.rsplit(".", 1)[1]: state[n] for n in names}
        logical = (weight.shape[0], weight.shape[1] * (2 if conf["format"] == "nvfp4" else 1))
        layout, params = _params(conf["format"], conf, scales, logical)
        with ck.registry.use_backend("eager"):
            out[layer + ".weight"] = layout.dequantize(weight, params).double()
        used |= {key, layer + ".weight", *names, layer + ".input_scale"}
    out.update({k: v.double() for k, v in state.items() if k not in used and v.is_floating_point()})
    return out
