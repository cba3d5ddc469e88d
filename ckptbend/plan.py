"""recipe + checkpoint → Plan: every tensor to scale, its rows or columns and its factors. Pure; nothing
is written.

The tensors of quantised layers (ComfyUI's scaled fp8 and comfy_quant formats) and plain fp8 tensors
follow their format's rule (formats/requant.py): a factor lands on a scale where one covers it exactly,
otherwise the codes are requantised and measured; `describe` says which, and the plan's warnings what was
clipped or departs from the requested factor.
"""

from __future__ import annotations

from dataclasses import dataclass

from .edits import Edit, Segment  # noqa: F401  (the plan's parts; imported from here too)
from .errors import CkptbendError
from .formats import requant
from .layouts import Checkpoint, Site, blocks_with_attention, label_runs
from .layouts.text_encoders import CLIP_ENCODERS, LARGE_ENCODERS, TEXT_ENCODERS
from .layouts.validate import folder
from .arithmetic import NUMPY_STORAGE as FLOAT_STORAGE, SCALABLE
from .recipe.schema import ARCHITECTURES, QK_WARN_PRODUCT


def _temporal_key(site: Site) -> str:
    return f"{'self' if site.attn == 'attn1' else 'cross'}_{'temporal' if site.temporal else 'structural'}"


# Which recipe key of each section (= ComfyUI node) applies to a site, or None.
SECTION_KEY = {
    "unet.self": lambda s: s.proj if s.component == "unet" and s.attn == "attn1" else None,
    "unet.cross": lambda s: s.proj if s.component == "unet" and s.attn == "attn2" else None,
    "unet.temporal": lambda s: _temporal_key(s) if s.component == "unet" and s.proj == "out" else None,
    "clip": lambda s: s.proj if s.component in CLIP_ENCODERS else None,
    "dit.joint": lambda s: s.proj if s.component == "dit" and s.attn == "joint" else None,
    "dit.self": lambda s: s.proj if s.component == "dit" and s.attn == "self" else None,
    "dit.cross": lambda s: s.proj if s.component == "dit" and s.attn == "cross" else None,
    "text": lambda s: s.proj if s.component in LARGE_ENCODERS else None,
}


@dataclass(frozen=True)
class Plan:
    checkpoint: Checkpoint
    recipe: object
    edits: tuple[Edit, ...]
    warnings: tuple[str, ...]
    requantised: tuple[int, int, int] = (0, 0, 0)   # quantised tensors requantised, values rounded, values clipped

    def summary(self) -> str:
        """'N tensors' and, where the format made the bake requantise, how much (for the one-line reports)."""
        tensors, rounded, clipped = self.requantised
        if not tensors:
            return f"{len(self.edits)} tensors"
        return (f"{len(self.edits)} tensors ({tensors} requantised: {rounded:,} values rounded to nearest, "
                f"{clipped:,} clipped)")

    def edits_for(self, rel: str) -> dict[str, Edit]:
        return {e.key: e for e in self.edits if e.file == rel}

    def describe(self) -> list[str]:
        lines = []
        for e in self.edits:
            for seg in e.segments:
                rows = f" rows {seg.rows[0]}:{seg.rows[1]}" if seg.rows else ""
                cols = f" columns {seg.cols[0]}:{seg.cols[1]}" if seg.cols else ""
                factors = " × ".join(f"{f:g}" for f in seg.factors)
                factors += f" of (w + {seg.offset:g})" if seg.offset else ""
                where = f"{e.file}: " if self.checkpoint.kind == "diffusers-folder" else ""
                note = e.note if e.note is not None else ""
                lines.append(f"{where}{e.key}{rows}{cols}  ×{factors}  ({', '.join(seg.reasons)}{note})")
        return lines


def _selected(entry, site: Site) -> bool:
    if entry.blocks and site.block not in entry.blocks and site.group not in entry.blocks:
        return False
    if entry.depth and site.depth not in entry.depth:
        return False
    if entry.stream and site.stream != entry.stream:
        return False
    return not entry.encoders or site.component in entry.encoders


def _entry_name(section: str, index: int, entries) -> str:
    return f"[[{section}]] entry {index + 1}" if len(entries) > 1 else f"[{section}]"


def _unmatched(message: str, allow_missing: bool, warnings: list[str]):
    if not allow_missing:
        raise CkptbendError(f"{message} (use --allow-missing to bake anyway)")
    warnings.append(message)


def _qk_norm_cancels(name, recipe_key, factor, section, ckpt: Checkpoint, warnings: list[str]):
    """q/k factors of a UNet node on a model that normalises q and k after projection. On a DiT (LTX-Video, HiDream)
    the bake keeps ComfyUI's literal meaning, so it stays bit-identical to the node, and warns."""
    if any(s.component == "dit" for s in ckpt.sites):
        joint_only = {s.attn for s in ckpt.sites if s.component == "dit"} == {"joint"}   # HiDream
        dit = "[dit.joint]" if joint_only else "[dit.self]" if section == "unet.self" else "[dit.cross]"
        warnings.append(f"{name}: {recipe_key} = {factor:g} is cancelled by this model's qk-norm, as with "
                        f"ComfyUI's node; {dit} scales the norm weight instead, which does act")
        return
    raise CkptbendError(f"{name}: {recipe_key} = {factor:g} would do nothing: this UNet normalises "
                        "q and k after projection (qk-norm), which cancels a scale on W_q/W_k")


def labels_read_for(recipe, ckpt: Checkpoint) -> str:
    """Which architecture the recipe's block labels are read for (what `--dry-run` says); refuses a
    checkpoint of another architecture than the recipe's `architecture`, and one whose architecture
    ckptbend cannot tell. Files of text encoders alone have no block labels: `architecture` does not apply."""
    if not recipe.architecture:
        return f"{ckpt.architecture} (detected; the recipe names no architecture)"
    written_for = ", ".join(recipe.architecture)
    if ckpt.architecture in {a for name in recipe.architecture for a in ARCHITECTURES[name]}:
        return f"{ckpt.architecture} (detected; the recipe is for {written_for})"
    if all(c in TEXT_ENCODERS for c in ckpt.components if c != "vae"):
        return f"none: {ckpt.path.name} holds text encoders only ({ckpt.architecture}), which have no block labels"
    known = ckpt.architecture in {a for names in ARCHITECTURES.values() for a in names}
    why = (f"add \"{ckpt.architecture}\" to the recipe's `architecture` if its blocks mean the same there" if known
           else "ckptbend cannot tell its architecture, so the recipe's block labels cannot be checked (remove "
                "`architecture` from the recipe to bake it anyway)")
    raise CkptbendError(f"recipe {recipe.name!r} is written for {written_for}, but {ckpt.path.name} is "
                        f"{ckpt.architecture}: {why}")


def _attention(s: Site) -> tuple:
    """The attention (one softmax, or one set of queries: Wan I2V's text and image keys) a q/k site feeds:
    its block, depth and attention in a UNet or DiT (every stream of a joint attention alike), its layer's
    attention module in a text encoder; within one model (a diffusers sub-folder)."""
    if s.block is not None:   # a self or cross attention per stream (LTX-2's video and audio) is its own softmax
        stream = s.stream if s.attn != "joint" else None
        return folder(s.file), s.component, s.block, s.depth, s.attn, s.temporal, stream, s.softmax
    return folder(s.file), s.component, s.key.rsplit(".", 2)[0]


def _qk_warnings(ckpt: Checkpoint, recipe, applied: dict) -> list[str]:
    """Warn where the factors of a query and a key that meet in one attention multiply to more than
    QK_WARN_PRODUCT, beyond what one entry alone gives (the recipe reader warns about that). Per attention
    the largest product is the largest q factor of its query tensors (every stream's) times the largest k
    factor of its key tensors; `applied` holds the product of factors per (section, file, key, rows)."""
    warnings = []
    for section in recipe.multipliers:
        key_of, per_attention = SECTION_KEY[section], {}
        for s in ckpt.sites:
            if key_of(s) in ("q", "k") and not s.bias:
                qk = per_attention.setdefault(_attention(s), {"q": 1.0, "k": 1.0})
                qk[key_of(s)] = max(qk[key_of(s)], applied.get((section, s.file, s.key, s.rows), 1.0))
        products = [qk["q"] * qk["k"] for qk in per_attention.values()]
        single = max((e.factor("q") * e.factor("k") for e in recipe.multipliers[section]), default=1.0)
        worst = max(products, default=1.0)
        if worst > QK_WARN_PRODUCT and worst > single * (1 + 1e-9):
            n = sum(1 for p in products if p > QK_WARN_PRODUCT)
            warnings.append(f"[{section}]: entries combine to q x k up to {worst:g} (> {QK_WARN_PRODUCT:g}) in {n} "
                            "attention(s) (a query and a key that meet in one softmax); UIs that run attention "
                            "in fp16 without upcasting may overflow (NaN/black images)")
    return warnings


def _refuse_offsets_outside_floats(ckpt: Checkpoint, by_tensor: dict) -> None:
    """A weight used as (w + offset) is scaled in float32 from fp32/fp16/bf16 only: fp8 and the quantised
    formats' rules scale codes and scales, which have no offset."""
    dtypes = {(f.rel, t.name): t.dtype for f in ckpt.files for t in f.header.tensors}
    for where, segs in by_tensor.items():
        if any(seg.offset for seg in segs) and dtypes[where] not in FLOAT_STORAGE:
            raise CkptbendError(f"{where[1]}: a norm weight used as (w + {segs[0].offset:g}), stored as "
                                f"{dtypes[where]}; ckptbend scales such a weight only in F32, F16 or BF16")


# What the companion's techniques reach (ckptbend/runtime): SAG and Slothful patch an SD UNet's self-attention;
# nothing reaches SVD (its cross-attention reads a CLIP image embedding, its temporal blocks run over frames).
SD_UNETS = ("sd1", "sd2", "sdxl")


def _sampling_time_warnings(recipe, ckpt: Checkpoint) -> list[str]:
    """Warn, at bake time, about sampling-time sections whose companion both hosts will refuse on this model."""
    arch = ckpt.architecture or ""
    unet_only = [n for n, on in (("[sag]", recipe.sag is not None), ("[slothful]", recipe.slothful is not None)) if on]
    used = unet_only + (["[[bending]]"] if recipe.bending else [])
    if arch == "svd" and used:
        return [f"{', '.join(used)}: the companion's techniques do not reach SVD (its cross-attention attends to the "
                "CLIP image embedding, not a prompt; its temporal blocks run over frames): both hosts refuse them"]
    if unet_only and arch and not arch.startswith(SD_UNETS) and arch != "unet-only":
        return [f"{', '.join(unet_only)}: SAG and Slothful Attention need an SD UNet (SD 1.x/2.x, SDXL); on {arch} "
                "the companion refuses them in both hosts"]
    return []


def make_plan(recipe, ckpt: Checkpoint, *, allow_missing: bool = False) -> Plan:
    labels_read_for(recipe, ckpt)
    warnings: list[str] = []
    found: dict[tuple, list] = {}   # (file, key, rows, cols) → [factors, reasons]
    applied: dict[tuple, float] = {}   # (section, file, key, rows) → product of its q or k factors
    for section, entries in recipe.multipliers.items():
        key_of = SECTION_KEY[section]
        of_section = [s for s in ckpt.sites if key_of(s) is not None]
        here = blocks_with_attention(ckpt, of_section)
        for index, entry in enumerate(entries):
            name = _entry_name(section, index, entries)
            candidates = [s for s in of_section if _selected(entry, s)]
            unknown = [b for b in entry.blocks if b not in here and all(s.group != b for s in of_section)]
            if unknown:   # any label the model lacks, even beside one it has: the recipe was meant elsewhere
                _unmatched(f"{name}: {ckpt.path.name} has no block {', '.join(unknown)} with [{section}] attention "
                           f"(its blocks: {label_runs(here)})", allow_missing, warnings)
            elif (entry.blocks or entry.depth or entry.encoders) and not candidates:
                _unmatched(f"{name}: selector matches no attention in {ckpt.path.name} "
                           f"(blocks with attention: {label_runs(blocks_with_attention(ckpt))})", allow_missing,
                           warnings)
            for recipe_key, factor in entry.factors:
                hits = [s for s in candidates if key_of(s) == recipe_key]
                if not hits:
                    _unmatched(f"{name}: {recipe_key} = {factor:g} matches no tensor in {ckpt.path.name} "
                               f"(components: {', '.join(ckpt.components)})", allow_missing, warnings)
                if hits and all(s.inert for s in hits):
                    warnings.append(f"{name}: {recipe_key} = {factor:g} has no effect: {hits[0].inert}")
                if ckpt.qk_norm and section in ("unet.self", "unet.cross") and recipe_key in ("q", "k") and hits:
                    _qk_norm_cancels(name, recipe_key, factor, section, ckpt, warnings)
                for s in hits:
                    slot = found.setdefault((s.file, s.key, s.rows, s.cols), [[], [], s.offset])
                    slot[0].append(factor)
                    slot[1].append(f"{section}.{recipe_key}")
                    if recipe_key in ("q", "k"):
                        at = (section, s.file, s.key, s.rows)
                        applied[at] = applied.get(at, 1.0) * factor
    warnings += _qk_warnings(ckpt, recipe, applied)
    warnings += _sampling_time_warnings(recipe, ckpt)

    # Group segments per tensor, keeping file order (the order tensors will be written in).
    by_tensor: dict[tuple[str, str], list[Segment]] = {}
    for (file, key, rows, cols), (factors, reasons, offset) in found.items():
        by_tensor.setdefault((file, key), []).append(Segment(rows, tuple(factors), tuple(reasons), cols, offset))
    _refuse_offsets_outside_floats(ckpt, by_tensor)
    by_tensor = {k: sorted(segs, key=lambda s: (s.rows or (0, 0), s.cols or (0, 0))) for k, segs in by_tensor.items()}
    # Quantised layers (and plain fp8 tensors): their format's rule decides which of their tensors change, and how.
    quantised = requant.route(ckpt, by_tensor)
    warnings += quantised.warnings
    edits = {k: Edit(*k, tuple(segs)) for k, segs in by_tensor.items() if k not in quantised.taken} | quantised.edits
    order = {(f.rel, t.name): i for i, (f, t) in enumerate((f, t) for f in ckpt.files for t in f.header.tensors)}
    edits = tuple(e for _, e in sorted(edits.items(), key=lambda kv: order[kv[0]]))
    dtypes = {(f.rel, t.name): t.dtype for f in ckpt.files for t in f.header.tensors}
    for e in edits:
        if e.op is None and dtypes[(e.file, e.key)] not in SCALABLE:
            raise CkptbendError(f"{e.key}: stored as {dtypes[(e.file, e.key)]}, which cannot be scaled")
    return Plan(ckpt, recipe, edits, tuple(warnings), quantised.counts)
