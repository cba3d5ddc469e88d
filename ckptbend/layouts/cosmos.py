"""Cosmos Predict2 / Predict2.5 (`CosmosTransformer3DModel`; ComfyUI `cosmos_predict2`) and Anima (ComfyUI `anima`:
a Cosmos-Predict2-2B whose file also holds its text adapter `llm_adapter.*`), as data.

Every block `blocks.{i}` (diffusers `transformer_blocks.{i}`) has a self-attention over the video tokens
(`self_attn`, diffusers `attn1`) → `[dit.self]`, and a cross-attention from them to the text (`cross_attn` /
`attn2`) → `[dit.cross]`; label B{i:02d}. q and k are normalised per head (`q_norm` / `k_norm`, diffusers `norm_q`
/ `norm_k`: one plain weight of the head width for every head, so uniform factors) and the factors scale those
weights; v scales `v_proj` (`to_v`), out `output_proj` (`to_out.0`); no biases. Anima's `llm_adapter` (self- and
cross-attention over the text before the model's cross-attention; diffusers' separate `AnimaTextConditioner`)
prepares the text embedding and is left alone, as HunyuanVideo's token refiner.

Names: NVIDIA's file under `net.` (diffusers' `convert_cosmos_transformer_checkpoint_to_diffusers` strips it), bare
or under `model.diffusion_model.` (ComfyUI); diffusers names in one file; diffusers folders. Cosmos 1.0
(`blocks.block{i}.blocks.0.block.attn.to_q.0`) and the image-context / control variants of 2.5 (`q_img`, `k_img`,
`before_proj`, ...) are refused in one line rather than baked with those parts left alone.
"""

from __future__ import annotations

import re

from ..errors import CkptbendError
from .dit_files import dit_tensor_names, scan
from .types import CheckpointFile, Identified, Site
from .wan import identified, refuse_unknown_modules

COMPONENTS = ("dit",)
PREFIXES = ("", "net.", "model.diffusion_model.")
ORIGINAL_KEYS = ("blocks.0.mlp.layer1.weight", "x_embedder.proj.1.weight")              # ComfyUI's detection keys
DIFFUSERS_KEYS = ("transformer_blocks.0.attn1.norm_q.weight", "time_embed.t_embedder.linear_1.weight")
ANIMA_KEY = "llm_adapter.blocks.0.cross_attn.q_proj.weight"                             # ComfyUI's Anima check
PREDICT25_KEY = "crossattn_proj.0.weight"                                               # Predict2.5's text projection
COSMOS1_KEY = "blocks.block0.blocks.0.block.attn.to_q.0.weight"
ATTENTION = re.compile(r"^(?:transformer_)?blocks\.(?P<i>\d+)\.(?P<attn>self_attn|cross_attn|attn1|attn2)\."
                       r"(?P<t>q_norm|k_norm|norm_q|norm_k|v_proj|to_v|output_proj|to_out\.0)\.weight$")
ATTN = {"self_attn": "self", "attn1": "self", "cross_attn": "cross", "attn2": "cross"}
PROJ = {"q_norm": "q", "norm_q": "q", "k_norm": "k", "norm_k": "k", "v_proj": "v", "to_v": "v", "output_proj": "out",
        "to_out.0": "out"}
_BLOCK = ("self_attn", "cross_attn", "mlp", "adaln_modulation_self_attn", "adaln_modulation_cross_attn",
          "adaln_modulation_mlp", "layer_norm_self_attn", "layer_norm_cross_attn", "layer_norm_mlp",
          "attn1", "attn2", "ff", "norm1", "norm2", "norm3")
_ATTENTION = ("q_proj", "k_proj", "v_proj", "output_proj", "q_norm", "k_norm", "to_q", "to_k", "to_v", "to_out",
              "norm_q", "norm_k")
BLOCKS = {"blocks": _BLOCK, "transformer_blocks": _BLOCK}
PARTS = {a: _ATTENTION for a in ("self_attn", "cross_attn", "attn1", "attn2")}
TOP = ("x_embedder", "t_embedder", "t_embedding_norm", "blocks", "final_layer", "pos_embedder", "extra_pos_embedder",
       "crossattn_proj", "llm_adapter", "logvar", "accum_video_sample_counter", "accum_image_sample_counter",
       "accum_iteration", "accum_train_in_hours", "patch_embed", "time_embed", "transformer_blocks", "norm_out",
       "proj_out", "learnable_pos_embed", "scaled_fp8")
SIZES = {2048: "2b", 5120: "14b"}
ARCHITECTURES = ("cosmos-predict2", "cosmos-predict2.5")
ARCHITECTURE_NAMES = {"anima": ("anima",), **{a: (a, *(f"{a}-{s}" for s in SIZES.values())) for a in ARCHITECTURES},
                      **{f"{a}-{s}": (f"{a}-{s}",) for a in ARCHITECTURES for s in SIZES.values()}}
DIFFUSERS_PIPELINES: dict = {}   # Cosmos2 / Anima folders are read sub-folder by sub-folder
TRANSFORMER_CLASS = "CosmosTransformer3DModel"


def _found(names) -> tuple[str, bool] | None:
    """(model prefix, diffusers-named) of a Cosmos Predict2 model in `names`, or None."""
    for prefix in PREFIXES:
        for keys, diffusers in ((ORIGINAL_KEYS, False), (DIFFUSERS_KEYS, True)):
            if all(prefix + k in names for k in keys):
                return prefix, diffusers
    return None


def architecture(variant: str, width: int) -> str:
    return f"{variant}-{SIZES[width]}" if variant != "anima" and width in SIZES else variant


def identify(header) -> Identified | None:
    names = set(header.names)
    found = _found(names)
    if found is None:
        return None
    prefix, diffusers = found
    refuse_unknown_modules(header, prefix, "Cosmos Predict2", BLOCKS, PARTS, TOP)
    variant = ("anima" if prefix + ANIMA_KEY in names else
               "cosmos-predict2.5" if prefix + PREDICT25_KEY in names else "cosmos-predict2")
    embed = header.tensor(prefix + ("patch_embed.proj.weight" if diffusers else "x_embedder.proj.1.weight"))
    return identified(header, prefix, architecture(variant, embed.shape[0]))


def refuse_unknown(header) -> None:
    if any(p + COSMOS1_KEY in set(header.names) for p in PREFIXES):
        raise CkptbendError(f"{header.path}: a Cosmos 1.0 diffusion model; ckptbend bakes Cosmos Predict2 / 2.5 and "
                            "Anima, not Cosmos 1.0")


def sites(cf: CheckpointFile, files) -> list[Site]:
    found = _found(dit_tensor_names(files))
    return [Site(cf.rel, t.name, "dit", ATTN[m["attn"]], PROJ[m["t"]], block=f"B{int(m['i']):02d}")
            for t, m in scan(cf, found and found[0], ATTENTION)]


def folder_architecture(model_class: str, present: set[str], config: dict | None = None) -> str | None:
    if model_class != TRANSFORMER_CLASS:
        return None
    config = config or {}
    if config.get("img_context_dim_in") or config.get("controlnet_block_every_n"):
        raise CkptbendError("a Cosmos transformer with image-context or control blocks; ckptbend does not bake those")
    width = config.get("num_attention_heads", 0) * config.get("attention_head_dim", 0)
    return architecture("cosmos-predict2.5" if config.get("use_crossattn_projection") else "cosmos-predict2", width)


def has_qk_norm(files) -> bool:
    return False   # no unet.* sites: [dit.*] q/k factors scale the qk-norm weights themselves
