"""Synthetic Stable Diffusion checkpoints with the real key names and layouts real files use.

Every key comes from the real model classes (diffusers' `UNet2DConditionModel`,
`UNetSpatioTemporalConditionModel`, `AutoencoderKL`, `AutoencoderKLTemporalDecoder`; transformers'
`CLIPTextModel`, `CLIPTextModelWithProjection`): nothing here is a hand-written key list. The
original single-file ("LDM") names are produced by the diffusers → LDM renaming below, which
`tests/test_synth.py` checks against diffusers' own LDM → diffusers converters.

Two sizes:

- ``tiny``: small configs with the real *block structure* (same number of down/up blocks, resnets
  per block, attention positions, transformer depths > 1 where the real model has them), random
  weights; a single file is 1.2–1.5 MB in fp32 (SVD is the exception, ~10 MB: diffusers'
  spatio-temporal blocks hard-code 32 GroupNorm groups, so its channels cannot go below 32).
- ``full``: the real configs of SD 1.5, SD 2.1, SDXL base/refiner 1.0 and SVD, built on the
  ``meta`` device (no memory), written tensor by tensor with seeded random values (never zeros).

Architectures (``ARCHES``) and components (``build_models`` keys):

==============  ==========================================================================
sd1             unet, clip_l (CLIPTextModel), vae
sd2             unet (linear proj, cross dim = text width), clip_h (OpenCLIP ViT-H text tower as
                a CLIPTextModel, all layers), vae
sdxl            unet (text_time addition embedding, depth varies per level), clip_l,
                clip_g (CLIPTextModelWithProjection), vae
sdxl_refiner    unet, clip_g, vae
svd             unet (UNetSpatioTemporalConditionModel), vae (AutoencoderKLTemporalDecoder);
                no image encoder (SVD's OpenCLIP-H vision tower is not generated)
==============  ==========================================================================

Layouts (``LAYOUTS``): ``single`` (original LDM single file), ``diffusers`` (a pipeline folder,
optionally sharded), ``unet`` / ``unet_bare`` / ``unet_diffusers`` (UNet alone: LDM names with or
without ``model.diffusion_model.``, or diffusers names), ``text_encoder`` (one HF CLIP file, the
arch's diffusers ``text_encoder``, or ``text_encoder_2`` for the refiner) and
``text_encoder_openclip`` (one OpenCLIP text tower: CLIP-H for sd2, CLIP-G for SDXL).

SVD: diffusers has no single-file converter for SVD, so its LDM names cannot be checked against
diffusers. They are derived from generative-models (``sgm``) module definitions, see
``_unet_resnet_ldm`` / ``_unet_attention_ldm`` / ``_vae_resnet_ldm``.
"""

import importlib

from ..errors import CkptbendError
from .catalog import ARCHES, GGUF, LAYOUTS, generator_of

# Imported on first use (PEP 562), so that `ckptbend synth --help` and the catalog need no torch.
_EXPORTS = {
    "write_safetensors": "files", "write_weights": "files",
    "build_models": "sd", "ddpm_schedule_buffers": "sd", "layout_state_dict": "sd", "ldm_state_dict": "sd",
    "DIFFUSERS_TEXT": "sd_configs", "DTYPES": "sd_configs", "FULL_CONFIGS": "sd_configs",
    "SINGLE_FILE_TEXT": "sd_configs", "SIZES": "sd_configs", "TINY_CONFIGS": "sd_configs",
    "hf_clip_state_dict": "text_encoders", "openclip_state_dict": "text_encoders",
}


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    try:
        return importlib.import_module(f"{__name__}.{name}")   # a generator module: synth.sd, synth.files
    except ModuleNotFoundError:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None


def write_checkpoint(path, arch: str, layout: str = "single", size: str = "tiny", dtype=None,
                     seed: int = 0, shard_size=None):
    """Write a synthetic checkpoint of `arch` (any of `ARCHES`) in `layout` and return its path (the
    file, or the folder for ``diffusers``); the family's generator module (catalog.GENERATORS) does the
    work. `dtype` (a torch dtype) applies to floating tensors; None is float32."""
    module = generator_of(arch)
    if module is None:
        raise CkptbendError(f"unknown architecture {arch!r} (one of {', '.join(ARCHES)})")
    if layout not in LAYOUTS:
        raise CkptbendError(f"unknown layout {layout!r} (one of {', '.join(LAYOUTS)})")
    generator = importlib.import_module(f"{__name__}.{module}")
    if dtype in GGUF:
        return _write_gguf(generator, path, arch, layout, dtype, seed)
    return generator.write_checkpoint(path, arch, layout=layout, size=size, dtype=dtype, seed=seed,
                                      shard_size=shard_size)


def _write_gguf(generator, path, arch: str, layout: str, form: str, seed: int):
    """The model of `arch` as a GGUF file (synth/gguf.py): its single-file form, written in float32 beside the
    output and read back, then written in GGUF."""
    import tempfile
    from pathlib import Path

    from safetensors.torch import load_file

    from .gguf import write_model

    if layout != "single":
        raise CkptbendError(f"synth: {form} writes the GGUF file of the model alone; it has no layout {layout!r}")
    with tempfile.TemporaryDirectory(dir=Path(path).absolute().parent) as tmp:
        single = generator.write_checkpoint(Path(tmp) / "single.safetensors", arch, layout="single", size="tiny",
                                            dtype=None, seed=seed, shard_size=None)
        state = load_file(str(single))
    return write_model(path, state, form, arch, seed)
