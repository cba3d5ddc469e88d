"""Krea 2 (`Krea2Transformer2DModel`; Raw and turbo share it), as data.

Krea 2 is a single-stream DiT (diffusers' transformer_krea2.py): every block attends over the joined
[text; image] sequence with one weight set — `[dit.joint]`, block `B{i}`, no stream. Its attention has grouped
q / kv heads, per-head RMSNorms on q and k whose stored weight w acts as (1 + w) ("zero-centred", one [head_dim]
weight shared by the heads), no biases, and a sigmoid output gate: out = `wo`(attention · sigmoid(`gate`(x))).

What each factor scales (dit-layouts.md §11, proved in tests/test_dit_krea2.py): q / k the qk-norm weight as it
acts, so w becomes f·(1 + w) − 1 (Site.offset 1; the RMSNorm cancels a scaled projection); v the v projection
`wv` (all kv heads); out the output projection `wo` (the gate multiplies the attention before it, so "output × f"
is `wo` × f). The text-fusion transformer (`txtfusion.layerwise_blocks` / `refiner_blocks`: self-attention over
the stacked text-encoder layers and the text tokens, before the model's text input) prepares the text embedding
and takes no part in the joint attention: no section reaches it, as with HunyuanVideo's token refiner.

Names: the original file's (`blocks.N.attn.{wq,wk,wv,wo,gate}`, `blocks.N.attn.qknorm.{qnorm,knorm}.scale`;
bare or under `model.diffusion_model.`) and diffusers' (`transformer_blocks.N.attn.{to_q,to_k,to_v,to_out.0,
to_gate,norm_q,norm_k}`), as diffusers' `convert_krea2_transformer_checkpoint_to_diffusers` maps them.
"""

from __future__ import annotations

import re

from .dit_files import dit_tensor_names, find_model, identified_under, scan
from .types import CheckpointFile, Identified, Site

COMPONENTS = ("dit",)
ARCHITECTURE = "krea2"
ARCHITECTURE_NAMES = {ARCHITECTURE: (ARCHITECTURE,)}
TRANSFORMER_CLASS = "Krea2Transformer2DModel"
DIFFUSERS_PIPELINES = {}   # Krea2Pipeline folders are read sub-folder by sub-folder
MARKS = {"original": "txtfusion.projector.weight", "diffusers": "text_fusion.projector.weight"}   # diffusers' sniffer key
PATTERNS = {
    "original": re.compile(r"blocks\.(?P<i>\d+)\.attn\.(?P<role>qknorm\.qnorm\.scale|qknorm\.knorm\.scale|wv\.weight|wo\.weight)$"),
    "diffusers": re.compile(r"transformer_blocks\.(?P<i>\d+)\.attn\.(?P<role>norm_q\.weight|norm_k\.weight|to_v\.weight|"
                            r"to_out\.0\.weight)$"),
}
PROJ = {"qknorm.qnorm.scale": "q", "qknorm.knorm.scale": "k", "wv.weight": "v", "wo.weight": "out",
        "norm_q.weight": "q", "norm_k.weight": "k", "to_v.weight": "v", "to_out.0.weight": "out"}
NORM_OFFSET = 1.0   # Krea2RMSNorm multiplies by (1 + weight)


def _found(names) -> tuple[str, str] | None:
    return find_model(names, MARKS)


def identify(header) -> Identified | None:
    found = _found(set(header.names))
    if found is None:
        return None
    return identified_under(header, found[1], ARCHITECTURE)


def sites(cf: CheckpointFile, files) -> list[Site]:
    found = _found(dit_tensor_names(files))
    if found is None:
        return []
    naming, prefix = found
    out = []
    for t, m in scan(cf, prefix, PATTERNS[naming]):
        proj = PROJ[m["role"]]
        out.append(Site(cf.rel, t.name, "dit", "joint", proj, block=f"B{int(m['i']):02d}",
                        offset=NORM_OFFSET if proj in ("q", "k") else 0.0))
    return out


def folder_architecture(model_class: str, present: set[str], config: dict | None = None) -> str | None:
    return ARCHITECTURE if model_class == TRANSFORMER_CLASS else None


def has_qk_norm(files) -> bool:
    return False   # no UNet-node sites: q/k factors scale the qk-norm weights themselves
