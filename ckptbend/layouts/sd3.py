"""SD3-medium, SD3.5-medium, SD3.5-large (MMDiT / MMDiT-X), as data (dit-layouts.md §3, §11).

Original names (SAI / ComfyUI, bare or under `model.diffusion_model.`): `joint_blocks.{i}.{x_block,context_block}.attn.`
`qkv` (rows q | k | v, h each), `proj`, and on SD3.5 `ln_q` / `ln_k` (per-head RMSNorm weights, one vector for
every head); SD3.5-medium adds the image-only `x_block.attn2.` in its first blocks. diffusers names:
`transformer_blocks.{i}.attn.{to_q,…,add_q_proj,…,norm_q,…}`, `attn2.…`.

A factor scales (§11): q/k the norm weight where there is one, else the q/k rows of the projection (SD3-medium);
v the v rows; out the output projection. The joint attention is `[dit.joint]`, `x_block` being the image stream
and `context_block` the text stream; SD3.5-medium's `attn2` is `[dit.self]`. Block label J{i:02d}.

Structurally dead: the last block's context stream is "pre-only" (its attention output is dropped, so it has
no `proj`), and its q has no effect on the result; its k and v still feed the image tokens.
"""

from __future__ import annotations

import re

from ..errors import CkptbendError
from .text_encoders import all_in_one_component
from .types import CheckpointFile, Identified, Site
from .validate import fused_width

COMPONENTS = ("dit",)
MODEL_PREFIX = "model.diffusion_model."
VAE_PREFIXES = ("first_stage_model.", "vae.")

# The keys that say "this is an SD3 transformer": original, or diffusers-named.
ORIGINAL_MARK = "joint_blocks.0.context_block.attn.qkv.weight"
DIFFUSERS_MARKS = ("pos_embed.pos_embed", "transformer_blocks.0.attn.add_q_proj.weight")

ORIGINAL = re.compile(r"^(?:model\.diffusion_model\.)?joint_blocks\.(?P<i>\d+)\.(?P<part>x_block|context_block)\."
                      r"(?P<attn>attn2?)\.(?P<param>qkv\.weight|qkv\.bias|proj\.weight|proj\.bias|ln_q\.weight|ln_k\.weight)$")
STREAM_OF_PART = {"x_block": "image", "context_block": "text"}
ORIGINAL_PARAM = {"ln_q.weight": "q", "ln_k.weight": "k", "proj.weight": "out", "proj.bias": "out"}
QKV = ("q", "k", "v")

# diffusers' joint-attention module names (SD3, Qwen-Image): module → (stream, projection, is a qk-norm).
DIFFUSERS = re.compile(r"^(?:model\.diffusion_model\.)?transformer_blocks\.(?P<i>\d+)\.(?P<attn>attn2?)\."
                       r"(?P<module>to_q|to_k|to_v|to_out\.0|add_q_proj|add_k_proj|add_v_proj|to_add_out|"
                       r"norm_q|norm_k|norm_added_q|norm_added_k)\.(?:weight|bias)$")
DIFFUSERS_MODULES = {
    "to_q": ("image", "q", False), "to_k": ("image", "k", False), "to_v": ("image", "v", False),
    "to_out.0": ("image", "out", False), "norm_q": ("image", "q", True), "norm_k": ("image", "k", True),
    "add_q_proj": ("text", "q", False), "add_k_proj": ("text", "k", False), "add_v_proj": ("text", "v", False),
    "to_add_out": ("text", "out", False), "norm_added_q": ("text", "q", True), "norm_added_k": ("text", "k", True),
}
NORM_OF = {("image", "q"): "norm_q", ("image", "k"): "norm_k", ("text", "q"): "norm_added_q", ("text", "k"): "norm_added_k"}
PRE_ONLY = ("the last joint block's text stream is pre-only: its attention output is dropped, so its q "
            "cannot act (its k and v do)")

_SD3_FOLDERS = {"transformer": "dit", "text_encoder": "clip_l", "text_encoder_2": "clip_g", "text_encoder_3": "t5xxl"}
VARIANTS = ("sd3-medium", "sd35-medium", "sd35-large")   # different depths: no name covers two
ARCHITECTURE_NAMES = {name: (name,) for name in VARIANTS}
DIFFUSERS_PIPELINES = {cls: _SD3_FOLDERS for cls in (
    "StableDiffusion3Pipeline", "StableDiffusion3Img2ImgPipeline", "StableDiffusion3InpaintPipeline",
    "StableDiffusion3PAGPipeline", "StableDiffusion3PAGImg2ImgPipeline")}
TRANSFORMER_CLASS = "SD3Transformer2DModel"


def bare_name(name: str) -> str:
    return name.removeprefix(MODEL_PREFIX)


def file_components(names, is_model_key) -> dict[str, str]:
    """key → component of a DiT single file: the model (bare, or under `model.diffusion_model.`), ComfyUI's
    all-in-one text encoders `text_encoders.<name>.`, and the VAE (left as "vae", untouched)."""
    prefixed = any(n.startswith(MODEL_PREFIX) and is_model_key(n[len(MODEL_PREFIX):]) for n in names)
    components = {}
    for n in names:
        if (encoder := all_in_one_component(n)) is not None:
            components[n] = encoder
        elif n.startswith(VAE_PREFIXES):
            components[n] = "vae"
        elif n.startswith(MODEL_PREFIX) or not prefixed:
            components[n] = "dit"
    return components


def refuse_unknown_parts(header, names: set[str], parts: set[str], what: str, known_as: str) -> None:
    """Refuse, in one line, a transformer (`names` bare) with a top-level part not in `parts`, rather than bake it
    as `known_as` and leave that part alone."""
    if unknown := sorted({n.split(".", 1)[0] for n in names} - parts):
        raise CkptbendError(f"{header.path.name}: {what} transformer with parts ckptbend does not know "
                            f"({', '.join(p + '.*' for p in unknown)}); refusing rather than baking it as {known_as}")


def dit_names(components: dict[str, str]) -> set[str]:
    """A file's DiT tensor names, without `model.diffusion_model.`."""
    return {bare_name(n) for n, c in components.items() if c == "dit"}


def model_names(files) -> set[str]:
    """The DiT's tensor names over every file of a checkpoint (shards split a model anywhere)."""
    return set().union(*(dit_names(f.components) for f in files))


def _is_sd3(names: set[str]) -> bool:
    return ORIGINAL_MARK in names or all(m in names for m in DIFFUSERS_MARKS)


def variant(names: set[str]) -> str:
    """sd3-medium (no qk-norm), sd35-medium (qk-norm and the image-only attn2), sd35-large (qk-norm only)."""
    if not any(n.endswith((".ln_q.weight", ".norm_q.weight")) for n in names):
        return "sd3-medium"
    return "sd35-medium" if any(".attn2." in n for n in names) else "sd35-large"


def identify(header) -> Identified | None:
    bare = {bare_name(n) for n in header.names}
    if not _is_sd3(bare):
        return None
    components = file_components(header.names, lambda rest: rest.startswith(("joint_blocks.", "transformer_blocks.")))
    return Identified.model_file(variant(dit_names(components)), components)


def _original_sites(cf: CheckpointFile, files, names: set[str]) -> list[Site]:
    found = []
    for t in cf.header.tensors:
        if cf.components.get(t.name) != "dit" or not (m := ORIGINAL.match(t.name)):
            continue
        i, part, attn, param = int(m["i"]), m["part"], m["attn"], m["param"]
        base = f"joint_blocks.{i}.{part}.{attn}."
        common = dict(attn="joint" if attn == "attn" else "self", block=f"J{i:02d}",
                      stream=STREAM_OF_PART[part] if attn == "attn" else None)
        pre_only = part == "context_block" and base + "proj.weight" not in names
        if param in ORIGINAL_PARAM:
            proj = ORIGINAL_PARAM[param]
            found.append(Site(cf.rel, t.name, "dit", proj=proj, inert=PRE_ONLY if pre_only and proj == "q" else None,
                              **common))
            continue
        h = fused_width(files, cf, t.name)        # qkv: rows [0,h) q, [h,2h) k, [2h,3h) v
        normed = base + "ln_q.weight" in names
        for r, proj in enumerate(QKV):
            if proj == "v" or not normed:
                found.append(Site(cf.rel, t.name, "dit", proj=proj, rows=(r * h, (r + 1) * h), fused=3 * h,
                                  inert=PRE_ONLY if pre_only and proj == "q" else None, **common))
    return found


def diffusers_joint_sites(cf: CheckpointFile, names: set[str], label: str, self_attn2: bool, inert) -> list[Site]:
    """Sites of diffusers' joint-attention names (`transformer_blocks.{i}.attn.…`): q/k on the norm weight
    where the attention has one, else on the projection; attn2 (SD3.5-medium) is an image-only self-attention.
    `inert(i, stream, proj)`: why such a factor cannot act, or None."""
    found = []
    for t in cf.header.tensors:
        if cf.components.get(t.name) != "dit" or not (m := DIFFUSERS.match(t.name)):
            continue
        i, attn = int(m["i"]), m["attn"]
        stream, proj, is_norm = DIFFUSERS_MODULES[m["module"]]
        if attn == "attn2" and (not self_attn2 or stream == "text"):
            continue
        if proj in ("q", "k"):
            has_norm = f"transformer_blocks.{i}.{attn}.{NORM_OF[(stream, proj)]}.weight" in names
            if is_norm != has_norm:
                continue
        joint = attn == "attn"
        found.append(Site(cf.rel, t.name, "dit", attn="joint" if joint else "self", proj=proj,
                          block=f"{label}{i:02d}", stream=stream if joint else None,
                          inert=inert(i, stream, proj) if joint else None))
    return found


def sites(cf: CheckpointFile, files) -> list[Site]:
    names = model_names(files)
    if not _is_sd3(names):
        return []
    if ORIGINAL_MARK in names:
        return _original_sites(cf, files, names)
    return diffusers_joint_sites(cf, names, "J", self_attn2=True, inert=lambda i, stream, proj: PRE_ONLY if (
        stream, proj) == ("text", "q") and f"transformer_blocks.{i}.attn.to_add_out.weight" not in names else None)


def folder_architecture(model_class: str, present: set[str], config: dict | None = None) -> str | None:
    if model_class != TRANSFORMER_CLASS:
        return None
    config = config or {}
    if not config.get("qk_norm"):
        return "sd3-medium"
    return "sd35-medium" if config.get("dual_attention_layers") else "sd35-large"


def has_qk_norm(files) -> bool:
    names = model_names(files)
    return _is_sd3(names) and variant(names) != "sd3-medium"
