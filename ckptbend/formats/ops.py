"""The operations a bake runs on the tensors of quantised layers — each takes a tensor's stored bytes and gives
its new bytes and how many values it clipped — and the effective weight (codes × scales) they stand for.

Segments here are in the coordinates of what is requantised: elements of an fp8/int8 weight, or the
[rows, blocks] grid of a block format's scales. Their factors apply one after another in float32, as the
float rule does (arithmetic.py), before the format's own rounding.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..arithmetic import scale_bytes, to_float64
from . import codecs


def runs(values) -> list:
    """(first, end, value) of each run of equal consecutive values."""
    out, start = [], 0
    for i in range(1, len(values) + 1):
        if i == len(values) or values[i] != values[start]:
            out.append((start, i, values[start]))
            start = i
    return out


def _rows(x, shape):
    return x.reshape(shape[0], -1) if len(shape) else x.reshape(1, -1)


def _look_up(codes: np.ndarray, segments, dtype: str) -> int:
    """Requantise, in place, the parts of a [rows, columns] array of one-byte codes that disjoint segments
    reach (their chains of factors, through the rule's 256-entry table); the number of values clipped."""
    clipped = 0
    for seg in segments:
        part = codes if seg.rows is None else codes[seg.rows[0]:seg.rows[1]]
        if seg.cols is not None:
            part = part[:, seg.cols[0]:seg.cols[1]]
        new, clips = codecs.table(dtype, tuple(seg.factors))
        clipped += int(codecs.histogram(part)[clips].sum())
        codecs.look_up(part, new)
    return clipped


@dataclass(frozen=True)
class Codes:
    """Requantise fp8 or int8 codes: each (disjoint) segment's part times its factors, rounded and clipped as
    the format does."""
    dtype: str
    segments: tuple

    def apply(self, raw, shape):
        codes = np.frombuffer(raw, dtype=np.uint8).copy()
        clipped = _look_up(_rows(codes, shape), self.segments, self.dtype)
        return memoryview(codes), clipped


@dataclass(frozen=True)
class _Grid:
    """A [rows, blocks] scale grid stored in cuBLAS's tiled order (nvfp4, mxfp8)."""
    rows: int
    blocks: int

    def read(self, raw) -> tuple[np.ndarray, np.ndarray]:
        flat = np.frombuffer(raw, dtype=np.uint8).copy()
        index = codecs.tiled_index(self.rows, self.blocks)
        return flat, index


@dataclass(frozen=True)
class BlockScales(_Grid):
    """nvfp4: requantise the fp8 e4m3 block scales (the codes stay)."""
    segments: tuple = ()

    def apply(self, raw, shape):
        flat, index = self.read(raw)
        grid = flat[index]
        saturated = _look_up(grid, self.segments, "F8_E4M3")
        flat[index] = grid
        return memoryview(flat), saturated


@dataclass(frozen=True)
class Exponents(_Grid):
    """mxfp8: shift the e8m0 block exponents by whole powers of two (per row runs, or per block runs)."""
    row_shifts: tuple = ()      # (first row, end row, shift)
    block_shifts: tuple = ()    # (first block, end block, shift)

    def shifts(self) -> np.ndarray:
        k = np.zeros((self.rows, self.blocks), dtype=np.int64)
        for a, b, s in self.row_shifts:
            k[a:b] += s
        for a, b, s in self.block_shifts:
            k[:, a:b] += s
        return k

    def apply(self, raw, shape):
        flat, index = self.read(raw)
        e = flat[index].astype(np.int64)
        shifted = e + self.shifts()
        clipped = (shifted < 0) | (shifted > codecs.E8M0_MAX)
        saturated = int((clipped & (e != 255)).sum())
        flat[index] = np.where(e == 255, 255, np.clip(shifted, 0, codecs.E8M0_MAX)).astype(np.uint8)
        return memoryview(flat), saturated


@dataclass(frozen=True)
class Expand:
    """An int8 layer's per-tensor scale made one per output channel ([rows, 1], the shape comfy-kitchen's
    per-channel int8 writes), so that rows take their own factors exactly; then the float rule."""
    dtype: str
    rows: int
    segments: tuple

    @property
    def out_shape(self) -> tuple[int, int]:
        return (self.rows, 1)

    def apply(self, raw, shape):
        return scale_bytes(bytearray(bytes(raw) * self.rows), self.dtype, self.out_shape, self.segments), 0


# --- effective weights ---------------------------------------------------------------------------------

def values_of(raw, dtype: str, shape) -> np.ndarray:
    """Stored values of any dtype ckptbend reads, in float32 (exact for every code; float64 stays float64)."""
    if dtype in codecs.TORCH_DTYPES:
        return codecs.decode(raw, dtype).reshape(shape)
    values = to_float64(bytes(raw), dtype, shape)
    return values if dtype == "F64" else values.astype(np.float32)


def outer_rows(raw, tensor, rows: int) -> np.ndarray:
    """A per-tensor or per-channel scale as a column of `rows` values."""
    values = values_of(raw, tensor.dtype, tensor.shape).reshape(-1)
    return np.broadcast_to(values.reshape(-1, 1), (rows, 1)) if values.size == 1 else values.reshape(rows, 1)


def effective(kind: str, parts: dict, r0: int, r1: int) -> np.ndarray:
    """Rows [r0, r1) of a layer's effective weight (float32), from its stored parts: role → (bytes, TensorInfo).
    kind: "codes" (fp8 / int8 × an optional outer scale), "nvfp4" or "mxfp8". ConvRot weights stay in their
    rotated basis (rows and whole rotation groups keep their ratios there)."""
    raw, t = parts["weight"]
    width = t.nbytes // t.shape[0] if len(t.shape) else t.nbytes
    rows = raw[r0 * width:r1 * width]
    if kind == "nvfp4":
        values = codecs.e2m1(bytes(rows), (r1 - r0, t.shape[1]))
        values *= np.repeat(_grid_values(parts, r0, r1, t.shape[0], values.shape[1] // 16, "F8_E4M3"), 16, axis=1)
    elif kind == "mxfp8":
        values = values_of(rows, t.dtype, (r1 - r0, t.shape[1]))
        values *= np.repeat(_grid_values(parts, r0, r1, t.shape[0], t.shape[1] // 32, "E8M0"), 32, axis=1)
    else:
        shape = (r1 - r0, *t.shape[1:]) if len(t.shape) else ()
        values = _rows(values_of(rows, t.dtype, shape), shape)
    if "outer" in parts:
        outer_raw, outer = parts["outer"]
        values = values * outer_rows(outer_raw, outer, t.shape[0] if len(t.shape) else 1)[r0:r1].astype(values.dtype)
    return values


def _grid_values(parts, r0, r1, rows, blocks, kind) -> np.ndarray:
    raw, _ = parts["block"]
    flat = np.frombuffer(bytes(raw), dtype=np.uint8)
    cells = flat[codecs.tiled_index(rows, blocks)[r0:r1]]
    if kind == "E8M0":
        return codecs.e8m0(cells).astype(np.float32)
    return codecs.values("F8_E4M3")[cells]
