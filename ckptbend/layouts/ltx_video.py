"""LTX-Video (0.9.x 2B, 0.9.7/0.9.8 13B), as data: file forms, architecture names, and two kinds of
attention site (dit-layouts.md §0, §8, §11).

- DiT sites (`[dit.self]` = `attn1`, `[dit.cross]` = `attn2`): q/k scale the `q_norm` / `k_norm`
  weights (an RMSNorm across all heads right after the projection), v scales `to_v`, out `to_out.0`
  (weight and bias).
- UNet-node sites (component "unet", attn1/attn2, `to_q`/`to_k`/`to_v`/`to_out.0` weight and bias):
  ComfyUI's UNet attention-multiply nodes match these literally, so `[unet.self]` / `[unet.cross]` /
  `[unet.temporal]` keep the nodes' meaning and bake bit-identically to them; their q/k factors are
  cancelled by the qk-norm (has_qk_norm → the plan warns and points to `[dit.self]` / `[dit.cross]`).

File forms: original names (Lightricks / ComfyUI) bare or under `model.diffusion_model.`, with the VAE
as `vae.…` in released files and T5-XXL as `text_encoders.t5xxl.transformer.…` in ComfyUI's; diffusers
names in one file; diffusers folders (`transformer/`, `text_encoder/`).
"""

from __future__ import annotations

import re

from .dit_files import dit_tensor_names
from .types import CheckpointFile, Identified, Site
from . import ltx2
from .wan import identified, model_prefix, refuse_unknown_modules

COMPONENTS = ("dit", "unet")
ORIGINAL_KEY = "adaln_single.emb.timestep_embedder.linear_1.bias"   # ComfyUI's detection key
DIFFUSERS_KEY = "time_embed.emb.timestep_embedder.linear_1.bias"
# PixArt shares `adaln_single` and `transformer_blocks.N.attn1`; LTX alone has the qk-norm and patchify_proj.
ORIGINAL_NEEDS = ("patchify_proj.weight", "transformer_blocks.0.attn1.q_norm.weight")
DIFFUSERS_NEEDS = ("proj_in.weight", "transformer_blocks.0.attn1.norm_q.weight")

ATTENTION = re.compile(r"(?:^|\.)transformer_blocks\.(?P<i>\d+)\.(?P<attn>attn1|attn2)\."
                       r"(?P<t>q_norm|k_norm|norm_q|norm_k|to_q|to_k|to_v|to_out\.0)\.(?P<wb>weight|bias)$")
DIT_ATTN = {"attn1": "self", "attn2": "cross"}
DIT_PROJ = {"q_norm": "q", "norm_q": "q", "k_norm": "k", "norm_k": "k", "to_v": "v", "to_out.0": "out"}
NODE_PROJ = {"to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "out"}
# What a block may hold: a file with more (LTX-2's audio stream, a future variant) is not taken for LTX-Video.
BLOCK_PARTS = ("attn1", "attn2", "ff", "scale_shift_table", "norm1", "norm2")
ATTENTION_PARTS = ("to_q", "to_k", "to_v", "to_out", "q_norm", "k_norm", "norm_q", "norm_k")

SIZES = {2048: "2b", 4096: "13b"}   # inner width (32 heads × 64 or × 128)
DIFFUSERS_PIPELINES = {name: {"transformer": "dit", "text_encoder": "t5xxl"}
                       for name in ("LTXPipeline", "LTXImageToVideoPipeline", "LTXConditionPipeline")}
TRANSFORMER_CLASS = "LTXVideoTransformer3DModel"


ARCHITECTURE_NAMES = {"ltx-video": ("ltx-video", *(f"ltx-video-{s}" for s in SIZES.values())),
                      **{f"ltx-video-{s}": (f"ltx-video-{s}",) for s in SIZES.values()}}


def architecture(inner: int) -> str:
    size = SIZES.get(inner)
    return f"ltx-video-{size}" if size else "ltx-video"


def identify(header) -> Identified | None:
    names = set(header.names)
    found = model_prefix(names, (ORIGINAL_KEY, DIFFUSERS_KEY))
    if found is None:
        return None
    prefix, key = found
    needs = ORIGINAL_NEEDS if key == ORIGINAL_KEY else DIFFUSERS_NEEDS
    if not all(prefix + n in names for n in needs):
        return None
    refuse_unknown_modules(header, prefix, "LTX-Video", {"transformer_blocks": BLOCK_PARTS},
                           {"attn1": ATTENTION_PARTS, "attn2": ATTENTION_PARTS})
    q = prefix + "transformer_blocks.0.attn1.to_q.weight"
    shape = header.tensor(q).shape if q in names else ()
    inner = shape[0] if len(shape) == 2 else 0     # any other rank: validate refuses the file
    return identified(header, prefix, architecture(inner))


def _is_ltx(files) -> bool:
    """LTX-Video, not LTX-2 (whose `audio_adaln_single` ends like LTX-Video's detection key) nor Sana (whose diffusers
    names share the diffusers key): the keys `identify` needs, in any file of the checkpoint."""
    names = dit_tensor_names(files)
    found = model_prefix(names, (ORIGINAL_KEY, DIFFUSERS_KEY))
    needs = () if found is None else ORIGINAL_NEEDS if found[1] == ORIGINAL_KEY else DIFFUSERS_NEEDS
    return found is not None and all(found[0] + n in names for n in needs) and ltx2.sites_prefix(files) is None


def sites(cf: CheckpointFile, files) -> list[Site]:
    if not _is_ltx(files):
        return []
    found = []
    for t in cf.header.tensors:
        if cf.components.get(t.name) != "dit" or not (m := ATTENTION.search(t.name)):
            continue
        block, role = f"B{int(m['i']):02d}", m["t"]
        if role in DIT_PROJ:
            found.append(Site(cf.rel, t.name, "dit", DIT_ATTN[m["attn"]], DIT_PROJ[role], block=block))
        if role in NODE_PROJ:
            found.append(Site(cf.rel, t.name, "unet", m["attn"], NODE_PROJ[role], block=block))
    return found


def folder_architecture(model_class: str, present: set[str], config: dict | None = None) -> str | None:
    if model_class != TRANSFORMER_CLASS:
        return None
    config = config or {}
    return architecture(config.get("num_attention_heads", 0) * config.get("attention_head_dim", 0))


def has_qk_norm(files) -> bool:
    """LTX's UNet-node sites: their q/k factors are cancelled by the qk-norm."""
    return _is_ltx(files)
