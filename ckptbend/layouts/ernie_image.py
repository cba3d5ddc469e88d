"""ERNIE-Image (base, turbo: `ErnieImageTransformer2DModel`), as data.

One naming everywhere (diffusers' single-file converter only strips `model.diffusion_model.`):
`layers.{i}.self_attention.{to_q,to_k,to_v,to_out.0}` (no biases) with per-head RMSNorms `norm_q` /
`norm_k` (one weight [hd] for every head), one weight set for the joined [image; text] sequence →
`[dit.joint]` without streams, labels B{i:02d}.

What a factor scales: q/k the norm weights (the norm would cancel a scaled projection); v `to_v`; out
`to_out.0` (its output goes straight to the gated residual, so it acts).
Base and turbo share every key. A file with parts this table does not describe is refused by name.
"""

from __future__ import annotations

import re

from .dit_files import scan
from .sd3 import dit_names, file_components, model_names, refuse_unknown_parts
from .types import CheckpointFile, Identified, Site

COMPONENTS = ("dit",)
MARKS = ("x_embedder.proj.weight", "layers.0.self_attention.to_q.weight", "layers.0.adaLN_sa_ln.weight")
PARTS = {"x_embedder", "text_proj", "time_embedding", "adaLN_modulation", "layers", "final_norm", "final_linear",
         "scaled_fp8"}   # and ComfyUI's scaled-fp8 marker
ARCHITECTURE = "ernie-image"
ARCHITECTURE_NAMES = {ARCHITECTURE: (ARCHITECTURE,)}
TRANSFORMER_CLASS = "ErnieImageTransformer2DModel"
DIFFUSERS_PIPELINES = {}   # read sub-folder by sub-folder

ATTENTION = re.compile(r"^(?:model\.diffusion_model\.)?layers\.(?P<i>\d+)\.self_attention\."
                       r"(?P<m>norm_q|norm_k|to_v|to_out\.0)\.(?:weight|bias)$")
PROJ = {"norm_q": "q", "norm_k": "k", "to_v": "v", "to_out.0": "out"}


def _is_ernie(names) -> bool:
    return all(m in names for m in MARKS)


def identify(header) -> Identified | None:
    components = file_components(header.names, lambda rest: rest.split(".", 1)[0] in PARTS)
    names = dit_names(components)
    if not _is_ernie(names):
        return None
    refuse_unknown_parts(header, names, PARTS, "an ERNIE-Image", "ERNIE-Image")
    return Identified.model_file(ARCHITECTURE, components)


def sites(cf: CheckpointFile, files) -> list[Site]:
    return [Site(cf.rel, t.name, "dit", "joint", PROJ[m["m"]], block=f"B{int(m['i']):02d}")
            for t, m in scan(cf, "" if _is_ernie(model_names(files)) else None, ATTENTION)]


def folder_architecture(model_class: str, present: set[str], config: dict | None = None) -> str | None:
    return ARCHITECTURE if model_class == TRANSFORMER_CLASS else None


def has_qk_norm(files) -> bool:
    return False   # no unet.* sites
