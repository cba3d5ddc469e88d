"""Qwen-Image Layered (QwenImageLayeredPipeline): one model call packs the layers + 1 generated frames, then the input
image, into one image sequence after the text ([text; frame 0; …; frame L; input image], each frame raster-ordered),
img_shapes [(1, h, w)] * (layers + 1) + [(1, h', w')] per item, and passes additional_t_cond (only Layered does).
The generated frames' queries are bent as frames of one (h, w) grid; the input image's tokens are left alone."""

from __future__ import annotations


def frames(kwargs) -> int | None:
    """The generated frames of a Qwen-Image Layered call (all its img_shapes but the input image's), else None."""
    shapes = kwargs.get("img_shapes")
    if kwargs.get("additional_t_cond") is None or not shapes:
        return None
    item = shapes[0] if isinstance(shapes[0], list) else shapes
    return len(item) - 1 if len(item) > 1 else None
