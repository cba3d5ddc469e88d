"""Sana (`SanaTransformer2DModel`: Sana 1.0 / 1.5 / Sprint), as data.

Every block `blocks.{i}` (diffusers `transformer_blocks.{i}`) has a self-attention over the image tokens (`attn`,
diffusers `attn1`) → `[dit.self]` and a cross-attention to the text (`cross_attn` / `attn2`) → `[dit.cross]`; label
B{i:02d}.

The self-attention is *linear* attention: out = ReLU(Q)·(ReLU(K)ᵀ V) / (ReLU(Q)·ReLU(K)ᵀ 1), so a positive factor on
q or k appears in numerator and denominator and cancels; the bake scales the q / k rows of `attn.qkv` (`to_q` /
`to_k`) literally and warns that it has no effect. v (rows [2h, 3h) of `qkv`) and out (`attn.proj`, weight and bias)
act. The cross-attention is softmax attention: q `cross_attn.q_linear`, k rows [0, h) and v rows [h, 2h) of the fused
`cross_attn.kv_linear` (weights and biases), out `cross_attn.proj`; where a diffusers file has qk-norm weights
(`attn2.norm_q` / `norm_k`, Sana 1.5), q/k scale those instead.

Names: original (Efficient-Large-Model) names bare or under `model.diffusion_model.`, as diffusers'
`convert_sana_transformer_to_diffusers` reads them (it has no qk-norm or guidance-embedding names: such an original
file is refused); diffusers names in one file; diffusers folders.
"""

from __future__ import annotations

import re

from .dit_files import dit_tensor_names, prefix_by_marks, scan
from .types import CheckpointFile, Identified, Site
from .validate import shape_in, weight_of
from .wan import identified, refuse_unknown_modules

COMPONENTS = ("dit",)
NAME = "Sana"
ORIGINAL_KEYS = ("blocks.0.cross_attn.kv_linear.weight", "y_embedder.y_proj.fc1.weight")   # diffusers' sniffer key
DIFFUSERS_KEYS = ("transformer_blocks.0.ff.conv_inverted.weight", "caption_projection.linear_1.weight")
ATTENTION = re.compile(r"^(?:transformer_)?blocks\.(?P<i>\d+)\.(?P<attn>attn|cross_attn|attn1|attn2)\."
                       r"(?P<t>qkv|proj|q_linear|kv_linear|to_q|to_k|to_v|to_out\.0|norm_q|norm_k)\.(?P<wb>weight|bias)$")
ATTN = {"attn": "self", "attn1": "self", "cross_attn": "cross", "attn2": "cross"}
SINGLE = {"proj": "out", "q_linear": "q", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "out", "norm_q": "q",
          "norm_k": "k"}
FUSED = {"qkv": ("q", "k", "v"), "kv_linear": ("k", "v")}
BLOCKS = {"blocks": ("attn", "cross_attn", "mlp", "scale_shift_table"),
          "transformer_blocks": ("attn1", "attn2", "ff", "scale_shift_table")}
PARTS = {"attn": ("qkv", "proj"), "cross_attn": ("q_linear", "kv_linear", "proj"),
         "attn1": ("to_q", "to_k", "to_v", "to_out", "norm_q", "norm_k"),
         "attn2": ("to_q", "to_k", "to_v", "to_out", "norm_q", "norm_k")}
TOP = {"original": ("pos_embed", "x_embedder", "t_embedder", "t_block", "y_embedder", "attention_y_norm", "blocks",
                    "final_layer", "scaled_fp8"),
       "diffusers": ("patch_embed", "time_embed", "caption_projection", "caption_norm", "transformer_blocks",
                     "scale_shift_table", "proj_out", "scaled_fp8")}
LINEAR = ("Sana's self-attention is linear attention (ReLU(Q)·ReLU(K)ᵀV normalised by ReLU(Q)·ReLU(K)ᵀ1), so a "
          "factor on q or k is divided away again")
ARCHITECTURE = "sana"
ARCHITECTURE_NAMES = {ARCHITECTURE: (ARCHITECTURE,)}
DIFFUSERS_PIPELINES: dict = {}   # SanaPipeline folders are read sub-folder by sub-folder
TRANSFORMER_CLASS = "SanaTransformer2DModel"


def _found(names) -> tuple[str, str] | None:
    """(model prefix, naming) of a Sana model in `names`, or None."""
    for naming, keys in (("original", ORIGINAL_KEYS), ("diffusers", DIFFUSERS_KEYS)):
        if (prefix := prefix_by_marks(names, keys)) is not None:
            return prefix, naming
    return None


def identify(header) -> Identified | None:
    found = _found(set(header.names))
    if found is None:
        return None
    refuse_unknown_modules(header, found[0], NAME, BLOCKS, PARTS, TOP[found[1]])
    return identified(header, found[0], ARCHITECTURE)


def _site(cf, key, attn, proj, block, rows=None, fused=None):
    inert = LINEAR if attn == "self" and proj in ("q", "k") else None
    return Site(cf.rel, key, "dit", attn, proj, rows=rows, fused=fused, block=block, inert=inert)


def sites(cf: CheckpointFile, files) -> list[Site]:
    names = dit_tensor_names(files)
    found = _found(names)
    out = []
    for t, m in scan(cf, found and found[0], ATTENTION):
        attn, block = ATTN[m["attn"]], f"B{int(m['i']):02d}"
        if m["t"] in FUSED:                        # [q; k; v] or [k; v], a block of rows each
            shape = shape_in(files, cf.rel, weight_of(t.name))
            parts = FUSED[m["t"]]
            h = shape[0] // len(parts) if shape and len(shape) == 2 else 0
            out += [_site(cf, t.name, attn, p, block, (r * h, (r + 1) * h), len(parts) * h) for r, p in enumerate(parts)]
            continue
        proj = SINGLE[m["t"]]
        normed = t.name.replace(f".{m['t']}.{m['wb']}", f".norm_{proj}.weight") in names if proj in ("q", "k") else False
        if attn == "cross" and proj in ("q", "k") and normed != m["t"].startswith("norm_"):
            continue                               # q/k on the norm weight where there is one, else the projection
        if attn == "self" and m["t"].startswith("norm_"):
            continue                               # linear attention: q/k stay on the projection (and warn)
        out.append(_site(cf, t.name, attn, proj, block))
    return out


def folder_architecture(model_class: str, present: set[str], config: dict | None = None) -> str | None:
    return ARCHITECTURE if model_class == TRANSFORMER_CLASS else None


def has_qk_norm(files) -> bool:
    return False   # no unet.* sites: [dit.*] q/k factors are placed by the table above
