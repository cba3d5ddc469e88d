"""Motif-Video (`MotifVideoTransformer3DModel`), as data. Its single file has diffusers' names (diffusers' single-file
mapping is the identity), bare or under `model.diffusion_model.`; diffusers folders too.

A HunyuanVideo-like DiT. Dual-stream blocks `transformer_blocks.{i}.attn` project the video tokens (`to_q/to_k/to_v`,
`to_out.0`) and the text tokens (`add_{q,k,v}_proj`, `to_add_out`) with their own weights and attend over both →
`[dit.joint]` with streams image / text, labels D{i:02d}; single-stream blocks `single_transformer_blocks.{i}.attn`
serve the joined sequence with one weight set, their attention output entering the fused `proj_out` beside the MLP
(columns [0, h), weight only: the bias is shared) → `[dit.joint]` without stream, S{i:02d}. Optional text
cross-attention `cross_attn` in either kind of block (queries: the block's attention output; keys and values: the text)
→ `[dit.cross]`, same labels. q/k scale the per-head RMSNorm weights (`norm_q`, `norm_k`, `norm_added_q`,
`norm_added_k`: one plain weight of the head width for every head), v the v projection, out the output projection
(weight and bias). A LayerNorm qk-norm (`qk_norm="layer_norm"`, with a bias) is refused.
"""

from __future__ import annotations

import re

from ..errors import CkptbendError
from .types import CheckpointFile, Identified, Site
from .dit_files import dit_tensor_names, identify_prefixed, prefix_by_marks, scan
from .validate import shape_in

COMPONENTS = ("dit",)
NAME = "Motif-Video"
MARKS = ("x_embedder.proj.weight", "context_embedder.linear_1.weight", "single_transformer_blocks.0.proj_mlp.weight",
         "transformer_blocks.0.attn.add_q_proj.weight")
ATTENTION = re.compile(r"^(?P<kind>transformer_blocks|single_transformer_blocks)\.(?P<i>\d+)\.(?P<attn>attn|cross_attn)\."
                       r"(?P<t>norm_q|norm_k|norm_added_q|norm_added_k|to_v|add_v_proj|to_out\.0|to_add_out)\."
                       r"(?P<wb>weight|bias)$")
SINGLE_OUT = re.compile(r"^single_transformer_blocks\.(?P<i>\d+)\.proj_out\.weight$")
MODULES = {"norm_q": ("image", "q"), "norm_k": ("image", "k"), "to_v": ("image", "v"), "to_out.0": ("image", "out"),
           "norm_added_q": ("text", "q"), "norm_added_k": ("text", "k"), "add_v_proj": ("text", "v"),
           "to_add_out": ("text", "out")}
_ATTENTION = ("to_q", "to_k", "to_v", "to_out", "norm_q", "norm_k", "add_q_proj", "add_k_proj", "add_v_proj",
              "to_add_out", "norm_added_q", "norm_added_k")
BLOCKS = {"transformer_blocks": ("norm1", "norm1_context", "attn", "cross_attn", "norm2", "norm2_context", "ff",
                                 "ff_context"),
          "single_transformer_blocks": ("attn", "cross_attn", "norm", "proj_mlp", "proj_out")}
PARTS = {"attn": _ATTENTION, "cross_attn": _ATTENTION}
TOP = ("x_embedder", "context_embedder", "image_embedder", "time_text_embed", "transformer_blocks",
       "single_transformer_blocks", "norm_out", "proj_out", "scaled_fp8")
ARCHITECTURE = "motif-video"
ARCHITECTURE_NAMES = {ARCHITECTURE: (ARCHITECTURE,)}
DIFFUSERS_PIPELINES: dict = {}   # MotifVideoPipeline folders are read sub-folder by sub-folder
TRANSFORMER_CLASS = "MotifVideoTransformer3DModel"


def _found(names) -> str | None:
    return prefix_by_marks(names, MARKS)


def identify(header) -> Identified | None:
    found = identify_prefixed(header, _found, NAME, BLOCKS, PARTS, ARCHITECTURE, TOP)
    if found and any(re.search(r"\.norm_(?:added_)?[qk]\.bias$", n) for n in header.names):
        raise CkptbendError(f"{header.path}: a Motif-Video with a LayerNorm qk-norm (norm_q.bias); ckptbend bakes only "
                            "its RMSNorm form")
    return found


def sites(cf: CheckpointFile, files) -> list[Site]:
    found = []
    for t, m in scan(cf, _found(dit_tensor_names(files)), SINGLE_OUT, ATTENTION):
        if m.re is SINGLE_OUT:                   # [attention | MLP] columns: the attention's, weight only
            shape = shape_in(files, cf.rel, t.name)
            h, width = (shape[0], shape[1]) if shape and len(shape) == 2 else (0, 0)
            found.append(Site(cf.rel, t.name, "dit", "joint", "out", cols=(0, h), fused=width, group="single",
                              block=f"S{int(m['i']):02d}"))
            continue
        stream, proj = MODULES[m["t"]]
        double = m["kind"] == "transformer_blocks"
        joint = m["attn"] == "attn"
        found.append(Site(cf.rel, t.name, "dit", "joint" if joint else "cross", proj,
                          group="double" if double else "single", block=f"{'D' if double else 'S'}{int(m['i']):02d}",
                          stream=stream if joint and double else None))
    return found


def folder_architecture(model_class: str, present: set[str], config: dict | None = None) -> str | None:
    return ARCHITECTURE if model_class == TRANSFORMER_CLASS else None


def has_qk_norm(files) -> bool:
    return False   # no unet.* sites: [dit.*] q/k factors scale the qk-norm weights themselves
