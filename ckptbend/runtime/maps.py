"""Store recorded attention-bending maps in a .safetensors file (torch + stdlib only).

A record is {"token", "layer", "step", "original", "bent"} and optionally "site" (the attention's name,
where a layer holds two, e.g. Motif-Video's attn and cross_attn): the token's cross-attention column as a
map [h, w] (video: [frames, h, w]) before and after bending. The file holds the tensors
`<i>.original` / `<i>.bent` and, in its metadata, the list of (token, layer, step[, site]) per record; it is
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
    index = [{"token": r["token"], "layer": int(r["layer"]),
              "step": None if r["step"] is None else int(r["step"]),
              **({"site": str(r["site"])} if r.get("site") is not None else {})} for r in records]
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


class MapsFileError(ValueError):
    """A file that is not a readable maps file; the message names the file and the problem."""


def load_maps(path) -> list[dict]:
    """The records saved by save_maps, tensors as float32 CPU tensors. Anything else in the file
    (a damaged or foreign file) raises MapsFileError naming the file and what is wrong."""
    def bad(why):
        raise MapsFileError(f"{path}: not a ckptbend maps file: {why}")

    with open(path, "rb") as f:
        raw = f.read()
    if len(raw) < 8:
        bad("shorter than its 8-byte header length")
    (size,) = struct.unpack("<Q", raw[:8])
    if size > len(raw) - 8:
        bad("header length larger than the file")
    try:
        header = json.loads(raw[8:8 + size])
        meta = header.pop("__metadata__", None) if isinstance(header, dict) else None
        if not isinstance(meta, dict) or meta.get("format") != FORMAT:
            bad(f"no {FORMAT!r} format marker")
        index = json.loads(meta["records"]) if isinstance(meta.get("records"), str) else None
    except (ValueError, RecursionError):
        bad("header or records are not valid JSON")
    if not isinstance(index, list):
        bad("its records are not a list")
    base = 8 + size
    return [_record(i, item, header, raw, base, bad) for i, item in enumerate(index)]


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _record(i, item, header, raw, base, bad) -> dict:
    if not isinstance(item, dict):
        bad(f"record {i} is not an object")
    token, layer, step = item.get("token"), item.get("layer"), item.get("step", None)
    if not isinstance(token, str) or not token:
        bad(f"record {i} has no token (a non-empty string)")
    if not _is_int(layer) or layer < 0:
        bad(f"record {i}'s layer must be an integer >= 0")
    if step is not None and (not _is_int(step) or step < 0):
        bad(f"record {i}'s step must be an integer >= 0 or null")
    site = item.get("site", None)                       # absent in files of one attention per layer
    if site is not None and (not isinstance(site, str) or not site):
        bad(f"record {i}'s site must be a non-empty string or null")
    record = {"token": token, "layer": layer, "step": step, "site": site}
    for kind in ("original", "bent"):
        e = header.get(f"{i}.{kind}")
        if not isinstance(e, dict) or e.get("dtype") != "F32":
            bad(f"record {i} has no float32 '{kind}' map")
        shape, offsets = e.get("shape"), e.get("data_offsets")
        if not (isinstance(shape, list) and len(shape) in (2, 3) and all(_is_int(d) and d > 0 for d in shape)):
            bad(f"record {i} '{kind}' must be a [h, w] or [frames, h, w] map with no empty side, not {shape!r}"[:200])
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_int(o) for o in offsets)
                and 0 <= offsets[0] <= offsets[1] <= len(raw) - base):
            bad(f"record {i} '{kind}' has data_offsets outside the file")
        data = bytearray(raw[base + offsets[0]:base + offsets[1]])
        if len(data) != 4 * _count(shape):
            bad(f"record {i} '{kind}' holds {len(data)} bytes, its shape needs {4 * _count(shape)}")
        record[kind] = torch.frombuffer(data, dtype=torch.float32).reshape(shape)
    return record


def _count(shape) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n
