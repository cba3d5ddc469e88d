"""SkyReels V2 in the diffusers host: Wan blocks, bent by the generic cross-attention path (cross.py) as Wan's are.
Its diffusion-forcing calls (enable_diffusion_forcing) give each latent frame its own timestep."""

from __future__ import annotations

import torch

SKYREELS_MODELS = ("SkyReelsV2Transformer3DModel",)
MIXED_STEPS = ("SkyReels V2's diffusion forcing denoises its frames at different steps in one model call, so an "
               "apply_to_timesteps window has no one step to count there (bend without a window)")


def check(module, entries, kwargs, t) -> None:
    """Refuse a step window where one call's frames are at different timesteps."""
    if (type(module).__name__ in SKYREELS_MODELS and kwargs.get("enable_diffusion_forcing")
            and any(e.apply_to_timesteps is not None for e in entries) and torch.as_tensor(t).unique().numel() > 1):
        raise ValueError(f"Attention Bending cannot bend this call: {MIXED_STEPS}")
