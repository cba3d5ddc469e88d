"""Synthetic SD 1.x / 2.x, SDXL and SVD checkpoints: build the real component models, then write them
in any layout (original single file, diffusers folder, UNet or text encoder alone)."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import torch

from ..errors import CkptbendError
from .files import write_safetensors, write_weights
from .sd_configs import (ARCHES, DIFFUSERS_TEXT, DTYPES, FULL_CONFIGS, LAYOUTS, LDM_UNET_PREFIX, LDM_VAE_PREFIX, SINGLE_FILE_TEXT,
                         SIZES, TINY_CONFIGS)
from .sd_names import unet_to_ldm, vae_to_ldm
from .text_encoders import OPENCLIP_COMPONENTS, position_ids, hf_clip_state_dict, openclip_extra, openclip_state_dict


def _check(arch, size="tiny", layout="single"):
    if arch not in ARCHES:
        raise CkptbendError(f"unknown architecture {arch!r} (one of {', '.join(ARCHES)})")
    if size not in SIZES:
        raise CkptbendError(f"unknown size {size!r} (one of {', '.join(SIZES)})")
    if layout not in LAYOUTS:
        raise CkptbendError(f"unknown layout {layout!r} (one of {', '.join(LAYOUTS)})")


def _component_class(name):
    import diffusers
    import transformers

    cls = getattr(diffusers, name, None) or getattr(transformers, name, None)
    if cls is None:
        raise CkptbendError(f"no model class {name!r} in diffusers or transformers")
    return cls


def _instantiate(class_name, kwargs):
    cls = _component_class(class_name)
    if class_name.startswith("CLIP"):
        from transformers import CLIPTextConfig

        return cls(CLIPTextConfig(**kwargs))
    return cls(**kwargs)


def build_models(arch: str, size: str = "tiny", seed: int = 0) -> dict[str, torch.nn.Module]:
    """The arch's component models: {"unet", text encoders ("clip_l" / "clip_h" / "clip_g"), "vae"}.

    ``tiny``: real modules with seeded random weights (every floating tensor is perturbed, so no
    tensor is all zeros or all ones). ``full``: real configs on the ``meta`` device (``seed`` is
    unused: values are drawn when the file is written).

    OpenCLIP towers (``clip_h``, ``clip_g``) carry an ``openclip_extra`` attribute: the tensors
    OpenCLIP files have and the HF class does not (``logit_scale``; ``text_projection`` for CLIP-H).
    """
    _check(arch, size)
    import diffusers  # noqa: F401  (import outside the RNG fork: first import may touch RNG state)
    import transformers  # noqa: F401

    configs = (TINY_CONFIGS if size == "tiny" else FULL_CONFIGS)[arch]
    models: dict[str, torch.nn.Module] = {}
    if size == "full":
        with torch.device("meta"):
            for name, (cls, kwargs) in configs.items():
                models[name] = _instantiate(cls, kwargs).eval()
        for name in OPENCLIP_COMPONENTS:
            if name in models:
                models[name].openclip_extra = openclip_extra(name, models[name], size, None)
        return models

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for name, (cls, kwargs) in configs.items():
            models[name] = _instantiate(cls, kwargs).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, model in models.items():
            for tensor in model.state_dict().values():
                if tensor.is_floating_point():
                    tensor.add_(torch.randn(tensor.shape, generator=g, dtype=tensor.dtype) * 0.02)
            if name in OPENCLIP_COMPONENTS:
                model.openclip_extra = openclip_extra(name, model, size, g)
    return models


def ddpm_schedule_buffers(steps=1000, beta_start=0.00085, beta_end=0.012) -> dict:
    """The 12 schedule buffers ldm's LatentDiffusion registers (``register_schedule``, scaled-linear
    betas, v_posterior 0), saved at the top level of SD 1.x / 2.x single files. Real values, float32."""
    betas = torch.linspace(beta_start ** 0.5, beta_end ** 0.5, steps, dtype=torch.float64) ** 2
    alphas = 1.0 - betas
    ac = torch.cumprod(alphas, 0)
    ac_prev = torch.cat([torch.ones(1, dtype=torch.float64), ac[:-1]])
    posterior_variance = betas * (1.0 - ac_prev) / (1.0 - ac)
    buffers = {
        "betas": betas, "alphas_cumprod": ac, "alphas_cumprod_prev": ac_prev,
        "sqrt_alphas_cumprod": ac.sqrt(), "sqrt_one_minus_alphas_cumprod": (1.0 - ac).sqrt(),
        "log_one_minus_alphas_cumprod": (1.0 - ac).log(), "sqrt_recip_alphas_cumprod": (1.0 / ac).sqrt(),
        "sqrt_recipm1_alphas_cumprod": (1.0 / ac - 1).sqrt(), "posterior_variance": posterior_variance,
        "posterior_log_variance_clipped": posterior_variance.clamp(min=1e-20).log(),
        "posterior_mean_coef1": betas * ac_prev.sqrt() / (1.0 - ac),
        "posterior_mean_coef2": (1.0 - ac_prev) * alphas.sqrt() / (1.0 - ac),
    }
    return {k: v.float() for k, v in buffers.items()}


def text_encoder_ldm(arch: str, name: str, model) -> dict:
    """One text encoder's single-file tensors, with the arch's prefix."""
    prefix, naming = SINGLE_FILE_TEXT[arch][name]
    if naming == "openclip":
        return {prefix + k: v for k, v in openclip_state_dict(model).items()}
    state = {prefix + k: v for k, v in hf_clip_state_dict(model).items()}
    # int64 [1, 77]: a persistent buffer in the transformers versions real files were saved with.
    state[prefix + "text_model.embeddings.position_ids"] = position_ids(model)
    return state


def ldm_state_dict(arch: str, models) -> dict[str, torch.Tensor]:
    """The full original single-file state dict: every key → tensor (meta tensors for ``full`` models;
    integer buffers and the DDPM schedule are always real)."""
    _check(arch)
    out = {LDM_UNET_PREFIX + k: v for k, v in unet_to_ldm(models["unet"].state_dict(), models["unet"].config).items()}
    for name in SINGLE_FILE_TEXT[arch]:
        out.update(text_encoder_ldm(arch, name, models[name]))
    vae = vae_to_ldm(models["vae"].state_dict(), models["vae"].config)
    if arch == "svd":
        # SVD's first stage is sgm's AutoencodingEngine (Encoder + VideoDecoder + a regularizer), which
        # has no quant_conv / post_quant_conv; diffusers' AutoencoderKLTemporalDecoder has a quant_conv.
        vae = {k: v for k, v in vae.items() if not k.startswith("quant_conv.")}
    out.update({LDM_VAE_PREFIX + k: v for k, v in vae.items()})
    if arch in ("sd1", "sd2"):
        out.update(ddpm_schedule_buffers())
    return out


_PIPELINES = {
    "sd1": ("StableDiffusionPipeline", "PNDMScheduler", {"requires_safety_checker": False}),
    "sd2": ("StableDiffusionPipeline", "DDIMScheduler", {"requires_safety_checker": False}),
    "sdxl": ("StableDiffusionXLPipeline", "EulerDiscreteScheduler", {"force_zeros_for_empty_prompt": True}),
    "sdxl_refiner": ("StableDiffusionXLImg2ImgPipeline", "EulerDiscreteScheduler",
                     {"force_zeros_for_empty_prompt": False, "requires_aesthetics_score": True}),
    "svd": ("StableVideoDiffusionPipeline", "EulerDiscreteScheduler", {}),
}
_SCHEDULERS = {
    "sd1": {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear", "set_alpha_to_one": False,
            "skip_prk_steps": True, "steps_offset": 1},
    "sd2": {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear", "clip_sample": False,
            "set_alpha_to_one": False, "steps_offset": 1, "prediction_type": "v_prediction"},
    "sdxl": {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear", "steps_offset": 1,
             "timestep_spacing": "leading"},
    "svd": {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
            "prediction_type": "v_prediction", "use_karras_sigmas": True, "sigma_min": 0.002, "sigma_max": 700.0,
            "timestep_type": "continuous", "timestep_spacing": "leading", "steps_offset": 1},
}
_SCHEDULERS["sdxl_refiner"] = _SCHEDULERS["sdxl"]


def _diffusers_text_encoders(arch, models):
    """sub-folder → (model class name, config, HF-named tensors). SD 2's text_encoder is CLIP-H
    without its last layer (SD 2 conditions on the penultimate layer; diffusers' config has 23)."""
    out = {}
    for name, sub in DIFFUSERS_TEXT[arch].items():
        model = models[name]
        config = copy.deepcopy(model.config)
        state = hf_clip_state_dict(model)
        if arch == "sd2":
            last = config.num_hidden_layers - 1
            state = {k: v for k, v in state.items() if not k.startswith(f"text_model.encoder.layers.{last}.")}
            config.num_hidden_layers = last
        config.architectures = [type(model).__name__]
        out[sub] = (type(model).__name__, config, state)
    return out


def _tokenizer(folder: Path):
    """A tiny byte-level CLIP tokenizer (512 byte symbols + specials, no merges): real files use the
    49408-token CLIP vocabulary, which is not available offline."""
    from transformers import CLIPTokenizer

    symbols = [chr(c) for c in range(33, 127)] + [chr(c) for c in range(161, 173)] + [chr(c) for c in range(174, 256)]
    symbols += [chr(256 + i) for i in range(256 - len(symbols))]   # GPT-2's byte → unicode table
    vocab = {s: i for i, s in enumerate(symbols)}
    vocab.update({s + "</w>": i + 256 for i, s in enumerate(symbols)})
    vocab.update({"<|startoftext|>": 512, "<|endoftext|>": 513})
    CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77).save_pretrained(folder)


def _cast_copy(model, dtype):
    model = copy.deepcopy(model)
    with torch.no_grad():
        for t in list(model.parameters()) + list(model.buffers()):
            if t.is_floating_point():
                t.data = t.data.to(dtype)
    return model


def _write_diffusers(root: Path, arch, models, size, dtype, generator, shard_size):
    import diffusers

    root.mkdir(parents=True, exist_ok=True)
    pipeline, scheduler, extra = _PIPELINES[arch]
    index = {"_class_name": pipeline, "_diffusers_version": diffusers.__version__, **extra,
             "feature_extractor": [None, None], "image_encoder": [None, None]}   # SVD's: not generated
    if arch in ("sd1", "sd2"):
        index["safety_checker"] = [None, None]

    for sub in ("unet", "vae"):
        model = models[sub]
        index[sub] = ["diffusers", type(model).__name__]
        if size == "tiny":   # the model's own writer
            kwargs = {"max_shard_size": shard_size} if shard_size is not None else {}
            _cast_copy(model, dtype).save_pretrained(root / sub, safe_serialization=True, **kwargs)
        else:
            model.save_config(root / sub)
            write_weights(root / sub, "diffusion_pytorch_model", model.state_dict(), dtype, generator, shard_size)

    texts = _diffusers_text_encoders(arch, models)
    if arch == "sdxl_refiner":
        index.update(text_encoder=[None, None], tokenizer=[None, None])
    for sub, (cls, config, state) in texts.items():
        index[sub] = ["transformers", cls]
        index[sub.replace("text_encoder", "tokenizer")] = ["transformers", "CLIPTokenizer"]
        config.dtype = dtype
        (root / sub).mkdir(parents=True, exist_ok=True)
        config.save_pretrained(root / sub)
        write_weights(root / sub, "model", state, dtype, generator, shard_size, total_parameters=True)
        _tokenizer(root / sub.replace("text_encoder", "tokenizer"))

    getattr(diffusers, scheduler)(**_SCHEDULERS[arch]).save_config(root / "scheduler")
    index["scheduler"] = ["diffusers", scheduler]
    (root / "model_index.json").write_text(json.dumps(dict(sorted(index.items())), indent=2) + "\n")
    return root


# ------------------------------------------------------------------------------------------------
# entry point
# ------------------------------------------------------------------------------------------------

def layout_state_dict(arch: str, layout: str, models) -> dict[str, torch.Tensor]:
    """The tensors of a one-file layout (everything but ``diffusers``)."""
    _check(arch, layout=layout)
    if layout == "single":
        return ldm_state_dict(arch, models)
    if layout in ("unet", "unet_bare"):
        state = unet_to_ldm(models["unet"].state_dict(), models["unet"].config)
        prefix = LDM_UNET_PREFIX if layout == "unet" else ""
        return {prefix + k: v for k, v in state.items()}
    if layout == "unet_diffusers":
        return dict(models["unet"].state_dict())
    if layout == "text_encoder":
        texts = _diffusers_text_encoders(arch, models)
        if not texts:
            raise CkptbendError(f"synth: {arch} has no text encoder")
        return texts["text_encoder" if "text_encoder" in texts else "text_encoder_2"][2]
    if layout == "text_encoder_openclip":
        names = [n for n in SINGLE_FILE_TEXT[arch] if SINGLE_FILE_TEXT[arch][n][1] == "openclip"]
        if not names:
            raise CkptbendError(f"synth: {arch} has no OpenCLIP text encoder")
        return openclip_state_dict(models[names[0]])
    raise CkptbendError(f"synth: layout {layout!r} is not a single file")


def write_checkpoint(path, arch: str, layout: str = "single", size: str = "tiny", dtype=torch.float32,
                     seed: int = 0, shard_size=None) -> Path:
    """Write a synthetic checkpoint and return its path (a file, or the folder for ``diffusers``).

    ``dtype`` applies to floating tensors (fp32, fp16, bf16, fp8 e4m3fn / e5m2); integer buffers keep
    theirs. Deterministic for a given seed. ``shard_size`` (e.g. "20KB") shards the weights of a
    ``diffusers`` folder, with ``*.safetensors.index.json``.
    """
    _check(arch, size, layout)
    dtype = torch.float32 if dtype is None else dtype
    if dtype not in DTYPES:
        raise CkptbendError(f"synth: unsupported dtype {dtype}")
    if shard_size is not None and layout != "diffusers":
        raise CkptbendError("synth: shard_size applies to the diffusers layout only")
    path = Path(path)
    models = build_models(arch, size, seed)
    generator = np.random.default_rng(seed)   # values of meta (full-size) tensors
    if layout == "diffusers":
        return _write_diffusers(path, arch, models, size, dtype, generator, shard_size)
    return write_safetensors(path, layout_state_dict(arch, layout, models), dtype, generator)
