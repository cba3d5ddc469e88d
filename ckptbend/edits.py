"""What a plan asks of one stored tensor: segments (rows or columns, and their factors), or, for the tensors of
a quantised layer, an operation of that format (formats/requant.py) that the writer runs instead."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Segment:
    rows: tuple[int, int] | None   # None: every row
    factors: tuple[float, ...]     # applied one after another in float32, like chained nodes
    reasons: tuple[str, ...]       # e.g. "unet.self.q"
    cols: tuple[int, int] | None = None   # None: every column (a 2-D weight's input columns otherwise)
    offset: float = 0.0            # the stored w acts as (w + offset): (w + offset) is scaled, offset taken back off

    @property
    def whole(self) -> bool:
        return self.rows is None and self.cols is None


@dataclass(frozen=True)
class Edit:
    file: str
    key: str
    segments: tuple[Segment, ...]
    op: object | None = None       # a format's operation (apply(raw, tensor) → bytes); None: the float rule
    note: str | None = None        # what `--dry-run` adds after each segment's reasons; None: the default

    @property
    def out_shape(self) -> tuple[int, ...] | None:
        """The tensor's new shape, where the operation changes it (an int8 per-tensor scale made per-channel)."""
        return getattr(self.op, "out_shape", None)
