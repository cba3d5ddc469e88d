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

from .files import write_safetensors, write_weights  # noqa: F401
from .sd import build_models, ddpm_schedule_buffers, layout_state_dict, ldm_state_dict, write_checkpoint  # noqa: F401
from .sd_configs import (ARCHES, DIFFUSERS_TEXT, DTYPES, FULL_CONFIGS, LAYOUTS, SINGLE_FILE_TEXT, SIZES,  # noqa: F401
                         TINY_CONFIGS)
from .text_encoders import hf_clip_state_dict, openclip_state_dict  # noqa: F401
