"""Mochi 1 (`MochiTransformer3DModel`; ComfyUI `mochi_preview`), as data.

An asymmetric MMDiT: every block `blocks.{i}` (diffusers `transformer_blocks.{i}`) projects the video tokens
(`attn.qkv_x`, rows q | k | v; diffusers `attn1.to_q/to_k/to_v`) and the text tokens (`attn.qkv_y`, of the narrower
text width; diffusers `add_{q,k,v}_proj`) with their own weights and attends over both → `[dit.joint]` with streams
image / text, label B{i:02d}. q and k are normalised per head (`q_norm_x` / `k_norm_x` / `q_norm_y` / `k_norm_y`,
diffusers `norm_q` / `norm_k` / `norm_added_q` / `norm_added_k`: one plain weight of the head width for every head),
so q/k scale those weights; v the v rows of the fused projection (rows [2h, 3h), h = a third of its rows: the inner
width, not the text width), out `proj_x` / `proj_y` (`to_out.0` / `to_add_out`), weight and bias.

Structurally dead: the last block's text stream is "pre-only" (no `proj_y`: its attention output is dropped), so its
q cannot act; its k and v still feed the video tokens.

Names: the original (Genmo) / ComfyUI file bare or under `model.diffusion_model.`, as diffusers'
`convert_mochi_transformer_checkpoint_to_diffusers` reads them; diffusers names in one file; diffusers folders.
"""

from __future__ import annotations

import re

from .types import CheckpointFile, Identified, Site
from .dit_files import dit_tensor_names, identify_prefixed, prefix_by_marks, scan
from .validate import shape_in

COMPONENTS = ("dit",)
NAME = "Mochi"
ORIGINAL_KEYS = ("t5_yproj.weight", "blocks.0.attn.qkv_x.weight")            # ComfyUI's and diffusers' sniffer keys
DIFFUSERS_KEYS = ("time_embed.caption_proj.weight", "transformer_blocks.0.attn1.add_q_proj.weight")
ATTENTION = re.compile(r"^(?:transformer_)?blocks\.(?P<i>\d+)\.(?:attn|attn1)\.(?P<t>qkv_[xy]|[qk]_norm_[xy]|proj_[xy]|"
                       r"norm_[qk]|norm_added_[qk]|to_v|add_v_proj|to_out\.0|to_add_out)\.(?P<wb>weight|bias)$")
MODULES = {"qkv_x": ("image", "v"), "qkv_y": ("text", "v"), "q_norm_x": ("image", "q"), "k_norm_x": ("image", "k"),
           "q_norm_y": ("text", "q"), "k_norm_y": ("text", "k"), "proj_x": ("image", "out"), "proj_y": ("text", "out"),
           "norm_q": ("image", "q"), "norm_k": ("image", "k"), "norm_added_q": ("text", "q"),
           "norm_added_k": ("text", "k"), "to_v": ("image", "v"), "add_v_proj": ("text", "v"),
           "to_out.0": ("image", "out"), "to_add_out": ("text", "out")}
TEXT_OUT = ("proj_y", "to_add_out")
_ATTENTION = ("qkv_x", "qkv_y", "q_norm_x", "k_norm_x", "q_norm_y", "k_norm_y", "proj_x", "proj_y", "to_q", "to_k",
              "to_v", "to_out", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out", "norm_q", "norm_k",
              "norm_added_q", "norm_added_k")
BLOCKS = {"blocks": ("mod_x", "mod_y", "attn", "mlp_x", "mlp_y"),
          "transformer_blocks": ("norm1", "norm1_context", "attn1", "ff", "ff_context")}
PARTS = {"attn": _ATTENTION, "attn1": _ATTENTION}
PRE_ONLY = ("the last block's text stream is pre-only: its attention output is dropped, so its q cannot act "
            "(its k and v do)")
ARCHITECTURE = "mochi"
ARCHITECTURE_NAMES = {ARCHITECTURE: (ARCHITECTURE,)}
DIFFUSERS_PIPELINES: dict = {}   # MochiPipeline folders are read sub-folder by sub-folder
TRANSFORMER_CLASS = "MochiTransformer3DModel"


def _found(names) -> str | None:
    return prefix_by_marks(names, ORIGINAL_KEYS, DIFFUSERS_KEYS)


def identify(header) -> Identified | None:
    return identify_prefixed(header, _found, NAME, BLOCKS, PARTS, ARCHITECTURE)


def sites(cf: CheckpointFile, files) -> list[Site]:
    names = dit_tensor_names(files)
    found = []
    for t, m in scan(cf, _found(names), ATTENTION):
        stream, proj = MODULES[m["t"]]
        rows = fused = None
        if m["t"].startswith("qkv_"):              # [q; k; v]: a third of the rows each
            shape = shape_in(files, cf.rel, t.name)
            h = shape[0] // 3 if shape and len(shape) == 2 else 0
            rows, fused = (2 * h, 3 * h), 3 * h
        attn = t.name[:t.name.rindex(f".{m['t']}.")]
        pre_only = stream == "text" and not any(f"{attn}.{o}.weight" in names for o in TEXT_OUT)
        found.append(Site(cf.rel, t.name, "dit", "joint", proj, rows=rows, fused=fused, block=f"B{int(m['i']):02d}",
                          stream=stream, inert=PRE_ONLY if pre_only and proj == "q" else None))
    return found


def folder_architecture(model_class: str, present: set[str], config: dict | None = None) -> str | None:
    return ARCHITECTURE if model_class == TRANSFORMER_CLASS else None


def has_qk_norm(files) -> bool:
    return False   # no unet.* sites: [dit.joint] q/k factors scale the qk-norm weights themselves
