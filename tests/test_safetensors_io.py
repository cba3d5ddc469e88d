"""The header reader: what real files look like is accepted; every malformed shape is one clear error."""

import json
import struct

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ckptbend.errors import CkptbendError
from ckptbend.safetensors_io import header_bytes, read_header


def raw_file(header, data=b"", length=None):
    body = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(body) if length is None else length) + body + data


def entry(dtype="F32", shape=(2,), offsets=(0, 8)):
    return {"dtype": dtype, "shape": list(shape), "data_offsets": list(offsets)}


def test_reads_what_the_reference_writer_writes(tmp_path):
    tensors = {"a": torch.zeros(3, 2, dtype=torch.float16), "b": torch.ones(5, dtype=torch.int64),
               "c": torch.zeros(0, 4), "d": torch.ones(2, dtype=torch.float8_e4m3fn)}
    save_file(tensors, tmp_path / "x.safetensors", metadata={"k": "v"})
    h = read_header(tmp_path / "x.safetensors")
    assert h.metadata == {"k": "v"}
    assert {t.name: (t.dtype, t.shape) for t in h.tensors} == {
        "a": ("F16", (3, 2)), "b": ("I64", (5,)), "c": ("F32", (0, 4)), "d": ("F8_E4M3", (2,))}
    assert [t.begin for t in h.tensors] == sorted(t.begin for t in h.tensors)


def test_written_header_round_trips_through_the_reference_reader(tmp_path):
    save_file({"w": torch.arange(6.0).reshape(2, 3)}, tmp_path / "in.safetensors")
    h = read_header(tmp_path / "in.safetensors")
    data = (tmp_path / "in.safetensors").read_bytes()[h.data_start:]
    (tmp_path / "out.safetensors").write_bytes(header_bytes({"m": "ü"}, h.tensors) + data)
    with safe_open(tmp_path / "out.safetensors", "pt") as f:
        assert f.metadata() == {"m": "ü"}
        assert torch.equal(f.get_tensor("w"), torch.arange(6.0).reshape(2, 3))


MALFORMED = [
    ("empty file", b"", "shorter than the 8-byte"),
    ("shorter than 8 bytes", b"\x01\x02\x03", "shorter than the 8-byte"),
    ("header length beyond the file", raw_file({}, length=1000), "larger than the file"),
    ("header length beyond the cap", struct.pack("<Q", 200_000_000) + b"{}", "exceeds"),
    ("header not JSON", raw_file(b"{not json}"), "not valid JSON"),
    ("header is a JSON list", raw_file(b"[1, 2]  "), "does not start with '{'"),
    ("header starts with padding", raw_file(b"   {}"), "does not start with '{'"),
    ("header not UTF-8", raw_file(b'{"\xff\xfe": 1}'), "UTF-8"),
    ("metadata value not a string", raw_file({"__metadata__": {"a": 1}}), "strings to strings"),
    ("metadata not an object", raw_file({"__metadata__": ["a"]}), "strings to strings"),
    ("unknown dtype", raw_file({"t": entry(dtype="F12")}, b"\0" * 8), "unknown dtype"),
    ("shape not a list", raw_file({"t": {"dtype": "F32", "shape": 2, "data_offsets": [0, 8]}}, b"\0" * 8), "shape"),
    ("negative dimension", raw_file({"t": entry(shape=(-2,))}, b"\0" * 8), "shape"),
    ("shape/dtype vs byte range", raw_file({"t": entry(shape=(3,))}, b"\0" * 8), "needs 12 bytes"),
    ("offsets reversed", raw_file({"t": entry(offsets=(8, 0))}, b"\0" * 8), "data_offsets"),
    ("offsets not integers", raw_file({"t": entry(offsets=(0.0, 8.0))}, b"\0" * 8), "data_offsets"),
    ("missing data_offsets", raw_file({"t": {"dtype": "F32", "shape": [2]}}, b"\0" * 8), "exactly dtype"),
    ("extra field", raw_file({"t": dict(entry(), extra=1)}, b"\0" * 8), "exactly dtype"),
    ("overlapping tensors", raw_file({"a": entry(), "b": entry(offsets=(4, 12))}, b"\0" * 12), "overlaps"),
    ("tensor inside another", raw_file({"a": entry(shape=(4,), offsets=(0, 16)), "b": entry(offsets=(8, 16))},
                                       b"\0" * 16), "overlaps"),
    ("two tensors on the same bytes", raw_file({"a": entry(), "b": entry()}, b"\0" * 8), "overlaps"),
    ("gap between tensors", raw_file({"a": entry(), "b": entry(offsets=(12, 20))}, b"\0" * 20), "gap"),
    ("gap at the start", raw_file({"a": entry(offsets=(4, 12))}, b"\0" * 12), "gap"),
    ("out of bounds", raw_file({"a": entry(offsets=(0, 8)), "b": entry(offsets=(8, 16))}, b"\0" * 8), "truncated"),
    ("truncated data section", raw_file({"a": entry()}, b"\0" * 5), "truncated"),
    ("trailing bytes", raw_file({"a": entry()}, b"\0" * 9), "trailing"),
    ("duplicate keys", raw_file(b'{"a":' + json.dumps(entry()).encode() + b',"a":' +
                                json.dumps(entry()).encode() + b"}", b"\0" * 8), "duplicate"),
    ("sub-byte dtype with odd count", raw_file({"a": entry(dtype="F4", shape=(3,), offsets=(0, 2))}, b"\0" * 2),
     "whole number of bytes"),
]


@pytest.mark.parametrize("name, content, fragment", MALFORMED, ids=[m[0] for m in MALFORMED])
def test_malformed_files_are_rejected_with_one_clear_line(tmp_path, name, content, fragment):
    path = tmp_path / "bad.safetensors"
    path.write_bytes(content)
    with pytest.raises(CkptbendError) as e:
        read_header(path)
    assert fragment in e.value.message and "\n" not in e.value.message
    assert path.read_bytes() == content
