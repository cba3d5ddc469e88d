"""What checkpoint files look like: find the model family in a file or folder, and its attention.

A checkpoint is one or more safetensors files. Every tensor key belongs to a *component* (unet, dit,
a text encoder such as clip_l or t5xxl, or something ckptbend leaves alone). Each model family is one
module of data and small finders, registered in `FAMILIES`; this module only combines them. A family
module has:

    COMPONENTS            the components whose attention it finds
    ARCHITECTURE_NAMES    recipe `architecture` name → the architectures it covers (every name `identify` and
                          `folder_architecture` can give must be covered by its own name)
    identify(header)      an `Identified` (kind, architecture, key → component) for a single file, or None
    DIFFUSERS_PIPELINES   model_index.json `_class_name` → {sub-folder: component} (other pipeline classes
                          are read sub-folder by sub-folder: `_folder_map`)
    sites(cf, files)      the attention Sites of one CheckpointFile (`files`: all of the checkpoint's)
    folder_architecture(model_class, present, config)   a diffusers folder's architecture, or None for a
                          class it does not know (config: the unet/transformer config.json, for families
                          named by its sizes); without one, the model sub-folder's weights are identified
    has_qk_norm(files)    whether q/k multipliers on its unet.* sites are cancelled by a qk-norm
    NOT_REACHED           (optional) (module, what it is): attention-bearing parts of its model no section reaches
                          (text connectors, token refiners), counted for `inspect` and every bake's notes
    refuse_unknown(header)  optional: asked when no family identified a file; raises a one-line error for a
                          relative of the family's models that ckptbend must not take for one of them

Families are asked in order; the first that identifies a file wins (DiT families come before the SD
UNets, whose `model.diffusion_model.` prefix they share). Adding a model family is one new module plus
its entry in `FAMILIES`.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

from ..errors import CkptbendError
from .. import gguf_io
from ..safetensors_io import Header, read_header
from . import (auraflow, cosmos, ernie_image, flux, flux2, flux3, hidream, ideogram4, kandinsky5, krea2, ltx2,
               ltx_video, lumina, minimax_h3, mochi, motif_video, qwen_image, sana, sd3, sd_unet, text_encoders, wan)
from .types import Checkpoint, CheckpointFile, Identified, Site  # noqa: F401  (the package's public types)
from .validate import check_sites

# Motif-Video first: its Flux-style dual/single blocks would be refused by Flux's check for unknown derivatives.
FAMILIES = (motif_video, flux, flux2, flux3, krea2, sd3, qwen_image, wan, ltx2, ltx_video, kandinsky5, minimax_h3,
            ideogram4, cosmos, auraflow, sana, mochi, lumina, hidream, ernie_image, sd_unet, text_encoders)
DIFFUSERS_PIPELINES = {cls: subs for f in FAMILIES for cls, subs in f.DIFFUSERS_PIPELINES.items()}
ARCHITECTURE_NAMES = {name: covers for f in FAMILIES for name, covers in f.ARCHITECTURE_NAMES.items()}

NO_ATTENTION = "{path}: no UNet, diffusion transformer or text encoder found; not a supported checkpoint layout"


def read_json_object(path: Path) -> dict:
    """A diffusers/transformers config file: a JSON object, or one clear error."""
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, OSError, RecursionError):
        raise CkptbendError(f"{path}: not a readable JSON file") from None
    if not isinstance(value, dict):
        raise CkptbendError(f"{path}: expected a JSON object")
    return value


def _config(path: Path) -> dict:
    """A config that may be missing or damaged: it only refines names, the weights decide the rest."""
    try:
        return read_json_object(path) if path.is_file() else {}
    except CkptbendError:
        return {}


# ComfyUI-GGUF's `general.architecture` names (its loader's list) → the architectures ckptbend tells apart.
GGUF_ARCHITECTURES = {
    "flux": ("flux-dev", "flux-schnell", "chroma", "flux2", "flux3", "krea2", "longcat-image", "ovis-image"),
    "sd1": ("sd1", "sd2"),
    "sdxl": ("sdxl-base", "sdxl-refiner"),
    "sd3": ("sd3-medium", "sd35-medium", "sd35-large"), "ltxv": ("ltx-video", "ltx-2"), "hyvid": ("hunyuan-video",),
    "wan": ("wan",), "qwen_image": ("qwen-image",), "lumina2": ("lumina2", "z-image"), "hidream": ("hidream",),
    "aura": ("auraflow",), "cosmos": ("cosmos-predict2", "anima"),
}
# ComfyUI-GGUF's text encoders (its TXT_ARCH_LIST, llama.cpp's names) → the encoders' architectures they cover
# (llama.cpp converts Mistral as `llama`).
GGUF_TEXT = {"t5": ("t5xxl-", "umt5xxl-", "byt5_small-"), "t5encoder": ("t5xxl-", "umt5xxl-", "byt5_small-"),
             "llama": ("llama-", "mistral3_24b-", "ministral3_3b-"), "qwen2vl": ("qwen25_7b-",),
             "qwen3": ("qwen3_",), "qwen3vl": ("qwen3vl_",)}


def read_file_header(path: Path) -> Header:
    """A single file's header: GGUF by its magic, otherwise safetensors (a file that is neither says what it is)."""
    if gguf_io.is_gguf(path):
        return gguf_io.read_header(path)
    if (what := gguf_io.other_format(path)) is not None:
        raise CkptbendError(f"{path}: not a valid safetensors file, nor GGUF: it is {what}")
    return read_header(path)


def _gguf_named(path: Path, header) -> tuple[str, ...] | None:
    """The architectures a GGUF's `general.architecture` (ComfyUI-GGUF's name) allows its tensors to be; None for a
    file without one (stable-diffusion.cpp's), told by its tensors alone."""
    named = header.architecture
    if named is None:
        return None
    covers = GGUF_ARCHITECTURES.get(named, GGUF_TEXT.get(named))
    if not covers:
        why = "ckptbend has no layout for this family" if covers == () else "not one of ComfyUI-GGUF's names"
        raise CkptbendError(f"{path}: general.architecture is {named!r}: {why}")
    return covers


def _identify(path: Path, header) -> Identified:
    found = next((found for f in FAMILIES if (found := f.identify(header))), None)
    if found is None:
        for f in FAMILIES:
            getattr(f, "refuse_unknown", lambda header: None)(header)
        raise CkptbendError(NO_ATTENTION.format(path=path))
    return found


# A diffusers pipeline folder's denoiser(s) and text encoders, by sub-folder name.
MODEL_FOLDER = re.compile(r"unet|transformer(?:_\d+)?")
TEXT_FOLDER = re.compile(r"text_encoder(?:_\d+)?")


def _folder_map(path: Path) -> tuple[dict[str, str], list[str]]:
    """sub-folder → component for this diffusers folder, and what it leaves alone. A pipeline class of the
    table keeps its mapping; any other folder (an unknown class, no model_index.json) is read sub-folder by
    sub-folder: `unet/` and `transformer*/` are the denoiser, each `text_encoder*/` is told by its own config
    (one whose config is missing, or names an encoder ckptbend does not know, is left alone) — never another
    pipeline's table."""
    subs = [d.name for d in sorted(path.iterdir()) if d.is_dir() and any(d.glob("*.safetensors") or d.glob("*.bin"))]
    table = DIFFUSERS_PIPELINES.get(_config(path / "model_index.json").get("_class_name"))
    configs = {sub: read_json_object(path / sub / "config.json") for sub in subs   # a damaged one is an error:
               if TEXT_FOLDER.fullmatch(sub) and (path / sub / "config.json").is_file()}   # it names the encoder
    if table is None:
        table = {sub: ("unet" if sub == "unet" else "dit") for sub in subs if MODEL_FOLDER.fullmatch(sub)}
        table.update(text_encoders.folder_components(configs))
    else:
        table = {sub: text_encoders.folder_component(c, configs[sub]) if sub in configs else c
                 for sub, c in table.items()}
    unread = [sub for sub in subs if sub not in table and sub != "vae"]
    return table, [f"{sub}/ ({_why_unread(sub, configs)}: copied unchanged)" for sub in unread]


def _why_unread(sub: str, configs: dict) -> str:
    if sub in configs:
        return f"a text encoder of model_type {configs[sub].get('model_type')!r}, which ckptbend does not know"
    if TEXT_FOLDER.fullmatch(sub):
        return "a text encoder without a config.json to say which"
    return "not a part ckptbend reads"


def _diffusers_files(path: Path) -> tuple[list[CheckpointFile], list[str]]:
    files = []
    table, left_alone = _folder_map(path)
    for sub, component in table.items():
        if not (path / sub).is_dir():
            continue
        weights = sorted((path / sub).glob("*.safetensors"))
        if not weights and any((path / sub).glob("*.bin")):
            raise CkptbendError(f"{path / sub}: only pickle .bin weights; convert them to safetensors first")
        headers = {w.name: read_header(w) for w in weights}
        for index in sorted((path / sub).glob("*.safetensors.index.json")):
            _check_index(index, headers)
        for name, h in headers.items():
            files.append(CheckpointFile(f"{sub}/{name}", h, {n: component for n in h.names}))
    if not files:
        raise CkptbendError(f"{path}: a folder, but no unet/, transformer/ or text_encoder*/ "
                            "with .safetensors weights (expected a diffusers model folder)")
    return files, left_alone


def _diffusers_architecture(path: Path, files: list[CheckpointFile], present: set[str]) -> str:
    """The model sub-folder's config names the architecture; without a readable config of a known class,
    its weights do, as for a single file; never a guess from what else the folder holds."""
    for sub in ("unet", "transformer"):
        shards = [f for f in files if f.rel.startswith(sub + "/")]
        if not shards:
            continue
        config = _config(path / sub / "config.json")
        model_class = str(config.get("_class_name", ""))
        if named := next((a for f in FAMILIES if (a := f.folder_architecture(model_class, present, config))), None):
            return named
        joined = Header(path / sub, 0, 0, {}, tuple(t for f in shards for t in f.header.tensors))
        found = next((found for f in FAMILIES if (found := f.identify(joined))), None)
        return found.architecture if found else "unknown"
    return "+".join(c for c in text_encoders.TEXT_ENCODERS if c in present) + "-only"


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
    check_sites(files, found)
    return tuple(found)


def _not_reached(arch: str, files) -> tuple[str, ...]:
    """One note per part of the detected model that its family says no section reaches, with its tensor count."""
    notes = []
    for family in FAMILIES:
        if not any(arch in covers for covers in family.ARCHITECTURE_NAMES.values()):
            continue
        for module, what in getattr(family, "NOT_REACHED", ()):
            found = [n for f in files for n, c in f.components.items() if c == "dit" and f".{module}." in f".{n}"]
            if found:
                notes.append(f"{len(found)} tensors of {what} ({found[0][:found[0].index(module) + len(module)]}…)")
    return tuple(notes)


def detect(path) -> Checkpoint:
    """Open a checkpoint (a .safetensors file or a diffusers folder) and find its attention sites."""
    path = Path(path)
    if path.is_dir():
        _refuse_links_outside(path)
        files, folder_notes = _diffusers_files(path)
        present = {c for f in files for c in f.components.values()}
        kind, arch = "diffusers-folder", _diffusers_architecture(path, files, present)
    elif not path.exists():
        raise CkptbendError(f"{path}: no such file or folder")
    else:
        header = read_file_header(path)
        covers = _gguf_named(path, header) if isinstance(header, gguf_io.GGUFHeader) else None
        found = _identify(path, header)
        if covers and not found.architecture.startswith(covers):
            raise CkptbendError(f"{path}: general.architecture says {header.architecture!r}, but its tensors are "
                                f"{found.architecture}'s; refusing to guess")
        kind, arch = found.kind, found.architecture
        files, folder_notes = [CheckpointFile(path.name, header, found.components)], []
    files, left_alone = text_encoders.set_aside(files)
    left_alone += _not_reached(arch, files)
    sites = _sites(files)
    # A qk-norm in the UNet (or behind a DiT's UNet-node sites), or DiT q/k sites that are norm weights.
    qk_norm = any(f.has_qk_norm(files) for f in FAMILIES) or any(s.component == "dit" and s.norm for s in sites)
    return Checkpoint(path, kind, arch, tuple(files), sites, qk_norm, tuple(folder_notes) + left_alone)


# refiner: blocks that prepare one token group before the main blocks (Lumina 2 / Z-Image)
GROUP_ORDER = {"input": 0, "middle": 1, "output": 2, "refiner": -1, "double": 0, "single": 1, "vace": 1}


def blocks_with_attention(ckpt: Checkpoint, sites=None) -> list[str]:
    """Block labels that hold UNet or DiT attention (of `sites`, by default every site), in model order."""
    labels = {(GROUP_ORDER.get(s.group, 0), s.block) for s in (ckpt.sites if sites is None else sites)
              if s.block is not None}
    return [label for _, label in sorted(labels)]


def label_runs(labels: list[str]) -> str:
    """Block labels for a message, runs shortened: "D00–D18, S00–S37", "IN01, IN02, IN04, …"."""
    runs: list[list[str]] = []
    for label in labels:
        head, number = label.rstrip("0123456789"), label[len(label.rstrip("0123456789")):]
        last = runs[-1][-1] if runs else ""
        if last.rstrip("0123456789") == head and number and int(last[len(head):]) + 1 == int(number):
            runs[-1].append(label)
        else:
            runs.append([label])
    return ", ".join(", ".join(r) if len(r) < 3 else f"{r[0]}–{r[-1]}" for r in runs) or "none"
