"""Synthetic Flux.1-dev / -schnell, Chroma and HunyuanVideo checkpoints, built from the real diffusers
classes (`FluxTransformer2DModel`, `ChromaTransformer2DModel`, `HunyuanVideoTransformer3DModel`) and
written in the file forms ckptbend reads. Original names come from `flux_names` (the inverse of diffusers'
single-file converters; tests/test_dit_flux.py runs the converters on them).

Layouts:

=====================  =================================================================================
single                 the transformer alone, original names, no prefix (BFL's / Tencent's own files)
comfy                  ComfyUI all-in-one: the model under ``model.diffusion_model.`` (HunyuanVideo:
                       ``model.model.`` in ComfyUI's Flux-style names), text encoders under
                       ``text_encoders.<name>.transformer.`` (Chroma: ``cond_stage_model.``), Flux's VAE
                       under ``vae.`` (Chroma: ``first_stage_model.``; HunyuanVideo's video VAE is not made)
transformer_diffusers  the transformer alone in diffusers names, one file
diffusers              a pipeline folder: model_index.json, transformer/, text_encoder(_2)/, vae/ (Flux, Chroma)
=====================  =================================================================================

ComfyUI's quantised forms (``dtype`` one of catalog.QUANTISED: scaled_fp8, fp8mixed, int8, int8_convrot,
nvfp4; synth/quantised.py) are written in the ``single`` and ``comfy`` layouts, as for the other DiTs.

Sizes: ``tiny`` (h 32 = 2 heads × 16, 2 double + 2 single blocks, tiny CLIP-L / T5 / Llama) and ``full``
(the released transformer config on the meta device, values drawn while writing; ``single`` only).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from ..errors import CkptbendError

from .catalog import GENERATORS, QUANTISED
from .files import write_safetensors, write_weights
from .flux_names import comfy_hunyuan_name, flux_to_original, hunyuan_to_original, radiance_head
from .quantised import quantise
from .text_encoders import hf_clip_state_dict

ARCHES, LAYOUTS = GENERATORS["flux"]
SIZES = ("tiny", "full")
H = 32
_TINY_FLUX = dict(in_channels=16, num_layers=2, num_single_layers=2, attention_head_dim=16, num_attention_heads=2,
                  joint_attention_dim=24, pooled_projection_dim=20, axes_dims_rope=(4, 6, 6))
CONFIGS = {   # arch → (diffusers class, tiny kwargs, full kwargs)
    "flux_dev": ("FluxTransformer2DModel", {**_TINY_FLUX, "guidance_embeds": True},
                 {"in_channels": 64, "guidance_embeds": True}),
    "flux_schnell": ("FluxTransformer2DModel", {**_TINY_FLUX, "guidance_embeds": False}, {"in_channels": 64}),
    "chroma": ("ChromaTransformer2DModel",
               {k: v for k, v in _TINY_FLUX.items() if k != "pooled_projection_dim"}
               | {"approximator_num_channels": 16, "approximator_hidden_dim": H, "approximator_layers": 2}, {}),
    "chroma_radiance": ("ChromaTransformer2DModel",   # Chroma's blocks; the pixel-space head: flux_names.radiance_head
                        {k: v for k, v in _TINY_FLUX.items() if k != "pooled_projection_dim"}
                        | {"approximator_num_channels": 16, "approximator_hidden_dim": H, "approximator_layers": 2}, {}),
    "hunyuan_video": ("HunyuanVideoTransformer3DModel",
                      dict(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=16, num_layers=2,
                           num_single_layers=2, num_refiner_layers=1, patch_size=2, patch_size_t=1, text_embed_dim=24,
                           pooled_projection_dim=20, rope_axes_dim=(4, 6, 6)), {}),
}
# Text encoders per arch: component → (ComfyUI name, diffusers sub-folder)
TEXT = {"flux_dev": {"clip_l": "text_encoder", "t5xxl": "text_encoder_2"},
        "flux_schnell": {"clip_l": "text_encoder", "t5xxl": "text_encoder_2"},
        "chroma": {"t5xxl": "text_encoder"}, "chroma_radiance": {"t5xxl": "text_encoder"},
        "hunyuan_video": {"llama": "text_encoder", "clip_l": "text_encoder_2"}}
PIPELINES = {"flux_dev": "FluxPipeline", "flux_schnell": "FluxPipeline", "chroma": "ChromaPipeline",
             "hunyuan_video": "HunyuanVideoPipeline"}
COMFY_MODEL_PREFIX = {"hunyuan_video": "model.model."}
COMFY_TEXT_PREFIX = {"chroma": "cond_stage_model.", "chroma_radiance": "cond_stage_model."}
NO_DIFFUSERS = ("chroma_radiance",)   # no diffusers class: original names only
COMFY_VAE_PREFIX = {"chroma": "first_stage_model.", "flux_dev": "vae.", "flux_schnell": "vae."}
_TINY_TEXT = dict(vocab_size=64, bos_token_id=0, eos_token_id=1, pad_token_id=1, hidden_size=H, intermediate_size=64, num_attention_heads=2, num_hidden_layers=2)
_TINY_VAE = dict(block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=2, latent_channels=16,
                 down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2)


def _randomize(model, seed):
    """Every parameter random; norm weights positive around 1, so a scaled norm weight is visible."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1 and "norm" in name and name.endswith(("weight", "scale")):
                p.copy_(0.5 + torch.rand(p.shape, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g) * (0.3 if p.ndim > 1 else 0.1))
    return model


def build_transformer(arch: str, size: str = "tiny", seed: int = 0):
    """The arch's diffusers transformer: tiny with seeded random weights, or full size on the meta device."""
    import diffusers

    cls_name, tiny, full = CONFIGS[arch]
    cls = getattr(diffusers, cls_name)
    if size == "full":
        with torch.device("meta"):
            return cls(**full).eval()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = cls(**tiny).eval()
    return _randomize(model, seed + 1)


def to_original(arch: str, state: dict) -> dict:
    """diffusers state dict → the original file's names (BFL for Flux/Chroma, Tencent for HunyuanVideo; Chroma
    Radiance: Chroma's blocks with its pixel-space head in place of `img_in` / `final_layer`)."""
    if arch == "chroma_radiance":
        return radiance_head(flux_to_original(state))
    return hunyuan_to_original(state) if arch == "hunyuan_video" else flux_to_original(state)


def build_text_encoders(arch: str, seed: int = 0) -> dict:
    """Tiny real text encoders of the arch: component → (model, names as released files have them)."""
    import transformers as T

    out = {}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + 7)
        for name in TEXT[arch]:
            if name == "clip_l":
                m = T.CLIPTextModel(T.CLIPTextConfig(max_position_embeddings=16, **_TINY_TEXT))
                state = hf_clip_state_dict(m)
            elif name == "t5xxl":
                m = T.T5EncoderModel(T.T5Config(vocab_size=64, d_model=H, d_kv=16, d_ff=64, num_layers=2, num_heads=2,
                                                feed_forward_proj="gated-gelu"))
                state = dict(m.state_dict())
            else:   # llama: the decoder's layers, as LlamaModel (diffusers) / `model.` (ComfyUI) hold them
                m = T.LlamaModel(T.LlamaConfig(num_key_value_heads=1, **_TINY_TEXT))
                state = dict(m.state_dict())
            out[name] = (m.eval(), state)
        g = torch.Generator().manual_seed(seed + 8)
        with torch.no_grad():   # perturb every tensor: no all-zero biases or all-one norms
            for model, state in out.values():
                for t in model.state_dict().values():
                    if t.is_floating_point():
                        t.add_(torch.randn(t.shape, generator=g) * 0.02)
    return {name: (model, {k: v.detach().clone() for k, v in state.items()}) for name, (model, state) in out.items()}


def build_vae(seed: int = 0):
    import diffusers

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + 11)
        return diffusers.AutoencoderKL(**_TINY_VAE).eval()


def _comfy_state(arch: str, transformer, seed: int) -> dict:
    from .sd_names import vae_to_ldm

    original = to_original(arch, transformer.state_dict())
    prefix = COMFY_MODEL_PREFIX.get(arch, "model.diffusion_model.")
    rename = comfy_hunyuan_name if arch == "hunyuan_video" else (lambda k: k)
    out = {prefix + rename(k): v for k, v in original.items()}
    text = COMFY_TEXT_PREFIX.get(arch, "text_encoders.")
    for name, (_, state) in build_text_encoders(arch, seed).items():
        inner = "model." if name == "llama" else ""
        out.update({f"{text}{name}.transformer.{inner}{k}": v for k, v in state.items()})
    if arch in COMFY_VAE_PREFIX:
        vae = build_vae(seed)
        out.update({COMFY_VAE_PREFIX[arch] + k: v for k, v in vae_to_ldm(vae.state_dict(), vae.config).items()})
    return out


def layout_state_dict(arch: str, layout: str, transformer, seed: int = 0, dtype=torch.float32) -> dict:
    """The tensors of a one-file layout."""
    if layout == "single":
        return to_original(arch, transformer.state_dict())
    if layout == "transformer_diffusers":
        return dict(transformer.state_dict())
    if layout == "comfy":
        return _comfy_state(arch, transformer, seed)
    raise CkptbendError(f"synth: layout {layout!r} is not a single file")


def _write_diffusers(root: Path, arch: str, transformer, dtype, seed: int) -> Path:
    import diffusers

    root.mkdir(parents=True, exist_ok=True)
    index = {"_class_name": PIPELINES[arch], "_diffusers_version": diffusers.__version__}
    transformer.to(dtype).save_pretrained(root / "transformer", safe_serialization=True)
    index["transformer"] = ["diffusers", type(transformer).__name__]
    for name, (model, state) in build_text_encoders(arch, seed).items():
        sub = TEXT[arch][name]
        model.config.dtype = dtype
        model.config.architectures = [type(model).__name__]
        model.config.save_pretrained(root / sub)
        write_weights(root / sub, "model", state, dtype, None, None)
        index[sub] = ["transformers", type(model).__name__]
        index[sub.replace("text_encoder", "tokenizer")] = [None, None]
    if arch != "hunyuan_video":
        build_vae(seed).to(dtype).save_pretrained(root / "vae", safe_serialization=True)
        index["vae"] = ["diffusers", "AutoencoderKL"]
    diffusers.FlowMatchEulerDiscreteScheduler().save_config(root / "scheduler")
    index["scheduler"] = ["diffusers", "FlowMatchEulerDiscreteScheduler"]
    (root / "model_index.json").write_text(json.dumps(dict(sorted(index.items())), indent=2) + "\n")
    return root


def write_checkpoint(path, arch: str, layout: str = "single", size: str = "tiny", dtype=torch.float32,
                     seed: int = 0, shard_size=None) -> Path:
    """Write a synthetic checkpoint of `arch` in `layout` and return its path."""
    if arch not in ARCHES:
        raise CkptbendError(f"unknown architecture {arch!r} (one of {', '.join(ARCHES)})")
    form = dtype if dtype in QUANTISED else None
    if form and (layout not in ("single", "comfy") or size != "tiny"):
        raise CkptbendError(f"synth: {form} is a ComfyUI single-file form, tiny only; use --layout single or comfy")
    if layout not in LAYOUTS:
        raise CkptbendError(f"synth: {arch} has no layout {layout!r} (one of {', '.join(LAYOUTS)})")
    if size not in SIZES or (size == "full" and layout != "single"):
        raise CkptbendError(f"synth: {arch} at size {size!r} is written in the single layout only")
    if shard_size is not None:
        raise CkptbendError("synth: shard_size is not supported for this architecture")
    if arch in NO_DIFFUSERS and layout in ("transformer_diffusers", "diffusers"):
        raise CkptbendError(f"synth: {arch} has no diffusers class, so no {layout} layout (use single or comfy)")
    dtype = torch.float32 if dtype is None or form else dtype
    path = Path(path)
    transformer = build_transformer(arch, size, seed)
    if layout == "diffusers":
        return _write_diffusers(path, arch, transformer, dtype, seed)
    state = layout_state_dict(arch, layout, transformer, seed, dtype)
    if form:
        prefix = COMFY_MODEL_PREFIX.get(arch, "model.diffusion_model.") if layout == "comfy" else ""
        return write_safetensors(path, quantise(state, prefix, form), None)
    generator = np.random.default_rng(seed)   # values of meta (full-size) tensors
    return write_safetensors(path, state, dtype, generator)
