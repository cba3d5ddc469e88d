"""LTX-Video 1.0 in the diffusers host: its text cross-attention (attn2, T5 with its padding masked) is bent by the
generic cross-attention path (cross.py) on the token grid the call gives: packed [b, frames·rows·cols, c] latents and
the num_frames / height / width keywords (LTXPipeline, LTXImageToVideoPipeline; patch 1 as released)."""

from __future__ import annotations

LTX_VIDEO_MODELS = ("LTXVideoTransformer3DModel",)
NO_GRID = ("LTX-Video's model call gives no num_frames / height / width matching its tokens (LTXConditionPipeline "
           "passes video_coords and appends its conditioning tokens), so its token grid is not known")


def check(module, x, kwargs) -> None:
    """Refuse a call whose tokens are not the num_frames × height × width grid it names (bending would place a
    word's map on a guessed grid)."""
    if type(module).__name__ not in LTX_VIDEO_MODELS:
        return
    sizes = [kwargs.get(k) for k in ("num_frames", "height", "width")]
    if not all(sizes) or sizes[0] * sizes[1] * sizes[2] != x.shape[1]:
        raise ValueError(f"Attention Bending cannot bend this call: {NO_GRID}")
