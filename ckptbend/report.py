"""Describe a checkpoint (for `ckptbend inspect`): architecture, layout, components, attention, dtypes."""

from __future__ import annotations

import re
from collections import Counter

from .errors import CkptbendError
from .layouts import Checkpoint, blocks_with_attention
from .layouts.text_encoder_forms import transformers_name
from .layouts.text_encoders import scales as text_encoder_scales
from .formats import comfy_quant, ggml
from .gguf_io import GGUFHeader
from .verify import recorded_recipe

TEXT_LAYER = re.compile(r"(?:^|\.)(?:layers|resblocks|block)\.(\d+)\.")   # HF / OpenCLIP / T5 layer index
INDEX = re.compile(r"\.\d+\.")


def _dit_qk_targets(ckpt: Checkpoint) -> list[str]:
    """What the DiT's q/k factors scale, one name per kind (block index as N): norm weights with qk-norm."""
    return sorted({INDEX.sub(".N.", s.key) + (f" rows {s.rows[0]}:{s.rows[1]}" if s.rows else "")
                   + (f" (used as w + {s.offset:g})" if s.offset else "")
                   for s in ckpt.sites if s.component == "dit" and s.proj in ("q", "k")})


def describe(ckpt: Checkpoint) -> dict:
    dtypes = Counter()
    size = 0
    tensors = Counter()
    for f in ckpt.files:
        size += f.header.file_size
        for t in f.header.tensors:
            dtypes[t.dtype] += 1
            tensors[f.components.get(t.name, "other")] += 1
    model_sites = [s for s in ckpt.sites if s.component in ("unet", "dit")]
    per_block = {}
    for label in blocks_with_attention(ckpt):
        here = [s for s in model_sites if s.block == label]
        per_block[label] = {
            "depth": max((s.depth for s in here if s.depth is not None), default=0) + 1,
            "attn": sorted({s.attn + ("-temporal" if s.temporal else "") for s in here}),
            "streams": sorted({s.stream for s in here if s.stream}),
            # a DiT's q factor lands on a norm weight (1-D) exactly where the block normalises q and k
            "qk_norm": any(s.proj == "q" and s.norm for s in here if s.component == "dit"),
        }
    encoders = {}
    for s in ckpt.sites:
        if s.component not in ("unet", "dit"):   # a layer: its index, or (no index in the key) the key's attention module
            m = TEXT_LAYER.search(transformers_name(s.key))        # llama.cpp's names read as HF's
            encoders.setdefault(s.component, set()).add(m.group(1) if m else s.key.rpartition("_proj")[0])
    try:
        recipe, recipe_error = recorded_recipe(ckpt), None
    except CkptbendError as e:
        recipe, recipe_error = None, e.message
    metadata = {k: v for f in ckpt.files for k, v in f.header.metadata.items() if k != "ckptbend.recipe"}
    return {
        "path": str(ckpt.path),
        "architecture": ckpt.architecture,
        "layout": ckpt.kind,
        "files": [f.rel for f in ckpt.files],
        "size_bytes": size,
        "components": dict(tensors),
        "dtypes": dict(dtypes),
        "attention_blocks": per_block,
        "text_encoder_attention_layers": {c: len(v) for c, v in encoders.items()},
        "text_encoder_notes": {c: note for c in encoders if (note := text_encoder_scales(c))},
        "qk_norm": ckpt.qk_norm,
        "attention_components": sorted({s.component for s in ckpt.sites}),
        "left_alone": list(ckpt.left_alone),
        "dit_qk_targets": _dit_qk_targets(ckpt),
        "quantisation": _quantisation(ckpt, dtypes),
        "metadata": metadata,
        "recipe": recipe.canonical() if recipe else None,
        "recipe_sha256": recipe.sha256 if recipe else None,
        "recipe_error": recipe_error,
    }


def _quantisation(ckpt: Checkpoint, dtypes: Counter) -> str | None:
    """The quantised layers by format (ComfyUI's comfy_quant formats, scaled fp8), and other fp8 tensors; a GGUF
    file's quantised ggml types."""
    if any(isinstance(f.header, GGUFHeader) for f in ckpt.files):
        types = sorted((n, t) for t, n in dtypes.items() if t not in ggml.FLOAT_TYPES)
        parts = [f"{t} ×{n} tensor{'s' * (n != 1)}" + ("" if ggml.why_not(t) is None else " (cannot be scaled)")
                 for n, t in reversed(types)]
        return "GGUF: " + ("; ".join(parts) or "no quantised tensors")
    layers = comfy_quant.summary(ckpt.files)
    quantised = {name for f in ckpt.files for q in comfy_quant.layers_of(f.rel, f.header).values()
                 for name in q.tensors.values()}
    fp8 = sum(1 for f in ckpt.files for t in f.header.tensors
              if t.dtype in comfy_quant.FP8 and t.name not in quantised and t.nbytes)   # not the empty marker
    parts = [f"{name} ×{n} layer{'s' * (n != 1)}" for name, n in sorted(layers.items(), key=lambda kv: -kv[1])]
    parts += [f"fp8 without a scale ×{fp8} tensor{'s' * (fp8 != 1)}"] if fp8 else []
    return "; ".join(parts) or None


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{n} B"
        n /= 1024


def printable(text: str) -> str:
    """`text` with control characters (terminal escape sequences among them) shown as escapes."""
    return "".join(c if c.isprintable() or c == " " else repr(c)[1:-1] if ord(c) > 0xFF or c in "\t\n\r"
                   else f"\\x{ord(c):02x}" for c in text)


def format_text(info: dict) -> str:
    lines = [
        f"{printable(info['path'])}",
        f"  architecture: {info['architecture']}",
        f"  layout:       {info['layout']} ({len(info['files'])} file{'s' * (len(info['files']) != 1)})",
        f"  size:         {_size(info['size_bytes'])}",
        "  components:   " + ", ".join(f"{c} ({n} tensors)" for c, n in info["components"].items()),
        "  dtypes:       " + ", ".join(f"{d} ×{n}" for d, n in sorted(info["dtypes"].items())),
    ]
    if info["attention_blocks"]:
        dit = "dit" in info["components"]
        lines.append("  transformer attention by block:" if dit else "  UNet attention by block:")
        for label, b in info["attention_blocks"].items():
            streams = f" (streams: {', '.join(b['streams'])})" if b["streams"] else ""
            depth = "" if dit else f"depth {b['depth']:<2} "
            qk = " qk-norm" if b.get("qk_norm") else ""
            lines.append(f"    {label:<5} {depth}{' '.join(b['attn'])}{streams}{qk}")
    for c, n in info["text_encoder_attention_layers"].items():
        note = info["text_encoder_notes"].get(c)
        lines.append(f"  {c}: {n} attention layers" + (f" ({note})" if note else ""))
    lines.extend(f"  left alone:   {part}" for part in info["left_alone"])
    if info["quantisation"]:
        lines.append(f"  quantisation: {info['quantisation']}")
    if "dit" in info["components"]:
        lines.append("  qk-norm:      " + ("yes: [dit.*] q/k factors scale the norm weights" if info["qk_norm"]
                                           else "no: [dit.*] q/k factors scale the q/k projection rows"))
        if info["dit_qk_targets"]:
            lines.append("  [dit.*] q/k factors scale: " + ", ".join(info["dit_qk_targets"]))
    if info["qk_norm"] and "unet" in info["attention_components"]:
        lines.append("  note: the model uses qk-norm; q/k multipliers of the UNet nodes cancel there")
    if info["metadata"]:
        lines.append("  metadata:")
        for k, v in info["metadata"].items():
            shown = printable(v if len(v) <= 100 else v[:97] + "...")
            lines.append(f"    {printable(k)}: {shown}")
    if info["recipe"]:
        lines.append(f"  baked by ckptbend with recipe {info['recipe_sha256'][:16]}:")
        lines.extend(("    " + printable(line)).rstrip() for line in info["recipe"].splitlines())
    if info["recipe_error"]:
        lines.append(f"  baked by ckptbend, but the recorded recipe is unreadable: {printable(info['recipe_error'])}")
    return "\n".join(lines)
