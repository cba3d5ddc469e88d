"""Compare two checkpoints (per-tensor ratios of what differs) or two recipes (values that differ)."""

from __future__ import annotations

import tomllib

import numpy as np

from .arithmetic import SCALABLE, to_float64
from .errors import CkptbendError
from .layouts import Checkpoint
from .layouts.text_encoders import OPENCLIP_SUFFIX


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


def _read(path, header, t):
    with open(path, "rb") as f:
        f.seek(header.data_start + t.begin)
        return f.read(t.nbytes)


def _ratio_lines(key, ta, raw_a, raw_b) -> list[str]:
    a = to_float64(raw_a, ta.dtype, ta.shape)
    b = to_float64(raw_b, ta.dtype, ta.shape)
    fused = OPENCLIP_SUFFIX.search(key) and "in_proj" in key
    parts = [(f" rows {i * len(a) // 3}:{(i + 1) * len(a) // 3} ({p})", slice(i * len(a) // 3, (i + 1) * len(a) // 3))
             for i, p in enumerate("qkv")] if fused else [("", slice(None))]
    lines = []
    for label, rows in parts:
        x, y = a[rows].ravel(), b[rows].ravel()
        if np.array_equal(x, y):
            continue
        denom = float(x @ x)
        ratio = float(x @ y) / denom if denom else float("nan")
        residual = float(np.abs(y - ratio * x).max()) / max(float(np.abs(x).max()), 1e-30)
        shape = "scaled" if residual < 1e-2 else "changed (not a pure scale)"
        lines.append(f"{key}{label}: ×{ratio:.6g} {shape}, max deviation {residual:.2e}")
    return lines


def diff_checkpoints(a: Checkpoint, b: Checkpoint) -> list[str]:
    folders = a.kind == "diffusers-folder"
    if a.kind != b.kind or (folders and [f.rel for f in a.files] != [f.rel for f in b.files]):
        raise CkptbendError(f"{a.path} and {b.path} have different layouts ({a.kind} vs {b.kind})")
    lines = []
    for fa, fb in zip(a.files, b.files):
        path_a = a.path / fa.rel if a.kind == "diffusers-folder" else a.path
        path_b = b.path / fb.rel if b.kind == "diffusers-folder" else b.path
        tb = {t.name: t for t in fb.header.tensors}
        prefix = f"{fa.rel}: " if a.kind == "diffusers-folder" else ""
        for ta in fa.header.tensors:
            other = tb.pop(ta.name, None)
            if other is None:
                lines.append(f"{prefix}{ta.name}: only in {a.path.name}")
            elif (ta.dtype, ta.shape) != (other.dtype, other.shape):
                lines.append(f"{prefix}{ta.name}: {ta.dtype}{list(ta.shape)} vs {other.dtype}{list(other.shape)}")
            else:
                raw_a, raw_b = _read(path_a, fa.header, ta), _read(path_b, fb.header, other)
                if raw_a == raw_b:
                    continue
                if ta.dtype not in SCALABLE:
                    lines.append(f"{prefix}{ta.name}: differs ({ta.dtype})")
                else:
                    lines.extend(prefix + line for line in _ratio_lines(ta.name, ta, raw_a, raw_b))
        lines.extend(f"{prefix}{name}: only in {b.path.name}" for name in tb)
    return lines
