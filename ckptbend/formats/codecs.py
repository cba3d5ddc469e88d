"""The number formats of quantised weights: decoding stored bytes, and encoding with each format's own rounding
and saturation (round to nearest even, clipped at the format's largest value, as ComfyUI's quantisers do).

- fp8 e4m3fn / e5m2: torch's conversions (largest finite 448 / 57344);
- int8: round half to even, clipped to [-128, 127] (comfy-kitchen's int8 quantiser);
- e2m1 (nvfp4 codes): two per byte, the first element in the high nibble;
- e8m0 (mxfp8 block scales): a biased exponent, 2^(e - 127), 255 is NaN;
- block-scale layout: nvfp4 and mxfp8 store their [rows, blocks] scale grid in cuBLAS's tiled order
  (tiles of 128 rows × 4 blocks, each tile laid out as 32 × 16: row r of the tile at (r mod 32, r div 32)).
"""

from __future__ import annotations

import math

import numpy as np

TORCH_DTYPES = {"F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2", "I8": "int8", "U8": "uint8"}
FP8_MAX = {"F8_E4M3": 448.0, "F8_E5M2": 57344.0}
INT8_RANGE = (-128.0, 127.0)
E2M1_VALUES = np.array([0, 0.5, 1, 1.5, 2, 3, 4, 6, -0.0, -0.5, -1, -1.5, -2, -3, -4, -6], dtype=np.float32)
E8M0_BIAS, E8M0_MAX = 127, 254


def decode(raw, dtype: str):
    """Stored codes (fp8 or int8) → a flat float32 torch tensor (torch: the only fp8 codec at hand)."""
    import torch

    stored = getattr(torch, TORCH_DTYPES[dtype])
    return torch.frombuffer(bytearray(raw), dtype=stored).to(torch.float32)


def decode64(raw, dtype: str, shape) -> np.ndarray:
    return decode(raw, dtype).numpy().astype(np.float64).reshape(shape)


def encode(x, dtype: str) -> tuple[np.ndarray, int]:
    """float32 values (a torch tensor, changed in place) → stored bytes (uint8 view) in `dtype`, and how many
    values were clipped to its range."""
    import torch

    if dtype == "I8":
        x = torch.round(x)          # half to even
        lo, hi = INT8_RANGE
        saturated = int(((x < lo) | (x > hi)).sum())
        return x.clamp_(lo, hi).to(torch.int8).view(torch.uint8).numpy(), saturated
    top = FP8_MAX[dtype]
    saturated = int((x.abs() > top).sum())
    return x.clamp_(-top, top).to(getattr(torch, TORCH_DTYPES[dtype])).view(torch.uint8).numpy(), saturated


def e2m1(raw: bytes, shape) -> np.ndarray:
    """nvfp4 codes [rows, bytes] → float32 [rows, 2·bytes] (high nibble first)."""
    packed = np.frombuffer(raw, dtype=np.uint8).reshape(shape)
    out = np.empty((shape[0], 2 * shape[1]), dtype=np.float32)
    out[:, 0::2] = E2M1_VALUES[packed >> 4]
    out[:, 1::2] = E2M1_VALUES[packed & 0x0F]
    return out


def to_e2m1(x: np.ndarray) -> np.ndarray:
    """float32 values (already within ±6) → e2m1 codes 0..15, rounded to nearest even, the sign kept (-0 too)."""
    magnitudes = E2M1_VALUES[:8]
    v = np.minimum(np.abs(x), 6.0)
    upper = np.clip(np.searchsorted(magnitudes, v), 1, 7)
    lower = upper - 1
    below, above = v - magnitudes[lower], magnitudes[upper] - v
    code = np.where((below < above) | ((below == above) & (lower % 2 == 0)), lower, upper)
    return (code | (np.signbit(x) << 3)).astype(np.uint8)


def pack_e2m1(codes: np.ndarray) -> np.ndarray:
    """[rows, 2n] e2m1 codes → [rows, n] bytes, the first of each pair in the high nibble."""
    return (codes[:, 0::2] << 4 | codes[:, 1::2]).astype(np.uint8)


def e8m0(exponents: np.ndarray) -> np.ndarray:
    values = np.exp2(exponents.astype(np.float64) - E8M0_BIAS)
    values[exponents == 255] = np.nan
    return values


def tiled_index(rows: int, cols: int) -> np.ndarray:
    """Where entry (r, c) of a [rows, cols] scale grid sits in its tiled storage (flat index)."""
    r = np.arange(rows)[:, None]
    c = np.arange(cols)[None, :]
    tiles_per_row = -(-cols // 4)
    tile = (r // 128) * tiles_per_row + c // 4
    inner = r % 128
    return tile * 512 + (inner % 32) * 16 + (inner // 32) * 4 + c % 4


def tiled_shape(rows: int, cols: int) -> tuple[int, int]:
    return (-(-rows // 128) * 128, -(-cols // 4) * 4)


def hadamard(n: int) -> np.ndarray:
    """The normalised regular Hadamard matrix ConvRot rotates by: Kronecker powers of the 4 × 4 regular
    Hadamard matrix (n a power of 4), divided by √n. Symmetric and orthogonal: H · H = I."""
    if n < 4 or 4 ** round(math.log(n, 4)) != n:
        raise ValueError(f"ConvRot group size {n} is not a power of 4")
    h4 = np.array([[1, 1, 1, -1], [1, 1, -1, 1], [1, -1, 1, 1], [-1, 1, 1, 1]], dtype=np.float64)
    h = h4
    while h.shape[0] < n:
        h = np.kron(h, h4)
    return h / math.sqrt(n)
