"""Compare two checkpoints (per-tensor ratios of what differs) or two recipes (values that differ).

A quantised layer (ComfyUI's scaled fp8 or comfy_quant formats) is compared by its effective weight, codes ×
scales, on one line — not tensor by tensor, since a bake moves its factors between codes and scales. A GGUF
tensor is compared by its values as gguf-py dequantises them."""

from __future__ import annotations

import tomllib

import numpy as np

from .arithmetic import SCALABLE, to_float64
from .errors import CkptbendError
from .formats import comfy_quant, ggml
from .gguf_io import GGUFHeader
from .layouts import Checkpoint


def _flatten(value, prefix="") -> dict[str, object]:
    if isinstance(value, dict):
        out = {}
        for k, v in value.items():
            out.update(_flatten(v, f"{prefix}.{k}" if prefix else k))
        return out
    if isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
        out = {}
        for i, v in enumerate(value):
            out.update(_flatten(v, f"{prefix}[{i}]"))
        return out
    return {prefix: value}


def diff_recipes(a, b) -> list[str]:
    """Differing values between two recipes, on their canonical forms (defaults shown as absent)."""
    fa, fb = _flatten(tomllib.loads(a.canonical())), _flatten(tomllib.loads(b.canonical()))
    return [f"{k}: {fa.get(k, '(default)')} → {fb.get(k, '(default)')}"
            for k in sorted(fa.keys() | fb.keys()) if fa.get(k) != fb.get(k)]


def _readable(header, t) -> bool:
    if isinstance(header, GGUFHeader):
        return ggml.why_not(t.dtype) is None
    return t.dtype in SCALABLE


def _values(raw, header, t) -> np.ndarray:
    if isinstance(header, GGUFHeader):
        return ggml.values(raw, t.dtype, t.shape, header.stored[t.name])
    return to_float64(raw, t.dtype, t.shape)


def _read(path, header, t):
    with open(path, "rb") as f:
        f.seek(header.data_start + t.begin)
        return f.read(t.nbytes)


AXES = ("rows", "columns")


def fused_ranges(ckpt: Checkpoint) -> dict[tuple[str, str], tuple[int, dict]]:
    """(file, key) → (axis, {(start, stop): what}) for each tensor the layouts cut into ranges (q|k|v rows,
    Flux's v rows of `linear1`, the attention columns of `linear2`, OpenCLIP's `in_proj`): the plan's ranges."""
    found: dict = {}
    for s in ckpt.sites:
        if s.rows or s.cols:
            axis, span = (0, s.rows) if s.rows else (1, s.cols)
            found.setdefault((s.file, s.key), (axis, {}))[1].setdefault(span, []).append(s.proj)
    return {where: (axis, {span: ", ".join(dict.fromkeys(p)) for span, p in sorted(spans.items())})
            for where, (axis, spans) in found.items()}


def _parts(cut, shape) -> list[tuple[str, tuple]]:
    """(label, index) of each range of a cut tensor, and of what lies between and after them ("other")."""
    if cut is None or len(shape) <= cut[0]:
        return [("", (slice(None),))]
    axis, spans = cut
    parts, at = [], 0
    for (start, stop), what in [*spans.items(), ((shape[axis], shape[axis]), None)]:
        for lo, hi, label in ((at, start, "other"), (start, stop, what)):
            if hi > lo:
                index = (slice(None),) * axis + (slice(lo, hi),)
                parts.append((f" {AXES[axis]} {lo}:{hi} ({label})", index))
        at = max(at, stop)
    return parts


def _ratio_lines(key, a: np.ndarray, b: np.ndarray, cut=None, rounding: float = 0.0) -> list[str]:
    """`rounding`: the largest deviation a requantisation in the tensor's format can leave (relative to the
    largest value), below which a part still counts as scaled."""
    a, b = np.atleast_1d(a), np.atleast_1d(b)    # a 0-D scale compares as one value
    lines = []
    for label, index in _parts(cut, a.shape):
        x, y = a[index].ravel(), b[index].ravel()
        if np.array_equal(x, y):
            continue
        denom = float(x @ x)
        ratio = float(x @ y) / denom if denom else float("nan")
        residual = float(np.abs(y - ratio * x).max()) / max(float(np.abs(x).max()), 1e-30)
        shape = "scaled" if residual < 1e-2 else "scaled, within its format's rounding" if residual <= rounding \
            else "changed (not a pure scale)"
        lines.append(f"{key}{label}: ×{ratio:.6g} {shape}, max deviation {residual:.2e}")
    return lines


# Half a step of each code format, relative to the largest value it holds: e4m3 (also nvfp4's block scales,
# mxfp8's codes) 2^-4, e5m2 2^-3, int8 1/254.
ROUNDING = {"F8_E4M3": 2 ** -4, "F8_E5M2": 2 ** -3, "I8": 1 / 254}


def _layers(cf) -> dict:
    """weight name → QuantLayer, for the quantised layers of one file ckptbend can read whole."""
    names = set(cf.header.names)
    return {w: q for w, q in comfy_quant.layers_of(cf.rel, cf.header).items()
            if q.format.codes and all(n in names for n in q.tensors.values())}


def _layer_parts(path, cf, q) -> dict:
    return {role: (_read(path, cf.header, cf.header.tensor(n)), cf.header.tensor(n)) for role, n in q.tensors.items()}


def _effective_lines(prefix, q, parts_a, parts_b, cut) -> list[str]:
    """One layer compared by its effective weight (codes × scales), whatever its scales' shapes became."""
    from .formats import ops

    kind = q.format.name if q.format.name in ("nvfp4", "mxfp8") else "codes"
    rows = parts_a["weight"][1].shape[0]
    a, b = (ops.effective(kind, parts, 0, rows).astype(np.float64) for parts in (parts_a, parts_b))
    basis = ", in ConvRot's rotated basis" if q.convrot else ""
    label = f"{q.weight} (effective: {q.format.label}{basis})"
    return [prefix + line for line in _ratio_lines(label, a, b, cut, ROUNDING.get(parts_a["weight"][1].dtype, 2 ** -4))]


def diff_checkpoints(a: Checkpoint, b: Checkpoint) -> list[str]:
    folders = a.kind == "diffusers-folder"
    if a.kind != b.kind or (folders and [f.rel for f in a.files] != [f.rel for f in b.files]):
        raise CkptbendError(f"{a.path} and {b.path} have different layouts ({a.kind} vs {b.kind})")
    lines, cuts = [], fused_ranges(a)
    # a norm weight the model uses as (w + offset) (Gemma 3's qk-norm) is compared as it acts
    offsets = {(s.file, s.key): s.offset for s in a.sites if s.offset}
    for fa, fb in zip(a.files, b.files):
        path_a = a.path / fa.rel if a.kind == "diffusers-folder" else a.path
        path_b = b.path / fb.rel if b.kind == "diffusers-folder" else b.path
        tb = {t.name: t for t in fb.header.tensors}
        prefix = f"{fa.rel}: " if a.kind == "diffusers-folder" else ""
        layers_b, compared = _layers(fb), set()
        for weight, q in _layers(fa).items():
            if weight in layers_b and layers_b[weight].format.name == q.format.name:
                compared |= set(q.tensors.values())
                parts_a, parts_b = _layer_parts(path_a, fa, q), _layer_parts(path_b, fb, layers_b[weight])
                if any(parts_a[r][0] != parts_b[r][0] for r in parts_a):
                    lines.extend(_effective_lines(prefix, q, parts_a, parts_b, cuts.get((fa.rel, weight))))
        for ta in fa.header.tensors:
            other = tb.pop(ta.name, None)
            if ta.name in compared:
                continue
            if other is None:
                lines.append(f"{prefix}{ta.name}: only in {a.path.name}")
            elif (ta.dtype, ta.shape) != (other.dtype, other.shape):
                lines.append(f"{prefix}{ta.name}: {ta.dtype}{list(ta.shape)} vs {other.dtype}{list(other.shape)}")
            else:
                raw_a, raw_b = _read(path_a, fa.header, ta), _read(path_b, fb.header, other)
                if raw_a == raw_b:
                    continue
                if not _readable(fa.header, ta):
                    lines.append(f"{prefix}{ta.name}: differs ({ta.dtype})")
                else:
                    cut, offset = cuts.get((fa.rel, ta.name)), offsets.get((fa.rel, ta.name), 0.0)
                    label = f"{ta.name} (as w + {offset:g})" if offset else ta.name
                    lines.extend(prefix + line for line in _ratio_lines(
                        label, _values(raw_a, fa.header, ta) + offset, _values(raw_b, fb.header, other) + offset,
                        cut))
        lines.extend(f"{prefix}{name}: only in {b.path.name}" for name in tb)
    return lines
