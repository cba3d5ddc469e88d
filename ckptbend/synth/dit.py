"""Shared by the diffusion-transformer generators: tiny text encoders under the names released files use,
ComfyUI's all-in-one and scaled-fp8 forms, and the writer for every layout.

A family module (``synth/sd3.py``, ``synth/qwen_image.py``) provides a ``Family``: the transformer class and
tiny configs, ``to_original`` (diffusers names → original single-file names; the inverse of diffusers' own
single-file converter, which the tests run on the result), its text encoders, VAE and pipeline names.

Layouts:

=====================  ================================================================================
single                 the transformer alone, original names, no prefix
single_prefixed        the transformer alone under ``model.diffusion_model.``
comfy                  ComfyUI's all-in-one checkpoint: ``model.diffusion_model.``, the text encoders under
                       ``text_encoders.<name>.transformer.``, the VAE under the family's VAE prefix
transformer_diffusers  the transformer alone, diffusers names (one file)
diffusers              a pipeline folder: model_index.json, transformer/, text_encoder*/, vae/, scheduler/
=====================  ================================================================================

A ``dtype`` of catalog.QUANTISED (scaled_fp8, fp8mixed, int8, int8_convrot, nvfp4) writes ComfyUI's quantised
form of the transformer (synth/quantised.py) in any single-file layout; everything else in bfloat16.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from ..errors import CkptbendError
from .catalog import QUANTISED
from .files import write_safetensors, write_weights
from .quantised import quantise
from . import large_text_encoders as large
from .text_encoders import hf_clip_state_dict

MODEL_PREFIX = "model.diffusion_model."
FP8_MAX = 448.0   # largest finite float8_e4m3fn
LAYOUTS = ("single", "single_prefixed", "comfy", "transformer_diffusers", "diffusers")
DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float8_e4m3fn, torch.float8_e5m2, *QUANTISED)

_TINY_TEXT = {"vocab_size": 64, "num_attention_heads": 2, "num_hidden_layers": 2, "bos_token_id": 0,
              "eos_token_id": 1, "pad_token_id": 1}


def _clip(hidden, act, projection):
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection
    return CLIPTextModelWithProjection(CLIPTextConfig(hidden_size=hidden, intermediate_size=2 * hidden,
                                                      max_position_embeddings=16, hidden_act=act,
                                                      projection_dim=projection, **_TINY_TEXT))


def _t5():
    from transformers import T5Config, T5EncoderModel
    return T5EncoderModel(T5Config(vocab_size=64, d_model=32, d_kv=16, d_ff=64, num_layers=2, num_heads=2,
                                   feed_forward_proj="gated-gelu", pad_token_id=0, eos_token_id=1))


def _qwen25_vl():
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration
    cfg = Qwen2_5_VLConfig(
        vision_config=dict(depth=1, hidden_size=16, intermediate_size=32, num_heads=2, out_hidden_size=32,
                           fullatt_block_indexes=[0], window_size=8, patch_size=2, spatial_merge_size=1,
                           temporal_patch_size=1, in_channels=3),
        bos_token_id=0, eos_token_id=1,
        text_config=dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_attention_heads=2,
                         num_hidden_layers=2, num_key_value_heads=1, bos_token_id=0, eos_token_id=1,
                         rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]}))
    return Qwen2_5_VLForConditionalGeneration(cfg)


# ComfyUI's encoder name → (builder, transformers class for diffusers folders)
TEXT_ENCODERS: dict[str, Callable] = {
    "clip_l": lambda: _clip(16, "quick_gelu", 16),      # SD3's CLIP-L (with its projection)
    "clip_g": lambda: _clip(32, "gelu", 24),            # SD3's CLIP-G: HF names, separate q/k/v_proj
    "t5xxl": _t5,
    "qwen25_7b": _qwen25_vl,
}


def text_file_state(name: str, model) -> dict:
    """The encoder's tensors under the names released files (and ComfyUI) use. transformers 5 renamed
    some modules in its state dicts; files keep the old names, which `from_pretrained` maps."""
    if name.startswith("clip"):
        return hf_clip_state_dict(model)
    if name not in TEXT_ENCODERS:
        return large.file_state_dict(name, model)
    state = model.state_dict()
    if name == "qwen25_7b":
        return {k.replace("model.language_model.", "model.").replace("model.visual.", "visual."): v
                for k, v in state.items()}
    return dict(state)


@dataclass(frozen=True)
class Family:
    transformer_class: str
    configs: dict                       # arch → transformer kwargs
    to_original: Callable               # diffusers state dict → original names (bare)
    text_encoders: dict                 # all-in-one / folder: encoder name → diffusers sub-folder
    pipeline: str
    vae_prefix: str                     # in ComfyUI's all-in-one file
    vae: Callable | None = None         # () → (diffusers VAE model, its original state dict) or None
    scheduler: dict = field(default_factory=dict)
    full_configs: dict = field(default_factory=dict)   # arch → the released config (size "full": single files)


def build(family: Family, arch: str, seed: int = 0):
    """The tiny transformer (real diffusers class) with every parameter random, norm weights included
    (around 1, so a q/k factor on a norm weight has a visible effect)."""
    import diffusers

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = getattr(diffusers, family.transformer_class)(**family.configs[arch]).eval()
    randomise(model, torch.Generator().manual_seed(seed + 1))
    return model


def randomise(model, g):
    """Every parameter random, norm weights included and around 1 (so q/k factors on them are visible)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1 and "norm" in name and name.endswith("weight"):
                p.copy_(0.5 + torch.rand(p.shape, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g) * (0.3 if p.ndim > 1 else 0.1))


def build_text_encoders(family: Family, seed: int = 0) -> dict:
    models = {}
    with torch.random.fork_rng(devices=[]):
        for i, name in enumerate(family.text_encoders):
            torch.manual_seed(seed + 10 + i)
            # the 2026 families' encoders (Qwen3, Gemma 2, Llama 3.1, ...) are the text-encoder generator's
            models[name] = TEXT_ENCODERS[name]().eval() if name in TEXT_ENCODERS else large.build(name, seed + 10 + i)
    return models


def _write_one(path, state: dict, dtype) -> Path:
    if dtype in QUANTISED:
        return write_safetensors(path, state, dtype=None)
    return write_safetensors(path, state, dtype)


def _model_state(family, arch, layout, model, dtype) -> dict:
    state = model.state_dict() if layout == "transformer_diffusers" else family.to_original(model.state_dict())
    prefix = MODEL_PREFIX if layout in ("single_prefixed", "comfy") else ""
    state = {prefix + k: v for k, v in state.items()}
    return quantise(state, prefix, dtype) if dtype in QUANTISED else state


def _comfy_extras(family, seed, dtype) -> dict:
    out = {}
    for name, model in build_text_encoders(family, seed).items():
        out.update({f"text_encoders.{name}.transformer.{k}": v for k, v in text_file_state(name, model).items()})
    if family.vae is not None:
        out.update({family.vae_prefix + k: v for k, v in family.vae(seed)[1].items()})
    if dtype in QUANTISED:   # only the diffusion model is quantised
        out = {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in out.items()}
    return out


def _write_folder(root: Path, family: Family, arch, model, dtype, seed, shard_size) -> Path:
    import diffusers

    if dtype in QUANTISED:
        raise CkptbendError(f"synth: {dtype} is a ComfyUI single-file form; use another dtype for diffusers")
    root.mkdir(parents=True, exist_ok=True)
    index = {"_class_name": family.pipeline, "_diffusers_version": diffusers.__version__}
    model.save_config(root / "transformer")
    write_weights(root / "transformer", "diffusion_pytorch_model", model.state_dict(), dtype, None, shard_size)
    index["transformer"] = ["diffusers", family.transformer_class]
    for name, model_ in build_text_encoders(family, seed).items():
        sub = family.text_encoders[name]
        config = copy.deepcopy(model_.config)
        config.architectures = [type(model_).__name__]
        config.dtype = dtype
        config.save_pretrained(root / sub)
        write_weights(root / sub, "model", text_file_state(name, model_), dtype, None, shard_size, total_parameters=True)
        index[sub] = ["transformers", type(model_).__name__]
    if family.vae is not None:
        vae = family.vae(seed)[0]
        vae.save_config(root / "vae")
        write_weights(root / "vae", "diffusion_pytorch_model", vae.state_dict(), dtype, None, shard_size)
        index["vae"] = ["diffusers", type(vae).__name__]
    if family.scheduler:
        diffusers.FlowMatchEulerDiscreteScheduler(**family.scheduler).save_config(root / "scheduler")
        index["scheduler"] = ["diffusers", "FlowMatchEulerDiscreteScheduler"]
    (root / "model_index.json").write_text(json.dumps(dict(sorted(index.items())), indent=2) + "\n")
    return root


def write_checkpoint(family: Family, path, arch: str, layout: str = "single", size: str = "tiny", dtype=None,
                     seed: int = 0, shard_size=None) -> Path:
    """Write a tiny checkpoint of `arch` in `layout` (see the module docstring) and return its path; size "full"
    (where the family gives a released config): the transformer alone at full size, built on the meta device
    and its values drawn while writing (memory stays small), in the single layouts."""
    dtype = torch.float32 if dtype is None else dtype
    full = size == "full" and arch in family.full_configs
    problem = next((message for bad, message in (
        (size != "tiny" and not full, f"synth: {arch} is generated tiny only"),
        (full and (layout not in ("single", "single_prefixed") or dtype in QUANTISED),
         f"synth: {arch} at full size is written in the single layouts, in a torch dtype"),
        (arch not in family.configs, f"unknown architecture {arch!r} (one of {', '.join(family.configs)})"),
        (layout not in LAYOUTS, f"synth: {arch} has no layout {layout!r} (one of {', '.join(LAYOUTS)})"),
        (dtype not in DTYPES, f"synth: unsupported dtype {dtype}"),
        (shard_size is not None and layout != "diffusers", "synth: shard_size applies to the diffusers layout only"),
    ) if bad), None)
    if problem:
        raise CkptbendError(problem)
    if full:
        import diffusers
        import numpy as np

        with torch.device("meta"):
            model = getattr(diffusers, family.transformer_class)(**family.full_configs[arch])
        state = _model_state(family, arch, layout, model, dtype)
        return write_safetensors(path, state, dtype, np.random.default_rng(seed))
    model = build(family, arch, seed)
    if layout == "diffusers":
        return _write_folder(Path(path), family, arch, model, dtype, seed, shard_size)
    state = _model_state(family, arch, layout, model, dtype)
    if layout == "comfy":
        state.update(_comfy_extras(family, seed, dtype))
    return _write_one(path, state, dtype)
