"""Render stored attention-bending maps (runtime/maps.py files) as PNG heatmap grids.

One PNG per token: a row per sampling step, a column per cross-attention layer (one per attention
where a layer records two, e.g. Motif-Video's attn and cross_attn, labelled), and in each cell
the original map (left) beside the bent one (right), both on the same colour scale so a move, a
blur or a mask is visible at a glance. Video maps show their first frame.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from PIL import Image, ImageDraw

from .errors import CkptbendError
from .output import Target, atomic_output, check_targets
from .runtime.maps import load_maps

# Anchors of a dark-to-bright colour ramp (close to matplotlib's "inferno"), interpolated linearly.
RAMP = torch.tensor([[0, 0, 4], [40, 11, 84], [101, 21, 110], [159, 42, 99], [212, 72, 66],
                     [245, 125, 21], [250, 193, 39], [252, 255, 164]], dtype=torch.float32)
CELL = 96          # pixels per map side
GAP = 4
LABEL = 18         # pixels for the row / column labels


def colorize(values: torch.Tensor) -> torch.Tensor:
    """values in [0, 1], any shape → uint8 RGB with a trailing channel axis."""
    x = values.clamp(0, 1) * (len(RAMP) - 1)
    lo = x.floor().long().clamp(max=len(RAMP) - 2)
    frac = (x - lo).unsqueeze(-1)
    return (RAMP[lo] * (1 - frac) + RAMP[lo + 1] * frac).round().to(torch.uint8)


def _frame(t: torch.Tensor) -> torch.Tensor:
    return t[0] if t.dim() == 3 else t


def _tile(original: torch.Tensor, bent: torch.Tensor) -> Image.Image:
    a, b = (torch.nan_to_num(_frame(m).float(), 0.0, 0.0, 0.0) for m in (original, bent))
    lo, hi = min(a.min(), b.min()), max(a.max(), b.max())
    span = float(hi - lo) or 1.0
    pair = Image.new("RGB", (2 * CELL + GAP, CELL), "white")
    for i, m in enumerate((a, b)):
        rgb = colorize((m - lo) / span).numpy()
        img = Image.fromarray(rgb, "RGB").resize((CELL, CELL), Image.NEAREST)
        pair.paste(img, (i * (CELL + GAP), 0))
    return pair


def image_names(tokens) -> dict[str, str]:
    """token → its PNG's file name: filename-safe, short, and different for different tokens."""
    names: dict[str, str] = {}
    for token in tokens:
        stem = re.sub(r"[^A-Za-z0-9_-]+", "_", token)[:80] or "token"
        name, n = f"{stem}.png", 1
        while name in names.values():
            n += 1
            name = f"{stem}-{n}.png"
        names[token] = name
    return names


def _column(record) -> tuple:
    return record["layer"], record.get("site")


def _columns(records) -> dict:
    """(layer, site) → its column label, by layer, a layer's sites in recording order; the site named only
    where its layer has more than one (Motif-Video's joint attn, then its cross_attn)."""
    order = list(dict.fromkeys(_column(r) for r in records))
    order.sort(key=lambda c: c[0])                                   # stable: sites keep their order
    per_layer = {layer: sum(c[0] == layer for c in order) for layer, _ in order}
    # A site is a module's attribute name; anything else in a file is drawn as ASCII (any font draws it), short.
    return {c: f"layer {c[0]}" if per_layer[c[0]] == 1 else f"layer {c[0]} {_ascii(c[1])}" for c in order}


def _ascii(site) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", site or "-")[:24]


def render(records: list[dict], out_dir: Path, *, force: bool = False, inputs=()) -> list[Path]:
    """Write one PNG per token into out_dir (created); returns the paths. Every image is checked
    first and written through a temporary (output.py); an existing one needs `force`."""
    names = image_names(dict.fromkeys(r["token"] for r in records))
    targets = {token: Target(out_dir / name, False, "map image") for token, name in names.items()}
    check_targets(list(targets.values()), inputs, force, out_dir if not out_dir.exists() else None)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for token, target in targets.items():
        mine = [r for r in records if r["token"] == token]
        steps = sorted({r["step"] for r in mine}, key=lambda s: (s is None, s or 0))   # None: outside the schedule
        columns = _columns(mine)
        cell_w, cell_h = 2 * CELL + GAP, CELL
        size = (LABEL * 4 + len(columns) * (cell_w + GAP), LABEL + len(steps) * (cell_h + GAP))
        sheet = Image.new("RGB", size, "white")
        draw = ImageDraw.Draw(sheet)
        for c, label in enumerate(columns.values()):
            draw.text((LABEL * 4 + c * (cell_w + GAP), 2), f"{label}: original | bent", fill="black")
        for r_i, step in enumerate(steps):
            draw.text((2, LABEL + r_i * (cell_h + GAP) + cell_h // 2), f"step {step}", fill="black")
        # Several records for one (step, layer, site) (a second-order sampler's two calls): the last one.
        cells = {(r["step"], _column(r)): r for r in mine}
        order = list(columns)
        for (step, column), r in cells.items():
            x = LABEL * 4 + order.index(column) * (cell_w + GAP)
            y = LABEL + steps.index(step) * (cell_h + GAP)
            sheet.paste(_tile(r["original"], r["bent"]), (x, y))
        with atomic_output(target, force) as tmp:
            sheet.save(tmp, format="PNG")
        written.append(target.path)
    return written


def render_file(maps_path: Path, out_dir: Path, force: bool = False) -> list[Path]:
    try:
        records = load_maps(maps_path)
    except FileNotFoundError:
        raise CkptbendError(f"{maps_path}: no such file") from None
    except IsADirectoryError:
        raise CkptbendError(f"{maps_path}: is a folder, not a maps file") from None
    except ValueError as e:
        raise CkptbendError(str(e)) from None
    if not records:
        raise CkptbendError(f"{maps_path}: holds no maps")
    return render(records, out_dir, force=force, inputs=[maps_path])
