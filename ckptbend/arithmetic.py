"""The one arithmetic rule of a bake, as ComfyUI applies a weight patch with strength_model = s:
upcast the stored tensor to float32, multiply (factor after factor), round to nearest back to the
stored dtype. A weight the model uses as (w + offset) (Gemma 3's qk-norm) has the offset added before the
factors and taken off after them, in the same float32 (Segment.offset).

numpy does it for fp32 / fp16 / bf16 / fp64 (importing torch costs more than copying a 2 GB file);
torch only for fp8. A 16-bit dtype has only 65,536 values, so fp16 and bf16 tensors are scaled through
a table holding the rule's result for every bit pattern: exact by construction, and several times
faster than converting each element. tests/test_arithmetic.py proves every path gives torch's
`(t.float() * s).to(dtype)` bytes.
"""

from __future__ import annotations

import functools
from collections import namedtuple

import numpy as np

# safetensors dtype → numpy storage type; BF16 is stored as raw uint16 and widened by hand.
NUMPY_STORAGE = {"F32": np.float32, "F16": np.float16, "F64": np.float64, "BF16": np.uint16}
TORCH_ONLY = {"F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2"}
BF16_NAN = 0x7FC0   # what torch stores for a NaN bfloat16
SCALABLE = set(NUMPY_STORAGE) | set(TORCH_ONLY)


def _bf16_to_f32(bits: np.ndarray) -> np.ndarray:
    return (bits.astype(np.uint32) << 16).view(np.float32)


def _f32_to_bf16(x: np.ndarray) -> np.ndarray:
    """Round to nearest even, as torch's float → bfloat16 conversion does."""
    u = x.view(np.uint32)
    bits = ((u + (0x7FFF + ((u >> 16) & 1))) >> 16).astype(np.uint16)
    bits[np.isnan(x)] = BF16_NAN
    return bits


def _rows_view(a: np.ndarray, shape) -> np.ndarray:
    return a.reshape(shape[0], -1) if len(shape) else a.reshape(1, -1)


def _part(rows_view, seg):
    """The view of a [rows, everything else] array that a segment scales: a row range, then a column range."""
    part = rows_view if seg.rows is None else rows_view[seg.rows[0]:seg.rows[1]]
    cols = getattr(seg, "cols", None)
    return part if cols is None else part[:, cols[0]:cols[1]]


def _multiply(work: np.ndarray, segments, dtype) -> None:
    for seg in segments:
        part, offset = _part(work, seg), getattr(seg, "offset", 0.0)
        if offset:
            part += dtype(offset)
        for f in seg.factors:
            part *= dtype(f)
        if offset:
            part -= dtype(offset)


_Whole = namedtuple("_Whole", "rows factors offset")


@functools.lru_cache(maxsize=256)
def _table(dtype: str, factors: tuple[float, ...], offset: float = 0.0) -> np.ndarray:
    """The rule applied to every 16-bit pattern of `dtype`: scaled[bits] is the result for bits."""
    every = bytearray(np.arange(65536, dtype=np.uint16).tobytes())
    with np.errstate(over="ignore", invalid="ignore"):
        _scale_with_numpy(every, dtype, (65536,), [_Whole(None, factors, offset)])
    return np.frombuffer(every, dtype=np.uint16)


def rule_table(dtype: str, factors: tuple[float, ...]) -> np.ndarray:
    """The rule's result for every bit pattern of a 16-bit dtype (F16, BF16): what the pattern becomes (read-only)."""
    return _table(dtype, tuple(factors))


# Elements per table look-up: the indices (widened to intp by numpy) and results stay in the CPU cache,
# ~2.5× faster than one look-up over a whole tensor (bin/bench --profile, "edited tensors: scale").
LOOKUP_STEP = 1 << 17


def _look_up(part: np.ndarray, table: np.ndarray) -> None:
    """Replace each 16-bit pattern of `part` by table[pattern], in place."""
    if not part.flags.c_contiguous:        # a column range: rare and small
        part[...] = table[part]
        return
    flat = part.reshape(-1)
    for start in range(0, flat.size, LOOKUP_STEP):
        chunk = flat[start:start + LOOKUP_STEP]
        np.take(table, chunk, out=chunk, mode="wrap")   # every uint16 is a valid index: no bounds check


def scale_bytes(raw, dtype: str, shape: tuple[int, ...], segments):
    """Scale rows (or columns) of one stored tensor in place, in a writable buffer (bytearray or
    memoryview), and return the buffer. Segments carry rows, factors and optionally cols. A zero-element
    tensor has nothing to scale."""
    if 0 in shape:
        return raw
    if dtype in TORCH_ONLY:
        return _scale_with_torch(raw, TORCH_ONLY[dtype], shape, segments)
    if dtype in ("F16", "BF16"):
        rows = _rows_view(np.frombuffer(raw, dtype=np.uint16), shape)
        for seg in segments:
            _look_up(_part(rows, seg), _table(dtype, tuple(seg.factors), getattr(seg, "offset", 0.0)))
        return raw
    with np.errstate(over="ignore", invalid="ignore"):   # inf and NaN follow IEEE, as in torch
        return _scale_with_numpy(raw, dtype, shape, segments)


def _scale_with_numpy(raw: bytearray, dtype: str, shape, segments) -> bytearray:
    stored = np.frombuffer(raw, dtype=NUMPY_STORAGE[dtype])
    if stored.size == 0:
        return raw
    if dtype in ("F32", "F64"):
        _multiply(_rows_view(stored, shape), segments, stored.dtype.type)   # already wide: in place
    elif dtype == "F16":
        work = _rows_view(stored.astype(np.float32), shape)
        _multiply(work, segments, np.float32)
        stored[:] = work.ravel()   # numpy's float32 → float16 cast rounds to nearest even
    else:
        work = _rows_view(_bf16_to_f32(stored), shape)
        _multiply(work, segments, np.float32)
        stored[:] = _f32_to_bf16(work.ravel())
    return raw


def _scale_with_torch(raw: bytearray, torch_name: str, shape, segments) -> bytearray:
    import torch

    stored = getattr(torch, torch_name)
    t = torch.frombuffer(raw, dtype=stored)
    work = t.to(torch.float32).reshape(shape[0] if len(shape) else 1, -1)
    for seg in segments:
        part, offset = _part(work, seg), getattr(seg, "offset", 0.0)
        if offset:                       # (never add 0: it would turn -0.0 into +0.0)
            part.add_(offset)
        for f in seg.factors:
            part.mul_(f)
        if offset:
            part.sub_(offset)
    # fp8 has no inf: saturate instead of producing NaN (ComfyUI rounds fp8 stochastically;
    # ckptbend rounds to nearest so that a bake is reproducible byte for byte).
    info = torch.finfo(stored)
    t.copy_(work.clamp_(info.min, info.max).reshape(-1))
    return raw


def to_float64(raw: bytes, dtype: str, shape) -> np.ndarray:
    """Decode a stored floating tensor (for comparisons, e.g. `ckptbend diff`)."""
    if dtype in TORCH_ONLY:
        import torch

        t = torch.frombuffer(bytearray(raw), dtype=getattr(torch, TORCH_ONLY[dtype]))
        return t.to(torch.float64).numpy().reshape(shape)
    stored = np.frombuffer(raw, dtype=NUMPY_STORAGE[dtype])
    return (_bf16_to_f32(stored) if dtype == "BF16" else stored).astype(np.float64).reshape(shape)
