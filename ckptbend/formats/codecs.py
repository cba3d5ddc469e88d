"""The number formats of quantised weights: decoding stored bytes, and encoding with each format's own rounding
and saturation (round to nearest even, clipped at the format's largest value, as ComfyUI's quantisers do).

- fp8 e4m3fn / e5m2: torch's conversions (largest finite 448 / 57344);
- int8: round half to even, clipped to [-128, 127] (comfy-kitchen's int8 quantiser);
- a one-byte code has 256 values, so a requantisation by a chain of factors is a table of 256 entries,
  built once with torch by the rule (float32 multiply, round, clip) and looked up for every code;
- e2m1 (nvfp4 codes): two per byte, the first element in the high nibble;
- e8m0 (mxfp8 block scales): a biased exponent, 2^(e - 127), 255 is NaN;
- block-scale layout: nvfp4 and mxfp8 store their [rows, blocks] scale grid in cuBLAS's tiled order
  (tiles of 128 rows × 4 blocks, each tile laid out as 32 × 16: row r of the tile at (r mod 32, r div 32)).
"""

from __future__ import annotations

import functools
import math

import numpy as np

TORCH_DTYPES = {"F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2", "I8": "int8", "U8": "uint8"}
FP8_MAX = {"F8_E4M3": 448.0, "F8_E5M2": 57344.0}
INT8_RANGE = (-128.0, 127.0)
E2M1_VALUES = np.array([0, 0.5, 1, 1.5, 2, 3, 4, 6, -0.0, -0.5, -1, -1.5, -2, -3, -4, -6], dtype=np.float32)
E8M0_BIAS, E8M0_MAX = 127, 254


def _torch_codes(dtype: str):
    import torch

    return torch.from_numpy(np.arange(256, dtype=np.uint8)).view(getattr(torch, TORCH_DTYPES[dtype]))


@functools.lru_cache(maxsize=None)
def values(dtype: str) -> np.ndarray:
    """The float32 value of each of the 256 codes of a one-byte dtype (fp8, int8, uint8)."""
    import torch

    return _torch_codes(dtype).to(torch.float32).numpy()


_STEP = 1 << 16   # codes per look-up: indices (widened by numpy) and results stay in the CPU cache


def histogram(codes: np.ndarray) -> np.ndarray:
    """How often each of the 256 codes occurs (in steps: numpy widens what it counts)."""
    flat = codes.reshape(-1)
    counts = np.zeros(256, dtype=np.int64)
    for start in range(0, flat.size, 1 << 20):
        counts += np.bincount(flat[start:start + (1 << 20)], minlength=256)
    return counts


def look_up(codes: np.ndarray, table: np.ndarray) -> None:
    """Replace each code by table[code], in place (a column range, not contiguous: at once)."""
    if not codes.flags.c_contiguous:
        codes[...] = table[codes]
        return
    flat = codes.reshape(-1)
    for start in range(0, flat.size, _STEP):
        np.take(table, flat[start:start + _STEP], out=flat[start:start + _STEP])


def decode(raw, dtype: str) -> np.ndarray:
    """Stored one-byte codes → float32 values (flat)."""
    codes, table = np.frombuffer(raw, dtype=np.uint8), values(dtype)
    out = np.empty(codes.size, dtype=np.float32)
    for start in range(0, codes.size, _STEP):
        np.take(table, codes[start:start + _STEP], out=out[start:start + _STEP])
    return out


@functools.lru_cache(maxsize=4096)
def table(dtype: str, factors: tuple[float, ...]) -> tuple[np.ndarray, np.ndarray]:
    """(new code, clipped?) of each of the 256 codes under the rule: the value times each factor in turn
    (float32), rounded to nearest even in `dtype` and clipped to its range."""
    import torch

    x = _torch_codes(dtype).to(torch.float32)
    for f in factors:
        x.mul_(f)
    if dtype == "I8":
        x = torch.round(x)          # half to even
        clipped = (x < INT8_RANGE[0]) | (x > INT8_RANGE[1])
        return x.clamp_(*INT8_RANGE).to(torch.int8).view(torch.uint8).numpy(), clipped.numpy()
    top = FP8_MAX[dtype]
    clipped = x.abs() > top
    return x.clamp_(-top, top).to(getattr(torch, TORCH_DTYPES[dtype])).view(torch.uint8).numpy(), clipped.numpy()


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


@functools.lru_cache(maxsize=64)
def tiled_index(rows: int, cols: int) -> np.ndarray:
    """Where entry (r, c) of a [rows, cols] scale grid sits in its tiled storage (flat index; shared, read-only)."""
    r = np.arange(rows)[:, None]
    c = np.arange(cols)[None, :]
    tiles_per_row = -(-cols // 4)
    tile = (r // 128) * tiles_per_row + c // 4
    inner = r % 128
    index = tile * 512 + (inner % 32) * 16 + (inner // 32) * 4 + c % 4
    index.flags.writeable = False
    return index


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
