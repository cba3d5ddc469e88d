"""The workflow ComfyUI embeds in the images it saves. Only the metadata is read, by walking the file's
chunks: pixels are never decoded (so no decompression-bomb limit applies), nothing is executed.

PNG (SaveImage): text chunks `prompt` (API format) and `workflow` (UI format), JSON text, as tEXt,
zTXt or iTXt, before or after the image data.
WebP (SaveAnimatedWEBP): EXIF strings "prompt:<json>" (tag 0x0110) and "workflow:<json>" (0x010F and
below), read by Pillow's EXIF parser.
"""

from __future__ import annotations

import struct
import warnings
import zlib
from pathlib import Path

from ckptbend.errors import CkptbendError

from .limits import MAX_TEXT_BYTES

CHUNKS = ("prompt", "workflow")   # preferred first: the prompt is what ComfyUI actually ran
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def is_image(head: bytes) -> bool:
    return head.startswith(PNG_MAGIC) or (head[:4] == b"RIFF" and head[8:12] == b"WEBP")


def embedded_texts(path: Path) -> dict[str, str]:
    """{"prompt": ..., "workflow": ...}: whichever of the two the image carries, prompt first."""
    try:
        with open(path, "rb") as f:
            texts = _png_texts(f) if f.read(8) == PNG_MAGIC else _webp_texts(f)
    except (OSError, ValueError, struct.error, zlib.error) as e:
        raise CkptbendError(f"{path}: cannot read the image's metadata ({' '.join(str(e).split()) or type(e).__name__})") from None
    if not texts:
        raise CkptbendError(f"{path}: the image carries no ComfyUI workflow (no 'prompt' or 'workflow' metadata)")
    return {k: texts[k] for k in CHUNKS if k in texts}


def _read(f, n: int) -> bytes:
    data = f.read(n)
    if len(data) != n:
        raise ValueError("the file ends inside a chunk")
    return data


def _inflate(data: bytes) -> bytes:
    inflater = zlib.decompressobj()
    text = inflater.decompress(data, MAX_TEXT_BYTES)
    if inflater.unconsumed_tail:
        raise ValueError(f"a compressed text chunk inflates to more than {MAX_TEXT_BYTES >> 20} MiB")
    return text


def _decode(raw: bytes) -> str:
    # tEXt is Latin-1 by the PNG spec, but tools write UTF-8 there too (JSON from ComfyUI is ASCII).
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("latin-1")


def _png_texts(f) -> dict[str, str]:
    texts = {}
    while header := f.read(8):
        if len(header) < 8:
            raise ValueError("the file ends inside a chunk header")
        length, kind = struct.unpack(">I4s", header)
        if kind == b"IEND":
            break
        if kind not in (b"tEXt", b"zTXt", b"iTXt"):
            f.seek(length + 4, 1)             # the data and its CRC
            continue
        if length > MAX_TEXT_BYTES:
            raise ValueError(f"a {kind.decode()} chunk of {length} bytes")
        data = _read(f, length)
        f.seek(4, 1)
        key, _, rest = data.partition(b"\0")
        key = key.decode("latin-1")
        if key not in CHUNKS or key in texts:
            continue
        if kind == b"tEXt":
            texts[key] = _decode(rest)
        elif kind == b"zTXt":                  # compression method, then zlib data
            texts[key] = _decode(_inflate(rest[1:]))
        else:                                  # iTXt: flag, method, language\0, translated keyword\0, UTF-8
            compressed, body = rest[:1] == b"\x01", rest[2:].split(b"\0", 2)[-1]
            texts[key] = (_inflate(body) if compressed else body).decode("utf-8", "replace")
    return texts


def _webp_texts(f) -> dict[str, str]:
    from PIL import Image

    f.seek(12)
    texts = {}
    while header := f.read(8):
        if len(header) < 8:
            break
        kind, length = struct.unpack("<4sI", header)
        if kind != b"EXIF":
            f.seek(length + (length & 1), 1)
            continue
        if length > MAX_TEXT_BYTES:
            raise ValueError(f"an EXIF chunk of {length} bytes")
        exif = Image.Exif()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")    # Pillow warns on stderr about odd EXIF; only our tags matter
            try:
                exif.load(_read(f, length))
            except (SyntaxError, KeyError, IndexError, TypeError) as e:
                raise ValueError(f"corrupt EXIF ({e})") from None
        for value in exif.values():
            key, _, text = value.partition(":") if isinstance(value, str) else ("", "", "")
            if key in CHUNKS:
                texts.setdefault(key, text)
        break
    return texts
