"""Attention Bending (Cole & Grierson, 2026): spatial transforms of cross-attention maps during sampling.

Pure torch: an entry (BendSpec), the nine transforms of a map, and bend_probs, which bends the word columns
of explicit probabilities. bent_attention.py applies the same rules to a host's attention output without the
[S, T] matrix; tokens.py finds a word's columns.

The text cross-attention is computed explicitly, P = softmax(Q·Kᵀ·scale) of shape [batch·heads, S, T]
(S image tokens, T text tokens). For each entry (a BendSpec), each column P[:, :, j] of its word is
viewed as maps [batch·heads, H, W] (video: one map per frame), transformed, blended
(1 − strength)·col + strength·T(col), optionally renormalised, and written back; then, if any entry
asks for it, every query row is renormalised over the text tokens. Only the conditional prediction
is bent (the host picks its rows).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Callable, Iterable, Mapping, Sequence

import torch
import torch.nn.functional as F

from .defaults import BEND_DEFAULTS as D
from .tokens import columns_for

MODES = ("scale", "spatial_scale", "rotate", "translate", "flip", "blur", "sharpen", "regional_mask",
         "frequency_filter")
RENORMALIZE = ("row", "column", "none")
FILTERS = ("lowpass", "highpass")
EPS = 1e-8                   # sums at or below this are left undivided


@dataclass(frozen=True)
class BendSpec:
    """One bending entry, with the original's field names and defaults (defaults.BEND_DEFAULTS, where each is
    explained). Unused mode parameters are ignored."""
    token: str
    mode: str
    strength: float = D["strength"]
    apply_to_timesteps: tuple[int, int] | None = D["apply_to_timesteps"]
    apply_to_layers: tuple[int, ...] | None = D["apply_to_layers"]
    renormalize: str = D["renormalize"]
    scale_factor: float = D["scale_factor"]
    zoom_factor: float = D["zoom_factor"]
    angle: float = D["angle"]
    translate_x: float = D["translate_x"]
    translate_y: float = D["translate_y"]
    flip_horizontal: bool = D["flip_horizontal"]
    flip_vertical: bool = D["flip_vertical"]
    kernel_size: int = D["kernel_size"]
    sigma: float = D["sigma"]
    sharpen_amount: float = D["sharpen_amount"]
    region: tuple[float, float, float, float] | None = D["region"]
    region_feather: float = D["region_feather"]
    filter: str | None = D["filter"]
    cutoff: float = D["cutoff"]

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
