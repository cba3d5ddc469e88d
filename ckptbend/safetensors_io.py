"""Read and validate safetensors headers; build output headers.

The data section is never decoded here: a rewrite that keeps every tensor's dtype and shape keeps
the same tensor table, so the output header is known before any tensor is written.
"""

from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path

from .errors import CkptbendError

# The reference reader's cap on the header length.
MAX_HEADER_BYTES = 100_000_000

# Bits per element of every dtype the format defines.
DTYPE_BITS = {
    "BOOL": 8, "U8": 8, "I8": 8, "F8_E5M2": 8, "F8_E4M3": 8, "F8_E8M0": 8,
    "F8_E4M3FNUZ": 8, "F8_E5M2FNUZ": 8,
    "I16": 16, "U16": 16, "F16": 16, "BF16": 16,
    "I32": 32, "U32": 32, "F32": 32,
    "I64": 64, "U64": 64, "F64": 64, "C64": 64,
    "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6,
}


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: str
    shape: tuple[int, ...]
    begin: int  # relative to the data section, [begin, end)
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin


@dataclass(frozen=True)
class Header:
    path: Path
    header_len: int
    file_size: int
    metadata: dict[str, str]
    tensors: tuple[TensorInfo, ...]  # in data-section order

    @property
    def data_start(self) -> int:
        return 8 + self.header_len

    def tensor(self, name: str) -> TensorInfo:
        for t in self.tensors:
            if t.name == name:
                return t
        raise KeyError(name)

    @property
    def names(self) -> list[str]:
        return [t.name for t in self.tensors]

    def to_bytes(self, metadata: dict[str, str], tensors) -> bytes:
        """An output's header (everything before its data section) with this metadata and tensor table."""
        return header_bytes(metadata, tensors)


def _fail(path, why: str):
    raise CkptbendError(f"{path}: not a valid safetensors file: {why}")


def _is_utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _reject_duplicates(pairs):
    seen = {}
    for key, value in pairs:
        if key in seen:
            raise ValueError(f"duplicate key {key!r} in header")
        seen[key] = value
    return seen


def _expected_nbytes(path, name, dtype, shape) -> int:
    bits = math.prod(shape) * DTYPE_BITS[dtype]
    if bits % 8:
        _fail(path, f"tensor {name!r}: {dtype} shape {list(shape)} is not a whole number of bytes")
    return bits // 8


def _parse_tensor(path, name, entry) -> TensorInfo:
    if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
        _fail(path, f"tensor {name!r}: entry must have exactly dtype, shape and data_offsets")
    dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if not isinstance(dtype, str) or dtype not in DTYPE_BITS:
        _fail(path, f"tensor {name!r}: unknown dtype {dtype!r}")
    if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
        _fail(path, f"tensor {name!r}: shape must be a list of non-negative integers")
    if (not isinstance(offsets, list) or len(offsets) != 2
            or not all(type(o) is int and o >= 0 for o in offsets) or offsets[0] > offsets[1]):
        _fail(path, f"tensor {name!r}: data_offsets must be [begin, end] with 0 <= begin <= end")
    begin, end = offsets
    if end - begin != _expected_nbytes(path, name, dtype, shape):
        _fail(path, f"tensor {name!r}: {dtype} shape {shape} needs "
                    f"{_expected_nbytes(path, name, dtype, shape)} bytes, data_offsets give {end - begin}")
    return TensorInfo(name, dtype, tuple(shape), begin, end)


def read_header(path) -> Header:
    """Read and fully validate a safetensors header: the tensors must tile the data section exactly."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            file_size = os.fstat(f.fileno()).st_size
            prefix = f.read(8)
            if len(prefix) < 8:
                _fail(path, f"file is {file_size} bytes, shorter than the 8-byte header length")
            (header_len,) = struct.unpack("<Q", prefix)
            if header_len > MAX_HEADER_BYTES:
                _fail(path, f"header length {header_len} exceeds the {MAX_HEADER_BYTES}-byte limit")
            if header_len > file_size - 8:
                _fail(path, f"header length {header_len} is larger than the file ({file_size} bytes)")
            raw = f.read(header_len)
    except IsADirectoryError:
        raise CkptbendError(f"{path}: is a directory, expected a .safetensors file") from None
    except FileNotFoundError:
        raise CkptbendError(f"{path}: no such file") from None
    except PermissionError:
        raise CkptbendError(f"{path}: permission denied") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        _fail(path, "header is not valid UTF-8")
    if not text.startswith("{"):
        _fail(path, "header does not start with '{'")
    try:
        doc = json.loads(text, object_pairs_hook=_reject_duplicates)
    except ValueError as e:
        _fail(path, f"header is not valid JSON ({e})")
    except RecursionError:
        _fail(path, "header JSON is nested too deeply")
    if not isinstance(doc, dict):
        _fail(path, "header is not a JSON object")

    metadata = doc.pop("__metadata__", {})
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        _fail(path, "__metadata__ must map strings to strings")
    for text in (*doc, *metadata, *metadata.values()):
        if not _is_utf8(text):   # JSON's \ud800 escapes decode to strings no UTF-8 writer accepts
            _fail(path, f"header has a string that is not valid Unicode: {text[:40]!r}")

    tensors = sorted((_parse_tensor(path, name, entry) for name, entry in doc.items()),
                     key=lambda t: (t.begin, t.end))
    data_size = file_size - 8 - header_len
    position = 0
    for t in tensors:
        if t.begin != position:
            what = "overlaps the previous tensor" if t.begin < position else f"leaves a gap at byte {position}"
            _fail(path, f"tensor {t.name!r} {what} (data_offsets [{t.begin}, {t.end}])")
        position = t.end
    if position != data_size:
        if position > data_size:
            _fail(path, f"data section is truncated: tensors need {position} bytes, file has {data_size}")
        _fail(path, f"{data_size - position} trailing bytes after the last tensor")
    return Header(path, header_len, file_size, metadata, tuple(tensors))


def retabled(tensors, shapes: dict[str, tuple[int, ...]]) -> tuple[TensorInfo, ...]:
    """The tensor table (in data order) with some tensors' shapes changed, every offset laid out again."""
    out, position = [], 0
    for t in tensors:
        shape = shapes.get(t.name, t.shape)
        size = math.prod(shape) * DTYPE_BITS[t.dtype] // 8 if t.name in shapes else t.nbytes
        out.append(TensorInfo(t.name, t.dtype, tuple(shape), position, position + size))
        position += size
    return tuple(out)


def header_bytes(metadata: dict[str, str], tensors) -> bytes:
    """Serialise a header: `__metadata__` first, tensors in data order, space-padded to 8 bytes."""
    doc = {"__metadata__": metadata} if metadata else {}
    for t in tensors:
        doc[t.name] = {"dtype": t.dtype, "shape": list(t.shape), "data_offsets": [t.begin, t.end]}
    body = json.dumps(doc, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    body += b" " * (-len(body) % 8)
    return struct.pack("<Q", len(body)) + body
