"""Read GGUF headers (with gguf-py's reader) into the same tensor table safetensors files give, and build an
output's header: the input's KV pairs and tensor infos as stored, plus ckptbend's provenance KVs.

A GGUF file is: magic `GGUF`, version, tensor count, KV count, the KV pairs, the tensor infos (name, dims
innermost first, ggml type, offset relative to the data section), padding to `general.alignment`, the data.
Tensor offsets are relative to the data section, so adding KV pairs (which moves it) leaves them valid: an
output's tensor infos are the input's bytes.

The table this module gives the rest of ckptbend (Header.tensors):
- `dtype` is the ggml type's name ("Q8_0", "Q4_K", "F16", ...);
- `shape` is the shape the model sees (torch order): the dims reversed, or, where ComfyUI-GGUF stored a
  tensor reshaped to [n / 256, 256] (SD 1.x / SDXL), its `comfy.gguf.orig_shape.<name>` KV;
- [begin, end) runs to the next tensor's offset (the last one's to the file's end), so the tensors tile the
  data section, alignment padding included: `stored[name]` is the bytes the tensor itself holds.
"""

from __future__ import annotations

import math
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path

from .errors import CkptbendError
from .safetensors_io import Header, TensorInfo

MAGIC = b"GGUF"
ORIG_SHAPE = "comfy.gguf.orig_shape."
STRING = 8   # GGUFValueType.STRING
# The output's header is padded (a KV of spaces) so its data section starts where the input's does within a
# page: the kernel copies tensors between equal page offsets half again as fast as between unequal ones.
PAGE = 4096
PAD_KEY = "ckptbend.page_padding"
# What other files start with, to say what a file is when it is neither safetensors nor GGUF.
OTHER_MAGICS = {b"PK\x03\x04": "a zip archive (a PyTorch .pt/.ckpt pickle?)",
                b"GGML": "an old GGML file (convert it to GGUF)", b"ggml": "an old GGML file (convert it to GGUF)",
                b"ggjt": "an old GGJT file (convert it to GGUF)", b"ggmf": "an old GGMF file (convert it to GGUF)",
                b"\x89HDF": "an HDF5 file", b"\x89PNG": "a PNG image"}


@dataclass(frozen=True)
class KV:
    key: str
    raw: bytes                # the whole entry as stored (key, type, value)
    text: str | None = None   # its value, where it is a string


@dataclass(frozen=True)
class GGUFHeader(Header):
    version: int = 3
    alignment: int = 32
    data_offset: int = 0
    kvs: tuple[KV, ...] = ()
    infos: bytes = b""                                  # the tensor-info section as stored
    stored: dict = field(default_factory=dict)          # tensor → bytes it holds (no padding)
    ne: dict = field(default_factory=dict)              # tensor → ggml dims (innermost first)
    architecture: str | None = None                     # general.architecture

    @property
    def data_start(self) -> int:
        return self.data_offset

    def to_bytes(self, meta: dict[str, str], tensors) -> bytes:
        """The output's header up to its data section: every input KV as stored, but the string KVs `meta`
        holds (ckptbend's provenance among them) written with its values; the tensor infos as stored."""
        entries, written = [], set()
        for kv in self.kvs:
            if kv.key in meta:
                entries.append(_string_kv(kv.key, meta[kv.key]))
                written.add(kv.key)
            elif kv.text is None:
                entries.append(kv.raw)
        entries += [_string_kv(k, v) for k, v in meta.items() if k not in written]
        if PAGE % self.alignment == 0:
            least = len(MAGIC) + struct.calcsize("<IQQ") + sum(map(len, entries)) + len(self.infos) + len(
                _string_kv(PAD_KEY, ""))
            entries.append(_string_kv(PAD_KEY, " " * ((self.data_offset - least) % PAGE)))
        head = MAGIC + struct.pack("<IQQ", self.version, len(self.tensors), len(entries))
        body = head + b"".join(entries) + self.infos
        return body + b"\0" * (-len(body) % self.alignment)


def _string_kv(key: str, value: str) -> bytes:
    k, v = key.encode("utf-8"), value.encode("utf-8")
    return struct.pack("<Q", len(k)) + k + struct.pack("<IQ", STRING, len(v)) + v


def is_gguf(path) -> bool:
    return _magic(path) == MAGIC


def _magic(path) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read(4)
    except OSError:
        return b""


def other_format(path) -> str | None:
    """What a file is, where its first bytes say it is neither safetensors nor GGUF."""
    magic = _magic(path)
    return next((what for m, what in OTHER_MAGICS.items() if magic.startswith(m)), None)


def _fail(path, why: str):
    raise CkptbendError(f"{path}: not a valid GGUF file: {why}")


def _field_bytes(f) -> int:
    return sum(int(p.nbytes) for p in f.parts)


def _text(f) -> str | None:
    from gguf import GGUFValueType

    if list(f.types) != [GGUFValueType.STRING]:
        return None
    try:
        return bytes(f.parts[-1]).decode("utf-8")
    except UnicodeDecodeError:
        return None


def _orig_shape(path, reader, name: str, count: int) -> tuple[int, ...] | None:
    from gguf import GGUFValueType

    f = reader.get_field(ORIG_SHAPE + name)
    if f is None:
        return None
    if list(f.types) != [GGUFValueType.ARRAY, GGUFValueType.INT32]:
        _fail(path, f"{ORIG_SHAPE}{name} is not an array of int32")
    shape = tuple(int(f.parts[i][0]) for i in f.data)
    if any(d < 0 for d in shape) or math.prod(shape) != count:
        _fail(path, f"{ORIG_SHAPE}{name} = {list(shape)} does not hold the tensor's {count} elements")
    return shape


def read_header(path) -> GGUFHeader:
    """Read and validate a GGUF header: the tensors' data lie in the data section, aligned, without overlap."""
    path = Path(path)
    try:
        import gguf

        reader = gguf.GGUFReader(path)
    except OSError as e:
        raise CkptbendError(f"{path}: cannot read: {e.strerror or e}") from None
    except Exception as e:     # gguf-py's reader on a damaged file: whatever it raises, one line
        _fail(path, f"truncated or damaged ({str(e) or type(e).__name__})")
    if reader.byte_order != "I":
        _fail(path, "big-endian GGUF files are not supported")
    version = int(reader.fields["GGUF.version"].parts[0][0])
    pseudo = ("GGUF.version", "GGUF.tensor_count", "GGUF.kv_count")
    raw = reader.data
    kvs = tuple(KV(name, bytes(raw[f.offset:f.offset + _field_bytes(f)]), _text(f))
                for name, f in reader.fields.items() if name not in pseudo)
    if reader.tensors:
        first = reader.tensors[0].field
        last = reader.tensors[-1].field
        infos = bytes(raw[first.offset:last.offset + _field_bytes(last)])
    else:
        infos = b""
    file_size = os.stat(path).st_size
    data_offset = int(reader.data_offset)
    size = file_size - data_offset
    found = sorted(reader.tensors, key=lambda t: t.data_offset)
    tensors, stored, ne = [], {}, {}
    for i, t in enumerate(found):
        begin = int(t.data_offset) - data_offset
        end = int(found[i + 1].data_offset) - data_offset if i + 1 < len(found) else size
        if i == 0 and begin != 0:
            _fail(path, f"tensor {t.name!r}: the data section does not start with a tensor (gap of {begin} bytes)")
        if begin % reader.alignment:
            _fail(path, f"tensor {t.name!r}: offset {begin} is not a multiple of the alignment {reader.alignment}")
        if begin + int(t.n_bytes) > end:
            what = "runs past the end of the file" if i + 1 == len(found) else "overlaps the next tensor"
            _fail(path, f"tensor {t.name!r} ({t.tensor_type.name}, {int(t.n_bytes)} bytes) {what}")
        dims = tuple(int(d) for d in t.shape)
        shape = _orig_shape(path, reader, t.name, int(t.n_elements)) or tuple(reversed(dims))
        tensors.append(TensorInfo(t.name, t.tensor_type.name, shape, begin, end))
        stored[t.name], ne[t.name] = int(t.n_bytes), dims
    metadata = {kv.key: kv.text for kv in kvs if kv.text is not None and kv.key != PAD_KEY}
    return GGUFHeader(path, data_offset - 8, file_size, metadata, tuple(tensors), version=version,
                      alignment=int(reader.alignment), data_offset=data_offset, kvs=kvs, infos=infos,
                      stored=stored, ne=ne, architecture=metadata.get("general.architecture"))
