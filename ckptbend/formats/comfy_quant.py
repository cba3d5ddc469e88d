"""ComfyUI's quantised safetensors, as data: which layers of a file are quantised, in which format, and
which of their tensors hold the codes and the scales.

A layer `<layer>` is quantised when the file says so, in one of three ways ComfyUI reads:
- `<layer>.comfy_quant`: a uint8 tensor holding JSON, e.g. {"format": "int8_tensorwise", "convrot": true,
  "convrot_groupsize": 256} (what ComfyUI writes today);
- the file metadata `_quantization_metadata`: {"layers": {"<layer>": {"format": ...}}} (ComfyUI turns it into
  comfy_quant entries on load);
- the older "scaled fp8": an fp8 `<layer>.weight` beside a float32 scalar `<layer>.scale_weight`. ComfyUI needs
  a `scaled_fp8` marker tensor to read it so; ckptbend does not: a per-tensor scale beside an fp8 weight is
  always part of that weight, and so is a `<layer>.weight_scale` scalar beside one without a comfy_quant entry.

Formats whose scales cannot take a factor by ckptbend's rule (w4a4, AWQ, w4a8, SVDQuant, ...) are named, so a
bake that reaches them is refused with their name rather than scaling codes it does not understand.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, replace

from ..errors import CkptbendError

FP8 = ("F8_E4M3", "F8_E5M2")
SCALED_FP8_MARKER = "scaled_fp8"
QUANT_SUFFIX = ".comfy_quant"
METADATA_KEY = "_quantization_metadata"
MAX_CONF_BYTES = 1 << 16   # a comfy_quant entry is a few dozen bytes of JSON


@dataclass(frozen=True)
class Format:
    """How a quantised weight is stored. `outer`: the scale multiplying the whole weight (per tensor, or for
    int8 per output channel); `block_scale` / `block`: the per-block scales of block formats and their width in
    input columns; `packed`: weight elements per stored byte column (nvfp4 packs two e2m1 codes per byte)."""
    name: str
    codes: tuple[str, ...]            # safetensors dtypes the weight's codes may be stored in
    outer: str | None                 # suffix after "<layer>." of the outer scale, if any
    block_scale: str | None = None
    block: int = 1
    packed: int = 1
    label: str = ""                   # how reports name it

    def tensors(self, layer: str) -> dict[str, str]:
        """role → tensor name of this format's tensors for `layer` (weight, outer, block)."""
        roles = {"weight": "weight", "outer": self.outer, "block": self.block_scale}
        return {role: f"{layer}.{suffix}" for role, suffix in roles.items() if suffix}


FORMATS = {f.name: f for f in (
    Format("float8_e4m3fn", ("F8_E4M3",), "weight_scale", label="fp8 e4m3fn × per-tensor weight_scale"),
    Format("float8_e5m2", ("F8_E5M2",), "weight_scale", label="fp8 e5m2 × per-tensor weight_scale"),
    Format("int8_tensorwise", ("I8",), "weight_scale", label="int8 × weight_scale"),
    Format("nvfp4", ("U8",), "weight_scale_2", block_scale="weight_scale", block=16, packed=2,
           label="nvfp4 (e2m1 × fp8 block scales × weight_scale_2)"),
    Format("mxfp8", ("F8_E4M3",), None, block_scale="weight_scale", block=32,
           label="mxfp8 (fp8 × power-of-two block scales)"),
    Format("scaled_fp8", FP8, "scale_weight", label="scaled fp8 (fp8 × scale_weight)"),
)}
# Formats ComfyUI (or a custom node) writes whose scales ckptbend's rule cannot reach: refused by name.
REFUSED = {
    "convrot_w4a4": "int4 codes with per-group scales after a rotation",
    "asym_w4a8_int8": "int4 codes with fp8 group scales and a codebook",
    "awq_w4a16": "int4 codes with per-group scales and zero points",
    "svdquant_w4a4": "int4 codes plus low-rank correction factors",
}


@dataclass(frozen=True)
class QuantLayer:
    """One quantised Linear of a file: its format, and its tensors by role."""
    file: str                  # the file, relative to the checkpoint
    layer: str                 # "<layer>" (the weight is "<layer>.weight")
    format: Format
    convrot: int | None = None # ConvRot group size (int8_tensorwise): weights stored as int8 of (W · H)
    declared: str = ""         # where the format was read: comfy_quant, metadata, marker, or beside

    @property
    def weight(self) -> str:
        return f"{self.layer}.weight"

    @property
    def tensors(self) -> dict[str, str]:
        return self.format.tensors(self.layer)


def _read_bytes(path, t) -> bytes:
    with open(path, "rb", buffering=0) as f:
        return os.pread(f.fileno(), t.nbytes, t.begin)


def _conf(path, header, name) -> dict:
    t = header.tensor(name)
    if t.dtype not in ("U8", "I8") or t.nbytes > MAX_CONF_BYTES:
        raise CkptbendError(f"{path}: {name} is {t.dtype}{list(t.shape)}, not a comfy_quant JSON entry")
    try:
        conf = json.loads(_read_bytes(path, _absolute(header, t)))
    except (ValueError, UnicodeDecodeError):
        raise CkptbendError(f"{path}: {name} does not hold JSON (ComfyUI's comfy_quant entry)") from None
    if not isinstance(conf, dict) or not isinstance(conf.get("format"), str):
        raise CkptbendError(f"{path}: {name} has no \"format\" (ComfyUI's comfy_quant entry)")
    return conf


def _absolute(header, t):
    return replace(t, begin=header.data_start + t.begin, end=header.data_start + t.end)


def _metadata_layers(path, header) -> dict:
    text = header.metadata.get(METADATA_KEY)
    if text is None:
        return {}
    try:
        layers = json.loads(text).get("layers", {})
    except (ValueError, AttributeError):
        raise CkptbendError(f"{path}: metadata {METADATA_KEY} is not ComfyUI's {{\"layers\": ...}} JSON") from None
    if not isinstance(layers, dict) or not all(isinstance(c, dict) for c in layers.values()):
        raise CkptbendError(f"{path}: metadata {METADATA_KEY} is not ComfyUI's {{\"layers\": ...}} JSON")
    return layers


def _layer_named(names: set, layer: str) -> str | None:
    """The file's spelling of a metadata layer name: as written, or under one model prefix."""
    if layer + ".weight" in names:
        return layer
    found = [n.removesuffix(".weight") for n in names if n.endswith("." + layer + ".weight")]
    return found[0] if len(found) == 1 else None


def _convrot(conf: dict) -> int | None:
    params = conf.get("params") if isinstance(conf.get("params"), dict) else {}
    if not conf.get("convrot", params.get("convrot", False)):
        return None
    return int(conf.get("convrot_groupsize", params.get("convrot_groupsize", 256)))


def _format_of(conf: dict, layer: str, path) -> Format:
    name = conf["format"]
    if name in FORMATS and name != "scaled_fp8":
        return FORMATS[name]
    why = REFUSED.get(name, "a format ckptbend does not know")
    return Format(name, (), None, label=f"{name} ({why})")


def _is_scalar(t) -> bool:
    return t.dtype in ("F32", "F16", "BF16", "F64") and len(t.shape) <= 1 and all(d == 1 for d in t.shape)


_CACHE: dict = {}


def layers_of(rel: str, header) -> dict[str, QuantLayer]:
    """weight name → QuantLayer for every quantised layer of one file (reads the small comfy_quant entries)."""
    path = header.path
    stat = os.stat(path)
    key = (str(path), stat.st_size, stat.st_mtime_ns, stat.st_ino, rel)
    if key not in _CACHE:
        if len(_CACHE) > 64:     # a run asks about one checkpoint's few files
            _CACHE.clear()
        _CACHE[key] = _find_layers(rel, header)
    return _CACHE[key]


def _find_layers(rel: str, header) -> dict[str, QuantLayer]:
    path, names = header.path, set(header.names)
    found: dict[str, QuantLayer] = {}
    for layer, conf in _metadata_layers(path, header).items():
        if (named := _layer_named(names, layer)) is not None:
            found[named + ".weight"] = QuantLayer(rel, named, _format_of(conf, named, path), _convrot(conf), "metadata")
    for name in sorted(n for n in names if n.endswith(QUANT_SUFFIX)):
        layer = name.removesuffix(QUANT_SUFFIX)
        conf = _conf(path, header, name)
        found[layer + ".weight"] = QuantLayer(rel, layer, _format_of(conf, layer, path), _convrot(conf), "comfy_quant")
    marked = any(n == SCALED_FP8_MARKER or n.endswith("." + SCALED_FP8_MARKER) for n in names)
    for t in header.tensors:
        if t.dtype not in FP8 or not t.name.endswith(".weight") or t.name in found:
            continue
        layer = t.name.removesuffix(".weight")
        for suffix in ("scale_weight", "weight_scale"):
            scale = f"{layer}.{suffix}"
            if scale in names and _is_scalar(header.tensor(scale)):
                missing = "scaled_fp8 marker" if suffix == "scale_weight" else "comfy_quant entry"
                label = "scaled fp8 (fp8 × scale_weight)" if marked and suffix == "scale_weight" else \
                    f"fp8 × per-tensor {suffix} (no {missing})"
                fmt = replace(FORMATS["scaled_fp8"], outer=suffix, label=label)
                found[t.name] = QuantLayer(rel, layer, fmt, None, "marker" if marked else "beside")
                break
    return found


def logical_shapes(header) -> dict[str, tuple[int, ...]]:
    """Every tensor's shape as the model sees it: an nvfp4 weight stores two e2m1 codes per byte (its stored
    [out, in/2] uint8 is [out, in]; told by its weight_scale_2 beside it). Padding, if any, stays."""
    names = set(header.names)
    return {t.name: (t.shape[0], 2 * t.shape[1]) if t.dtype == "U8" and len(t.shape) == 2
            and t.name.endswith(".weight") and t.name.removesuffix("weight") + "weight_scale_2" in names else t.shape
            for t in header.tensors}


def logical_shape(header, name: str) -> tuple[int, ...]:
    """One tensor's shape as the model sees it (logical_shapes)."""
    t = header.tensor(name)
    if t.dtype == "U8" and len(t.shape) == 2 and name.removesuffix("weight") + "weight_scale_2" in set(header.names):
        return (t.shape[0], 2 * t.shape[1])
    return t.shape


def summary(files) -> dict[str, int]:
    """format label → number of quantised layers, over the files of a checkpoint (for `inspect`)."""
    counts: dict[str, int] = {}
    for f in files:
        for q in layers_of(f.rel, f.header).values():
            name = q.format.name if q.format.name != "scaled_fp8" else q.format.label
            if q.convrot:
                name += f" + convrot (group {q.convrot})"
            counts[name] = counts.get(name, 0) + 1
    return counts
