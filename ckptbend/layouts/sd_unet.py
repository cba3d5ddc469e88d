"""SD 1.x / 2.x, SDXL and SVD: the UNet's attention keys, block labels, and the SD file forms
(single-file prefixes, architecture detection keys, diffusers pipeline folders), as data.

A UNet attention projection is found by key suffix, the way ComfyUI's multiply nodes find it; a
structural pattern tells which block and depth it sits at, whatever the layout (original "LDM" or diffusers).
"""

from __future__ import annotations

import re

from .types import CheckpointFile, Identified, Site
from .text_encoders import CLIP_ENCODERS

COMPONENTS = ("unet",)

# Single-file ("LDM") prefixes → component. First match wins.
SINGLE_FILE_PREFIXES = (
    ("model.diffusion_model.", "unet"),
    ("cond_stage_model.transformer.", "clip_l"),          # SD 1.x: OpenAI CLIP-L (HF names)
    ("cond_stage_model.model.", "clip_h"),                # SD 2.x: OpenCLIP ViT-H (OpenCLIP names)
    ("conditioner.embedders.0.transformer.", "clip_l"),   # SDXL base: CLIP-L (HF names)
    ("conditioner.embedders.1.model.", "clip_g"),         # SDXL base: OpenCLIP ViT-bigG
    ("conditioner.embedders.0.model.", "clip_g"),         # SDXL refiner: OpenCLIP ViT-bigG only
    ("first_stage_model.", "vae"),
)

# Single-file architecture detection: (name, keys that must all be present); first match wins.
ARCHITECTURES = (
    ("svd", ("model.diffusion_model.input_blocks.1.1.time_stack.0.attn1.to_q.weight",)),
    ("sdxl-base", ("conditioner.embedders.0.transformer.text_model.embeddings.position_embedding.weight",
                   "conditioner.embedders.1.model.positional_embedding")),
    ("sdxl-refiner", ("conditioner.embedders.0.model.positional_embedding",)),
    ("sd2", ("cond_stage_model.model.token_embedding.weight",)),
    ("sd1", ("cond_stage_model.transformer.text_model.embeddings.position_embedding.weight",)),
)

# recipe `architecture` name → the detected architectures it covers. "sdxl" is the SDXL base model people
# mean by it: the refiner's blocks differ (four levels), so a recipe for it must say "sdxl-refiner".
ARCHITECTURE_NAMES = {"sd1": ("sd1",), "sd2": ("sd2",), "sdxl": ("sdxl-base",), "sdxl-base": ("sdxl-base",),
                      "sdxl-refiner": ("sdxl-refiner",), "svd": ("svd",)}

# diffusers folders of every SD pipeline are read sub-folder by sub-folder (layouts._folder_map): `unet/`,
# and CLIP-L / OpenCLIP-H / CLIP-G text encoders told by their configs (text_encoders.folder_components).
DIFFUSERS_PIPELINES = {}
UNET_CLASSES = ("UNet2DConditionModel", "UNetSpatioTemporalConditionModel")

UNET_SUFFIX = re.compile(r"(?:^|\.)(?P<attn>attn1|attn2)\.(?P<proj>to_q|to_k|to_v|to_out\.0)\.(?:weight|bias)$")
PROJ_NAMES = {"to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "out"}

# Where a UNet attention sits. LDM: input_blocks.N.M.transformer_blocks.D, middle_block.M.transformer_blocks.D
# (time_stack.D: the temporal transformer of video UNets).
LDM_BLOCK = re.compile(r"(?:^|\.)(?:(?P<group>input_blocks|output_blocks)\.(?P<n>\d+)\.\d+|middle_block\.\d+)\."
                       r"(?P<stack>transformer_blocks|time_stack)\.(?P<depth>\d+)\.")
# diffusers: down_blocks.B.attentions.A.transformer_blocks.D (temporal_transformer_blocks.D: video).
DIFFUSERS_BLOCK = re.compile(r"(?:^|\.)(?:(?P<group>down_blocks|up_blocks)\.(?P<b>\d+)|mid_block)\.attentions\.(?P<a>\d+)\."
                             r"(?P<stack>transformer_blocks|temporal_transformer_blocks)\.(?P<depth>\d+)\.")
DIFFUSERS_RESNET = re.compile(r"(?:^|\.)down_blocks\.0\.resnets\.(\d+)\.")
QK_NORM = re.compile(r"(?:^|\.)(attn1|attn2)\.(norm_q|norm_k|q_norm|k_norm)\.weight$")
BARE_UNET_STARTS = ("input_blocks.", "down_blocks.", "time_embed.", "time_embedding.")

GROUP_OF = {"input_blocks": "input", "output_blocks": "output",
            "down_blocks": "input", "up_blocks": "output", None: "middle"}
LABEL_PREFIX = {"input": "IN", "middle": "M", "output": "OUT"}


class OutsideLayout(ValueError):
    """An attention key in no known block (the caller names the file)."""


def _label(group: str, index: int) -> str:
    return "M00" if group == "middle" else f"{LABEL_PREFIX[group]}{index:02d}"


def _position(key: str, layers_per_block: int | None):
    """(group, block label, depth, temporal) of a UNet attention key, or None if not in a transformer."""
    m = LDM_BLOCK.search(key)
    if m:
        group = GROUP_OF[m["group"]]
        return group, _label(group, int(m["n"] or 0)), int(m["depth"]), m["stack"] == "time_stack"
    m = DIFFUSERS_BLOCK.search(key)
    if m and layers_per_block is not None:
        group = GROUP_OF[m["group"]]
        b, a = int(m["b"] or 0), int(m["a"])
        # The original UNet numbers input blocks after conv_in (1 + …); up blocks have one more layer.
        index = 1 + b * (layers_per_block + 1) + a if group == "input" else b * (layers_per_block + 1) + a
        return group, _label(group, index), int(m["depth"]), m["stack"] == "temporal_transformer_blocks"
    return None


def _layers_per_block(files) -> int | None:
    """diffusers UNets only: resnets per down block, needed to number blocks as the original does.
    Counted over every file, since shards split a UNet anywhere."""
    resnets = [int(m.group(1)) for f in files for k, c in f.components.items()
               if c == "unet" and (m := DIFFUSERS_RESNET.search(k))]
    return max(resnets) + 1 if resnets else None


def sites(cf: CheckpointFile, files) -> list[Site]:
    """The UNet attention projections of one file (`files`: every file of the checkpoint)."""
    layers_per_block = _layers_per_block(files)
    found = []
    for t in cf.header.tensors:
        if cf.components.get(t.name) != "unet" or not (m := UNET_SUFFIX.search(t.name)):
            continue
        where = _position(t.name, layers_per_block)
        if where is None:
            raise OutsideLayout(f"{cf.rel}: attention key {t.name!r} is outside any known block layout")
        group, block, depth, temporal = where
        found.append(Site(cf.rel, t.name, "unet", m["attn"], PROJ_NAMES[m["proj"]],
                          group=group, block=block, depth=depth, temporal=temporal))
    return found


def _component_by_prefix(key: str) -> str | None:
    for prefix, component in SINGLE_FILE_PREFIXES:
        if key.startswith(prefix):
            return component
    return None


def unet_architecture(header, names) -> str:
    """A UNet saved alone, told by its structure (what ComfyUI's detection reads too): SVD by its temporal
    transformers, SDXL by its added text-time embedding (the refiner has four levels, the base three), SD 2.x
    by its linear proj_in (SD 1.x: a 1×1 convolution)."""
    if any(".time_stack." in n or ".temporal_transformer_blocks." in n for n in names):
        return "svd"
    if any(n.endswith(("label_emb.0.0.weight", "add_embedding.linear_1.weight")) for n in names):
        levels = {m.group(1) for n in names if (m := re.search(r"(?:^|\.)down_blocks\.(\d+)\.", n))}
        blocks = {int(m.group(1)) for n in names if (m := re.search(r"(?:^|\.)input_blocks\.(\d+)\.", n))}
        return "sdxl-refiner" if len(levels) == 4 or max(blocks, default=0) == 11 else "sdxl-base"
    proj_in = next((n for n in names if n.endswith("proj_in.weight") and ("input_blocks." in n or "down_blocks." in n)),
                   None)
    if proj_in is None:
        return "unet-only"
    return "sd2" if len(header.tensor(proj_in).shape) == 2 else "sd1"


def identify(header) -> Identified | None:
    """An SD single file (by its prefixes), or a UNet saved alone."""
    names = header.names
    components = {n: c for n in names if (c := _component_by_prefix(n))}
    if components:
        if not {"unet", *CLIP_ENCODERS} & set(components.values()):
            return None
        arch = next((a for a, needed in ARCHITECTURES if all(k in components for k in needed)), None)
        only_unet = set(components.values()) == {"unet"}
        arch = arch or (unet_architecture(header, names) if only_unet else "unknown")
        return Identified("unet" if only_unet else "single-file", arch, components)
    if any(UNET_SUFFIX.search(n) for n in names) and any(n.startswith(BARE_UNET_STARTS) for n in names):
        return Identified("unet", unet_architecture(header, names), {n: "unet" for n in names})
    return None


def has_qk_norm(files) -> bool:
    return any(QK_NORM.search(n) for f in files for n, c in f.components.items() if c == "unet")


def folder_architecture(unet_class: str, present: set[str], config: dict | None = None) -> str | None:
    """A diffusers SD pipeline's architecture name, from the UNet class and the text encoders present."""
    if unet_class not in UNET_CLASSES:
        return None
    if unet_class == "UNetSpatioTemporalConditionModel":
        return "svd"
    if "clip_g" in present:
        return "sdxl-base" if "clip_l" in present else "sdxl-refiner"
    return "sd2" if "clip_h" in present else "sd1"
