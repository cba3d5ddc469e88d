"""What checkpoint files look like: find the model families in a file or folder, and their attention.

A checkpoint is one or more safetensors files. Every tensor key belongs to a *component* (unet,
clip_l, clip_g, clip_h, or something ckptbend leaves alone). Each model family is one module of
data and small finders, registered in `FAMILIES`; this module only combines them. A family module has:

    COMPONENTS            the components whose attention it finds
    SINGLE_FILE_PREFIXES  (key prefix, component) of its single files, most specific first
    ARCHITECTURES         (architecture name, keys that must all be present) for single files
    DIFFUSERS_FOLDERS     diffusers sub-folder → component
    sites(cf, files)      the attention Sites of one CheckpointFile (`files`: all of the checkpoint's)
    bare_kind(header)     the component a file holding only this family's model is, or None
    folder_architecture(config_class, present)   a diffusers folder's architecture, or None

Adding a model family is one new module plus its entry in `FAMILIES`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from ..errors import CkptbendError
from ..safetensors_io import Header, read_header
from . import sd_unet, text_encoders
from .types import Checkpoint, CheckpointFile, Site  # noqa: F401  (the package's public types)

FAMILIES = (sd_unet, text_encoders)
SINGLE_FILE_PREFIXES = tuple(p for f in FAMILIES for p in f.SINGLE_FILE_PREFIXES)
ARCHITECTURES = tuple(a for f in FAMILIES for a in f.ARCHITECTURES)
DIFFUSERS_FOLDERS = {sub: c for f in FAMILIES for sub, c in f.DIFFUSERS_FOLDERS.items()}
ATTENTION_COMPONENTS = {c for f in FAMILIES for c in f.COMPONENTS}

NO_ATTENTION = "{path}: no UNet or text encoder found; not a supported checkpoint layout"


def read_json_object(path: Path) -> dict:
    """A diffusers/transformers config file: a JSON object, or one clear error."""
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, OSError, RecursionError):
        raise CkptbendError(f"{path}: not a readable JSON file") from None
    if not isinstance(value, dict):
        raise CkptbendError(f"{path}: expected a JSON object")
    return value


def _component_by_prefix(key: str) -> str | None:
    for prefix, component in SINGLE_FILE_PREFIXES:
        if key.startswith(prefix):
            return component
    return None


def _bare_kind(header: Header) -> str | None:
    return next((kind for f in FAMILIES if (kind := f.bare_kind(header))), None)


def _detect_single(path: Path, header: Header):
    names = header.names
    components = {n: _component_by_prefix(n) for n in names}
    if any(c is not None for c in components.values()):
        if not ATTENTION_COMPONENTS & set(components.values()):
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


def _diffusers_component(folder: Path, sub: str) -> str:
    component = DIFFUSERS_FOLDERS[sub]
    # SD 2.x's text_encoder is OpenCLIP-H converted to HF names: told from CLIP-L by its activation
    # (OpenAI CLIP uses quick_gelu).
    config = folder / sub / "config.json"
    if component == "clip_l" and config.is_file() and read_json_object(config).get("hidden_act") == "gelu":
        return "clip_h"
    return component


def _diffusers_architecture(folder: Path, present: set[str]) -> str:
    try:   # only a hint for the architecture name: the weights decide everything else
        model_class = read_json_object(folder / "unet" / "config.json").get("_class_name", "")
    except CkptbendError:
        model_class = ""
    return next(a for f in FAMILIES if (a := f.folder_architecture(model_class, present)))


def _diffusers_files(path: Path) -> list[CheckpointFile]:
    files = []
    for sub in DIFFUSERS_FOLDERS:
        if not (path / sub).is_dir():
            continue
        component = _diffusers_component(path, sub)
        weights = sorted((path / sub).glob("*.safetensors"))
        if not weights and any((path / sub).glob("*.bin")):
            raise CkptbendError(f"{path / sub}: only pickle .bin weights; convert them to safetensors first")
        headers = {w.name: read_header(w) for w in weights}
        for index in sorted((path / sub).glob("*.safetensors.index.json")):
            _check_index(index, headers)
        for name, h in headers.items():
            files.append(CheckpointFile(f"{sub}/{name}", h, {n: component for n in h.names}))
    if not files:
        raise CkptbendError(f"{path}: a folder, but no unet/, text_encoder/ or text_encoder_2/ "
                            "with .safetensors weights (expected a diffusers model folder)")
    return files


def _check_index(index: Path, headers: dict[str, Header]) -> None:
    """A sharded model's index must describe its shards exactly: every shard it names is a file of
    this folder, and each tensor is in the shard it names (and nowhere else)."""
    weight_map = read_json_object(index).get("weight_map")
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise CkptbendError(f"{index}: no weight_map of tensor names to shard files")
    for shard in sorted(set(weight_map.values())):
        if "/" in shard or "\\" in shard or shard in (".", ".."):
            raise CkptbendError(f"{index}: names the shard {shard!r} outside its folder; refusing")
        if shard not in headers:
            raise CkptbendError(f"{index}: names the shard {shard!r}, which is missing from {index.parent}")
    stem = index.name.removesuffix(".index.json").removesuffix(".safetensors")
    listed = {(name, shard) for name, shard in weight_map.items()}
    present = {(n, shard) for shard, h in headers.items() if shard in set(weight_map.values()) or
               shard.startswith(stem + "-") for n in h.names}
    if listed != present:
        name, shard = min(listed ^ present)
        where = "lists" if (name, shard) in listed else "does not list"
        raise CkptbendError(f"{index}: {where} tensor {name!r} in {shard}; the index and its shards disagree")


def _refuse_links_outside(folder: Path) -> None:
    """A model folder's symlinks must stay inside it: a bake copies what they point to."""
    root = folder.resolve()
    for p in folder.rglob("*"):
        if p.is_symlink() and not p.resolve().is_relative_to(root):
            raise CkptbendError(f"{p}: a symlink to {os.readlink(p)}, outside the model folder; refusing")


def _sites(files) -> tuple[Site, ...]:
    found = []
    for cf in files:
        order = {name: i for i, name in enumerate(cf.header.names)}
        try:
            of_file = [s for f in FAMILIES for s in f.sites(cf, files)]
        except sd_unet.OutsideLayout as e:
            raise CkptbendError(str(e)) from None
        found += sorted(of_file, key=lambda s: order[s.key])   # stable: fused row ranges keep their order
    return tuple(found)


def detect(path) -> Checkpoint:
    """Open a checkpoint (a .safetensors file or a diffusers folder) and find its attention sites."""
    path = Path(path)
    if path.is_dir():
        _refuse_links_outside(path)
        files = _diffusers_files(path)
        present = {c for f in files for c in f.components.values()}
        kind, arch = "diffusers-folder", _diffusers_architecture(path, present)
    elif not path.exists():
        raise CkptbendError(f"{path}: no such file or folder")
    else:
        header = read_header(path)
        kind, arch, components = _detect_single(path, header)
        files = [CheckpointFile(path.name, header, components)]
    return Checkpoint(path, kind, arch, tuple(files), _sites(files), sd_unet.has_qk_norm(files))


def blocks_with_attention(ckpt: Checkpoint) -> list[str]:
    """Block labels that hold UNet attention, in UNet order."""
    return sd_unet.blocks(ckpt.sites)
