"""Tiny GGUF files of a diffusion model, laid out as ComfyUI-GGUF's converter (tools/convert.py) lays them out:
the model alone under its original names (no `model.diffusion_model.` prefix), `general.architecture` its
name for the family, 1-D tensors, tensors of ≤ 1024 elements and the family's high-precision keys in F32,
every other tensor in the chosen type — or F16 where the type's block does not divide its rows; for SD 1.x /
SDXL a tensor whose last dimension 256 does not divide is stored reshaped to [n / 256, 256], its shape in
`comfy.gguf.orig_shape.<name>`.

Types (`--dtype`, FORMS): gguf-py's own quantiser writes Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, BF16 and F16. It has none
for the K- and IQ-quants: their blocks get seeded random codes and sub-scales, with the fp16 scale fields (d, and
dmin half of it) fitted so each block's largest value is the weight block's — valid blocks of the type at the
weights' magnitude, not a quantisation of them. `gguf-k_m` mixes types as llama.cpp's "K_M" files do: Q6_K
for the tensors holding v, Q4_K for the rest, Q8_0 where 256 does not divide a row, then F16.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np

from ..errors import CkptbendError
from ..formats.ggml import BLOCK_TYPES, scale_fields
from .catalog import GGUF

FORMS = {"q4_0": "Q4_0", "q4_1": "Q4_1", "q5_0": "Q5_0", "q5_1": "Q5_1", "q8_0": "Q8_0", "q2_k": "Q2_K",
         "q3_k": "Q3_K", "q4_k": "Q4_K", "q5_k": "Q5_K", "q6_k": "Q6_K", "iq4_nl": "IQ4_NL", "iq4_xs": "IQ4_XS",
         "gguf-f16": "F16", "gguf-bf16": "BF16", "gguf-k_m": "K_M"}
assert tuple(FORMS) == GGUF
# ckptbend's synthetic architectures → ComfyUI-GGUF's `general.architecture`
COMFY_ARCH = {"flux_dev": "flux", "flux_schnell": "flux", "chroma": "flux", "chroma_radiance": "flux",
              "flux2_dev": "flux", "flux2_klein": "flux", "z_image": "lumina2", "lumina2": "lumina2", "ltx2": "ltxv",
              "ltx2_3": "ltxv", "ltx2_5": "ltxv", "hunyuan_video": "hyvid", "hunyuan_video15": "hyvid",
              "flux3_klein": "flux", "flux3_klein_base": "flux", "krea2": "flux", "hidream": "hidream",
              "wan_vace": "wan", "qwen_image_layered": "qwen_image", "qwen_image_21": "qwen_image",
              "sd1": "sd1", "sd2": "sd1", "sdxl": "sdxl", "sdxl_refiner": "sdxl", "sd3_medium": "sd3",
              "sd35_medium": "sd3", "sd35_large": "sd3", "wan21_t2v": "wan", "wan21_i2v": "wan", "wan22_ti2v": "wan",
              "wan22_i2v": "wan", "ltx_video": "ltxv", "qwen_image": "qwen_image", "auraflow": "aura",
              "cosmos_predict2": "cosmos", "anima": "cosmos", "longcat_image": "flux", "ovis_image": "flux"}
# ckptbend's large text encoders → the `general.architecture` of their llama.cpp GGUF (ComfyUI-GGUF's text list;
# llama.cpp converts Mistral as llama)
TEXT_ARCH = {"t5xxl": "t5encoder", "umt5xxl": "t5encoder", "llama": "llama", "mistral3_24b": "llama",
             "qwen25_7b": "qwen2vl", "qwen3_4b": "qwen3", "qwen3vl_4b": "qwen3vl"}
HIPREC = {"wan": (".modulation",), "ltxv": ("scale_shift_table",), "hidream": (".ff_i.gate.weight", "img_emb.emb_pos")}
SHAPE_FIX = ("sd1", "sdxl")
SMALL = 1024                # tensors of at most this many elements stay F32
MODEL_PREFIX = "model.diffusion_model."
HOLDS_V = (".v.", "qkv", "linear1", "to_v", "in_proj")


def model_state(state: dict) -> dict:
    """The diffusion model's tensors, its prefix stripped (as ComfyUI-GGUF's converter keeps them)."""
    if any(k.startswith(MODEL_PREFIX) for k in state):
        return {k[len(MODEL_PREFIX):]: v for k, v in state.items() if k.startswith(MODEL_PREFIX)}
    return dict(state)


def _fits(qtype: str, width: int) -> bool:
    return qtype in ("F16", "BF16", "F32") or width % BLOCK_TYPES[qtype].elements == 0


def tensor_type(key: str, shape: tuple, form: str, arch: str, small: int = SMALL) -> tuple[str, tuple, tuple | None]:
    """(ggml type, stored shape, original shape if stored reshaped) of one tensor; tensors of at most `small`
    elements stay F32."""
    n = math.prod(shape)
    if len(shape) <= 1 or n <= small or any(h in key for h in HIPREC.get(arch, ())):
        return "F32", shape, None
    stored, orig = shape, None
    if arch in SHAPE_FIX and n >= 512 and n % 256 == 0 and shape[-1] % 256:
        stored, orig = (n // 256, 256), shape
    qtype = FORMS[form]
    if qtype == "K_M":
        for candidate in ("Q6_K" if any(h in key for h in HOLDS_V) else "Q4_K", "Q8_0", "F16"):
            if _fits(candidate, stored[-1]):
                return candidate, stored, orig
    return (qtype if _fits(qtype, stored[-1]) else "F16"), stored, orig


def random_blocks(values: np.ndarray, qtype: str, rng: np.random.Generator) -> np.ndarray:
    """[rows, bytes] blocks of `qtype` with random codes, scaled so each block's largest |value| is `values`'."""
    import gguf

    bt = BLOCK_TYPES[qtype]
    flat = values.reshape(-1, bt.elements).astype(np.float32)
    blocks = rng.integers(0, 256, (flat.shape[0], bt.nbytes), dtype=np.uint8)
    base = (1.0, 0.5)[:len(bt.scales)]
    for field, v in zip(scale_fields(blocks, bt), base):
        field[...] = np.float16(v).view(np.uint16)
    decoded = gguf.quants.dequantize(blocks, gguf.GGMLQuantizationType[qtype]).reshape(flat.shape)
    top = np.abs(decoded).max(axis=1)
    fit = np.where(top > 0, np.abs(flat).max(axis=1) / np.where(top > 0, top, 1), 0.0)
    for field, v in zip(scale_fields(blocks, bt), base):
        field[...] = (fit * v).astype(np.float16).view(np.uint16)
    return blocks.reshape(values.shape[0], -1)


def encode(values: np.ndarray, qtype: str, rng: np.random.Generator) -> np.ndarray:
    """A tensor's stored data: float32 / float16 values, or uint8 bytes [rows, bytes] of a quantised type."""
    import gguf

    values = np.ascontiguousarray(values, dtype=np.float32)
    if qtype == "F32":
        return values
    if qtype in BLOCK_TYPES and not BLOCK_TYPES[qtype].requantise:
        return random_blocks(values, qtype, rng)
    return gguf.quants.quantize(values, gguf.GGMLQuantizationType[qtype])     # gguf-py's own quantiser


def write_gguf(path, arch_name: str, tensors, orig_shapes: dict | None = None, metadata: dict | None = None) -> Path:
    """Write a GGUF file streaming: `tensors` is a list of (name, ggml type, stored data shape (bytes for a
    quantised type), numpy dtype, nbytes, make) where make() gives the data when its turn comes."""
    import gguf

    writer = gguf.GGUFWriter(path=None, arch=arch_name)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    for name, shape in (orig_shapes or {}).items():
        writer.add_array(f"comfy.gguf.orig_shape.{name}", [int(d) for d in shape])
    for key, value in (metadata or {}).items():
        writer.add_string(key, value)
    for name, qtype, shape, dtype, nbytes, _ in tensors:
        raw = None if qtype in ("F32", "F16") else gguf.GGMLQuantizationType[qtype]
        writer.add_tensor_info(name, shape, np.dtype(dtype), nbytes, raw_dtype=raw)
    writer.write_header_to_file(path=Path(path))
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for *_, make in tensors:
        writer.write_tensor_data(make())
    writer.close()
    return Path(path)


def write_model(path, state: dict, form: str, arch: str, seed: int = 0, small: int = SMALL) -> Path:
    """A model's state dict (torch tensors, original names) as a GGUF file of `form` (FORMS). `small`: the
    converter's threshold; tests lower it so that a tiny model's attention (32 × 32) is quantised too."""
    if arch in TEXT_ARCH:
        return write_text_encoder(path, state, form, TEXT_ARCH[arch], seed)
    if arch not in COMFY_ARCH:
        raise CkptbendError(f"synth: {arch} has no GGUF form (ComfyUI-GGUF names no architecture for it)")
    name, rng = COMFY_ARCH[arch], np.random.default_rng(seed)
    entries, orig_shapes = [], {}
    for key, t in model_state(state).items():
        qtype, stored, orig = tensor_type(key, tuple(t.shape), form, name, small)
        if orig is not None:
            orig_shapes[key] = orig
        data = encode(t.float().numpy().reshape(stored), qtype, rng)
        entries.append((key, qtype, data.shape, data.dtype, data.nbytes, lambda data=data: data))
    return write_gguf(path, name, entries, orig_shapes)


def _random_q8_0(shape: tuple, rng: np.random.Generator) -> np.ndarray:
    """Q8_0 bytes [rows, bytes] of random codes under small random fp16 scales (fast: a benchmark's data)."""
    rows, count = shape[0], math.prod(shape) // 32
    blocks = np.empty((count, 34), dtype=np.uint8)
    blocks[:, 2:] = np.frombuffer(rng.bytes(count * 32), dtype=np.uint8).reshape(count, 32)
    blocks[:, :2] = (rng.random(count, dtype=np.float32) * 1e-3 + 1e-4).astype(np.float16).view(np.uint8).reshape(-1, 2)
    return blocks.reshape(rows, -1)


def write_large(path, shapes: dict, arch: str, seed: int = 0) -> Path:
    """A large GGUF file of a model's tensor shapes (name → torch shape), generated and written one tensor at a
    time (a benchmark's: memory stays at one tensor): Q8_0 of random codes where ComfyUI-GGUF's converter
    quantises, F32 of random values where it keeps F32."""
    name, rng, entries = COMFY_ARCH[arch], np.random.default_rng(seed), []
    for key, shape in shapes.items():
        qtype, stored, _ = tensor_type(key, tuple(shape), "q8_0", name)
        if qtype == "Q8_0":
            byte_shape = (stored[0], math.prod(stored[1:]) // 32 * 34)
            entries.append((key, qtype, byte_shape, np.uint8, math.prod(byte_shape),
                            lambda stored=stored: _random_q8_0(stored, rng)))
        else:
            entries.append((key, "F32", tuple(stored), np.float32, 4 * math.prod(stored),
                            lambda stored=stored: rng.standard_normal(stored, dtype=np.float32) * 0.1))
    return write_gguf(path, name, entries)


def write_text_encoder(path, state: dict, form: str, arch_name: str, seed: int = 0, small: int = 0) -> Path:
    """A transformers text encoder's state dict as a GGUF in llama.cpp's names (gguf-py's TensorNameMap for
    `arch_name`, one of ComfyUI-GGUF's text architectures: t5encoder, llama, qwen2vl, qwen3, qwen3vl); a tensor
    it names nothing (a tied copy, a vision tower: llama.cpp's mmproj file) is left out. Every matrix is
    quantised (`small` 0), as llama.cpp does. llama.cpp's converter also permutes Llama's q/k rows for its
    RoPE: a whole-tensor factor does not see row order, so they are kept as they are."""
    import gguf

    n_blocks = 1 + max(int(n) for key in state for n in re.findall(r"(?:block|layers)\.(\d+)\.", key))
    names = gguf.TensorNameMap(next(a for a, n in gguf.MODEL_ARCH_NAMES.items() if n == arch_name), n_blocks)
    rng, entries = np.random.default_rng(seed), []
    for key, t in state.items():
        # (llama.cpp's converter reads a VL model's text layers as the plain model's)
        name = names.get_name(key.replace("model.language_model.", "model.", 1), try_suffixes=(".weight", ".bias"))
        if name is None or any(e[0] == name for e in entries):
            continue
        qtype, stored, _ = tensor_type(name, tuple(t.shape), form, arch_name, small)
        data = encode(t.float().numpy().reshape(stored), qtype, rng)
        entries.append((name, qtype, data.shape, data.dtype, data.nbytes, lambda data=data: data))
    return write_gguf(path, arch_name, entries)
