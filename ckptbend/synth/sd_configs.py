"""Configs of the SD architectures' component models, as data: ``tiny`` (the real block structure at
small widths) and ``full`` (the released models' configs). Each component: (class name in diffusers or
transformers, constructor kwargs; for transformers classes the kwargs of CLIPTextConfig).
"""

from __future__ import annotations

import torch

from .catalog import GENERATORS

ARCHES, LAYOUTS = GENERATORS["sd"]
SIZES = ("tiny", "full")
DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float8_e4m3fn, torch.float8_e5m2)

LDM_UNET_PREFIX = "model.diffusion_model."
LDM_VAE_PREFIX = "first_stage_model."

_SD_DOWN = ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D")
_SD_UP = ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D")
_XL_DOWN = ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D")
_XL_UP = ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D")
_REFINER_DOWN = ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D")
_REFINER_UP = ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D")
_VAE_BLOCKS = {"down_block_types": ("DownEncoderBlock2D",) * 4, "up_block_types": ("UpDecoderBlock2D",) * 4}

# The tiny CLIP vocabulary is the synthetic tokenizer's: 256 byte symbols, the same with "</w>",
# then <|startoftext|> (512) and <|endoftext|> (513).
_TINY_VOCAB = 1000
_TINY_TOKENS = {"bos_token_id": 512, "eos_token_id": 513, "pad_token_id": 513}


def _tiny_clip(hidden, layers, act, projection):
    return {"vocab_size": _TINY_VOCAB, "hidden_size": hidden, "intermediate_size": 2 * hidden,
            "num_hidden_layers": layers, "num_attention_heads": 2, "max_position_embeddings": 77,
            "hidden_act": act, "projection_dim": projection, **_TINY_TOKENS}


_TINY_CLIP_L = ("CLIPTextModel", _tiny_clip(16, 2, "quick_gelu", 16))
_TINY_CLIP_G = ("CLIPTextModelWithProjection", _tiny_clip(32, 3, "gelu", 24))   # projection ≠ width on purpose
_TINY_VAE = ("AutoencoderKL", {"block_out_channels": (4, 8, 16, 16), "layers_per_block": 2, "norm_num_groups": 2,
                               "latent_channels": 4, "sample_size": 64, **_VAE_BLOCKS})
_TINY_UNET = {"sample_size": 8, "layers_per_block": 2, "norm_num_groups": 2}

TINY_CONFIGS = {
    "sd1": {
        "unet": ("UNet2DConditionModel", {**_TINY_UNET, "block_out_channels": (4, 8, 16, 16),
                                          "down_block_types": _SD_DOWN, "up_block_types": _SD_UP,
                                          "cross_attention_dim": 16, "attention_head_dim": 2}),
        "clip_l": _TINY_CLIP_L,
        "vae": _TINY_VAE,
    },
    "sd2": {
        "unet": ("UNet2DConditionModel", {**_TINY_UNET, "block_out_channels": (4, 8, 16, 16),
                                          "down_block_types": _SD_DOWN, "up_block_types": _SD_UP,
                                          "cross_attention_dim": 24, "attention_head_dim": (1, 2, 4, 4),
                                          "use_linear_projection": True}),
        "clip_h": ("CLIPTextModel", _tiny_clip(24, 3, "gelu", 24)),
        "vae": _TINY_VAE,
    },
    "sdxl": {
        "unet": ("UNet2DConditionModel", {**_TINY_UNET, "block_out_channels": (4, 8, 16),
                                          "down_block_types": _XL_DOWN, "up_block_types": _XL_UP,
                                          "transformer_layers_per_block": (1, 1, 2),
                                          "cross_attention_dim": 16 + 32, "attention_head_dim": (1, 2, 4),
                                          "use_linear_projection": True, "addition_embed_type": "text_time",
                                          "addition_time_embed_dim": 8,
                                          "projection_class_embeddings_input_dim": 6 * 8 + 24}),
        "clip_l": _TINY_CLIP_L,
        "clip_g": _TINY_CLIP_G,
        "vae": _TINY_VAE,
    },
    "sdxl_refiner": {
        "unet": ("UNet2DConditionModel", {**_TINY_UNET, "block_out_channels": (4, 8, 16, 16),
                                          "down_block_types": _REFINER_DOWN, "up_block_types": _REFINER_UP,
                                          "transformer_layers_per_block": 2,
                                          "cross_attention_dim": 32, "attention_head_dim": (1, 2, 4, 4),
                                          "use_linear_projection": True, "addition_embed_type": "text_time",
                                          "addition_time_embed_dim": 8,
                                          "projection_class_embeddings_input_dim": 5 * 8 + 24}),
        "clip_g": _TINY_CLIP_G,
        "vae": _TINY_VAE,
    },
    "svd": {
        # diffusers' spatio-temporal blocks hard-code GroupNorm(32 groups): 32 channels is the floor.
        "unet": ("UNetSpatioTemporalConditionModel", {"sample_size": 8, "in_channels": 8, "out_channels": 4,
                                                      "block_out_channels": (32, 32, 32, 32), "layers_per_block": 2,
                                                      "cross_attention_dim": 16, "num_attention_heads": (2, 2, 4, 4),
                                                      "addition_time_embed_dim": 8,
                                                      "projection_class_embeddings_input_dim": 3 * 8,
                                                      "num_frames": 4}),
        "vae": ("AutoencoderKLTemporalDecoder", {"block_out_channels": (32, 32, 32, 32), "layers_per_block": 2,
                                                 "latent_channels": 4, "sample_size": 64}),
    },
}

_CLIP_L = ("CLIPTextModel", {"vocab_size": 49408, "hidden_size": 768, "intermediate_size": 3072,
                             "num_hidden_layers": 12, "num_attention_heads": 12, "max_position_embeddings": 77,
                             "hidden_act": "quick_gelu", "projection_dim": 768,
                             "bos_token_id": 0, "eos_token_id": 2, "pad_token_id": 1})
_CLIP_G = ("CLIPTextModelWithProjection", {"vocab_size": 49408, "hidden_size": 1280, "intermediate_size": 5120,
                                           "num_hidden_layers": 32, "num_attention_heads": 20,
                                           "max_position_embeddings": 77, "hidden_act": "gelu", "projection_dim": 1280,
                                           "bos_token_id": 0, "eos_token_id": 2, "pad_token_id": 1})


def _vae(sample_size, scaling_factor, cls="AutoencoderKL"):
    kw = {"in_channels": 3, "out_channels": 3, "block_out_channels": (128, 256, 512, 512), "layers_per_block": 2,
          "latent_channels": 4, "sample_size": sample_size, "scaling_factor": scaling_factor}
    if cls == "AutoencoderKL":
        kw.update(norm_num_groups=32, **_VAE_BLOCKS)
    return (cls, kw)


_SD_UNET = {"layers_per_block": 2, "norm_num_groups": 32, "in_channels": 4, "out_channels": 4,
            "block_out_channels": (320, 640, 1280, 1280), "down_block_types": _SD_DOWN, "up_block_types": _SD_UP}

FULL_CONFIGS = {
    "sd1": {  # runwayml / stable-diffusion-v1-5
        "unet": ("UNet2DConditionModel", {**_SD_UNET, "sample_size": 64, "cross_attention_dim": 768,
                                          "attention_head_dim": 8}),
        "clip_l": _CLIP_L,
        "vae": _vae(512, 0.18215),
    },
    "sd2": {  # stabilityai / stable-diffusion-2-1 (768-v)
        "unet": ("UNet2DConditionModel", {**_SD_UNET, "sample_size": 96, "cross_attention_dim": 1024,
                                          "attention_head_dim": (5, 10, 20, 20), "use_linear_projection": True}),
        # OpenCLIP ViT-H/14 text tower, all 24 layers (the single file has them all; diffusers'
        # text_encoder keeps the first 23, see _diffusers_text_encoders).
        "clip_h": ("CLIPTextModel", {"vocab_size": 49408, "hidden_size": 1024, "intermediate_size": 4096,
                                     "num_hidden_layers": 24, "num_attention_heads": 16,
                                     "max_position_embeddings": 77, "hidden_act": "gelu", "projection_dim": 512,
                                     "bos_token_id": 0, "eos_token_id": 2, "pad_token_id": 1}),
        "vae": _vae(768, 0.18215),
    },
    "sdxl": {  # stabilityai / stable-diffusion-xl-base-1.0
        "unet": ("UNet2DConditionModel", {"sample_size": 128, "layers_per_block": 2, "norm_num_groups": 32,
                                          "block_out_channels": (320, 640, 1280), "down_block_types": _XL_DOWN,
                                          "up_block_types": _XL_UP, "transformer_layers_per_block": (1, 2, 10),
                                          "cross_attention_dim": 2048, "attention_head_dim": (5, 10, 20),
                                          "use_linear_projection": True, "addition_embed_type": "text_time",
                                          "addition_embed_type_num_heads": 64, "addition_time_embed_dim": 256,
                                          "projection_class_embeddings_input_dim": 2816}),
        "clip_l": _CLIP_L,
        "clip_g": _CLIP_G,
        "vae": _vae(1024, 0.13025),
    },
    "sdxl_refiner": {  # stabilityai / stable-diffusion-xl-refiner-1.0
        "unet": ("UNet2DConditionModel", {"sample_size": 128, "layers_per_block": 2, "norm_num_groups": 32,
                                          "block_out_channels": (384, 768, 1536, 1536),
                                          "down_block_types": _REFINER_DOWN, "up_block_types": _REFINER_UP,
                                          "transformer_layers_per_block": 4, "cross_attention_dim": 1280,
                                          "attention_head_dim": (6, 12, 24, 24), "use_linear_projection": True,
                                          "addition_embed_type": "text_time", "addition_time_embed_dim": 256,
                                          "projection_class_embeddings_input_dim": 2560}),
        "clip_g": _CLIP_G,
        "vae": _vae(1024, 0.13025),
    },
    "svd": {  # stabilityai / stable-video-diffusion-img2vid-xt
        "unet": ("UNetSpatioTemporalConditionModel", {"sample_size": 96, "in_channels": 8, "out_channels": 4,
                                                      "block_out_channels": (320, 640, 1280, 1280),
                                                      "layers_per_block": 2, "cross_attention_dim": 1024,
                                                      "num_attention_heads": (5, 10, 20, 20),
                                                      "transformer_layers_per_block": 1,
                                                      "addition_time_embed_dim": 256,
                                                      "projection_class_embeddings_input_dim": 768,
                                                      "num_frames": 25}),
        "vae": _vae(768, 0.18215, cls="AutoencoderKLTemporalDecoder"),
    },
}

# OpenCLIP text towers carry tensors the HF classes do not have: `logit_scale` (both) and, for SD 2's
# CLIP-H (a plain CLIPTextModel in diffusers), `text_projection` [width, embed_dim].
# Where each text encoder sits in a single file, and in which naming.
SINGLE_FILE_TEXT = {
    "sd1": {"clip_l": ("cond_stage_model.transformer.", "hf")},
    "sd2": {"clip_h": ("cond_stage_model.model.", "openclip")},
    "sdxl": {"clip_l": ("conditioner.embedders.0.transformer.", "hf"),
             "clip_g": ("conditioner.embedders.1.model.", "openclip")},
    "sdxl_refiner": {"clip_g": ("conditioner.embedders.0.model.", "openclip")},
    "svd": {},
}

# diffusers folder: sub-folder of each text encoder.
DIFFUSERS_TEXT = {
    "sd1": {"clip_l": "text_encoder"},
    "sd2": {"clip_h": "text_encoder"},
    "sdxl": {"clip_l": "text_encoder", "clip_g": "text_encoder_2"},
    "sdxl_refiner": {"clip_g": "text_encoder_2"},
    "svd": {},
}
