"""Writing synthetic tensors as safetensors files, one tensor at a time (byte-identical to
safetensors' own writer), and as diffusers-style shards with an index."""

from __future__ import annotations

import json
import os
import re
import struct
from pathlib import Path

import numpy as np
import torch

from ..errors import CkptbendError

# Format dtype names and the order safetensors' writer lays tensors out in: by dtype (this rank,
# descending), then by name. Reproducing it makes a file byte-identical to `save_file`'s.
_ST_DTYPES = {
    torch.bool: ("BOOL", 0), torch.uint8: ("U8", 1), torch.int8: ("I8", 2),
    torch.float8_e5m2: ("F8_E5M2", 3), torch.float8_e4m3fn: ("F8_E4M3", 4),
    torch.int16: ("I16", 5), torch.float16: ("F16", 7), torch.bfloat16: ("BF16", 8),
    torch.int32: ("I32", 9), torch.float32: ("F32", 11), torch.float64: ("F64", 12), torch.int64: ("I64", 13),
}
_CHUNK = 1 << 23   # elements drawn at a time for random tensors


def _out_dtype(t, dtype):
    return dtype if dtype is not None and t.is_floating_point() else t.dtype


def _random_chunks(numel, dtype, rng):
    """Seeded random values in chunks of _CHUNK: random sign and mantissa, exponent 2^-5 or 2^-4, so
    |x| is in [1/32, 1/8) — never zero, inf or NaN in any float dtype, fp8 included. Built from the
    generator's raw bits, several times faster than uniform_ (this is most of a full-size write)."""
    for start in range(0, numel, _CHUNK):
        k = min(_CHUNK, numel - start)
        bits = rng.bit_generator.random_raw((k + 1) // 2).view(np.uint32)[:k]
        bits &= np.uint32(0x80FFFFFF)      # sign, lowest exponent bit, mantissa
        bits |= np.uint32(0x3D000000)      # exponent 122 (+1): 2^-5 or 2^-4
        yield torch.from_numpy(bits.view(np.float32)).to(dtype)


def _raw(t):
    return t.detach().contiguous().reshape(-1).view(torch.uint8).numpy()


def write_safetensors(path, tensors: dict, dtype=torch.float32, generator=None, metadata=None) -> Path:
    """Write ``tensors`` as a safetensors file, streaming: the header is built from shapes and dtypes,
    then each tensor is written in turn. Floating tensors are cast to ``dtype``; meta tensors are
    filled with values from ``generator`` (a ``numpy.random.Generator``; drawn in file order, chunk by
    chunk, so memory stays small).
    ``dtype=None`` keeps every tensor's dtype.
    The layout matches safetensors' own writer (dtype order, then name; space-padded header)."""
    path = Path(path)
    entries = []
    for name, t in tensors.items():
        out = _out_dtype(t, dtype)
        if out not in _ST_DTYPES:
            raise CkptbendError(f"synth: cannot write dtype {out}")
        entries.append((name, t, out))
    entries.sort(key=lambda e: (-_ST_DTYPES[e[2]][1], e[0]))
    header = {"__metadata__": dict(metadata if metadata is not None else {"format": "pt"})}
    offset = 0
    for name, t, out in entries:
        nbytes = t.numel() * out.itemsize
        header[name] = {"dtype": _ST_DTYPES[out][0], "shape": list(t.shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".synth-tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(struct.pack("<Q", len(blob)))
            f.write(blob)
            for name, t, out in entries:
                if t.is_meta:
                    if not out.is_floating_point:
                        raise CkptbendError(f"synth: no value for integer tensor {name}")
                    if generator is None:
                        raise CkptbendError("synth: meta tensors need a generator")
                    for chunk in _random_chunks(t.numel(), out, generator):
                        f.write(_raw(chunk))
                else:
                    f.write(_raw(t.to(out)))
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


_UNITS = {"B": 1, "KB": 10 ** 3, "MB": 10 ** 6, "GB": 10 ** 9, "TB": 10 ** 12,
          "KIB": 2 ** 10, "MIB": 2 ** 20, "GIB": 2 ** 30}


def _parse_size(size) -> int:
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", str(size))
    if not m or m[2].upper() not in _UNITS | {"": 1}:
        raise CkptbendError(f"synth: cannot read shard size {size!r} (e.g. 20KB, 5GB)")
    return int(float(m[1]) * _UNITS.get(m[2].upper(), 1))


def write_weights(folder: Path, stem: str, tensors: dict, dtype, generator, shard_size, total_parameters=False):
    """``{stem}.safetensors``, or shards ``{stem}-0000i-of-0000n.safetensors`` + ``{stem}.safetensors.index.json``
    split greedily in state-dict order (as huggingface_hub's splitter does)."""
    if shard_size is None:
        write_safetensors(folder / f"{stem}.safetensors", tensors, dtype, generator)
        return
    limit = _parse_size(shard_size)
    shards, current, used = [], {}, 0
    for name, t in tensors.items():
        nbytes = t.numel() * _out_dtype(t, dtype).itemsize
        if current and used + nbytes > limit:
            shards.append(current)
            current, used = {}, 0
        current[name] = t
        used += nbytes
    shards.append(current)
    if len(shards) == 1:
        write_safetensors(folder / f"{stem}.safetensors", tensors, dtype, generator)
        return
    weight_map, total = {}, 0
    for i, shard in enumerate(shards, 1):
        fname = f"{stem}-{i:05d}-of-{len(shards):05d}.safetensors"
        write_safetensors(folder / fname, shard, dtype, generator)
        for name, t in shard.items():
            weight_map[name] = fname
            total += t.numel() * _out_dtype(t, dtype).itemsize
    meta = {"total_size": total}
    if total_parameters:
        meta = {"total_parameters": sum(t.numel() for t in tensors.values()), **meta}
    index = {"metadata": meta, "weight_map": dict(sorted(weight_map.items()))}
    (folder / f"{stem}.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
