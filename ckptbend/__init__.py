"""ckptbend: bake attention multipliers into diffusion-model checkpoints."""

__version__ = "0.1.0"
