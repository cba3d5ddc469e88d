"""Tiny Anima checkpoints: the tiny Cosmos Predict2 transformer (synth/cosmos.py) with its text adapter under
`llm_adapter.`, as ComfyUI's Anima file holds it (diffusers' `AnimaTextConditioner` has the same names). Only the
single-file layouts: diffusers keeps the adapter in a separate model, so an Anima diffusers transformer is a plain
Cosmos one."""

from __future__ import annotations

import dataclasses

import torch

from ..errors import CkptbendError
from . import cosmos, dit

ARCHES = ("anima",)
LAYOUTS = ("single", "single_prefixed", "comfy")
ADAPTER = dict(source_dim=24, target_dim=24, model_dim=32, num_layers=1, num_attention_heads=2, target_vocab_size=16)


def adapter(seed: int = 0):
    from diffusers import AnimaTextConditioner

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + 5)
        model = AnimaTextConditioner(**ADAPTER).eval()
    dit.randomise(model, torch.Generator().manual_seed(seed + 6))
    return model


def _to_original(sd: dict) -> dict:
    return {**cosmos.to_original(sd), **{f"llm_adapter.{k}": v for k, v in adapter().state_dict().items()}}


FAMILY = dataclasses.replace(cosmos.FAMILY, configs={"anima": cosmos.CONFIGS["cosmos_predict2"]},
                             to_original=_to_original)


def write_checkpoint(path, arch, layout="single", size="tiny", dtype=None, seed=0, shard_size=None):
    if layout not in LAYOUTS:
        raise CkptbendError(f"synth: anima has no layout {layout!r} (one of {', '.join(LAYOUTS)})")
    return dit.write_checkpoint(FAMILY, path, arch, layout, size, dtype, seed, shard_size)
