"""Slothful Attention (the ComfyUI node's Dec 2023 version: time_decay / keep_middle / strength / Simple).

Every self-attention keeps all its query tokens but sees fewer key/value tokens: the key and value
*inputs* (the normalised hidden states, before to_k / to_v) are pooled with a stride that grows with
`strength`, changes with UNet depth (`depth_decay`) and fades as sampling progresses (`time_decay`).
A style control, not an accelerator. Entry point for hosts: slothful_kv().

Reference quirk kept by default (reference_blend_quirk=True): when k_blend and v_blend are both
exactly 1, the node returns the uncropped subsampled tensor for both, not the pooled one (at a
64×64 latent 704 tokens where the pooled grid has 672), so blend 0.99 and 1.0 differ sharply.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .defaults import (SLOTHFUL_DEFAULTS, SLOTHFUL_MODES, SLOTHFUL_RANGES, SLOTHFUL_SIMPLE_DEFAULTS,
                       SLOTHFUL_SIMPLE_EXPANDS, SLOTHFUL_SIMPLE_FIXED, SLOTHFUL_SIMPLE_RANGES)

MODES = SLOTHFUL_MODES
DEFAULTS = SLOTHFUL_DEFAULTS
RANGES = SLOTHFUL_RANGES
SIMPLE_DEFAULTS = SLOTHFUL_SIMPLE_DEFAULTS
SIMPLE_RANGES = SLOTHFUL_SIMPLE_RANGES


def simple_params(**simple) -> dict:
    """The Simple node's inputs (SIMPLE_DEFAULTS' names; missing ones take its defaults) expanded to the full
    node's parameters."""
    unknown = sorted(set(simple) - set(SIMPLE_DEFAULTS))
    if unknown:
        raise TypeError(f"unknown Slothful Attention Simple parameter(s): {', '.join(unknown)}")
    values = {**SIMPLE_DEFAULTS, **simple}
    full = {full: values[name] for name, fulls in SLOTHFUL_SIMPLE_EXPANDS.items() for full in fulls}
    return {**SLOTHFUL_SIMPLE_FIXED, **full}


def resolve_params(params: dict | None = None) -> dict:
    """DEFAULTS overlaid with params; unknown names and unknown modes are errors (ranges are the UI's
    limits, not checked here)."""
    params = dict(params or {})
    unknown = sorted(set(params) - set(DEFAULTS))
    if unknown:
        raise ValueError(f"unknown Slothful Attention parameter(s): {', '.join(unknown)}")
    full = {**DEFAULTS, **params}
    for side in ("in_mode", "out_mode"):
        if full[side] not in MODES:
            raise ValueError(f"{side} must be one of {', '.join(MODES)}, got {full[side]!r}")
    return full


# --- the stride ---------------------------------------------------------------------------------

def progress(sigma) -> float:
    """t = clamp((ln σ + 2.2) / 5, 0, 1): ≈1 at the start of sampling, ≈0 at the end (σ ≤ 0 → 0)."""
    sigma = float(sigma)
    if sigma <= 0:
        return 0.0
    return min(1.0, max(0.0, (math.log(sigma) + 2.2) / 5))


def sigma_from_alpha_cumprod(alpha_cumprod: float) -> float:
    """The k-diffusion sigma of a variance-preserving step, for hosts that only know ᾱ (diffusers)."""
    return math.sqrt((1 - alpha_cumprod) / alpha_cumprod)


def is_sdxl_family(n_heads: int) -> bool:
    """The node's test: SD 1.x attention has 8 heads, everything else counts as SDXL.
    Quirk kept as is: SD 2.x (64-dim heads, 5–20 of them) is classed as SDXL too."""
    return n_heads != 8


def stride_for(n_tokens: int, latent_hw: tuple[int, int], sigma, strength: float, depth_decay: float,
               time_decay: float, sdxl: bool) -> float:
    """stride = strength · r^(|depth_decay|/2) · t^time_decay for an attention with n_tokens queries in a
    model whose latent has N = H·W positions.

    depth_decay ≥ 0: r = n/N (SD 1.x) or 4n/N (SDXL, whose top level has no attention) — 1 at the
    shallowest attention level, shrinking with depth. depth_decay < 0: r = N/n/64 (SD 1.x) or
    N/n/16 (SDXL) — 1 at the deepest level, shrinking towards the top.
    """
    height, width = latent_hw
    n_latent = height * width
    if depth_decay >= 0:
        r = (4 if sdxl else 1) * n_tokens / n_latent
    else:
        r = n_latent / n_tokens / (16 if sdxl else 64)
    ratio = r ** (abs(depth_decay) / 2) * progress(sigma) ** time_decay   # 0.0 ** 0 == 1, as in Python
    return strength * ratio


# --- the reduction ------------------------------------------------------------------------------

def recover_grid(n_tokens: int, latent_hw: tuple[int, int]) -> tuple[int, int]:
    """The token grid of this attention: w = round(W·sqrt(n/N)), h = n // w."""
    height, width = latent_hw
    w = max(1, round(width * math.sqrt(n_tokens / (height * width))))
    return n_tokens // w, w


def window_1d(stride: float, n_tokens: int) -> int:
    """Window and step ceil(stride) over the token axis (capped at n: the node fails beyond it)."""
    return max(1, min(math.ceil(stride), n_tokens))


def window_2d(stride: float, grid_hw: tuple[int, int]) -> tuple[int, int]:
    """(rows, columns) of the 2-D window: sty = ceil(sqrt(stride)), stx = ceil(stride/sty), and the window
    is stx rows by sty columns (the node's naming). Capped at the grid (the node fails beyond it)."""
    sty = math.ceil(math.sqrt(stride))
    stx = math.ceil(stride / sty)
    return max(1, min(stx, grid_hw[0])), max(1, min(sty, grid_hw[1]))


def _is_2d(mode: str) -> bool:
    if mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
    return mode.startswith("2D")


def _pool(x: torch.Tensor, window, mode: str) -> torch.Tensor:
    """avg or max pooling with window = step (1-D on [b, c, n], 2-D on [b, c, h, w]); no padding."""
    if x.dim() == 3:
        return (F.avg_pool1d if mode.endswith("AVG") else F.max_pool1d)(x, window, window)
    return (F.avg_pool2d if mode.endswith("AVG") else F.max_pool2d)(x, window, window)


def _to_grid(x: torch.Tensor, grid_hw: tuple[int, int]) -> torch.Tensor:
    """[b, n, c] tokens → [b, c, h, w] (row-major tokens)."""
    b, n, c = x.shape
    h, w = grid_hw
    if h * w != n:
        raise ValueError(f"{n} tokens do not form a {h}×{w} grid")
    return x.transpose(1, 2).reshape(b, c, h, w)


def _to_tokens(x: torch.Tensor) -> torch.Tensor:
    """[b, c, h, w] or [b, c, n] → [b, tokens, c]."""
    return x.flatten(2).transpose(1, 2)


def subsample(x: torch.Tensor, stride: float, mode: str, grid_hw: tuple[int, int] | None = None) -> torch.Tensor:
    """`one` uncropped: pooling with window 1 and the mode's step, i.e. every step-th token (1-D) or every
    stx-th row and sty-th column (2-D). What the reference returns when both blends are 1."""
    if _is_2d(mode):
        rows, cols = window_2d(stride, grid_hw)
        return _to_tokens(_to_grid(x, grid_hw)[:, :, ::rows, ::cols])
    return x[:, ::window_1d(stride, x.shape[1])]


def reduce_tokens(x: torch.Tensor, stride: float, mode: str, blend: float,
                  grid_hw: tuple[int, int] | None = None) -> torch.Tensor:
    """[b, n, c] → [b, m, c] with m the pooled size: one·(1 − blend) + pool·blend.

    1-D modes pool the token axis (window = step = ceil(stride)); `one` is trimmed (or zero-padded,
    which pooling without padding never needs) at the end to pool's length. 2-D modes pool the
    recovered grid grid_hw with a stx×sty window; `one` is cropped to pool's grid; tokens row-major.
    """
    if _is_2d(mode):
        grid = _to_grid(x, grid_hw)
        window = window_2d(stride, grid_hw)
        pool = _pool(grid, window, mode)
        one = grid[:, :, ::window[0], ::window[1]][:, :, :pool.shape[2], :pool.shape[3]]
    else:
        seq = x.transpose(1, 2)                                  # [b, c, n]
        step = window_1d(stride, x.shape[1])
        pool = _pool(seq, step, mode)
        one = seq[:, :, ::step][:, :, :pool.shape[2]]
        one = F.pad(one, (0, pool.shape[2] - one.shape[2]))
    return _to_tokens(one * (1 - blend) + pool * blend)


def slothful_kv(k_in: torch.Tensor, v_in: torch.Tensor, block_kind: str, sigma, n_heads: int,
                latent_hw: tuple[int, int], params: dict | None = None,
                reference_blend_quirk: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """The node's attn1 patch on the key and value inputs [b, n, c] of one self-attention.

    block_kind: "input" | "middle" | "output" (ComfyUI's extra_options["block"][0]); anything not
    "output" uses the in_* parameters, except the middle block, which is left alone while keep_middle.
    sigma: this step's sigma; n_heads: the attention's head count (tells SD 1.x from the SDXL family);
    latent_hw: the latent's (H, W); params: DEFAULTS overrides. Returns the inputs themselves when
    the stride is ≤ 1, else (reduced k_in, reduced v_in); the query is never touched.
    """
    p = resolve_params(params)
    if block_kind == "middle" and p["keep_middle"]:
        return k_in, v_in
    side = "out_" if block_kind == "output" else "in_"
    n_tokens = k_in.shape[1]
    stride = stride_for(n_tokens, latent_hw, sigma, p[side + "strength"], p[side + "depth_decay"],
                        p["time_decay"], is_sdxl_family(n_heads))
    if stride <= 1:
        return k_in, v_in
    mode, k_blend, v_blend = p[side + "mode"], p[side + "k_blend"], p[side + "v_blend"]
    grid_hw = recover_grid(n_tokens, latent_hw) if _is_2d(mode) else None
    if reference_blend_quirk and k_blend == 1 and v_blend == 1:
        return subsample(k_in, stride, mode, grid_hw), subsample(v_in, stride, mode, grid_hw)
    return (reduce_tokens(k_in, stride, mode, k_blend, grid_hw),
            reduce_tokens(v_in, stride, mode, v_blend, grid_hw))
