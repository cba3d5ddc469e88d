"""Attention Bending (Cole & Grierson, 2026): spatial transforms of cross-attention maps during sampling.

Imports only torch, math and the standard library: this file is copied verbatim into companions and
the ComfyUI node.

The text cross-attention is computed explicitly, P = softmax(Q·Kᵀ·scale) of shape [batch·heads, S, T]
(S image tokens, T text tokens). For each entry (a BendSpec), each column P[:, :, j] of its word is
viewed as maps [batch·heads, H, W] (video: one map per frame), transformed, blended
(1 − strength)·col + strength·T(col), optionally renormalised, and written back; then, if any entry
asks for it, every query row is renormalised over the text tokens. Only the conditional prediction
is bent (the host picks its rows). Entry points: attention_with_bending(), bend_probs().
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass
from typing import Callable, Hashable, Iterable, Mapping, Sequence

import torch
import torch.nn.functional as F

MODES = ("scale", "spatial_scale", "rotate", "translate", "flip", "blur", "sharpen", "regional_mask",
         "frequency_filter")
RENORMALIZE = ("row", "column", "none")
FILTERS = ("lowpass", "highpass")
EPS = 1e-8                   # sums at or below this are left undivided
RANGES = {"translate_x": (-1.0, 1.0), "translate_y": (-1.0, 1.0), "region": (0.0, 1.0), "cutoff": (0.0, 1.0)}


@dataclass(frozen=True)
class BendSpec:
    """One bending entry, with the original's field names. Unused mode parameters are ignored."""
    token: str
    mode: str
    strength: float = 1.0
    apply_to_timesteps: tuple[int, int] | None = None   # [start, end] scheduler step indices, both inclusive
    apply_to_layers: tuple[int, ...] | None = None      # cross-attention site indices
    renormalize: str = "row"                            # "row" | "column" (first version) | "none"
    scale_factor: float = 1.0                           # scale
    zoom_factor: float = 1.0                            # spatial_scale
    angle: float = 0.0                                  # rotate, degrees
    translate_x: float = 0.0                            # translate, normalised units −1..1
    translate_y: float = 0.0
    flip_horizontal: bool = False                       # flip
    flip_vertical: bool = False
    kernel_size: int = 3                                # blur, sharpen, frequency_filter (placeholder)
    sigma: float = 1.0
    sharpen_amount: float = 1.0                         # sharpen
    region: tuple[float, float, float, float] | None = None   # regional_mask: x1, y1, x2, y2; None: no-op
    region_feather: float = 0.1
    filter: str | None = None                           # frequency_filter: "lowpass" | "highpass"
    cutoff: float = 0.5                                 # fraction of Nyquist

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        renorm = self.renormalize
        if isinstance(renorm, bool):            # the original's renormalize = true / false
            renorm = "row" if renorm else "none"
        if renorm not in RENORMALIZE:
            raise ValueError(f"renormalize must be one of {', '.join(RENORMALIZE)}, got {self.renormalize!r}")
        object.__setattr__(self, "renormalize", renorm)
        if self.apply_to_timesteps is not None:
            start, end = self.apply_to_timesteps
            object.__setattr__(self, "apply_to_timesteps", (int(start), int(end)))
        if self.apply_to_layers is not None:
            object.__setattr__(self, "apply_to_layers", tuple(int(i) for i in self.apply_to_layers))
        if self.region is not None:
            object.__setattr__(self, "region", tuple(float(c) for c in self.region))
        if self.filter is not None and self.filter not in FILTERS:
            raise ValueError(f"filter must be one of {', '.join(FILTERS)}, got {self.filter!r}")

    @classmethod
    def from_dict(cls, entry: Mapping) -> "BendSpec":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(entry) - names)
        if unknown:
            raise ValueError(f"unknown bending field(s): {', '.join(unknown)}")
        return cls(**entry)


def as_spec(entry) -> BendSpec:
    return entry if isinstance(entry, BendSpec) else BendSpec.from_dict(entry)


def entry_active(entry, step_index: int | None = None, layer_index: int | None = None) -> bool:
    """Whether an entry applies at this scheduler step and cross-attention site.

    apply_to_timesteps = [start, end] bends steps start <= step <= end, both ends inclusive as in the
    original (a recipe [0, 25] bends 26 steps). A filter that is set needs its index: None there is
    a host bug, not "all"."""
    spec = as_spec(entry)
    if spec.apply_to_timesteps is not None:
        if step_index is None:
            raise ValueError("entry has apply_to_timesteps but no step index was given")
        start, end = spec.apply_to_timesteps
        if not start <= step_index <= end:
            return False
    if spec.apply_to_layers is not None:
        if layer_index is None:
            raise ValueError("entry has apply_to_layers but no layer index was given")
        if layer_index not in spec.apply_to_layers:
            return False
    return True


# --- the nine transforms, on maps [N, H, W] -------------------------------------------------------

def scale_map(maps: torch.Tensor, scale_factor: float = 1.0) -> torch.Tensor:
    return maps * scale_factor


def _affine(maps: torch.Tensor, theta: list[list[float]]) -> torch.Tensor:
    """Output pixel at normalised (x, y) reads the input at θ·(x, y, 1): bilinear, border padding,
    align_corners=False."""
    n, h, w = maps.shape
    t = torch.tensor(theta, dtype=maps.dtype, device=maps.device).expand(n, 2, 3)
    grid = F.affine_grid(t, [n, 1, h, w], align_corners=False)
    return F.grid_sample(maps[:, None], grid, mode="bilinear", padding_mode="border", align_corners=False)[:, 0]


def zoom_map(maps: torch.Tensor, zoom_factor: float = 1.0) -> torch.Tensor:
    """spatial_scale: zoom about the centre, θ = diag(1/zoom) (zoom > 1 enlarges)."""
    if zoom_factor <= 0:
        raise ValueError(f"zoom_factor must be positive, got {zoom_factor}")
    return _affine(maps, [[1 / zoom_factor, 0.0, 0.0], [0.0, 1 / zoom_factor, 0.0]])


def rotate_map(maps: torch.Tensor, angle: float = 0.0) -> torch.Tensor:
    """θ = [[cos a, −sin a, 0], [sin a, cos a, 0]], a in degrees (90 equals torch.rot90 on a square grid)."""
    a = math.radians(angle)
    return _affine(maps, [[math.cos(a), -math.sin(a), 0.0], [math.sin(a), math.cos(a), 0.0]])


def translate_map(maps: torch.Tensor, translate_x: float = 0.0, translate_y: float = 0.0) -> torch.Tensor:
    """θ = [[1, 0, tx], [0, 1, ty]] in normalised units: content moves by −tx·W/2, −ty·H/2 pixels."""
    return _affine(maps, [[1.0, 0.0, translate_x], [0.0, 1.0, translate_y]])


def flip_map(maps: torch.Tensor, flip_horizontal: bool = False, flip_vertical: bool = False) -> torch.Tensor:
    dims = [d for d, on in ((-1, flip_horizontal), (-2, flip_vertical)) if on]
    return torch.flip(maps, dims) if dims else maps


def gaussian_kernel_1d(kernel_size: int, sigma: float) -> torch.Tensor:
    """exp(−x²/2σ²) over x = arange(k) − k//2, normalised. σ ≤ 0 gives the identity tap (the formula's
    limit; it would divide by zero)."""
    x = torch.arange(kernel_size, dtype=torch.float32) - kernel_size // 2
    if sigma <= 0:
        return (x == 0).float()
    g = torch.exp(-x ** 2 / (2 * sigma ** 2))
    return g / g.sum()


def blur_map(maps: torch.Tensor, kernel_size: int = 3, sigma: float = 1.0) -> torch.Tensor:
    """2-D Gaussian (outer product), conv2d with zero padding k//2; an even kernel size is raised by one.
    Zero padding lets mass leak out at the borders, as in the original."""
    k = int(kernel_size) + (1 - int(kernel_size) % 2)
    g = gaussian_kernel_1d(k, sigma).to(device=maps.device, dtype=maps.dtype)
    weight = torch.outer(g, g)[None, None]
    return F.conv2d(maps[:, None], weight, padding=k // 2)[:, 0]


def sharpen_map(maps: torch.Tensor, sharpen_amount: float = 1.0, kernel_size: int = 3,
                sigma: float = 1.0) -> torch.Tensor:
    """Unsharp mask: col + amount·(col − blur(col))."""
    return maps + sharpen_amount * (maps - blur_map(maps, kernel_size, sigma))


def region_mask(height: int, width: int, region=(0.0, 0.0, 1.0, 1.0), region_feather: float = 0.1,
                dtype=torch.float32, device=None) -> torch.Tensor:
    """M [H, W]: 1 on rows int(y1·H):int(y2·H), columns int(x1·W):int(x2·W), else 0. With feather > 0,
    blurred with f = max(1, int(feather·min(H, W))), kernel 2f+1, σ = f/2, then divided by its max."""
    x1, y1, x2, y2 = region
    m = torch.zeros(height, width, dtype=dtype, device=device)
    m[int(y1 * height):int(y2 * height), int(x1 * width):int(x2 * width)] = 1
    if region_feather > 0:
        f = max(1, int(region_feather * min(height, width)))
        m = blur_map(m[None], 2 * f + 1, f / 2)[0]
        peak = m.max()
        if peak > 0:                       # an empty region stays all zero
            m = m / peak
    return m


def mask_region(maps: torch.Tensor, region=None, region_feather: float = 0.1) -> torch.Tensor:
    """regional_mask: col · M; without a region the map is left unchanged, as in the original."""
    if region is None:
        return maps
    return maps * region_mask(maps.shape[-2], maps.shape[-1], region, region_feather, maps.dtype, maps.device)


def frequency_mask(height: int, width: int, filter: str, cutoff: float, device=None) -> torch.Tensor:
    """Ideal radial mask over rfft2 frequencies: radius = |f| / Nyquist (0 at DC, 1 at Nyquist on an axis,
    √2 in the corner); lowpass keeps radius ≤ cutoff, highpass keeps radius > cutoff (they sum to 1)."""
    fy = torch.fft.fftfreq(height, device=device) / 0.5
    fx = torch.fft.rfftfreq(width, device=device) / 0.5
    radius = torch.sqrt(fy[:, None] ** 2 + fx[None, :] ** 2)
    keep = radius <= cutoff if filter == "lowpass" else radius > cutoff
    return keep.float()


def filter_frequencies(maps: torch.Tensor, filter: str | None = None, cutoff: float = 0.5, sigma: float = 1.0,
                       sharpen_amount: float = 1.0, kernel_size: int = 3) -> torch.Tensor:
    """frequency_filter. With filter ("lowpass" | "highpass"): real-FFT filter at `cutoff` (fraction of
    Nyquist). Without: the original's placeholder, sharpen if sigma < 1 else blur (with the entry's
    sharpen_amount and kernel_size)."""
    if filter is None:
        if sigma < 1:
            return sharpen_map(maps, sharpen_amount, kernel_size, sigma)
        return blur_map(maps, kernel_size, sigma)
    if filter not in FILTERS:
        raise ValueError(f"filter must be one of {', '.join(FILTERS)}, got {filter!r}")
    h, w = maps.shape[-2:]
    spectrum = torch.fft.rfft2(maps.float()) * frequency_mask(h, w, filter, cutoff, maps.device)
    return torch.fft.irfft2(spectrum, s=(h, w)).to(maps.dtype)


TRANSFORMS: dict[str, Callable[[torch.Tensor, BendSpec], torch.Tensor]] = {
    "scale": lambda m, s: scale_map(m, s.scale_factor),
    "spatial_scale": lambda m, s: zoom_map(m, s.zoom_factor),
    "rotate": lambda m, s: rotate_map(m, s.angle),
    "translate": lambda m, s: translate_map(m, s.translate_x, s.translate_y),
    "flip": lambda m, s: flip_map(m, s.flip_horizontal, s.flip_vertical),
    "blur": lambda m, s: blur_map(m, s.kernel_size, s.sigma),
    "sharpen": lambda m, s: sharpen_map(m, s.sharpen_amount, s.kernel_size, s.sigma),
    "regional_mask": lambda m, s: mask_region(m, s.region, s.region_feather),
    "frequency_filter": lambda m, s: filter_frequencies(m, s.filter, s.cutoff, s.sigma, s.sharpen_amount,
                                                        s.kernel_size),
}


def transform(maps: torch.Tensor, entry) -> torch.Tensor:
    """T(maps) for the entry's mode, maps [N, H, W]."""
    spec = as_spec(entry)
    return TRANSFORMS[spec.mode](maps, spec)


# --- renormalisation and the bend itself ------------------------------------------------------------

def _safe_divide(x: torch.Tensor, total: torch.Tensor) -> torch.Tensor:
    return x / torch.where(total > EPS, total, torch.ones_like(total))


def renormalize_columns(cols: torch.Tensor) -> torch.Tensor:
    """cols [batch·heads, S]: each divided by its sum over all S positions (all frames, for video)."""
    return _safe_divide(cols, cols.sum(-1, keepdim=True))


def renormalize_rows(probs: torch.Tensor) -> torch.Tensor:
    """probs [batch·heads, S, T]: each query row divided by its sum over the text tokens."""
    return _safe_divide(probs, probs.sum(-1, keepdim=True))


def grid_for(n_tokens: int, latent_hw: tuple[int, int] | None = None, frames: int | None = None) -> tuple[int, int]:
    """(h, w) of one frame's token grid, S = frames·h·w.

    With the latent's (H, W): the level whose grid is (ceil(H/2^k), ceil(W/2^k)) (UNet levels, DiT
    patches), else the aspect-ratio estimate w = round(W·sqrt(s/(H·W))). Without, or if neither fits:
    the original's fallback, the most square factorisation h ≤ w.
    """
    f = frames or 1
    if n_tokens % f:
        raise ValueError(f"{n_tokens} tokens are not {f} equal frames")
    s = n_tokens // f
    if latent_hw is not None:
        height, width = latent_hw
        k = 0
        while True:
            h, w = math.ceil(height / 2 ** k), math.ceil(width / 2 ** k)
            if h * w == s:
                return h, w
            if h * w < s or (h == 1 and w == 1):
                break
            k += 1
        w = round(width * math.sqrt(s / (height * width)))
        if w > 0 and s % w == 0:
            return s // w, w
    h = math.isqrt(s)
    while s % h:
        h -= 1
    return h, s // h


def active_entries(entries: Iterable, step_index: int | None = None, layer_index: int | None = None) -> list:
    """The entries that act here: strength ≠ 0 (0 leaves sampling bit-identical) and entry_active."""
    return [s for s in map(as_spec, entries) if s.strength != 0 and entry_active(s, step_index, layer_index)]


def _bend_columns(cols: torch.Tensor, spec_columns: Sequence[tuple], grid_hw: tuple[int, int],
                  frames: int | None) -> None:
    """Bend, in place, the columns cols[:, :, j] ([batch·heads, S, ·]) each (spec, [j…]) names, in order."""
    bh, n_tokens, _ = cols.shape
    f = frames or 1
    h, w = grid_hw
    if f * h * w != n_tokens:
        raise ValueError(f"{n_tokens} image tokens do not fit {f} frame(s) of {h}×{w}")
    for spec, columns in spec_columns:
        for j in columns:
            col = cols[:, :, j].float()                                      # [bh, S]
            bent = transform(col.reshape(bh * f, h, w), spec).reshape(bh, n_tokens)
            blended = (1 - spec.strength) * col + spec.strength * bent
            if spec.renormalize == "column":
                blended = renormalize_columns(blended)
            cols[:, :, j] = blended.to(cols.dtype)


def bend_probs(probs: torch.Tensor, token_indices: Mapping[str, Sequence[int]], grid_hw: tuple[int, int],
               entries: Iterable, step_index: int | None = None, layer_index: int | None = None,
               frames: int | None = None) -> torch.Tensor:
    """Bent copy of probs [batch·heads, S, T]; probs itself when no entry is active here.

    token_indices: token → its text-token columns (token_columns). Entries with strength 0 are
    skipped outright, so they leave P bit-identical (a row renormalisation would not). Column
    renormalisation is per entry, after blending; row renormalisation once, after all entries, if
    any active entry asks for it. The transforms run in float32. Entries with apply_to_timesteps /
    apply_to_layers need step_index / layer_index (entry_active).
    """
    active = active_entries(entries, step_index, layer_index)
    if not active:
        return probs
    out = probs.clone()
    _bend_columns(out, [(s, columns_for(s.token, token_indices, probs.shape[-1])) for s in active], grid_hw, frames)
    if any(s.renormalize == "row" for s in active):
        out = renormalize_rows(out)
    return out


CHUNK_ELEMENTS = 1 << 25      # logits per query chunk in bent_output: 128 MiB of float32


def bent_output(out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, entries: Iterable,
                token_indices: Mapping[str, Sequence[int]], grid_hw: tuple[int, int],
                step_index: int | None = None, layer_index: int | None = None, frames: int | None = None,
                text: slice = slice(None), queries: slice = slice(None), scale: float | None = None,
                chunk_elements: int = CHUNK_ELEMENTS,
                observe: Callable[[torch.Tensor, torch.Tensor], None] | None = None,
                bias: torch.Tensor | None = None) -> torch.Tensor:
    """Bend the host's attention output `out` in place, computing only what bending changes; returns out.

    out, q: [b, heads, Lq, d]; k, v: [b, heads, Lk, d] (per head; a host's [b, L, heads·d] viewed so).
    out is the host's own attention result softmax(q·kᵀ·scale)·v (any backend). Only the query rows
    `queries` (the image tokens) are bent, against the text keys `text` (their column numbers count
    from text.start); the softmax runs over all Lk keys (joint attention: text and image). Per query
    chunk (chunk_elements logits), in float32: s = q·kᵀ·scale, lse = logsumexp(s), and the n bent
    columns P_J = exp(s_J − lse) only; they are bent (bend_probs' rules, _bend_columns) to P'_J, and

        out' = (out + (P'_J − P_J)·v_J) / r,   r = 1 − ΣP_J + ΣP'_J if any entry renormalises rows, else 1

    which is what bend_probs followed by P'·v gives, without the [Lq, Lk] matrix. Extra memory: the
    columns (2·b·heads·Lq·n float32) and one chunk's logits and temporaries (about 2·chunk_elements
    floats plus the chunk's float32 queries and output rows). observe(P_J, P'_J) ([b·heads, S, n])
    sees the columns (maps), in increasing column order. bias: an additive mask on the logits, broadcastable
    to [b, heads, Lq, Lk] (the query rows counted before `queries`). Nothing active: out untouched.
    """
    active = active_entries(entries, step_index, layer_index)
    if not active:
        return out
    b, heads, _, d = q.shape
    scale = d ** -0.5 if scale is None else scale
    first = text.start or 0
    n_text = len(range(k.shape[2])[text])
    per_spec = [(s, [first + j for j in columns_for(s.token, token_indices, n_text)]) for s in active]
    keys = sorted({j for _, js in per_spec for j in js})
    if keys and keys[-1] >= k.shape[2]:
        raise ValueError(f"token column {keys[-1] - first} lies beyond the {n_text} text tokens the model sees")
    local = {j: i for i, j in enumerate(keys)}
    qs, os = q[:, :, queries], out[:, :, queries]
    n_q = qs.shape[2]
    kf, vj = k.float(), v[:, :, keys].float()
    step = max(1, chunk_elements // max(1, b * heads * k.shape[2]))
    chunks = [slice(i, i + step) for i in range(0, n_q, step)]
    p = torch.empty(b, heads, n_q, len(keys), dtype=torch.float32, device=q.device)
    if bias is not None and bias.ndim == 4 and bias.shape[2] > 1:
        bias = bias[:, :, queries]
    for c in chunks:
        logits = torch.matmul(qs[:, :, c].float(), kf.transpose(-1, -2)).mul_(scale)
        if bias is not None:
            logits += (bias[:, :, c] if bias.ndim == 4 and bias.shape[2] > 1 else bias).float()
        p[:, :, c] = torch.exp(logits[..., keys] - torch.logsumexp(logits, dim=-1, keepdim=True))
        del logits
    bent = p.clone()
    _bend_columns(bent.view(b * heads, n_q, -1), [(s, [local[j] for j in js]) for s, js in per_spec], grid_hw,
                  frames)
    if observe is not None:
        observe(p.view(b * heads, n_q, -1), bent.view(b * heads, n_q, -1))
    rows = any(s.renormalize == "row" for s in active)
    for c in chunks:
        corrected = os[:, :, c].float() + torch.matmul(bent[:, :, c] - p[:, :, c], vj)
        if rows:
            corrected = _safe_divide(corrected, 1 - p[:, :, c].sum(-1, keepdim=True) + bent[:, :, c].sum(-1, keepdim=True))
        os[:, :, c] = corrected.to(out.dtype)
    return out


def bend_rows(out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rows: Sequence[int],
              bias: torch.Tensor | None = None, **bend) -> None:
    """bent_output on the batch items `rows` of per-head out/q/k/v (and of a per-item bias), written into
    out: consecutive rows as views (no copies), others gathered and written back. Both hosts use it."""
    index = slice(rows[0], rows[-1] + 1) if list(rows) == list(range(rows[0], rows[-1] + 1)) else list(rows)
    if bias is not None and bias.shape[0] > 1:
        bias = bias[index]
    if isinstance(index, slice):
        bent_output(out[index], q[index], k[index], v[index], bias=bias, **bend)
    else:
        out[index] = bent_output(out[index], q[index], k[index], v[index], bias=bias, **bend)


def _split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """[b, n, heads·d] → [b·heads, n, d], batch-major (row i·heads + h is item i, head h)."""
    b, n, inner = x.shape
    return x.reshape(b, n, heads, inner // heads).transpose(1, 2).reshape(b * heads, n, inner // heads)


def attention_probs(q: torch.Tensor, k: torch.Tensor, heads: int, scale: float | None = None,
                    bias: torch.Tensor | None = None) -> torch.Tensor:
    """softmax(q·kᵀ·scale + bias) in float32, [b·heads, S, T], from projected q [b, S, heads·d] and
    k [b, T, heads·d]. scale defaults to d^−½; bias is an additive mask broadcastable to the result
    (diffusers' Attention.prepare_attention_mask gives [b·heads, 1, T]: 0 keeps, −10000 drops)."""
    d = q.shape[-1] // heads
    scale = d ** -0.5 if scale is None else scale
    logits = torch.bmm(_split_heads(q, heads).float(), _split_heads(k, heads).float().transpose(1, 2)) * scale
    if bias is not None:
        logits = logits + bias.float()
    return torch.softmax(logits, dim=-1)


def attention_with_bending(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, entries: Iterable = (),
                           token_indices: Mapping[str, Sequence[int]] | None = None,
                           grid_hw: tuple[int, int] | None = None, step_index: int | None = None,
                           layer_index: int | None = None, frames: int | None = None,
                           scale: float | None = None, bend_batch: Sequence[int] | None = None,
                           apply: bool = True,
                           observe: Callable[[torch.Tensor, torch.Tensor], None] | None = None,
                           bias: torch.Tensor | None = None) -> torch.Tensor:
    """Explicit attention with bent probabilities: q [b, S, heads·d], k, v [b, T, heads·d] (projected)
    → out [b, S, heads·d] before to_out.

    softmax(q·kᵀ·scale) in float32 (scale defaults to d^−½), bent for the batch items in bend_batch
    (the conditional ones; default all), then times V in float32, returned in v's dtype. grid_hw defaults to the most square
    factorisation (pass grid_for(S, latent_hw) when the latent is known). Phase 1 (visualisation):
    apply=False computes the bent maps, hands (original, bent) to observe, and uses the original.
    bias: an additive mask on the logits (attention_probs).
    """
    b, n_q, inner = q.shape
    n_kv = k.shape[1]
    d = inner // heads
    probs = attention_probs(q, k, heads, scale, bias)
    vh = _split_heads(v, heads)
    bent = probs
    entries = list(entries)
    if entries:
        grid_hw = grid_hw or grid_for(n_q, frames=frames)
        token_indices = token_indices or {}
        if bend_batch is None:
            bent = bend_probs(probs, token_indices, grid_hw, entries, step_index, layer_index, frames)
        else:
            rows = torch.as_tensor(list(bend_batch), dtype=torch.long, device=probs.device)
            per_item = probs.view(b, heads, n_q, n_kv)
            part = bend_probs(per_item[rows].reshape(-1, n_q, n_kv), token_indices, grid_hw, entries,
                              step_index, layer_index, frames)
            bent = per_item.clone()
            bent[rows] = part.view(len(rows), heads, n_q, n_kv)
            bent = bent.view(b * heads, n_q, n_kv)
    if observe is not None:
        observe(probs, bent)
    used = bent if apply else probs
    out = torch.bmm(used, vh.float()).to(v.dtype)          # float32 probabilities, not v's fp16 / bf16
    return out.reshape(b, heads, n_q, d).transpose(1, 2).reshape(b, n_q, heads * d)


# --- token targeting ---------------------------------------------------------------------------------
#
# An entry's token is one of (the original's later versions, after 6322d6f):
# - a word or phrase: its sub-tokens' columns in the encoded prompt (all of them; first_only for the
#   original's first sub-token). A word absent from the prompt is an error ("Token not found").
# - a wildcard, "ALL", "*" or "ALLTOKENS" (any case): every text token, i.e. every key column of the
#   cross-attention (start/end tokens and padding included, as the original's range(seq_len)).
# - a comma-separated group, "kiss, rose, ship": every member found in the prompt is bent by the same
#   entry, each column on its own, as one entry. Members missing from the prompt are skipped, as in
#   the original; a group none of whose members is in the prompt is an error here (the original logs
#   a warning and bends nothing).
#
# Prompts may mark targets with braces, "a romantic {kiss} at {sunset}": the braces are removed before
# encoding and nothing else is touched, so the host's emphasis syntax ("(sunset:1.2)", "((kiss))",
# "\(" escapes; compel's weights in diffusers) passes to its tokenizer unchanged, and a target may carry
# a weight: "{(sunset:1.2)}" or "({sunset}:1.2)". Marks are optional: the entry's token names the target.
# The original marked targets with parentheses, which are ComfyUI's and A1111's emphasis; "{a|b}"
# (dynamic-prompt choices) is not a mark.

WILDCARDS = ("ALL", "*", "ALLTOKENS")
_MARK = re.compile(r"\{([^{}|]+)\}")


def is_wildcard(token: str) -> bool:
    return token.strip().upper() in WILDCARDS


def group_members(token: str) -> list[str]:
    """'kiss, rose' → ['kiss', 'rose']; a single word → [word]."""
    return [w.strip() for w in token.split(",") if w.strip()]


def parse_marked_prompt(prompt: str) -> tuple[str, list[str]]:
    """'a romantic {kiss} at {(sunset:1.2)}' → ('a romantic kiss at (sunset:1.2)', ['kiss', '(sunset:1.2)'])."""
    words = [m.strip() for m in _MARK.findall(prompt)]
    return _MARK.sub(r"\1", prompt), words


def token_indices_for(word: str, prompt_tokens: Sequence[Hashable],
                      tokenize_word: Callable[[str], Sequence[Hashable]], first_only: bool = False) -> list[int]:
    """Positions of `word` in the encoded prompt: the first place where its sub-tokens appear in a row.

    prompt_tokens: the encoded prompt as the text encoder sees it (BOS at 0), token strings or ids;
    tokenize_word: one word (or phrase) → its sub-tokens of the same kind, without BOS/EOS, e.g.
    `tokenizer.tokenize` of a CLIP tokenizer or a ComfyUI tokenizer's ids, or Alternatives of such
    sequences (the earliest match wins). first_only=True bends only
    the first sub-token, as the original does; the default bends them all.
    """
    pieces = tokenize_word(word)
    tokens = list(prompt_tokens)
    hits = [(i, len(option)) for option in (pieces if isinstance(pieces, Alternatives) else [pieces])
            if (i := token_run(tokens, option)) is not None]
    if not hits:
        raise ValueError(f"Token not found: '{word}'")
    i, m = min(hits)
    return [i] if first_only else list(range(i, i + m))


BARE_PREFIX = ","        # a word right after it is spelled as right after any punctuation


def spelled_in(prompt_tokens: Sequence[Hashable], spell: Callable[[str], list]) -> Callable[[str], list]:
    """tokenize_word for token_columns, from `spell` (text → the host tokenizer's pieces, no specials): a word
    as spelled alone; where that is not in the prompt, as spelled right after punctuation. SentencePiece
    (T5, UMT5) gives a word after a space "▁sunset" but after punctuation with no space ("kiss,sunset",
    '"sunset"', ComfyUI's escaped "\\(sunset\\)") "s", "un", "set": spell(",sunset") less spell(",")'s
    pieces. CLIP's BPE spells both alike."""
    def word_pieces(word):
        alone = spell(word)
        if token_run(prompt_tokens, alone) is not None:
            return alone
        lead, after = spell(BARE_PREFIX), spell(BARE_PREFIX + word)
        return after[len(lead):] if lead and after[:len(lead)] == lead and after[len(lead):] else alone

    return word_pieces


class Alternatives(tuple):
    """What tokenize_word may return instead of one piece sequence: several spellings of the word, the
    earliest in the prompt wins. Byte-level BPE (Qwen2) spells a word after a space ("Ġkiss") unlike one
    at the prompt's start or after punctuation ("kiss")."""


def token_run(tokens: Sequence[Hashable], pieces: Sequence[Hashable]) -> int | None:
    """The first i where pieces appear in a row in tokens, or None (also for no pieces)."""
    tokens, pieces, m = list(tokens), list(pieces), len(pieces)
    return next((i for i in range(len(tokens) - m + 1) if m and tokens[i:i + m] == pieces), None)


def token_columns(words: Iterable[str], prompt_tokens: Sequence[Hashable],
                  tokenize_word: Callable[[str], Sequence[Hashable]], first_only: bool = False) -> dict[str, list[int]]:
    """{token: its columns} for every entry token (see above): a word's sub-tokens, a group's members'
    (those in the prompt), nothing for a wildcard (columns_for resolves it per call)."""
    out = {}
    for word in words:
        if is_wildcard(word):
            continue
        members = group_members(word) if "," in word else [word]
        found = []
        for member in members:
            try:
                found += token_indices_for(member, prompt_tokens, tokenize_word, first_only)
            except ValueError:
                if len(members) == 1:
                    raise
        if not found:
            raise ValueError(f"Token not found: no word of the group '{word}'")
        out[word] = list(dict.fromkeys(found))
    return out


def columns_for(token: str, token_indices: Mapping[str, Sequence[int]], n_text: int) -> list[int]:
    """The key columns an entry bends: every one of the n_text for a wildcard, else token_indices'."""
    if is_wildcard(token):
        return list(range(n_text))
    if token not in token_indices:
        raise ValueError(f"Token not found: '{token}'")
    return list(token_indices[token])
