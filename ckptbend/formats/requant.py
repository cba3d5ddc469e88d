"""How a factor reaches a quantised weight — the rule, per format (docs/formats.md, "ComfyUI's quantised
safetensors").

A weight's factors form a map over its elements: each row and each column has a chain of factors. The
most exact place for them, in this order:

1. The whole weight, one factor: its outer scale (fp8 weight_scale / scale_weight, int8 weight_scale, nvfp4
   weight_scale_2) — exact, the codes stay byte for byte.
2. Rows of an int8 layer: its per-channel scales (a per-tensor scale becomes one per channel, [out, 1], the
   shape comfy-kitchen's per-channel int8 writes) — exact, ConvRot included (it mixes input columns only).
3. Anything finer than the scales: the codes (fp8, int8) or the fp8 block scales (nvfp4) of the reached part
   are requantised, rounded to nearest even and clipped as the format does, in one of two ways:
   - plain: only the reached part is requantised by its factor (it may exceed the format's largest value);
   - raised: the outer scale takes the largest factor F, the values it applies to keep their codes, and
     every other value is requantised by its factor / F ≤ 1, which cannot clip.
   A way that rounds fewer values and clips none is taken; when plain rounds fewer but would clip, the way
   whose baked weight is nearer to the requested one in total squared error (what a linear layer's output
   error follows) is taken. A tensor without an outer scale (plain fp8) has only the plain way. Whatever is
   clipped is counted and reported, never silent.
4. mxfp8 (power-of-two block scales, no outer scale): a block's exponent takes ⌈log2 f⌉ of its largest
   factor (exact), its codes the rest, f / 2^⌈log2 f⌉ ≤ 1 (one rounding each, nothing clips). A power-of-two
   factor is exact.

Every requantisation is measured on the source before anything is written (measure.py): values
requantised, values clipped, and per range the achieved factor, reported when it departs from the requested
one by more than MATERIAL.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import numpy as np

from ..edits import Edit, Segment
from ..errors import CkptbendError
from ..gguf_io import GGUFHeader
from . import codecs, ggml, measure, ops
from .measure import MATERIAL
from .comfy_quant import FORMATS, FP8, QuantLayer, layers_of, logical_shape

UNITS = {"F8_E4M3": "fp8 e4m3fn", "F8_E5M2": "fp8 e5m2", "I8": "int8"}


@dataclass
class Routed:
    """What the rule asks of a checkpoint's quantised tensors: edits by (file, tensor), the planned tensors it
    took over (their plain edits are dropped), and what to tell."""
    edits: dict = field(default_factory=dict)
    taken: set = field(default_factory=set)
    counts: tuple = (0, 0, 0)          # tensors requantised, values rounded, values clipped
    clipped: dict = field(default_factory=dict)    # (what was requantised, why plain) → [(tensor, values clipped)]
    departed: dict = field(default_factory=dict)   # (reasons, factor, format) → [(where, achieved, lowest, highest)]

    @property
    def warnings(self) -> list[str]:
        return _warnings(self)


class _Chains:
    """The segments reaching each row and each column of a weight (their factors apply in that order)."""

    def __init__(self, segments, rows: int, cols: int, key: str):
        self.segments, self.rows, self.cols, self._products = tuple(segments), [()] * rows, [()] * cols, {}
        for i, s in enumerate(self.segments):
            if s.rows is not None and s.cols is not None:
                raise CkptbendError(f"{key}: a range of rows and columns at once cannot reach a quantised weight")
            target, span = (self.cols, s.cols) if s.cols is not None else (self.rows, s.rows or (0, rows))
            target[span[0]:span[1]] = [c + (i,) for c in target[span[0]:span[1]]]

    def factors(self, chain) -> tuple:
        return tuple(f for i in chain for f in self.segments[i].factors)

    def reasons(self, chain) -> tuple:
        return tuple(r for i in chain for r in self.segments[i].reasons)

    def products(self, axis: str) -> np.ndarray:
        """The product of each row's (column's) factors."""
        if axis not in self._products:
            of_chain = {c: math.prod(self.factors(c)) for c in set(getattr(self, axis))}
            self._products[axis] = np.array([of_chain[c] for c in getattr(self, axis)], dtype=np.float64)
        return self._products[axis]

    def same(self, axis: str) -> bool:
        """Whether every row (column) has the same factors (from whichever entries)."""
        return len({self.factors(c) for c in getattr(self, axis)}) == 1

    def common(self, axis: str):
        """(factors, reasons) every row (column) has — reasons of whichever entries give them — or None."""
        chains = getattr(self, axis)
        if not self.same(axis):
            return None
        return self.factors(chains[0]), tuple(dict.fromkeys(r for c in dict.fromkeys(chains) for r in self.reasons(c)))

    def uniform(self):
        """(factors, reasons) when every element has the same factors, or None."""
        rows, cols = self.common("rows"), self.common("cols")
        return (rows[0] + cols[0], rows[1] + cols[1]) if rows and cols else None

    def reached(self, axis: str) -> bool:
        return any(getattr(self, axis))

    def disjoint(self, key: str) -> tuple:
        """The factors as segments that do not overlap: runs of rows (or columns) with one chain."""
        if self.reached("rows") and self.reached("cols"):
            raise CkptbendError(f"{key}: rows and columns at once cannot reach this quantised weight")
        axis = "cols" if self.reached("cols") else "rows"
        return tuple(_segment(axis, a, b, self.factors(c), ", ".join(self.reasons(c)))
                     for a, b, c in ops.runs(getattr(self, axis)) if c)

    def of(self, chain) -> tuple:
        """(factors, reasons) of a chain."""
        return self.factors(chain), self.reasons(chain)


def _via(found: tuple, outer: str, why: str = "") -> Segment:
    """The whole-tensor segment putting (factors, reasons) on an outer scale."""
    factors, reasons = found
    return Segment(None, factors, (f"{', '.join(reasons)} ({why}via {outer})",))


def _span(axis, a, b) -> dict:
    return {"rows": (a, b), "cols": None} if axis == "rows" else {"rows": None, "cols": (a, b)}


def _ratio_segments(chains: _Chains, axis: str) -> list:
    """Raised requantisation: every row (column) by its factor / the axis's largest, where that is not 1."""
    products = chains.products(axis)
    top, out = products.max(), []
    for a, b, (chain, p) in ops.runs(list(zip(getattr(chains, axis), products))):
        if p != top:
            why = chains.reasons(chain) or ("not in a range",)
            text = f"{', '.join(why)}: ×{p:g} overall, the scale taking ×{top:g}"
            out.append(_segment(axis, a, b, (p / top,), text))
    return out


def _in_units(segments, unit: int) -> tuple:
    return tuple(replace(s, cols=(s.cols[0] // unit, s.cols[1] // unit)) if s.cols else s for s in segments)


def _choose(chains: _Chains, probe, plain: dict, raised: dict, kind: str) -> dict:
    """Plain or raised requantisation (module docstring, 3): a way that rounds fewer values and clips none is
    taken; when the plain way rounds fewer but would clip, the one with the smaller total squared error."""
    pr, pc = chains.products("rows"), chains.products("cols")
    if pr.max() * pc.max() <= 1:
        return plain                           # every factor ≤ 1: nothing can clip, nothing to raise
    vr, nr = np.unique(pr, return_counts=True)
    vc, nc = np.unique(pc, return_counts=True)
    untouched = sum(int(a) * int(b) for x, a in zip(vr, nr) for y, b in zip(vc, nc) if x * y == 1)
    rounded_plain = pr.size * pc.size - untouched
    rounded_raised = pr.size * pc.size - int((pr == pr.max()).sum()) * int((pc == pc.max()).sum())
    if rounded_raised < rounded_plain:
        return raised
    found = probe(plain, kind)
    if not found.saturated:
        return plain
    return raised if probe(raised, kind).error <= found.error else plain


def _top(chains: _Chains) -> tuple:
    """(factors, reasons) of the largest factor: its chain, and the entries of every row and column giving it."""
    pr, pc = chains.products("rows"), chains.products("cols")
    factors = chains.factors(chains.rows[int(np.argmax(pr))] + chains.cols[int(np.argmax(pc))])
    top_r, top_c = pr.max(), pc.max()
    tops = [c for c, p in zip(chains.rows, pr) if p == top_r] + [c for c, p in zip(chains.cols, pc) if p == top_c]
    return factors, tuple(dict.fromkeys(r for c in dict.fromkeys(tops) for r in chains.reasons(c)))


# --- the rules, per format -------------------------------------------------------------------------------
# Each returns (changes: tensor name → Edit, what to measure: "codes" | "nvfp4" | "mxfp8" | None if exact).

def _fp8(cf, q, parts, chains, probe):
    outer = q.tensors["outer"]
    whole = chains.uniform()
    if whole is not None:
        return {outer: _edit(cf, outer, [_via(whole, q.format.outer)])}, None
    dtype, segments = parts["weight"][1].dtype, chains.disjoint(q.weight)
    plain = {q.weight: _edit(cf, q.weight, segments, ops.Codes(dtype, segments))}
    ratios = tuple(_ratio_segments(chains, "rows") + _ratio_segments(chains, "cols"))
    raised = {q.weight: _edit(cf, q.weight, ratios, ops.Codes(dtype, ratios)),
              outer: _edit(cf, outer, [_via(_top(chains), q.format.outer, "the largest factor, ")])}
    return _choose(chains, probe, plain, raised, "codes"), "codes"


def _int8(cf, q, parts, chains, probe):
    outer, scale = q.tensors["outer"], parts["outer"][1]
    rows = parts["weight"][1].shape[0]
    if tuple(scale.shape) not in ((), (1,), (rows,), (rows, 1)):
        raise CkptbendError(f"{outer}: shape {list(scale.shape)} is neither per tensor nor per output channel "
                            f"of {q.weight} ({rows} rows)")
    if chains.same("rows"):
        on_scale = [_via(chains.common("rows"), "weight_scale")] if chains.rows[0] else []
    else:   # rows: their channels' scales (exact)
        on_scale = [Segment((a, b), chains.factors(c), tuple(f"{r} (via weight_scale)" for r in chains.reasons(c)))
                    for a, b, c in ops.runs(chains.rows) if c]

    def with_scale(changes, segments):
        if not segments:
            return changes
        expand = math.prod(scale.shape) == 1 and any(s.rows for s in segments)
        op = ops.Expand(scale.dtype, rows, tuple(segments)) if expand else None
        note = f"; the per-tensor scale made one per output channel, [{rows}, 1]" if expand else None
        return {**changes, outer: _edit(cf, outer, segments, op, note)}

    if chains.same("cols"):
        on_scale += [_via(chains.common("cols"), "weight_scale")] if chains.cols[0] else []
        return with_scale({}, on_scale), None
    _check_groups(chains, q.convrot, "ConvRot rotation group", q.weight)
    cols_only = _Chains([s for s in chains.segments if s.cols], rows, len(chains.cols), q.weight)
    segments = cols_only.disjoint(q.weight)
    plain = with_scale({q.weight: _edit(cf, q.weight, segments, ops.Codes("I8", segments))}, on_scale)
    ratios = tuple(_ratio_segments(cols_only, "cols"))
    raised = with_scale({q.weight: _edit(cf, q.weight, ratios, ops.Codes("I8", ratios))},
                        [*on_scale, _via(_top(cols_only), "weight_scale", "the largest factor, ")])
    return _choose(cols_only, probe, plain, raised, "codes"), "codes"


def _nvfp4(cf, q, parts, chains, probe):
    outer, grid_name = q.tensors["outer"], q.tensors["block"]
    whole = chains.uniform()
    if whole is not None:
        return {outer: _edit(cf, outer, [_via(whole, q.format.outer)])}, None
    _check_groups(chains, 16, "nvfp4 block", q.weight)
    rows, blocks = len(chains.rows), len(chains.cols) // 16
    def blocks_of(segments):   # shown in the weight's columns, applied to the grid's blocks
        return _edit(cf, grid_name, segments, ops.BlockScales(rows, blocks, _in_units(segments, 16)))

    plain = {grid_name: blocks_of(chains.disjoint(q.weight))}
    ratios = tuple(_ratio_segments(chains, "rows") + _ratio_segments(chains, "cols"))
    raised = {grid_name: blocks_of(ratios),
              outer: _edit(cf, outer, [_via(_top(chains), q.format.outer, "the largest factor, ")])}
    return _choose(chains, probe, plain, raised, "nvfp4"), "nvfp4"


def _power_split(f: float) -> tuple[int, float]:
    """f = 2^k · r with k = ⌈log2 f⌉ and r in (1/2, 1] (k = 0, r = f for f = 0)."""
    if f == 0:
        return 0, 0.0
    m, e = math.frexp(f)
    k = e - 1 if m == 0.5 else e
    return k, f / 2.0 ** k


def _mxfp8(cf, q, parts, chains, probe):
    weight, grid_name = parts["weight"][1], q.tensors["block"]
    rows, blocks = weight.shape[0], weight.shape[1] // 32
    if chains.reached("rows") and chains.reached("cols"):
        raise CkptbendError(f"{q.weight}: rows and columns at once cannot reach an mxfp8 weight")
    axis = "cols" if chains.reached("cols") else "rows"
    products = chains.products(axis)
    if axis == "cols":   # a block's exponent follows its largest factor
        shift = [_power_split(products[b * 32:(b + 1) * 32].max())[0] for b in range(blocks)]
        ratio = [p / 2.0 ** shift[c // 32] for c, p in enumerate(products)]
    else:
        split = [_power_split(p) for p in products]
        shift, ratio = [k for k, _ in split], [r for _, r in split]
    width = 32 if axis == "cols" else 1
    runs = [(a, b, k) for a, b, k in ops.runs(shift) if k]
    shown = [_segment(axis, a * width, b * width, (2.0 ** k,), "the exponent's share") for a, b, k in runs]
    grid = ops.Exponents(rows, blocks, **{"block_shifts" if axis == "cols" else "row_shifts": tuple(runs)})
    changes = {grid_name: _edit(cf, grid_name, shown, grid, " (power-of-two block scales: exact)")}
    codes = tuple(_segment(axis, a, b, (r,), "the rest after the exponent") for a, b, r in ops.runs(ratio) if r != 1)
    if not codes:
        return changes, None
    changes[q.weight] = _edit(cf, q.weight, codes, ops.Codes(weight.dtype, codes))
    return changes, "mxfp8"


def _segment(axis, a, b, factors, reason) -> Segment:
    span = _span(axis, a, b)
    return Segment(span["rows"], factors, (reason,), span["cols"])


def _check_groups(chains: _Chains, group: int | None, what: str, key: str):
    """Column factors must be whole over each group of `group` columns the format shares a value across."""
    if not group:
        return
    for a, b, _ in ops.runs(chains.cols):
        if a % group or (b % group and b != len(chains.cols)):
            raise CkptbendError(f"{key}: a column range ending at {a if a % group else b} cuts its {what}s of "
                                f"{group} columns; refusing")


RULES = {"int8_tensorwise": _int8, "nvfp4": _nvfp4, "mxfp8": _mxfp8}


def _edit(cf, name, segments, op=None, note=None) -> Edit:
    return Edit(cf.rel, name, tuple(segments), op, note)


# --- routing a plan's tensors ----------------------------------------------------------------------------

def route(ckpt, by_tensor: dict) -> Routed:
    """The edits for every quantised layer (and plain fp8 tensor) that `by_tensor` ((file, key) → segments)
    reaches; they replace its plain edits of those tensors."""
    routed = Routed()
    for cf in ckpt.files:
        mine = {key: segs for (file, key), segs in by_tensor.items() if file == cf.rel}
        if not mine:
            continue
        if isinstance(cf.header, GGUFHeader):     # GGUF: its tensor types' rule (formats/ggml.py)
            ggml.route_file(cf, mine, routed)
            continue
        layers = layers_of(cf.rel, cf.header)
        for key, segs in mine.items():
            q = layers.get(key if key.endswith(".weight") else key.removesuffix("bias") + "weight")
            if q is not None and not q.format.codes:
                _tensor_checks(cf, q)              # a layer ckptbend cannot scale: refused, its bias with it
            elif q is not None and key == q.weight:
                routed.taken.add((cf.rel, key))
                parts = _tensor_checks(cf, q)
                shape = logical_shape(cf.header, q.weight)
                chains = _Chains(segs, shape[0] if shape else 1, math.prod(shape[1:]), key)
                rule = RULES.get(q.format.name, _fp8)
                decided = rule(cf, q, parts, chains, measure.prober(cf, parts, chains))
                _finish(cf, key, q.format.label, parts, chains, decided, routed)
            elif cf.header.tensor(key).dtype in FP8:
                t = cf.header.tensor(key)
                chains = _Chains(segs, t.shape[0] if t.shape else 1, math.prod(t.shape[1:]), key)
                parts, segments = {"weight": (None, t)}, chains.disjoint(key)
                plain = {key: _edit(cf, key, segments, ops.Codes(t.dtype, segments))}
                _finish(cf, key, f"{UNITS[t.dtype]} (no scale beside it)", parts, chains, (plain, "codes"), routed)
    return routed


def _tensor_checks(cf, q: QuantLayer) -> dict:
    """The layer's tensors by role (bytes read later), or a one-line refusal naming what is wrong."""
    fmt, names = q.format, set(cf.header.names)
    if not fmt.codes:
        raise CkptbendError(f"{q.weight}: stored in ComfyUI's {fmt.label}, which ckptbend cannot scale; refusing "
                            f"(it bakes {', '.join(n for n in FORMATS if n != 'scaled_fp8')} and scaled fp8)")
    missing = [n for n in q.tensors.values() if n not in names]
    if missing:
        raise CkptbendError(f"{q.weight}: a {fmt.name} layer without its {missing[0]}; refusing")
    found = {role: (None, cf.header.tensor(name)) for role, name in q.tensors.items()}
    w = found["weight"][1]
    if w.dtype not in fmt.codes:
        raise CkptbendError(f"{q.weight}: a {fmt.name} weight stored as {w.dtype}, expected {' or '.join(fmt.codes)}")
    if fmt.block_scale:
        grid = found["block"][1]
        blocks = w.shape[1] * fmt.packed // fmt.block if len(w.shape) == 2 else 0
        if len(w.shape) != 2 or tuple(grid.shape) != codecs.tiled_shape(w.shape[0], blocks) \
                or grid.nbytes != math.prod(grid.shape):
            raise CkptbendError(f"{grid.name}: {grid.dtype}{list(grid.shape)} is not {fmt.name}'s block-scale grid "
                                f"for a weight of {list(w.shape)}")
    if "outer" in found and found["outer"][1].dtype not in ("F32", "F16", "BF16"):
        raise CkptbendError(f"{found['outer'][1].name}: a scale stored as {found['outer'][1].dtype}; refusing")
    return found


def _finish(cf, key, label, parts, chains, decided, routed: Routed):
    changes, kind = decided
    if kind is not None:
        report = measure.probe(cf, parts, chains, changes, kind)
        for name, count in report.requantised.items():
            op = changes[name].op
            unit = "its fp8 e4m3fn block scales (one per 16 columns)" if isinstance(op, ops.BlockScales) \
                else UNITS[op.dtype]
            changes[name] = replace(changes[name], note=f"{changes[name].note or ''}, requantised in {unit}; "
                                    f"the tensor: {count:,} rounded to nearest, {report.saturated:,} clipped")
            codes = "fp8 e4m3fn block scales" if isinstance(op, ops.BlockScales) else f"{UNITS[op.dtype]} codes"
        routed.counts = tuple(a + b for a, b in zip(routed.counts, (1, sum(report.requantised.values()),
                                                                    report.saturated)))
        if report.saturated:
            why = "raising the scale would lose more, in least squares" if "outer" in parts else "no scale beside it"
            routed.clipped.setdefault((codes, why), []).append((key, report.saturated))
        for seg, measured in zip(chains.segments, report.achieved):
            if measured is not None and abs(measured[0] - 1) > MATERIAL:
                f = math.prod(seg.factors)
                routed.departed.setdefault((", ".join(seg.reasons), f, label), []).append(
                    (key + _where(seg), *(f * m for m in measured)))
    routed.edits.update({(cf.rel, name): e for name, e in changes.items()})


def _where(seg) -> str:
    return f" rows {seg.rows[0]}:{seg.rows[1]}" if seg.rows else f" columns {seg.cols[0]}:{seg.cols[1]}" \
        if seg.cols else ""


def _warnings(routed: Routed) -> list[str]:
    """One line per kind of loss: what was clipped, and which factors could not be held finely."""
    lines = []
    for (codes, why), found in routed.clipped.items():
        where = found[0][0] if len(found) == 1 else f"{len(found)} tensors, e.g. {found[0][0]}"
        n = sum(n for _, n in found)
        lines.append(f"{where}: {n:,} requantised {codes} exceeded the largest one and {'were' if n != 1 else 'was'} "
                     f"clipped to it ({why})")
    for (reasons, f, label), found in routed.departed.items():
        where = found[0][0] if len(found) == 1 else f"{len(found)} tensors, e.g. {found[0][0]}"
        got = [a for _, a, _, _ in found]
        achieved = f"×{min(got):.4f}" + (f" to ×{max(got):.4f}" if len(found) > 1 else "")
        lines.append(f"{where}: {reasons} ×{f:g} achieved {achieved} (the least-squares ratio of baked to source "
                     f"values over the range, off by more than {MATERIAL:.0%}; per value "
                     f"×{min(lo for *_, lo, _ in found):.4f} to ×{max(hi for *_, hi in found):.4f}): "
                     f"{label} cannot hold this factor finely on these values")
    return lines
