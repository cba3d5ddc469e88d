"""What checkpoint files look like, as data: where the UNet and text encoders live, and where attention is.

A checkpoint is one or more safetensors files. Every tensor key belongs to a *component* (unet,
clip_l, clip_g, clip_h, or something ckptbend leaves alone). Inside a component, an attention
projection is found by key suffix, the way ComfyUI's multiply nodes find it, and a structural pattern
tells which block and depth it sits at, whatever the file's layout (original "LDM" or diffusers).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from .errors import CkptbendError
from .safetensors_io import Header, read_header

TEXT_ENCODERS = ("clip_l", "clip_g", "clip_h")
TEXT_ENCODER_WIDTHS = {768: "clip_l", 1024: "clip_h", 1280: "clip_g"}

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

# diffusers folder: sub-folder → component. SD 2.x's text_encoder is OpenCLIP-H converted to HF
# names; it is told from CLIP-L by its activation (OpenAI CLIP uses quick_gelu).
DIFFUSERS_FOLDERS = {"unet": "unet", "text_encoder": "clip_l", "text_encoder_2": "clip_g"}

# Single-file architecture detection: (name, keys that must all be present); first match wins.
ARCHITECTURES = (
    ("svd", ("model.diffusion_model.input_blocks.1.1.time_stack.0.attn1.to_q.weight",)),
    ("sdxl-base", ("conditioner.embedders.0.transformer.text_model.embeddings.position_embedding.weight",
                   "conditioner.embedders.1.model.positional_embedding")),
    ("sdxl-refiner", ("conditioner.embedders.0.model.positional_embedding",)),
    ("sd2", ("cond_stage_model.model.token_embedding.weight",)),
    ("sd1", ("cond_stage_model.transformer.text_model.embeddings.position_embedding.weight",)),
)

# --- attention projections, matched by suffix (the rule ComfyUI's nodes use) ---------------------
UNET_SUFFIX = re.compile(r"(?:^|\.)(?P<attn>attn1|attn2)\.(?P<proj>to_q|to_k|to_v|to_out\.0)\.(?:weight|bias)$")
HF_CLIP_SUFFIX = re.compile(r"(?:^|\.)self_attn\.(?P<proj>q_proj|k_proj|v_proj|out_proj)\.(?:weight|bias)$")
OPENCLIP_SUFFIX = re.compile(r"(?:^|\.)resblocks\.\d+\.attn\.(?P<proj>in_proj_weight|in_proj_bias|out_proj\.weight|out_proj\.bias)$")
PROJ_NAMES = {"to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "out",
              "q_proj": "q", "k_proj": "k", "v_proj": "v", "out_proj": "out",
              "out_proj.weight": "out", "out_proj.bias": "out"}

# Where a UNet attention sits. LDM: input_blocks.N.M.transformer_blocks.D, middle_block.M.transformer_blocks.D
# (time_stack.D: the temporal transformer of video UNets).
LDM_BLOCK = re.compile(r"(?:^|\.)(?:(?P<group>input_blocks|output_blocks)\.(?P<n>\d+)\.\d+|middle_block\.\d+)\."
                       r"(?P<stack>transformer_blocks|time_stack)\.(?P<depth>\d+)\.")
# diffusers: down_blocks.B.attentions.A.transformer_blocks.D (temporal_transformer_blocks.D: video).
DIFFUSERS_BLOCK = re.compile(r"(?:^|\.)(?:(?P<group>down_blocks|up_blocks)\.(?P<b>\d+)|mid_block)\.attentions\.(?P<a>\d+)\."
                             r"(?P<stack>transformer_blocks|temporal_transformer_blocks)\.(?P<depth>\d+)\.")
DIFFUSERS_RESNET = re.compile(r"(?:^|\.)down_blocks\.0\.resnets\.(\d+)\.")
QK_NORM = re.compile(r"(?:^|\.)(attn1|attn2)\.(norm_q|norm_k|q_norm|k_norm)\.weight$")

GROUP_OF = {"input_blocks": "input", "output_blocks": "output",
            "down_blocks": "input", "up_blocks": "output", None: "middle"}
LABEL_PREFIX = {"input": "IN", "middle": "M", "output": "OUT"}


@dataclass(frozen=True)
class Site:
    """One attention projection parameter (or a row range of a fused one)."""
    file: str
    key: str
    component: str
    attn: str                    # attn1 | attn2 (UNet) | self (text encoder)
    proj: str                    # q | k | v | out
    rows: tuple[int, int] | None = None   # row range inside a fused in_proj tensor
    group: str | None = None     # input | middle | output (UNet)
    block: str | None = None     # IN04, M00, OUT03 (UNet)
    depth: int | None = None     # transformer index inside the block (UNet)
    temporal: bool = False       # video temporal transformer (SVD time_stack)


@dataclass(frozen=True)
class CheckpointFile:
    rel: str                     # path relative to the checkpoint (the file name for single files)
    header: Header
    components: dict[str, str]   # tensor key → component


@dataclass(frozen=True)
class Checkpoint:
    path: Path
    kind: str                    # "single-file" | "diffusers-folder" | "unet" | "text-encoder"
    architecture: str
    files: tuple[CheckpointFile, ...]
    sites: tuple[Site, ...]
    qk_norm: bool                # the UNet normalises q and k after projection

    @property
    def components(self) -> list[str]:
        seen = []
        for f in self.files:
            for c in f.components.values():
                if c not in seen:
                    seen.append(c)
        return seen


def _label(group: str, index: int) -> str:
    return "M00" if group == "middle" else f"{LABEL_PREFIX[group]}{index:02d}"


def _unet_position(key: str, layers_per_block: int | None):
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


def _sites_of_file(cf: CheckpointFile, layers_per_block: int | None) -> list[Site]:
    sites = []
    for t in cf.header.tensors:
        component = cf.components.get(t.name)
        if component == "unet" and (m := UNET_SUFFIX.search(t.name)):
            where = _unet_position(t.name, layers_per_block)
            if where is None:
                raise CkptbendError(f"{cf.rel}: attention key {t.name!r} is outside any known block layout")
            group, block, depth, temporal = where
            sites.append(Site(cf.rel, t.name, component, m["attn"], PROJ_NAMES[m["proj"]],
                              group=group, block=block, depth=depth, temporal=temporal))
        elif component in TEXT_ENCODERS and (m := HF_CLIP_SUFFIX.search(t.name)):
            sites.append(Site(cf.rel, t.name, component, "self", PROJ_NAMES[m["proj"]]))
        elif component in TEXT_ENCODERS and (m := OPENCLIP_SUFFIX.search(t.name)):
            if m["proj"].startswith("in_proj"):
                # Fused [3d, d] / [3d]: rows 0:d are q, d:2d k, 2d:3d v.
                d = t.shape[0] // 3
                for i, proj in enumerate(("q", "k", "v")):
                    sites.append(Site(cf.rel, t.name, component, "self", proj, rows=(i * d, (i + 1) * d)))
            else:
                sites.append(Site(cf.rel, t.name, component, "self", PROJ_NAMES[m["proj"]]))
    return sites


def _component_by_prefix(key: str) -> str | None:
    for prefix, component in SINGLE_FILE_PREFIXES:
        if key.startswith(prefix):
            return component
    return None


def _bare_kind(header: Header) -> str | None:
    """What a file without the single-file prefixes holds: a UNet or one text encoder."""
    names = header.names
    if any(UNET_SUFFIX.search(n) for n in names) and any(
            n.startswith(("input_blocks.", "down_blocks.", "time_embed.", "time_embedding.")) for n in names):
        return "unet"
    hf, openclip = any(HF_CLIP_SUFFIX.search(n) for n in names), any(OPENCLIP_SUFFIX.search(n) for n in names)
    if not (hf or openclip):
        return None
    # The three text encoders SD files use differ in width; a small or unknown one is told by its form:
    # HF-named with a projection is SDXL's CLIP-G; OpenCLIP-named is bigG too unless 1024 wide.
    norm = next((n for n in names if n.endswith(("final_layer_norm.weight", "ln_final.weight"))), None)
    shape = header.tensor(norm).shape if norm else ()
    width = shape[0] if len(shape) == 1 else None
    if width in TEXT_ENCODER_WIDTHS:
        return TEXT_ENCODER_WIDTHS[width]
    if hf:
        return "clip_g" if "text_projection.weight" in names else "clip_l"
    return "clip_g"


NO_ATTENTION = "{path}: no UNet or text encoder found; not a supported checkpoint layout"


def _detect_single(path: Path, header: Header):
    names = header.names
    components = {n: _component_by_prefix(n) for n in names}
    if any(c is not None for c in components.values()):
        if not {"unet", *TEXT_ENCODERS} & set(components.values()):
            raise CkptbendError(NO_ATTENTION.format(path=path))
        for arch, needed in ARCHITECTURES:
            if all(k in components for k in needed):
                break
        else:
            arch = "unet-only" if set(components.values()) <= {"unet", None} else "unknown"
        kind = "unet" if set(components.values()) <= {"unet", None} else "single-file"
        return kind, arch, {n: c for n, c in components.items() if c}
    bare = _bare_kind(header)
    if bare is None:
        raise CkptbendError(NO_ATTENTION.format(path=path))
    kind = "unet" if bare == "unet" else "text-encoder"
    arch = "unet-only" if bare == "unet" else f"{bare}-only"
    return kind, arch, {n: bare for n in names}


def _diffusers_text_component(folder: Path, sub: str) -> str:
    component = DIFFUSERS_FOLDERS[sub]
    config = folder / sub / "config.json"
    if component == "clip_l" and config.is_file() and read_json_object(config).get("hidden_act") == "gelu":
        return "clip_h"
    return component


def read_json_object(path: Path) -> dict:
    """A diffusers/transformers config file: a JSON object, or one clear error."""
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, OSError, RecursionError):
        raise CkptbendError(f"{path}: not a readable JSON file") from None
    if not isinstance(value, dict):
        raise CkptbendError(f"{path}: expected a JSON object")
    return value


def _diffusers_architecture(folder: Path, present: set[str]) -> str:
    try:   # only a hint for the architecture name: the weights decide everything else
        unet_class = read_json_object(folder / "unet" / "config.json").get("_class_name", "")
    except CkptbendError:
        unet_class = ""
    if unet_class == "UNetSpatioTemporalConditionModel":
        return "svd"
    if "clip_g" in present:
        return "sdxl-base" if "clip_l" in present else "sdxl-refiner"
    return "sd2" if "clip_h" in present else "sd1"


def detect(path) -> Checkpoint:
    """Open a checkpoint (a .safetensors file or a diffusers folder) and find its attention sites."""
    path = Path(path)
    if path.is_dir():
        files = []
        for sub in DIFFUSERS_FOLDERS:
            if not (path / sub).is_dir():
                continue
            component = DIFFUSERS_FOLDERS[sub] if sub == "unet" else _diffusers_text_component(path, sub)
            weights = sorted((path / sub).glob("*.safetensors"))
            if not weights and any((path / sub).glob("*.bin")):
                raise CkptbendError(f"{path / sub}: only pickle .bin weights; convert them to safetensors first")
            for w in weights:
                h = read_header(w)
                files.append(CheckpointFile(f"{sub}/{w.name}", h, {n: component for n in h.names}))
        if not files:
            raise CkptbendError(f"{path}: a folder, but no unet/, text_encoder/ or text_encoder_2/ "
                                "with .safetensors weights (expected a diffusers model folder)")
        present = {c for f in files for c in f.components.values()}
        kind, arch = "diffusers-folder", _diffusers_architecture(path, present)
    elif not path.exists():
        raise CkptbendError(f"{path}: no such file or folder")
    else:
        header = read_header(path)
        kind, arch, components = _detect_single(path, header)
        files = [CheckpointFile(path.name, header, components)]
    layers_per_block = _layers_per_block(files)
    sites = tuple(s for f in files for s in _sites_of_file(f, layers_per_block))
    qk_norm = any(QK_NORM.search(n) for f in files for n, c in f.components.items() if c == "unet")
    return Checkpoint(path, kind, arch, tuple(files), sites, qk_norm)


def blocks_with_attention(ckpt: Checkpoint) -> list[str]:
    """Block labels that hold UNet attention, in UNet order."""
    order = {"input": 0, "middle": 1, "output": 2}
    labels = {(order[s.group], s.block) for s in ckpt.sites if s.component == "unet"}
    return [label for _, label in sorted(labels)]
