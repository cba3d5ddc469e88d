"""The workflow ComfyUI embeds in the images it saves. Only metadata is read (Pillow parses the
container; pixels are never decoded, nothing is executed).

PNG (SaveImage): text chunks `prompt` (API format) and `workflow` (UI format), JSON text.
WebP (SaveAnimatedWEBP): EXIF strings "prompt:<json>" (tag 0x0110) and "workflow:<json>" (0x010F and below).
"""

from __future__ import annotations

import warnings
from pathlib import Path

from ckptbend.errors import CkptbendError

CHUNKS = ("prompt", "workflow")   # preferred first: the prompt is what ComfyUI actually ran
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def is_image(head: bytes) -> bool:
    return head.startswith(PNG_MAGIC) or (head[:4] == b"RIFF" and head[8:12] == b"WEBP")


def embedded_texts(path: Path) -> dict[str, str]:
    """{"prompt": ..., "workflow": ...}: whichever of the two the image carries."""
    from PIL import Image, UnidentifiedImageError

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)   # only metadata is read
            texts = _texts(path)
    except (UnidentifiedImageError, Image.DecompressionBombError, OSError, SyntaxError, ValueError) as e:
        raise CkptbendError(f"{path}: cannot read the image's metadata ({' '.join(str(e).split()) or type(e).__name__})") from None
    if not texts:
        raise CkptbendError(f"{path}: the image carries no ComfyUI workflow (no 'prompt' or 'workflow' metadata)")
    return {k: texts[k] for k in CHUNKS if k in texts}


def _texts(path: Path) -> dict[str, str]:
    from PIL import Image

    with Image.open(path) as image:
        if image.format == "PNG":
            return {k: v for k, v in image.info.items() if k in CHUNKS and isinstance(v, str)}
        texts = {}
        for value in image.getexif().values():
            key, _, text = value.partition(":") if isinstance(value, str) else ("", "", "")
            if key in CHUNKS:
                texts.setdefault(key, text)
        return texts
