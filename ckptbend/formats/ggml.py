"""GGUF's tensor types (ggml's), and how a factor reaches each — the rule for GGUF files (docs/formats.md, "GGUF").

A quantised ggml tensor is a run of blocks over its elements in row-major order (a torch row [out, in] is
in / block consecutive blocks; ComfyUI-GGUF's reshaped SD tensors are the same elements, regrouped). Each
block's values are its codes times its fp16 scale fields (d, and dmin / m where the type subtracts a minimum),
so multiplying every scale field of a block by f multiplies every value of the block by f:

1. A factor on a whole tensor, whole rows, or a column range made of whole blocks: the fp16 scale fields of
   every reached block take it by the float rule (float32 multiply, factor after factor, one rounding to
   fp16: arithmetic.rule_table), the codes stay byte for byte, blocks not reached are untouched.
2. A range that cuts a block: the cut blocks are dequantised, scaled element by element and quantised again
   with gguf-py's reference quantiser of the same type (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0) — other types have
   none, and are refused.
3. A new scale that overflows fp16 (> 65504): refused, naming the tensor (the values it stands for cannot
   be held by the type at all).
4. F32 / F16 / BF16 / F64 tensors: the float rule on their values (arithmetic.scale_bytes).
5. Types whose scales cannot take an arbitrary factor (REFUSED), and types ckptbend does not know: refused.

The scale fields' offsets (BLOCK_TYPES) are proven against gguf-py's dequantisation in tests/test_gguf.py.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ..arithmetic import rule_table, scale_bytes
from ..edits import Edit, Segment
from ..errors import CkptbendError

FP16_EXPONENT, FP16_MAGNITUDE = 0x7C00, 0x7FFF


@dataclass(frozen=True)
class BlockType:
    name: str
    elements: int                 # values per block
    nbytes: int                   # bytes per block
    scales: tuple[int, ...]       # byte offsets of the block's fp16 scale fields (d, and dmin / m)
    requantise: bool = False      # gguf-py has this type's reference quantiser

    @property
    def fields(self) -> str:
        return "d, dmin" if len(self.scales) == 2 else "d"


BLOCK_TYPES = {t.name: t for t in (
    BlockType("Q4_0", 32, 18, (0,), True),
    BlockType("Q4_1", 32, 20, (0, 2), True),
    BlockType("Q5_0", 32, 22, (0,), True),
    BlockType("Q5_1", 32, 24, (0, 2), True),
    BlockType("Q8_0", 32, 34, (0,), True),
    BlockType("Q2_K", 256, 84, (80, 82)),
    BlockType("Q3_K", 256, 110, (108,)),
    BlockType("Q4_K", 256, 144, (0, 2)),
    BlockType("Q5_K", 256, 176, (0, 2)),
    BlockType("Q6_K", 256, 210, (208,)),
    BlockType("IQ4_NL", 32, 18, (0,)),
    BlockType("IQ4_XS", 256, 136, (0,)),
    BlockType("IQ2_XXS", 256, 66, (0,)),
    BlockType("IQ2_XS", 256, 74, (0,)),
    BlockType("IQ2_S", 256, 82, (0,)),
    BlockType("IQ3_XXS", 256, 98, (0,)),
    BlockType("IQ3_S", 256, 110, (0,)),
    BlockType("IQ1_S", 256, 50, (0,)),
    BlockType("TQ1_0", 256, 54, (52,)),
    BlockType("TQ2_0", 256, 66, (64,)),
)}
FLOAT_TYPES = ("F32", "F16", "BF16", "F64")    # stored values: the float rule (same names as safetensors')
REFUSED = {
    "MXFP4": "its block scales are powers of two (e8m0), which cannot take an arbitrary factor",
    "NVFP4": "its block scales are fp8 e4m3 values, which cannot take an arbitrary factor exactly",
    "IQ1_M": "its block scale is spread over the sub-scale bits: there is no fp16 field to scale",
}


def why_not(type_name: str) -> str | None:
    """Why a tensor of this ggml type cannot be scaled, or None."""
    if type_name in BLOCK_TYPES or type_name in FLOAT_TYPES:
        return None
    return REFUSED.get(type_name, "a ggml type ckptbend cannot scale")


def scale_fields(blocks: np.ndarray, bt: BlockType) -> list[np.ndarray]:
    """Writable uint16 views of each fp16 scale field of a [..., bytes] uint8 array of blocks (a view of them)."""
    return [blocks[..., off:off + 2].view(np.uint16)[..., 0] for off in bt.scales]


def _reached(blocks: np.ndarray, seg: Segment, rows: int, cols: int, bt: BlockType) -> np.ndarray:
    """The [..., bytes] view of the blocks a segment reaches (a block it cuts included)."""
    B = bt.elements
    if seg.cols is not None:
        c, d = seg.cols
        return blocks.reshape(rows, -1, bt.nbytes)[:, c // B:-(-d // B)]
    a, b = seg.rows or (0, rows)
    return blocks[a * cols // B:-(-b * cols // B)]


def _boundaries(seg: Segment, rows: int, cols: int, bt: BlockType) -> list[int]:
    """The segment's edges that fall inside a block: flat element indices (rows), or columns (a column range)."""
    a, b = seg.cols or ((seg.rows[0] * cols, seg.rows[1] * cols) if seg.rows else (0, rows * cols))
    return [x for x in (a, b) if x % bt.elements]


def cut_blocks(segments, rows: int, cols: int, bt: BlockType) -> np.ndarray:
    """Indices of the blocks whose elements the segments do not all reach alike (sorted)."""
    B, found = bt.elements, set()
    for seg in segments:
        boundaries = _boundaries(seg, rows, cols, bt)
        if seg.cols is not None and (boundaries or cols % B):
            if cols % B:
                return np.arange(rows * cols // B)     # rows are not whole blocks: every block may be cut
            per_row = cols // B
            found |= {r * per_row + x // B for r in range(rows) for x in boundaries}
        else:
            found |= {x // B for x in boundaries}
    return np.array(sorted(found), dtype=np.int64)


def _element_factors(cut: np.ndarray, segments, cols: int, B: int) -> list:
    """(mask over the cut blocks' elements, factors) per segment, in order."""
    flat = cut[:, None] * B + np.arange(B)[None, :]
    row, col = flat // cols, flat % cols
    out = []
    for seg in segments:
        if seg.cols is not None:
            mask = (col >= seg.cols[0]) & (col < seg.cols[1])
        elif seg.rows is not None:
            mask = (row >= seg.rows[0]) & (row < seg.rows[1])
        else:
            mask = np.ones(flat.shape, dtype=bool)
        out.append((mask, seg.factors))
    return out


@dataclass(frozen=True)
class Blocks:
    """A quantised tensor: each segment's factors on the fp16 scale fields of the blocks it reaches; the blocks a
    range cuts (`cut`) requantised. `rows` × `cols`: the torch view segments are in; `size`: bytes it holds."""
    key: str
    type: str
    size: int
    rows: int
    cols: int
    segments: tuple
    cut: tuple = ()
    in_place = True               # changes the bytes it is given (the writer patches the output where it lies)

    def apply(self, raw, shape):
        bt = BLOCK_TYPES[self.type]
        data = np.frombuffer(raw, dtype=np.uint8)
        if not data.flags.writeable:
            data = data.copy()
        blocks = data[:self.size].reshape(-1, bt.nbytes)
        cut = np.array(self.cut, dtype=np.int64)
        source = _dequantize(blocks[cut], bt) if cut.size else None
        for seg in self.segments:
            if seg.cols is not None and self.cols % bt.elements:
                continue                    # rows are not whole blocks: every block is requantised below
            table = rule_table("F16", seg.factors)
            for part in scale_fields(_reached(blocks, seg, self.rows, self.cols, bt), bt):
                new = table[part]
                if (((new & FP16_MAGNITUDE) == FP16_EXPONENT) & ((part & FP16_EXPONENT) != FP16_EXPONENT)).any():
                    raise CkptbendError(f"{self.key}: ×{math.prod(seg.factors):g} takes a {self.type} block scale "
                                        f"past fp16's largest value (65504); the type cannot hold these values: refusing")
                part[...] = new
        if cut.size:
            values = source.reshape(cut.size, bt.elements)
            for mask, factors in _element_factors(cut, self.segments, self.cols, bt.elements):
                for f in factors:
                    values[mask] *= np.float32(f)
            blocks[cut] = _quantize(values, bt)
        return memoryview(data), 0


def _dequantize(blocks: np.ndarray, bt: BlockType) -> np.ndarray:
    import gguf

    return gguf.quants.dequantize(np.ascontiguousarray(blocks), gguf.GGMLQuantizationType[bt.name]).astype(np.float32)


def _quantize(values: np.ndarray, bt: BlockType) -> np.ndarray:
    import gguf

    return gguf.quants.quantize(values, gguf.GGMLQuantizationType[bt.name]).reshape(-1, bt.nbytes)


@dataclass(frozen=True)
class Floats:
    """An F32 / F16 / BF16 / F64 tensor of a GGUF file: the float rule on the bytes it holds (not its padding)."""
    type: str
    size: int
    segments: tuple
    in_place = True

    def apply(self, raw, shape):
        view = memoryview(raw)
        if view.readonly:
            view = memoryview(bytearray(raw))
        scale_bytes(view[:self.size], self.type, shape, self.segments)
        return view, 0


# --- routing a plan's tensors ----------------------------------------------------------------------------

def route_file(cf, mine: dict, routed) -> None:
    """The edits of one GGUF file's planned tensors (key → segments) into `routed` (requant.Routed): every one is
    taken over by its type's operation; a tensor that cannot take its factors is refused in one line."""
    header = cf.header
    for key, segs in mine.items():
        t = header.tensor(key)
        why = why_not(t.dtype)
        if why is not None:
            raise CkptbendError(f"{key}: stored as {t.dtype} in a GGUF file: {why}; refusing")
        size = header.stored[key]
        routed.taken.add((cf.rel, key))
        if t.dtype in FLOAT_TYPES:
            routed.edits[(cf.rel, key)] = Edit(cf.rel, key, tuple(segs), Floats(t.dtype, size, tuple(segs)),
                                               f"; {t.dtype} values")
            continue
        if any(s.offset for s in segs):       # a norm weight used as (w + offset): not a pure scale of its values
            raise CkptbendError(f"{key}: a weight the model uses as (w + {segs[0].offset:g}) stored as {t.dtype}: its "
                                "block scales cannot take that factor; refusing")
        bt = BLOCK_TYPES[t.dtype]
        rows, cols = (t.shape[0], math.prod(t.shape[1:])) if t.shape else (1, 1)
        if any(s.rows is not None and s.cols is not None for s in segs):
            raise CkptbendError(f"{key}: a range of rows and columns at once cannot reach a {t.dtype} tensor; refusing")
        cut = cut_blocks(segs, rows, cols, bt)
        blocks = size // bt.nbytes
        if cut.size and not bt.requantise:
            raise CkptbendError(f"{key}: a range cuts {cut.size} of its {t.dtype} blocks ({bt.elements} values each), "
                                f"and gguf-py has no quantiser for {t.dtype} to requantise them; refusing")
        reshaped = f", stored reshaped {list(reversed(header.ne[key]))}" if len(header.ne[key]) != len(t.shape) or \
            tuple(reversed(header.ne[key])) != tuple(t.shape) else ""
        note = f"; {t.dtype}{reshaped}: ×f on the fp16 block scales ({bt.fields}), codes unchanged"
        if cut.size:
            note += (f"; {cut.size} of its {blocks} blocks cut by a range, requantised in {t.dtype} "
                     f"({cut.size * bt.elements:,} values rounded to nearest)")
            routed.counts = tuple(a + b for a, b in zip(routed.counts, (1, int(cut.size) * bt.elements, 0)))
        op = Blocks(key, t.dtype, size, rows, cols, tuple(segs), tuple(int(i) for i in cut))
        routed.edits[(cf.rel, key)] = Edit(cf.rel, key, tuple(segs), op, note)


def values(raw, type_name: str, shape, size: int) -> np.ndarray:
    """A GGUF tensor's values (float64, the shape the model sees), dequantised by gguf-py."""
    import gguf

    data = np.frombuffer(bytes(raw[:size]), dtype=np.uint8)
    if type_name in ("F32", "F16", "F64"):
        out = data.view({"F32": np.float32, "F16": np.float16, "F64": np.float64}[type_name])
    else:
        out = gguf.quants.dequantize(data.reshape(1, -1), gguf.GGMLQuantizationType[type_name])
    return out.astype(np.float64).reshape(shape)
