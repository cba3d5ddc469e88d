"""Flux.2 (dev; klein 4B and 9B, base and distilled: `Flux2Transformer2DModel`), as data.

Flux.2 keeps Flux.1's block names (BFL's `double_blocks` / `single_blocks`, read by ckptbend/layouts/flux.py's
engine) and changes what is inside them (diffusers' transformer_flux2.py, BFL's flux2/model.py):
- no biases anywhere in the attention or the MLP, and no per-block modulation: three model-level modulations
  (`double_stream_modulation_img/_txt`, `single_stream_modulation`) serve every block;
- double blocks: per stream a fused `qkv` (rows q | k | v, each h) with per-head RMSNorms `norm.query_norm` /
  `norm.key_norm` (one weight [head_dim] shared by the heads), a joint attention over [text; image], and the
  stream's own output projection `proj`;
- single blocks are *parallel* blocks: `linear1` holds q | k | v | the SwiGLU MLP's gate and value (2 × M rows),
  `linear2` reads the attention output (columns [0, h)) and the MLP's M outputs (the rest), no bias.

What each factor scales (ckptbend's rule, dit-layouts.md §11; proved against the real class in
tests/test_dit_flux2.py): q / k the qk-norm weight (the RMSNorm cancels a scaled projection); v the v rows
[2h, 3h) of `qkv` / `linear1`; out the stream's `proj` (double) or `linear2`'s attention columns [0, h)
(single: "attention output × f" before the fused projection; the MLP columns stay).

Names: BFL's (released files, ComfyUI's `model.diffusion_model.`), diffusers' (`transformer_blocks.N.attn.*`,
`single_transformer_blocks.N.attn.to_qkv_mlp_proj` / `to_out`). Variants: `flux2-dev` has a guidance
embedder; klein has none and is named by its width (3072: 4B, 4096: 9B). klein base and distilled share one
layout (only the weights differ; a diffusers folder says `is_distilled` in model_index.json), so one name
covers both. Text encoders of all-in-one files (Mistral Small 3, Qwen3) belong to the text-encoder family.
"""

from __future__ import annotations

import re

from .dit_files import dit_tensor_names, find_model, identified_under
from .flux import BFL, DIFFUSERS, OUT_LINEAR2_GATED, V_LINEAR1_GATED, Part, block_sites
from .types import CheckpointFile, Identified, Site

COMPONENTS = ("dit",)

# Fused parallel projections: linear1 = 3h + 2M rows (SwiGLU gate | value), linear2 = h + M columns (the
# gated-MLP parts of layouts/flux.py, shared with Ovis-Image).
V_LINEAR1, OUT_LINEAR2 = V_LINEAR1_GATED, OUT_LINEAR2_GATED
V_QKV_MLP = Part("rows", 2, 3, 3, "to_qkv_mlp_proj", "to_out.weight", lambda s: 2 * (s[1] - s[0]))
OUT_TO_OUT = Part("cols", 0, 1, 1, "to_out", "to_qkv_mlp_proj.weight", lambda s: (s[0] - 3 * s[1]) // 2)

_SWIGLU = {"linear1": V_LINEAR1, "linear2": OUT_LINEAR2}
BFL2 = tuple((p, proj, stream, _SWIGLU.get(part.module, part) if part else None) for p, proj, stream, part in BFL)
_DS = r"(?P<group>single)_transformer_blocks\.(?P<i>\d+)\.attn\."
DIFFUSERS2 = tuple(row for row in DIFFUSERS if row[3] is None and "single" not in row[0]) + (
    (_DS + r"norm_q\.weight", "q", None, None),
    (_DS + r"norm_k\.weight", "k", None, None),
    (_DS + r"to_qkv_mlp_proj\.(?:weight|bias)", "v", None, V_QKV_MLP),
    (_DS + r"to_out\.weight", "out", None, OUT_TO_OUT),
)
COMPILED = {n: tuple((re.compile(p + "$"), *rest) for p, *rest in t) for n, t in (("bfl", BFL2), ("diffusers", DIFFUSERS2))}

# naming → (detection key: ComfyUI's / diffusers' model-level modulation, width key, guidance key), after the prefix
MARKS = {
    "bfl": ("double_stream_modulation_img.lin.weight", "img_in.weight", "guidance_in.in_layer.weight"),
    "diffusers": ("double_stream_modulation_img.linear.weight", "x_embedder.weight",
                  "time_guidance_embed.guidance_embedder.linear_1.weight"),
}
KLEIN_SIZES = {3072: "4b", 4096: "9b"}
VARIANTS = ("flux2-dev", "flux2-klein", *(f"flux2-klein-{s}" for s in KLEIN_SIZES.values()))
ARCHITECTURE_NAMES = {"flux2": ("flux2", *VARIANTS), "flux2-dev": ("flux2-dev",), "flux2-klein": VARIANTS[1:],
                      **{name: (name,) for name in VARIANTS[2:]}}
TRANSFORMER_CLASS = "Flux2Transformer2DModel"
DIFFUSERS_PIPELINES = {}   # Flux2Pipeline / Flux2KleinPipeline folders are read sub-folder by sub-folder


def architecture(width: int, guidance: bool) -> str:
    """flux2-dev (the guidance-distilled 32B), flux2-klein-4b / -9b; flux2-klein at other widths (tiny files)."""
    if guidance:
        return "flux2-dev"
    size = KLEIN_SIZES.get(width)
    return f"flux2-klein-{size}" if size else "flux2-klein"


def _found(names) -> tuple[str, str] | None:
    """(naming, model prefix) of a Flux.2 transformer among `names`, or None."""
    return find_model(names, {naming: marks[0] for naming, marks in MARKS.items()})


def identify(header) -> Identified | None:
    names = set(header.names)
    found = _found(names)
    if found is None:
        return None
    naming, prefix = found
    _, width_key, guidance_key = MARKS[naming]
    width = header.tensor(prefix + width_key).shape[0] if prefix + width_key in names else 0
    return identified_under(header, prefix, architecture(width, prefix + guidance_key in names))


def sites(cf: CheckpointFile, files) -> list[Site]:
    found = _found(dit_tensor_names(files))
    if found is None:
        return []
    naming, prefix = found
    return block_sites(cf, files, COMPILED[naming], prefix)


def folder_architecture(model_class: str, present: set[str], config: dict | None = None) -> str | None:
    if model_class != TRANSFORMER_CLASS:
        return None
    config = config or {}
    width = config.get("num_attention_heads", 48) * config.get("attention_head_dim", 128)
    return architecture(width, bool(config.get("guidance_embeds", True)))


def has_qk_norm(files) -> bool:
    return False   # no UNet-node sites: [dit.joint] q/k factors scale the qk-norm weights themselves
