"""Store recorded attention-bending maps in a .safetensors file (torch + stdlib only).

A record is {"token", "layer", "step", "original", "bent"}: the token's cross-attention column as a
map [h, w] (video: [frames, h, w]) before and after bending. The file holds the tensors
`<i>.original` / `<i>.bent` and, in its metadata, the list of (token, layer, step) per record; it is
written with the standard library so that companions need no extra package, and any safetensors
reader opens it. `ckptbend maps FILE -o DIR` renders it as PNG heatmaps.
"""

from __future__ import annotations

import json
import os
import struct

import torch

FORMAT = "ckptbend.maps/1"


def _records(source) -> list:
    return list(getattr(source, "maps", source))


def save_maps(source, path) -> int:
    """Write the records of `source` (a session with .maps, or a list of records) to `path`; returns
    how many. The file is written beside `path` and renamed into place."""
    records = _records(source)
    if not records:
        raise ValueError("no maps were recorded (is bending active, and record_maps on or phase=1?)")
    entries, blobs, offset = {}, [], 0
    for i, r in enumerate(records):
        for kind in ("original", "bent"):
            t = r[kind].detach().to("cpu", torch.float32).contiguous()
            data = t.numpy().tobytes()
            entries[f"{i}.{kind}"] = {"dtype": "F32", "shape": list(t.shape), "data_offsets": [offset, offset + len(data)]}
            blobs.append(data)
            offset += len(data)
    # step is None for a model call outside the scheduler's timesteps.
    index = [{"token": r["token"], "layer": int(r["layer"]), "step": None if r["step"] is None else int(r["step"])}
             for r in records]
    header = {"__metadata__": {"format": FORMAT, "records": json.dumps(index)}, **entries}
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)                     # keeps tensor data 8-byte aligned
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            f.write(struct.pack("<Q", len(text)) + text)
            for blob in blobs:
                f.write(blob)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return len(records)


def load_maps(path) -> list[dict]:
    """The records saved by save_maps, tensors as float32 CPU tensors."""
    with open(path, "rb") as f:
        raw = f.read()
    if len(raw) < 8:
        raise ValueError(f"{path}: not a maps file (too short)")
    (size,) = struct.unpack("<Q", raw[:8])
    try:
        header = json.loads(raw[8:8 + size])
        meta = header.pop("__metadata__")
        if meta.get("format") != FORMAT:
            raise ValueError
        index = json.loads(meta["records"])
    except (ValueError, KeyError, TypeError, AttributeError):
        raise ValueError(f"{path}: not a ckptbend maps file") from None
    base = 8 + size
    records = []
    for i, item in enumerate(index):
        record = dict(item)
        for kind in ("original", "bent"):
            e = header.get(f"{i}.{kind}")
            if e is None or e.get("dtype") != "F32":
                raise ValueError(f"{path}: record {i} has no float32 '{kind}' map")
            start, stop = e["data_offsets"]
            data = bytearray(raw[base + start:base + stop])
            if len(data) != 4 * _count(e["shape"]):
                raise ValueError(f"{path}: record {i} '{kind}' is truncated")
            record[kind] = torch.frombuffer(data, dtype=torch.float32).reshape(e["shape"]) if data else torch.zeros(e["shape"])
        records.append(record)
    return records


def _count(shape) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n
