"""Self-Attention Guidance (Hong et al., ICCV 2023) as ComfyUI's SelfAttentionGuidance node defines it.

One sampling step, in denoised (x0) space, with A the post-softmax self-attention probabilities of
the unconditional half recorded at the middle block's first attn1:

    mask     = attention_mask_from_probs(A, b, heads, H, W)   keys with more than average attention
    degraded = degrade(x0_u, mask, blur_sigma)                blur x0_u where the mask is on
    x_deg    = renoise(degraded, x, x0_u)                     give it this step's noise back
    sag_x0   = model(x_deg, uncond, same sigma) as x0         the one extra UNet call
    result   = guide(cfg_result, degraded, sag_x0, scale)     cfg_result + scale·(degraded − sag_x0)

sag_step() chains these for a k-diffusion host (x = x0 + σ·eps, ComfyUI). For a variance-preserving
host (diffusers: x = sqrt(ᾱ)·x0 + sqrt(1−ᾱ)·eps, the model predicting eps or v) sag_prediction_delta()
computes the same correction and returns it as δ in the model's prediction space: adding one δ to
both the conditional and the unconditional prediction adds δ to the CFG result for any guidance
scale, so a wrapper around the UNet applies SAG without touching the pipeline's CFG code.
"""

from __future__ import annotations

import itertools
import math
from typing import Callable

import torch
import torch.nn.functional as F

from .defaults import SAG_DEFAULTS, SAG_RANGES  # noqa: F401  (SAG_RANGES: the node's inputs)

SAG_THRESHOLD = 1.0          # fixed in the node: a key "wins" when it gets more than average attention
BLUR_KERNEL_SIZE = 9
MAX_SKIPPED_SIZE = 4         # latents this small in either dimension get no SAG (no room for reflect padding 4)
# diffusers' deprecated StableDiffusionSAGPipeline (an independent eps-space reference): fixed blur sigma.
DIFFUSERS_PIPELINE_DEFAULTS = {"scale": 0.75, "blur_sigma": 1.0}


# --- mask -------------------------------------------------------------------------------------

def guess_mid_grid(n: int, height: int, width: int) -> tuple[int, int]:
    """(h_mid, w_mid) with h_mid·w_mid = n, guessed from the latent's aspect ratio as ComfyUI does.

    x = round(sqrt(H/W · n)); the first divisor of n among x, x+1, x−1, x+2, x−2, … (x−i never below 1)
    is h_mid. ComfyUI gives up after floor(sqrt(n)/2) tries (and then fails); we keep searching, which
    always ends because 1 divides n, and gives ComfyUI's answer wherever ComfyUI gives one.
    """
    if n < 1:
        raise ValueError(f"need at least one token, got n={n}")
    x = max(1, round(math.sqrt(height / width * n)))   # Python's round, as the node uses
    for i in itertools.count():
        for h in (x + i, max(1, x - i)):
            if n % h == 0:
                return h, n // h
    raise AssertionError("unreachable")


def attention_mask_from_probs(probs: torch.Tensor, batch: int, heads: int, height: int, width: int,
                              threshold: float = SAG_THRESHOLD,
                              mid_hw: tuple[int, int] | None = None) -> torch.Tensor:
    """Float mask [batch, 1, height, width] from self-attention probabilities [batch·heads, n, n].

    Average over heads, sum over the query axis: one value per key token (1.0 = average attention,
    since every query row sums to 1); mask = value > threshold. The mask lives on the middle block's
    grid: pass mid_hw when the host knows it, else it is guessed from the aspect ratio (guess_mid_grid).
    Nearest-neighbour upsampling to the latent size. Batch-major layout: row i·heads + h is item i, head h.
    """
    n_query, n = probs.shape[-2], probs.shape[-1]
    per_key = probs.reshape(batch, heads, n_query, n).mean(1).sum(1)        # [batch, n]
    h_mid, w_mid = mid_hw if mid_hw is not None else guess_mid_grid(n, height, width)
    dtype = probs.dtype if probs.is_floating_point() else torch.float32
    mask = (per_key > threshold).reshape(batch, 1, h_mid, w_mid).to(dtype)
    return F.interpolate(mask, size=(height, width), mode="nearest")


# --- degrade, re-noise, guide (x0 space) ------------------------------------------------------

def gaussian_kernel_1d(sigma: float, kernel_size: int = BLUR_KERNEL_SIZE) -> torch.Tensor:
    """Taps at linspace(−(k−1)/2, (k−1)/2, k) (−4..4 for k = 9), exp(−x²/2σ²), normalised to sum 1."""
    half = (kernel_size - 1) * 0.5
    x = torch.linspace(-half, half, kernel_size)
    pdf = torch.exp(-0.5 * (x / sigma) ** 2)
    return pdf / pdf.sum()


def gaussian_blur_2d(x: torch.Tensor, sigma: float, kernel_size: int = BLUR_KERNEL_SIZE) -> torch.Tensor:
    """Separable Gaussian (outer product of gaussian_kernel_1d) on [b, C, H, W], each channel on its
    own (depthwise conv), reflect padding kernel_size//2 (4 for the node's 9 taps).

    sigma ≤ 0 returns x unchanged: the node divides by sigma and produces NaN there; "no blur" is
    the limit of the blur as sigma → 0, so blur_sigma 0 means SAG guides with an unblurred x0.
    """
    if sigma <= 0:
        return x
    k1 = gaussian_kernel_1d(sigma, kernel_size).to(device=x.device, dtype=x.dtype)
    channels = x.shape[-3]
    weight = torch.outer(k1, k1).expand(channels, 1, kernel_size, kernel_size).contiguous()
    pad = kernel_size // 2
    return F.conv2d(F.pad(x, (pad, pad, pad, pad), mode="reflect"), weight, groups=channels)


def degrade(x0_uncond: torch.Tensor, mask: torch.Tensor, blur_sigma: float) -> torch.Tensor:
    """Blur the unconditional x0 only where the model attends most: blur·mask + x0·(1 − mask)."""
    return gaussian_blur_2d(x0_uncond, blur_sigma) * mask + x0_uncond * (1 - mask)


def renoise(degraded: torch.Tensor, x: torch.Tensor, x0_uncond: torch.Tensor) -> torch.Tensor:
    """Put this step's noise back on the degraded x0 (k-diffusion x = x0 + σ·eps): degraded + x − x0_u."""
    return degraded + x - x0_uncond


def guide(cfg_result: torch.Tensor, degraded: torch.Tensor, sag_x0: torch.Tensor, scale: float) -> torch.Tensor:
    """Push the CFG result away from what the model makes of the degraded input."""
    return cfg_result + (degraded - sag_x0) * scale


def sag_applies(height: int, width: int) -> bool:
    """The node skips latents of 4 pixels or fewer in either dimension (reflect padding needs more)."""
    return min(height, width) > MAX_SKIPPED_SIZE


def sag_step(x: torch.Tensor, cfg_result: torch.Tensor, x0_uncond: torch.Tensor, probs: torch.Tensor,
             heads: int, uncond_x0_at: Callable[[torch.Tensor], torch.Tensor],
             scale: float = SAG_DEFAULTS["scale"], blur_sigma: float = SAG_DEFAULTS["blur_sigma"],
             threshold: float = SAG_THRESHOLD, mid_hw: tuple[int, int] | None = None) -> torch.Tensor:
    """The node's post-CFG function, k-diffusion convention, all predictions in x0 space.

    x: this step's noisy input [b, C, H, W]; cfg_result, x0_uncond: CFG and unconditional x0;
    probs: the recorded unconditional attention [b·heads, n, n]; uncond_x0_at(x_deg) runs the model
    on x_deg with the unconditional conditioning at the same sigma and returns its x0.
    Returns cfg_result itself when skipped (tiny latent) or when scale is 0 (the node would still
    call the model and add 0·(…), the same values; we save the call).
    """
    height, width = x0_uncond.shape[-2:]
    if scale == 0 or not sag_applies(height, width):
        return cfg_result
    mask = attention_mask_from_probs(probs, x0_uncond.shape[0], heads, height, width, threshold, mid_hw)
    degraded = degrade(x0_uncond, mask, blur_sigma)
    sag_x0 = uncond_x0_at(renoise(degraded, x, x0_uncond))
    return guide(cfg_result, degraded, sag_x0, scale)


# --- variance-preserving hosts (diffusers): x = sqrt(ᾱ)·x0 + sqrt(1−ᾱ)·eps ------------------------
# alpha_cumprod is ᾱ at this step: a float, or a tensor broadcastable to x (e.g. [b, 1, 1, 1]).

def _sqrt_pair(alpha_cumprod, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    a = torch.as_tensor(alpha_cumprod, dtype=like.dtype, device=like.device)
    return a.sqrt(), (1 - a).sqrt()


def x0_from_eps(x, eps, alpha_cumprod):
    """x0 = (x − sqrt(1−ᾱ)·eps) / sqrt(ᾱ)."""
    sa, s1 = _sqrt_pair(alpha_cumprod, x)
    return (x - s1 * eps) / sa


def eps_from_x0(x, x0, alpha_cumprod):
    """eps = (x − sqrt(ᾱ)·x0) / sqrt(1−ᾱ)."""
    sa, s1 = _sqrt_pair(alpha_cumprod, x)
    return (x - sa * x0) / s1


def x0_from_v(x, v, alpha_cumprod):
    """v = sqrt(ᾱ)·eps − sqrt(1−ᾱ)·x0, hence x0 = sqrt(ᾱ)·x − sqrt(1−ᾱ)·v."""
    sa, s1 = _sqrt_pair(alpha_cumprod, x)
    return sa * x - s1 * v


def v_from_x0(x, x0, alpha_cumprod):
    """v = (sqrt(ᾱ)·x − x0) / sqrt(1−ᾱ)."""
    sa, s1 = _sqrt_pair(alpha_cumprod, x)
    return (sa * x - x0) / s1


def to_x0(x, prediction, alpha_cumprod, prediction_type: str = "epsilon"):
    """The model's prediction ("epsilon", "v_prediction" or "sample", diffusers' names) as x0."""
    if prediction_type == "epsilon":
        return x0_from_eps(x, prediction, alpha_cumprod)
    if prediction_type == "v_prediction":
        return x0_from_v(x, prediction, alpha_cumprod)
    if prediction_type == "sample":
        return prediction
    raise ValueError(f"unknown prediction_type {prediction_type!r}")


def prediction_delta(delta_x0, alpha_cumprod, prediction_type: str = "epsilon"):
    """The change of the prediction that changes its x0 by delta_x0 at fixed x (to_x0 is affine in it):
    eps: −sqrt(ᾱ)/sqrt(1−ᾱ)·Δx0; v: −Δx0/sqrt(1−ᾱ); sample: Δx0."""
    sa, s1 = _sqrt_pair(alpha_cumprod, delta_x0)
    if prediction_type == "epsilon":
        return -sa / s1 * delta_x0
    if prediction_type == "v_prediction":
        return -delta_x0 / s1
    if prediction_type == "sample":
        return delta_x0
    raise ValueError(f"unknown prediction_type {prediction_type!r}")


def renoise_vp(degraded, x, x0_uncond, alpha_cumprod):
    """renoise() for x = sqrt(ᾱ)·x0 + sqrt(1−ᾱ)·eps_u: sqrt(ᾱ)·degraded + sqrt(1−ᾱ)·eps_u
    = x + sqrt(ᾱ)·(degraded − x0_u) (what diffusers' scheduler.add_noise(degraded, eps_u, t) gives)."""
    sa, _ = _sqrt_pair(alpha_cumprod, x)
    return x + sa * (degraded - x0_uncond)


def sag_prediction_delta(x: torch.Tensor, pred_uncond: torch.Tensor, probs: torch.Tensor, heads: int,
                         uncond_pred_at: Callable[[torch.Tensor], torch.Tensor], alpha_cumprod,
                         scale: float = SAG_DEFAULTS["scale"], blur_sigma: float = SAG_DEFAULTS["blur_sigma"],
                         prediction_type: str = "epsilon", threshold: float = SAG_THRESHOLD,
                         mid_hw: tuple[int, int] | None = None) -> torch.Tensor | None:
    """sag_step for a variance-preserving host, returned as δ in prediction space.

    x: the UNet's input at this step (the unconditional half's rows); pred_uncond: its unconditional
    prediction; uncond_pred_at(x_deg) runs the UNet on x_deg with the unconditional conditioning at
    the same timestep and returns its prediction. Add the returned δ to both the conditional and the
    unconditional prediction (or to the CFG result): the CFG result's x0 moves by
    scale·(degraded − sag_x0), exactly sag_step's correction. None when SAG does nothing this step
    (tiny latent or scale 0): leave the predictions alone.
    """
    height, width = x.shape[-2:]
    if scale == 0 or not sag_applies(height, width):
        return None
    x0_u = to_x0(x, pred_uncond, alpha_cumprod, prediction_type)
    mask = attention_mask_from_probs(probs, x0_u.shape[0], heads, height, width, threshold, mid_hw)
    degraded = degrade(x0_u, mask, blur_sigma)
    x_deg = renoise_vp(degraded, x, x0_u, alpha_cumprod)
    sag_x0 = to_x0(x_deg, uncond_pred_at(x_deg), alpha_cumprod, prediction_type)
    return prediction_delta((degraded - sag_x0) * scale, alpha_cumprod, prediction_type)
