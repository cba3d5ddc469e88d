"""HiDream-I1 (full, dev, fast) and HiDream-E1 (`HiDreamImageTransformer2DModel`), as data (dit-layouts.md §0, §9, §11).

One naming everywhere (diffusers' single-file converter only strips `model.diffusion_model.`):
- `double_stream_blocks.{i}.block.attn1.` — a joint attention over [image; text]: the image stream
  `to_q/to_k/to_v/to_out` with `q_rms_norm/k_rms_norm`, the text stream the same names with `_t` →
  `[dit.joint]` with streams, labels D{i:02d};
- `single_stream_blocks.{i}.block.attn1.` — one weight set for the joined sequence (no `_t`) →
  `[dit.joint]` without streams, S{i:02d}.
The feed-forward is a mixture of experts (`ff_i.experts.N`, `ff_i.shared_experts`, `ff_i.gate`): no attention,
never touched.

What a factor scales: q/k the `q_rms_norm` / `k_rms_norm` weights (an RMSNorm over the whole projected
vector, all heads together, right after the projection: scaling the projection is cancelled by it); v the v
projection, out `to_out`, weight and bias (the attention output goes straight to the gated residual).

ComfyUI's UNetSelfAttentionMultiply matches `attn1.to_q/to_k/to_v` (weight and bias) of the image stream and
of the single blocks — never `to_out` (no `.0`) nor the `_t` text stream. `[unet.self]` keeps that literal
meaning, bit-identical to the node, and warns that the qk-norm cancels its q and k (as on LTX-Video).

HiDream-O1 (a different model, ComfyUI's `t_embedder1` / `x_embedder.proj1`) has no diffusers class here:
refused in one line, as is a HiDream file with parts this table does not describe.
"""

from __future__ import annotations

import re

from ..errors import CkptbendError
from .dit_files import scan
from .sd3 import dit_names, file_components, model_names, refuse_unknown_parts
from .types import CheckpointFile, Identified, Site

COMPONENTS = ("dit", "unet")
MARKS = ("caption_projection.0.linear.weight", "double_stream_blocks.0.block.adaLN_modulation.1.bias")   # ComfyUI's, diffusers'
O1_MARKS = ("t_embedder1.mlp.0.weight", "x_embedder.proj1.weight")                                       # ComfyUI's HiDream-O1
PARTS = {"t_embedder", "p_embedder", "x_embedder", "double_stream_blocks", "single_stream_blocks", "final_layer",
         "caption_projection", "scaled_fp8"}   # and ComfyUI's scaled-fp8 marker
ARCHITECTURE = "hidream"
ARCHITECTURE_NAMES = {ARCHITECTURE: (ARCHITECTURE,)}
TRANSFORMER_CLASS = "HiDreamImageTransformer2DModel"
DIFFUSERS_PIPELINES = {"HiDreamImagePipeline": {"transformer": "dit", "text_encoder": "clip_l", "text_encoder_2": "clip_g",
                                                 "text_encoder_3": "t5xxl", "text_encoder_4": "llama"}}

ATTENTION = re.compile(r"^(?:model\.diffusion_model\.)?(?P<group>double|single)_stream_blocks\.(?P<i>\d+)\.block\.attn1\."
                       r"(?P<m>q_rms_norm|k_rms_norm|to_q|to_k|to_v|to_out)(?P<t>_t)?\.(?P<wb>weight|bias)$")
DIT_PROJ = {"q_rms_norm": "q", "k_rms_norm": "k", "to_v": "v", "to_out": "out"}
NODE_PROJ = {"to_q": "q", "to_k": "k", "to_v": "v"}   # what ComfyUI's node matches (`attn1.to_q.weight` …)


def _is_hidream(names) -> bool:
    return all(m in names for m in MARKS)


def identify(header) -> Identified | None:
    components = file_components(header.names, lambda rest: rest.split(".", 1)[0] in PARTS | {"t_embedder1"})
    names = dit_names(components)
    if all(m in names for m in O1_MARKS):
        raise CkptbendError(f"{header.path.name}: HiDream-O1, which ckptbend has no layout for (no diffusers class "
                            "to prove one against); refusing")
    if not _is_hidream(names):
        return None
    refuse_unknown_parts(header, names, PARTS, "a HiDream", "HiDream-I1")
    return Identified.model_file(ARCHITECTURE, components)


def sites(cf: CheckpointFile, files) -> list[Site]:
    found = []
    for t, m in scan(cf, "" if _is_hidream(model_names(files)) else None, ATTENTION):
        group, text = m["group"], bool(m["t"])
        block = f"{'D' if group == 'double' else 'S'}{int(m['i']):02d}"
        stream = None if group == "single" else ("text" if text else "image")
        if m["m"] in DIT_PROJ:
            found.append(Site(cf.rel, t.name, "dit", "joint", DIT_PROJ[m["m"]], group=group, block=block, stream=stream))
        if m["m"] in NODE_PROJ and not text:
            found.append(Site(cf.rel, t.name, "unet", "attn1", NODE_PROJ[m["m"]], group=group, block=block))
    return found


def folder_architecture(model_class: str, present: set[str], config: dict | None = None) -> str | None:
    return ARCHITECTURE if model_class == TRANSFORMER_CLASS else None


def has_qk_norm(files) -> bool:
    """HiDream's UNet-node sites: their q/k factors are cancelled by the qk-norm."""
    return _is_hidream(model_names(files))
