"""Measuring a requantisation on the source before anything is written: the layer's tensors are read, the
planned operations run on them in memory, and the effective weights (codes × scales) before and after are
compared, a chunk of rows at a time — values requantised, values clipped, the total squared error
Σ(y − x)² of baked (y) to requested (x = factor × source) values, and per range the achieved factor: the
least-squares ratio Σxy / Σx² (1 where the factor is held exactly)."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, replace

import numpy as np

from ..arithmetic import scale_bytes
from ..edits import Edit
from . import codecs, ops

_CHUNK = 1 << 22       # elements per row chunk when comparing
MATERIAL = 0.01        # an achieved factor further than 1 % from the requested one is reported


@dataclass(frozen=True)
class Report:
    requantised: dict          # tensor name → values (block scales) requantised
    saturated: int             # values clipped to the format's largest
    error: float               # Σ (baked − factor × source)², effective values
    achieved: tuple            # per segment: (least-squares factor relative to the requested, lowest, highest) or None


def prober(cf, parts, chains):
    return lambda changes, kind: probe(cf, parts, chains, changes, kind)


_PROBES: dict = {}


def probe(cf, parts, chains, changes: dict, kind: str) -> Report:
    """The Report of running `changes` (tensor name → Edit) on one layer of the source, remembered per file state."""
    path = cf.header.path
    stat = os.stat(path)
    key = (str(path), stat.st_size, stat.st_mtime_ns, stat.st_ino, tuple(sorted(changes.items())), kind)
    if key not in _PROBES:
        if len(_PROBES) > 4096:
            _PROBES.clear()
        _PROBES[key] = _measure(cf, parts, chains, changes, kind)
    return _PROBES[key]


def _apply(edit: Edit, raw, t):
    if edit.op is None:
        return scale_bytes(bytearray(raw), t.dtype, t.shape, edit.segments), 0
    return edit.op.apply(raw, t.shape)


def _measure(cf, parts, chains, changes, kind) -> Report:
    with open(cf.header.path, "rb", buffering=0) as f:
        before = {role: (os.pread(f.fileno(), t.nbytes, cf.header.data_start + t.begin), t)
                  for role, (_, t) in parts.items()}
    after, saturated = dict(before), 0
    for role, (raw, t) in before.items():
        if t.name in changes:
            new, clipped = _apply(changes[t.name], raw, t)
            after[role] = (new, replace(t, shape=changes[t.name].out_shape or t.shape))
            saturated += clipped
    tensors = {t.name: t for _, t in before.values()}
    requantised = {name: _covered(e.op, tensors[name]) for name, e in changes.items()
                   if isinstance(e.op, (ops.Codes, ops.BlockScales))}
    return Report(requantised, saturated, *_compare(before, after, chains, kind))


def _covered(op, t) -> int:
    """How many values (block scales) an operation requantises."""
    if isinstance(op, ops.BlockScales):
        rows, cols = op.rows, op.blocks
    else:
        rows, cols = (t.shape[0] if t.shape else 1), math.prod(t.shape[1:])
    if any(s.whole for s in op.segments):
        return rows * cols
    r = set().union(*(range(*s.rows) for s in op.segments if s.rows))
    c = set().union(*(range(*s.cols) for s in op.segments if s.cols))
    return len(r) * cols + len(c) * rows - len(r) * len(c)


def _compare(before, after, chains, kind) -> tuple[float, tuple]:
    """(Σ(y − x)², per segment (Σxy / Σx², lowest y/x, highest y/x)), x = requested, y = baked, chunk by chunk.
    The spread per value is looked for only in ranges whose least-squares ratio departs from 1 (a second pass)."""
    if kind == "codes" and all(_scalar(parts) for parts in (before, after)):
        return _compare_pairs(before, after, chains)
    sums, error = np.zeros((len(chains.segments), 2)), 0.0
    for r0, x, y in _chunks(before, after, chains, kind):
        for i, xs, ys in _regions(chains, r0, x, y):
            sums[i] += (float(np.dot(xs, ys)), float(np.dot(xs, xs)))
        y -= x
        error += float(np.dot(y.reshape(-1), y.reshape(-1)))
    relative = [sxy / sxx if sxx else None for sxy, sxx in sums]
    departed = {i for i, r in enumerate(relative) if r is not None and abs(r - 1) > MATERIAL}
    lo, hi = np.full(len(relative), np.inf), np.full(len(relative), -np.inf)
    if departed:
        for r0, x, y in _chunks(before, after, chains, kind):
            for i, xs, ys in _regions(chains, r0, x, y):
                if i in departed and (nonzero := xs != 0).any():
                    ratio = ys[nonzero] / xs[nonzero]
                    lo[i], hi[i] = min(lo[i], ratio.min()), max(hi[i], ratio.max())
    return error, tuple(None if r is None else (r, lo[i], hi[i]) for i, r in enumerate(relative))


def _chunks(before, after, chains, kind):
    """(first row, requested x, baked y) for chunks of rows; float32."""
    pr, pc = chains.products("rows").astype(np.float32), chains.products("cols").astype(np.float32)
    n, step = len(pr), max(1, _CHUNK // max(1, len(pc)))
    for r0 in range(0, n, step):
        r1 = min(n, r0 + step)
        x = ops.effective(kind, before, r0, r1)
        if (pr[r0:r1] != 1).any():
            x *= pr[r0:r1, None]
        if (pc != 1).any():
            x *= pc[None, :]
        yield r0, x, ops.effective(kind, after, r0, r1)


def _regions(chains, r0, x, y):
    """(segment index, its values of x and of y, flat) within one chunk."""
    for i, s in enumerate(chains.segments):
        a, b = s.rows or (0, len(chains.rows))
        a, b = max(a, r0) - r0, min(b, r0 + len(x)) - r0
        if a < b:
            cols = slice(*s.cols) if s.cols else slice(None)
            yield i, x[a:b, cols].reshape(-1), y[a:b, cols].reshape(-1)


def _scalar(parts) -> bool:
    return "outer" not in parts or math.prod(parts["outer"][1].shape) == 1


def _compare_pairs(before, after, chains) -> tuple[float, tuple]:
    """_compare for one-byte codes under one scale (or none): every value is its code's value × the scale, so
    the sums follow from how often each (source code, baked code) pair occurs in each run of rows (columns)
    with one requested factor — a histogram of 65,536 pairs, exact, without decoding a value."""
    raw, t = before["weight"]
    rows = t.shape[0] if t.shape else 1
    codes = [np.frombuffer(parts["weight"][0], dtype=np.uint8).reshape(rows, -1) for parts in (before, after)]
    scale = [float(ops.outer_rows(*parts["outer"], 1)[0, 0]) if "outer" in parts else 1.0 for parts in (before, after)]
    value = codecs.values(t.dtype).astype(np.float64)
    axis = "cols" if chains.reached("cols") else "rows"
    runs = ops.runs(list(zip(getattr(chains, axis), chains.products(axis))))
    counts = [np.zeros(65536, dtype=np.int64) for _ in runs]
    step = max(1, _CHUNK // max(1, codes[0].shape[1]))
    for r0 in range(0, rows, step):                  # in chunks of rows: bounded memory
        r1 = min(rows, r0 + step)
        for (a, b, _), count in zip(runs, counts):
            span = (slice(max(a, r0), min(b, r1)), slice(None)) if axis == "rows" else (slice(r0, r1), slice(a, b))
            part = [c[span] for c in codes]
            if part[0].size:
                count += np.bincount((part[0].astype(np.uint16) << 8 | part[1]).reshape(-1), minlength=65536)
    sums, error = np.zeros((len(chains.segments), 2)), 0.0
    lo, hi = np.full(len(chains.segments), np.inf), np.full(len(chains.segments), -np.inf)
    for (_, _, (chain, m)), pairs in zip(runs, counts):
        found = np.nonzero(pairs)[0]
        n, x, y = pairs[found], m * scale[0] * value[found >> 8], scale[1] * value[found & 0xFF]
        keep = ~(np.isnan(x) | np.isnan(y))
        n, x, y = n[keep], x[keep], y[keep]
        error += float(np.sum(n * (y - x) ** 2))
        for i in chain:
            sums[i] += (float(np.sum(n * x * y)), float(np.sum(n * x * x)))
            if (x != 0).any():
                ratio = y[x != 0] / x[x != 0]
                lo[i], hi[i] = min(lo[i], ratio.min()), max(hi[i], ratio.max())
    return error, tuple((sxy / sxx, lo[i], hi[i]) if sxx else None for i, (sxy, sxx) in enumerate(sums))
