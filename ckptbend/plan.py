"""recipe + checkpoint → Plan: every tensor to scale, its rows and its factors. Pure; nothing is written."""

from __future__ import annotations

from dataclasses import dataclass

from .errors import CkptbendError
from .layouts import Checkpoint, Site, blocks_with_attention
from .layouts.text_encoders import TEXT_ENCODERS
from .arithmetic import SCALABLE


def _temporal_key(site: Site) -> str:
    return f"{'self' if site.attn == 'attn1' else 'cross'}_{'temporal' if site.temporal else 'structural'}"


# Which recipe key of each section (= ComfyUI node) applies to a site, or None.
SECTION_KEY = {
    "unet.self": lambda s: s.proj if s.component == "unet" and s.attn == "attn1" else None,
    "unet.cross": lambda s: s.proj if s.component == "unet" and s.attn == "attn2" else None,
    "unet.temporal": lambda s: _temporal_key(s) if s.component == "unet" and s.proj == "out" else None,
    "clip": lambda s: s.proj if s.component in TEXT_ENCODERS else None,
}


@dataclass(frozen=True)
class Segment:
    rows: tuple[int, int] | None   # None: the whole tensor
    factors: tuple[float, ...]     # applied one after another in float32, like chained nodes
    reasons: tuple[str, ...]       # e.g. "unet.self.q"


@dataclass(frozen=True)
class Edit:
    file: str
    key: str
    segments: tuple[Segment, ...]


@dataclass(frozen=True)
class Plan:
    checkpoint: Checkpoint
    recipe: object
    edits: tuple[Edit, ...]
    warnings: tuple[str, ...]

    def edits_for(self, rel: str) -> dict[str, Edit]:
        return {e.key: e for e in self.edits if e.file == rel}

    def describe(self) -> list[str]:
        lines = []
        for e in self.edits:
            for seg in e.segments:
                rows = f" rows {seg.rows[0]}:{seg.rows[1]}" if seg.rows else ""
                factors = " × ".join(f"{f:g}" for f in seg.factors)
                where = f"{e.file}: " if self.checkpoint.kind == "diffusers-folder" else ""
                lines.append(f"{where}{e.key}{rows}  ×{factors}  ({', '.join(seg.reasons)})")
        return lines


def _selected(entry, site: Site) -> bool:
    if entry.blocks and site.block not in entry.blocks and site.group not in entry.blocks:
        return False
    if entry.depth and site.depth not in entry.depth:
        return False
    return not entry.encoders or site.component in entry.encoders


def _entry_name(section: str, index: int, entries) -> str:
    return f"[[{section}]] entry {index + 1}" if len(entries) > 1 else f"[{section}]"


def _unmatched(message: str, allow_missing: bool, warnings: list[str]):
    if not allow_missing:
        raise CkptbendError(f"{message} (use --allow-missing to bake anyway)")
    warnings.append(message)


def make_plan(recipe, ckpt: Checkpoint, *, allow_missing: bool = False) -> Plan:
    warnings: list[str] = []
    found: dict[tuple[str, str, tuple | None], list] = {}   # (file, key, rows) → [factors, reasons]
    for section, entries in recipe.multipliers.items():
        key_of = SECTION_KEY[section]
        for index, entry in enumerate(entries):
            name = _entry_name(section, index, entries)
            candidates = [s for s in ckpt.sites if key_of(s) is not None and _selected(entry, s)]
            if (entry.blocks or entry.depth or entry.encoders) and not candidates:
                available = ", ".join(blocks_with_attention(ckpt)) or "none"
                _unmatched(f"{name}: selector matches no attention in {ckpt.path.name} "
                           f"(blocks with attention: {available})", allow_missing, warnings)
            for recipe_key, factor in entry.factors:
                hits = [s for s in candidates if key_of(s) == recipe_key]
                if not hits:
                    _unmatched(f"{name}: {recipe_key} = {factor:g} matches no tensor in {ckpt.path.name} "
                               f"(components: {', '.join(ckpt.components)})", allow_missing, warnings)
                if ckpt.qk_norm and section in ("unet.self", "unet.cross") and recipe_key in ("q", "k") and hits:
                    raise CkptbendError(f"{name}: {recipe_key} = {factor:g} would do nothing: this UNet normalises "
                                        "q and k after projection (qk-norm), which cancels a scale on W_q/W_k")
                for s in hits:
                    slot = found.setdefault((s.file, s.key, s.rows), [[], []])
                    slot[0].append(factor)
                    slot[1].append(f"{section}.{recipe_key}")

    # Group row segments per tensor, keeping file order (the order tensors will be written in).
    by_tensor: dict[tuple[str, str], list[Segment]] = {}
    for (file, key, rows), (factors, reasons) in found.items():
        by_tensor.setdefault((file, key), []).append(Segment(rows, tuple(factors), tuple(reasons)))
    order = {(f.rel, t.name): i for i, (f, t) in enumerate((f, t) for f in ckpt.files for t in f.header.tensors)}
    edits = tuple(Edit(file, key, tuple(sorted(segs, key=lambda s: s.rows or (0, 0))))
                  for (file, key), segs in sorted(by_tensor.items(), key=lambda kv: order[kv[0]]))
    dtypes = {(f.rel, t.name): t.dtype for f in ckpt.files for t in f.header.tensors}
    for e in edits:
        if dtypes[(e.file, e.key)] not in SCALABLE:
            raise CkptbendError(f"{e.key}: stored as {dtypes[(e.file, e.key)]}, which cannot be scaled")
    return Plan(ckpt, recipe, edits, tuple(warnings))
