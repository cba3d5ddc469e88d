"""Write the companion folder: the recipe's sampling-time part as data, plus the runtime package, whole.

A companion is what cannot be baked (SAG, Slothful Attention, Attention Bending). It travels with
the checkpoint and needs only torch (and diffusers, for `apply(pipe)`), never ckptbend:

    <folder>/__init__.py          apply(pipe) / remove(pipe) for diffusers; NODE_CLASS_MAPPINGS for ComfyUI
    <folder>/companion.json       recipe name and hash, the checkpoint it belongs to, the dynamic values
    <folder>/recipe.toml          the whole recipe, canonical form
    <folder>/pyproject.toml       ComfyUI registry metadata, so the folder can be published as a node pack
    <folder>/workflow_api.json    a ComfyUI workflow (API format): load the checkpoint, apply the node, sample
                                  (none for a family without a graph: companion.json's no_workflow says why)
    <folder>/runtime/             ckptbend/runtime copied whole, as it is: a package that imports only torch,
                                  the standard library and itself (relative imports), so it never reaches for
                                  an installed ckptbend, and ComfyUI's own modules only while sampling

Companions written before the runtime was a package (its modules copied one by one into runtime/) keep
working as they are: each carries its own runtime, and the node id and inputs they declare are read by
`recipe import` from their companion.json alone.
"""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import asdict
from pathlib import Path

from . import __version__
from .errors import CkptbendError
from .output import Target, atomic_output, check_targets

FORMAT = 1
RUNTIME_DIR = Path(__file__).parent / "runtime"
RUNTIME_SKIP = shutil.ignore_patterns("__pycache__", "*.pyc")
SUFFIX = "_ckptbend"


def folder_for(checkpoint: Path) -> Path:
    """The companion's place beside a checkpoint: an importable name, `my-model.v2.safetensors` →
    `my_model_v2_ckptbend/` (a dot or dash in a folder name would stop `import`)."""
    return checkpoint.parent / (identifier(checkpoint.name.removesuffix(".safetensors")) + SUFFIX)


def identifier(text: str) -> str:
    name = re.sub(r"\W+", "_", text, flags=re.ASCII).strip("_") or "model"
    return "m_" + name if name[0].isdigit() else name


def dynamic_part(recipe) -> dict:
    """The recipe's sampling-time sections as plain JSON data, in the runtime modules' own names."""
    out: dict = {}
    if recipe.sag is not None:
        out["sag"] = asdict(recipe.sag)
    if recipe.slothful is not None:
        full = asdict(recipe.slothful)
        out["slothful_simple"] = full.pop("simple")
        out["slothful"] = full
    if recipe.bending:
        out["bending"] = [_bend_dict(b) for b in recipe.bending]
    return out


def _bend_dict(entry) -> dict:
    common = {"token": entry.token, "mode": entry.mode, "strength": entry.strength,
              "apply_to_timesteps": _list_or_none(entry.apply_to_timesteps),
              "apply_to_layers": _list_or_none(entry.apply_to_layers), "renormalize": entry.renormalize}
    # Unset optional parameters (a frequency filter's cutoff) fall back to the runtime's defaults.
    params = {k: list(v) if isinstance(v, tuple) else v for k, v in entry.params.items() if v is not None}
    return {**common, **params}


def _list_or_none(value):
    return None if value is None else list(value)


def manifest(recipe, checkpoint: dict | None) -> dict:
    return {"format": FORMAT, "ckptbend_version": __version__, "recipe_name": recipe.name,
            "recipe_sha256": recipe.sha256, "description": recipe.description,
            "checkpoint": checkpoint, "dynamic": dynamic_part(recipe)}


def write_companion(recipe, folder: Path, checkpoint: dict | None = None) -> None:
    """Fill the empty or new `folder` with the companion of `recipe` (which must have dynamic sections).

    checkpoint: what the companion belongs to, e.g. {"file": "x.safetensors", "architecture": "wan21-t2v-1.3b",
    "kind": "dit", "source": ..., "source_sha256": ...}; None for `ckptbend emit` without a checkpoint.
    """
    if not recipe.has_dynamic:
        raise CkptbendError(f"recipe {recipe.name!r} has no [sag], [slothful] or [[bending]] section; "
                            "there is nothing to put in a companion")
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copytree(RUNTIME_DIR, folder / "runtime", ignore=RUNTIME_SKIP, dirs_exist_ok=True)
    data = manifest(recipe, checkpoint)
    workflow = example_workflow(recipe, checkpoint)
    if workflow is None:       # a family without a graph: say so, never an SD 1.x graph that would not load it
        data["no_workflow"] = missing_workflow(recipe, checkpoint)
    (folder / "companion.json").write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    (folder / "recipe.toml").write_text(recipe.canonical(), encoding="utf-8")
    (folder / "pyproject.toml").write_text(_pyproject(recipe), encoding="utf-8")
    if workflow is not None:
        (folder / "workflow_api.json").write_text(json.dumps(workflow, indent=2, ensure_ascii=False) + "\n",
                                                  encoding="utf-8")
    (folder / "__init__.py").write_text(INIT_TEMPLATE.format(name=recipe.name, sha=recipe.sha256), encoding="utf-8")


def _architecture(recipe, checkpoint: dict | None) -> str | None:
    return (checkpoint or {}).get("architecture") or (recipe.architecture[0] if recipe.architecture else None)


def missing_workflow(recipe, checkpoint: dict | None) -> str | None:
    """The one line saying why the companion has no workflow_api.json; None where it has one."""
    from .workflows import missing_graph
    return missing_graph(_architecture(recipe, checkpoint))


def example_workflow(recipe, checkpoint: dict | None) -> dict | None:
    """ComfyUI's API-format workflow for the model family the companion belongs to (workflows.py): its
    loaders → the companion's node → sampler → save. The node's inputs come from its own INPUT_TYPES, so
    the example always matches the node. checkpoint: the record of the file (its name, architecture and
    kind, as detected); without one, the recipe's architecture, else an SD 1.x graph. None for a family
    without a graph (missing_workflow says so)."""
    from .runtime.comfy_host import node_class_mappings
    from .workflows import EXAMPLE_PROMPT, example_workflow as graph

    architecture = _architecture(recipe, checkpoint)
    checkpoint = checkpoint or {}
    (node_id, node), = node_class_mappings(dynamic_part(recipe), recipe.name, recipe.sha256)[0].items()
    words = [b.token for b in recipe.bending]
    prompt = EXAMPLE_PROMPT + "".join(f", {w}" for w in words if w not in EXAMPLE_PROMPT.split())
    inputs = {}
    for name, (kind, *options) in node.INPUT_TYPES()["required"].items():
        if isinstance(kind, str) and kind in ("MODEL", "CLIP"):
            inputs[name] = kind                          # wired to the loaders' outputs
        elif name == "bending_prompt":
            inputs[name] = prompt                       # the words to bend, as the text encoder sees them
        else:
            inputs[name] = options[0]["default"] if options else kind[0]   # a combo list: its first choice
    return graph(node_id, inputs, checkpoint.get("file", "model.safetensors"), architecture, checkpoint.get("kind"))


def _pyproject(recipe) -> str:
    slug = re.sub(r"[^a-z0-9]+", "-", recipe.name.lower()).strip("-") or "recipe"
    description = recipe.description or f"Sampling-time part of the ckptbend recipe {recipe.name}"
    return (
        "# ComfyUI registry metadata (https://docs.comfy.org/registry): publish this folder as a node pack.\n"
        "[project]\n"
        f"name = {json.dumps('ckptbend-' + slug)}\n"
        f"version = \"1.0.0\"\n"
        f"description = {json.dumps(description, ensure_ascii=False)}\n"
        "license = { text = \"MIT\" }\n"
        "dependencies = []   # torch comes with ComfyUI\n"
        "\n"
        "[tool.comfy]\n"
        "PublisherId = \"\"   # your registry publisher id\n"
        f"DisplayName = {json.dumps('ckptbend: ' + recipe.name, ensure_ascii=False)}\n"
        "Icon = \"\"\n"
        f"# recipe sha256 {recipe.sha256}\n"
    )


INIT_TEMPLATE = '''"""ckptbend companion for the recipe {name!r} (sha256 {sha}).

The sampling-time part of the recipe (SAG, Slothful Attention, Attention Bending), which cannot be
baked into weights. Needs torch; diffusers only for apply(). Generated by ckptbend; self-contained.

diffusers:
    import sys; sys.path.insert(0, "<folder that holds this one>")
    import <this folder's name> as companion
    session = companion.apply(pipe)         # phase=1: bending maps recorded, bending left out of the image
    image = pipe("a photo at {{sunset}}").images[0]   # {{word}} marks a bending target
    companion.save_maps(session, "maps.safetensors")   # then: ckptbend maps maps.safetensors -o maps/
    companion.remove(pipe)

ComfyUI: copy this folder into ComfyUI/custom_nodes/; the node is "ckptbend: {name}".
"""

import json as _json
import os as _os
import pathlib as _pathlib
import struct as _struct

from .runtime import comfy_host as _comfy_host
from .runtime import diffusers_host as _diffusers_host
from .runtime.maps import load_maps, save_maps  # noqa: F401  (public API)

MANIFEST = _json.loads((_pathlib.Path(__file__).with_name("companion.json")).read_text(encoding="utf-8"))
RECIPE_NAME = MANIFEST["recipe_name"]
RECIPE_SHA256 = MANIFEST["recipe_sha256"]
CHECKPOINT = MANIFEST["checkpoint"]
DYNAMIC = MANIFEST["dynamic"]


def apply(pipe, *, phase=2, record_maps=None):
    """Install the recipe's sampling-time techniques on a diffusers pipeline; returns the session
    (session.maps holds recorded bending maps). Undo with remove(pipe)."""
    return _diffusers_host.apply(pipe, DYNAMIC, phase=phase, record_maps=record_maps)


def remove(pipe):
    """Restore the pipeline exactly as it was before apply()."""
    _diffusers_host.remove(pipe)


def matches(checkpoint_path):
    """Whether a .safetensors file was baked from this recipe (its ckptbend.recipe_sha256 metadata).
    False for anything else: a missing, unreadable or foreign file, or a damaged header."""
    try:
        with open(checkpoint_path, "rb") as f:
            (size,) = _struct.unpack("<Q", f.read(8))
            if size > min(100_000_000, _os.fstat(f.fileno()).st_size - 8):   # never trust the length
                return False
            header = _json.loads(f.read(size))
        meta = header.get("__metadata__") if isinstance(header, dict) else None
        return isinstance(meta, dict) and meta.get("ckptbend.recipe_sha256") == RECIPE_SHA256
    except (OSError, ValueError, RecursionError, _struct.error):
        return False


NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS = _comfy_host.node_class_mappings(DYNAMIC, RECIPE_NAME, RECIPE_SHA256)
'''


def emit(recipe, target: Path, *, force: bool = False, checkpoint: dict | None = None, inputs=()) -> Path:
    """Write the companion of `recipe` as the folder `target`, atomically (a temporary folder beside
    it, renamed into place when complete). `inputs`: files the command reads, never replaced."""
    place = Target(Path(target), True, "companion folder")
    check_targets([place], inputs, force)
    try:
        with atomic_output(place, force) as tmp:
            write_companion(recipe, tmp, checkpoint)
    except OSError as e:
        raise CkptbendError(f"{target}: cannot write the companion folder: {e.strerror or e}") from None
    return Path(target)
