"""MiniMax H3 (audio-video DiT; diffusers `MiniMaxH3Transformer3DModel`, ComfyUI `minimax_h3`), as data.

Every block `blocks.{i}` (diffusers `transformer_blocks.{i}`) runs ONE self-attention over a packed sequence of
text, video and audio rows with one weight set (there is no cross-attention anywhere in H3): like Flux's single
blocks it is `[dit.joint]` selected without `stream`, label B{i:02d}. q and k are normalised per head (`q_norm` /
`k_norm`, one weight of the head width for every head: uniform factors), so q/k scale those weights; v scales the v
rows of the fused `qkv_proj` — rows [2h, 3h) of the `[q; k; v]` stack every published single file holds (diffusers'
converter: MiniMaxAI's shards interleave the rows per head instead, which no file says; ckptbend reads the stack) —
and out `out_proj` (diffusers `to_v`, `to_out.0`). No projection has a bias. The text token refiner
(`token_refiner.blocks`, self-attention over the text before the blocks) is left alone.
"""

from __future__ import annotations

import re

from .types import CheckpointFile, Identified, Site
from .dit_files import dit_tensor_names, identify_prefixed, prefix_by_marks, scan
from .validate import shape_in

COMPONENTS = ("dit",)
NAME = "MiniMax H3"
ORIGINAL_KEYS = ("video_patch_proj.weight", "audio_patch_proj.weight")          # ComfyUI's detection keys
DIFFUSERS_KEYS = ("audio_proj_in.weight", "transformer_blocks.0.adaln_proj.linear.weight")
ATTENTION = re.compile(r"^(?:transformer_)?blocks\.(?P<i>\d+)\.attn\."
                       r"(?P<t>q_norm|k_norm|norm_q|norm_k|qkv_proj|to_v|out_proj|to_out\.0)\.weight$")
PROJ = {"q_norm": "q", "norm_q": "q", "k_norm": "k", "norm_k": "k", "qkv_proj": "v", "to_v": "v",
        "out_proj": "out", "to_out.0": "out"}
_PARTS = ("norm1", "norm2", "attn", "mlp", "ff", "adaln_proj")
BLOCKS = {"blocks": _PARTS, "transformer_blocks": _PARTS}
# A VSA-trained file's `to_gate_compress` (a gated sparse-attention branch, not in diffusers) is refused, unread.
_ATTENTION = ("qkv_proj", "q_norm", "k_norm", "out_proj", "to_q", "to_k", "to_v", "norm_q", "norm_k", "to_out")
PARTS = {"attn": _ATTENTION}
ARCHITECTURE = "minimax-h3"
ARCHITECTURE_NAMES = {ARCHITECTURE: (ARCHITECTURE,)}
DIFFUSERS_PIPELINES: dict = {}
TRANSFORMER_CLASS = "MiniMaxH3Transformer3DModel"
NOT_REACHED = (("token_refiner", "MiniMax H3's text token refiner (self-attention over the text)"),)


def _found(names) -> str | None:
    return prefix_by_marks(names, ORIGINAL_KEYS, DIFFUSERS_KEYS)


def identify(header) -> Identified | None:
    return identify_prefixed(header, _found, NAME, BLOCKS, PARTS, ARCHITECTURE)


def sites(cf: CheckpointFile, files) -> list[Site]:
    found = []
    for t, m in scan(cf, _found(dit_tensor_names(files)), ATTENTION):
        rows = fused = None
        if m["t"] == "qkv_proj":       # [q; k; v]: h = a third of the rows (the inner width, not the model's)
            shape = shape_in(files, cf.rel, t.name)
            h = shape[0] // 3 if shape and len(shape) == 2 else 0
            rows, fused = (2 * h, 3 * h), 3 * h
        found.append(Site(cf.rel, t.name, "dit", "joint", PROJ[m["t"]], rows=rows, fused=fused,
                          block=f"B{int(m['i']):02d}"))
    return found


def folder_architecture(model_class: str, present: set[str], config: dict | None = None) -> str | None:
    return ARCHITECTURE if model_class == TRANSFORMER_CLASS else None


def has_qk_norm(files) -> bool:
    return False   # no unet.* sites: q/k factors of [dit.joint] scale the qk-norm weights themselves
