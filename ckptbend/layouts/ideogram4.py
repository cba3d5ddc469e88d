"""Ideogram 4 (`Ideogram4Transformer2DModel`; ComfyUI `ideogram4`), as data.

A single-stream DiT (a NextDiT relative): every block `layers.{i}` runs one self-attention over the packed
[text; image] sequence with one weight set → `[dit.joint]` without streams, label B{i:02d}. Attention names:
original / ComfyUI `attention.qkv` (rows q | k | v, h each, no bias), `attention.norm_q` / `norm_k` (RMSNorm per
head, one plain [head_dim] weight for every head), `attention.o` (no bias); diffusers `attention.{to_q,to_k,to_v,
to_out.0,norm_q,norm_k}` (diffusers has no single-file converter: the original names are ComfyUI's module's).

What a factor scales: q/k the norm weights (uniform over heads). v and out scale `qkv`'s v rows and `o`, but as in
Z-Image they cannot act: the attention output passes through an RMSNorm (`attention_norm2`) before its gated
residual and `o` has no bias, so the factor is divided away again (only the norm's eps keeps a trace); a bake of v
or out is the literal scaling and warns that it has no effect. A file with parts this table does not describe is
refused by name.
"""

from __future__ import annotations

import re

from .types import CheckpointFile, Identified, Site
from .dit_files import dit_tensor_names, identify_prefixed, prefix_by_marks, scan
from .validate import fused_width

COMPONENTS = ("dit",)
NAME = "Ideogram 4"
MARKS = ("embed_image_indicator.weight", "llm_cond_proj.weight")      # the keys ComfyUI's loaders look for
ATTENTION = re.compile(r"^layers\.(?P<i>\d+)\.attention\.(?P<t>norm_q|norm_k|qkv|to_v|o|to_out\.0)\.weight$")
PROJ = {"norm_q": "q", "norm_k": "k", "qkv": "v", "to_v": "v", "o": "out", "to_out.0": "out"}
TOP = ("input_proj", "llm_cond_norm", "llm_cond_proj", "t_embedding", "adaln_proj", "embed_image_indicator", "layers",
       "final_layer", "scaled_fp8")
_BLOCK = ("attention", "feed_forward", "attention_norm1", "attention_norm2", "ffn_norm1", "ffn_norm2",
          "adaln_modulation")
BLOCKS = {"layers": _BLOCK}
PARTS = {"attention": ("qkv", "o", "norm_q", "norm_k", "to_q", "to_k", "to_v", "to_out")}
OUTPUT_NORMED = ("Ideogram 4 passes every attention output through an RMSNorm (attention_norm2) and its output "
                 "projection has no bias, so the factor is divided away again")
ARCHITECTURE = "ideogram4"
ARCHITECTURE_NAMES = {ARCHITECTURE: (ARCHITECTURE,)}
DIFFUSERS_PIPELINES: dict = {}   # Ideogram4Pipeline folders are read sub-folder by sub-folder
TRANSFORMER_CLASS = "Ideogram4Transformer2DModel"


def _found(names) -> str | None:
    return prefix_by_marks(names, MARKS)


def identify(header) -> Identified | None:
    return identify_prefixed(header, _found, NAME, BLOCKS, PARTS, ARCHITECTURE, TOP)


def sites(cf: CheckpointFile, files) -> list[Site]:
    found = []
    for t, m in scan(cf, _found(dit_tensor_names(files)), ATTENTION):
        rows = fused = None
        if m["t"] == "qkv":                   # [q; k; v], h rows each
            h = fused_width(files, cf, t.name)
            rows, fused = (2 * h, 3 * h), 3 * h
        proj = PROJ[m["t"]]
        found.append(Site(cf.rel, t.name, "dit", "joint", proj, rows=rows, fused=fused, block=f"B{int(m['i']):02d}",
                          inert=OUTPUT_NORMED if proj in ("v", "out") else None))
    return found


def folder_architecture(model_class: str, present: set[str], config: dict | None = None) -> str | None:
    return ARCHITECTURE if model_class == TRANSFORMER_CLASS else None


def has_qk_norm(files) -> bool:
    return False   # no unet.* sites: q/k factors of [dit.joint] scale the qk-norm weights themselves
