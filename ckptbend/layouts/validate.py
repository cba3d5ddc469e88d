"""Whether the tensors the families found are tensors ckptbend can scale: one check that every family's
sites go through at detection, so `inspect`, `bake` and `--dry-run` refuse the same files, in one line,
before anything is written.

- A storage ckptbend does not understand (a weight split into quantiser parts) is refused by name.
- A bias is never scaled alone: its weight (`X.weight` for `X.bias`, `in_proj_weight` for `in_proj_bias`)
  must be a plain tensor of the same model, scaled by the same factor, with one row per bias entry.
- Ranks: a projection weight is 2-D ([out, in]); a bias and a qk-norm weight are 1-D.
- A row or column range lies inside its tensor, and a fused tensor has the length its layout cuts it for
  (`Site.fused`: 3·h rows for q|k|v, h + MLP columns for Flux's `linear2`).
"""

from __future__ import annotations

import re

from ..errors import CkptbendError
from ..formats.comfy_quant import logical_shapes
from .types import CheckpointFile, Site

# Quantised storages that split a weight into parts ckptbend cannot scale: pattern → what it is.
FOREIGN_STORAGE = (
    (re.compile(r"\.weight\._(?:data|scale)$"), "optimum-quanto's quantised weights (weight._data / weight._scale)"),
)
BIAS_ONLY = "a bias is never scaled without its weight"


def folder(rel: str) -> str:
    """The model a file belongs to: its diffusers sub-folder (shards of one model share it), or ''."""
    return rel.rpartition("/")[0]


def weight_of(key: str) -> str:
    """The weight beside a bias (`X.bias` → `X.weight`, `in_proj_bias` → `in_proj_weight`); a weight itself."""
    return key[:-len("bias")] + "weight" if key.endswith("bias") else key


def shape_in(files, rel: str, key: str) -> tuple[int, ...] | None:
    """The shape of `key` in the model of file `rel` (any of its shards), as the model sees it (an nvfp4 weight
    unpacked), or None if it has no such tensor."""
    for f in files:
        if folder(f.rel) == folder(rel) and key in set(f.header.names):
            return logical_shapes(f.header)[key]
    return None


def fused_width(files, cf: CheckpointFile, key: str) -> int:
    """h of a fused q|k|v input projection (weight [3h, h] and bias [3h]): its weight's input width; 0 where
    the weight is missing or not 2-D, which `check_sites` then refuses."""
    shape = shape_in(files, cf.rel, weight_of(key))
    return shape[1] if shape is not None and len(shape) == 2 else 0


def _fail(s: Site, message: str):
    raise CkptbendError(f"{s.file}: {s.key} {message}")


def _refuse_foreign_storage(files: list[CheckpointFile]) -> None:
    for f in files:
        for name, component in f.components.items():
            for pattern, what in FOREIGN_STORAGE:
                if component != "vae" and pattern.search(name):
                    raise CkptbendError(f"{f.rel}: {name} is {what}, a storage ckptbend does not understand; "
                                        "dequantise the file first")


def _check_partner(s: Site, shapes: dict, at: set) -> None:
    weight = weight_of(s.key)
    shape = shapes.get((folder(s.file), weight))
    if shape is None:
        parts = sorted(n for (d, n) in shapes if d == folder(s.file) and n.startswith(weight + "."))
        stored = f" (stored as {', '.join(parts)}: a storage ckptbend does not understand)" if parts else ""
        _fail(s, f"has no weight {weight}{stored}; {BIAS_ONLY}")
    if (folder(s.file), weight, s.proj, s.rows) not in at:
        _fail(s, f"is an attention site but its weight {weight} is not; {BIAS_ONLY}")


def _check_bias_length(s: Site, shapes: dict) -> None:
    weight, bias = shapes[(folder(s.file), weight_of(s.key))], shapes[(folder(s.file), s.key)]
    if weight[0] != bias[0]:
        _fail(s, f"has {bias[0]} entries but its weight {weight_of(s.key)} has {weight[0]} rows")


def _check_rank(s: Site, shape) -> None:
    want, what = (1, "a bias") if s.bias else (1, "a qk-norm weight") if s.norm else (2, "a projection weight")
    if len(shape) != want:
        _fail(s, f"has shape {list(shape)}; {what} must be {want}-D, so this is not a layout ckptbend understands")


def _check_range(s: Site, shape) -> None:
    for axis, span, name in ((0, s.rows, "rows"), (1, s.cols, "columns")):
        if span is None:
            continue
        if s.fused is not None and shape[axis] != s.fused:
            _fail(s, f"has shape {list(shape)}; its layout needs {s.fused} {name} ({s.proj} at {name} "
                     f"{span[0]}:{span[1]}), so this is not a layout ckptbend understands")
        if not 0 <= span[0] < span[1] <= shape[axis]:
            _fail(s, f"has shape {list(shape)}, too small for {s.proj} at {name} {span[0]}:{span[1]}")


def check_sites(files: list[CheckpointFile], sites) -> None:
    """Refuse, in one line, a checkpoint whose attention tensors ckptbend cannot scale faithfully."""
    _refuse_foreign_storage(files)
    shapes = {(folder(f.rel), name): shape for f in files for name, shape in logical_shapes(f.header).items()}
    at = {(folder(s.file), s.key, s.proj, s.rows) for s in sites}
    for s in sites:
        if s.bias:
            _check_partner(s, shapes, at)
    for s in sites:
        _check_rank(s, shapes[(folder(s.file), s.key)])
    for s in sites:
        _check_range(s, shapes[(folder(s.file), s.key)])
    for s in sites:
        if s.bias:
            _check_bias_length(s, shapes)
