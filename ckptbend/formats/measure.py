"""Measuring a requantisation on the source before anything is written: the layer's tensors are read, the
planned operations run on them in memory, and the effective weights (codes × scales) before and after are
compared — values requantised, values clipped, and per range the achieved factor: the least-squares ratio
Σxy / Σx² of baked (y) to requested (x = factor × source) values (1 where the factor is held exactly)."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, replace

import numpy as np

from ..arithmetic import scale_bytes
from ..edits import Edit
from . import ops

_CHUNK = 1 << 22       # elements per row chunk when comparing


@dataclass(frozen=True)
class Report:
    requantised: dict          # tensor name → values requantised
    saturated: int
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
            after[role] = (bytes(new), replace(t, shape=changes[t.name].out_shape or t.shape))
            saturated += clipped
    tensors = {t.name: t for _, t in before.values()}
    requantised = {name: _covered(e.op, tensors[name]) for name, e in changes.items()
                   if isinstance(e.op, (ops.Codes, ops.BlockScales))}
    return Report(requantised, saturated, _achieved(before, after, chains, kind))


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


def _achieved(before, after, chains: _Chains, kind) -> tuple:
    pr, pc = chains.products("rows"), chains.products("cols")
    n, step = len(pr), max(1, _CHUNK // max(1, len(pc)))
    sums = np.zeros((len(chains.segments), 2))
    lo = np.full(len(chains.segments), np.inf)
    hi = np.full(len(chains.segments), -np.inf)
    for r0 in range(0, n, step):
        r1 = min(n, r0 + step)
        x = ops.effective(kind, before, r0, r1) * pr[r0:r1, None] * pc[None, :]
        y = ops.effective(kind, after, r0, r1)
        for i, s in enumerate(chains.segments):
            a, b = s.rows or (0, n)
            a, b = max(a, r0) - r0, min(b, r1) - r0
            if a >= b:
                continue
            cols = slice(*s.cols) if s.cols else slice(None)
            xs, ys = x[a:b, cols], y[a:b, cols]
            sums[i] += (float((xs * ys).sum()), float((xs * xs).sum()))
            nonzero = xs != 0
            if nonzero.any():
                ratio = ys[nonzero] / xs[nonzero]
                lo[i], hi[i] = min(lo[i], ratio.min()), max(hi[i], ratio.max())
    return tuple((sxy / sxx, lo[i], hi[i]) if sxx else None for i, (sxy, sxx) in enumerate(sums))
