"""ComfyUI workflows → recipes. The workflow is read into one graph (workflow.py, ui_graph.py), the chosen
sampler's MODEL and CLIP paths are walked (walk.py), and the nodes met on the way become the recipe:
attention multipliers, SAG and Slothful Attention its sections, a ckptbend companion node its whole
recipe; sampling-only nodes are listed as kept in the workflow; anything else changes the model in a way
a recipe cannot hold and is refused by name (or, with --ignore-other-patches, listed as left out).
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

from ckptbend.errors import CkptbendError

from . import nodes as N
from .clip_multiply import clip_multiply
from .draft import FLOAT32_MAX, Draft, slug
from .walk import Chain, choose_chain
from .workflow import Broken, Link, Node, fill_widgets, widget_problem

COMPANION_NODE = re.compile(r"ckptbend_\w+_[0-9a-f]{8}")   # comfy_host.node_id's shape
LOOKED_FOR = ("no attention-multiply node (UNetSelfAttentionMultiply, UNetCrossAttentionMultiply, "
              "UNetTemporalAttentionMultiply, CLIPAttentionMultiply), SelfAttentionGuidance, Slothful Attention or "
              "ckptbend companion node")


@dataclass(frozen=True)
class Options:
    name: str | None = None
    sampler: str | None = None
    ignore_other_patches: bool = False
    companions: tuple[Path, ...] = ()
    allow_out_of_range: bool = False


def _imports(node: Node, through: str) -> bool:
    return COMPANION_NODE.fullmatch(node.class_type) is not None or \
        (node.class_type in N.PATCHES and N.PATCHES[node.class_type].through == through)


def holds_recipe(chain: Chain) -> bool:
    behind = [n for nodes in chain.merged.values() for n in nodes]
    return any(_imports(n, "model") for n in chain.model + behind) or any(_imports(n, "clip") for n in chain.clip + behind)


def workflow_draft(read: tuple[dict, str], source: Path, opts: Options, where: str = "") -> Draft:
    """The recipe a workflow's chosen sampler runs with. `read` is read_graph's (graph, format); `where`
    names the image chunk the workflow came from."""
    label = f"{source}{where}"
    graph, fmt = read
    chain, same = choose_chain(graph, label, opts.sampler, holds_recipe)
    if not holds_recipe(chain):
        kept = [n for n in chain.model + chain.clip if n.class_type in N.SAMPLING_ONLY["model"] + N.SAMPLING_ONLY["clip"]]
        raise CkptbendError(f"{label}: nothing to import: {LOOKED_FOR} on the model or CLIP path of {chain.sampler}" +
                            (f" (only nodes that change sampling: {', '.join(n.class_type for n in kept)})" if kept else ""))
    for key, behind in chain.merged.items():
        hidden = [n for n in behind if _imports(n, "model") or _imports(n, "clip")]
        if hidden:
            raise CkptbendError(f"{label}: {graph[key]} merges several models; {hidden[0]} behind it cannot be "
                                "imported into one model's recipe")
    draft = Draft(label, opts.name or "")
    draft.notes.append(f"Imported by `ckptbend recipe import` from {source.name}{where} "
                       f"(ComfyUI {fmt}-format workflow)")
    draft.notes.append(f"sampler: {chain.sampler}" + (f" (same chain: {', '.join(c.sampler.key for c in same)})" if same else ""))
    draft.notes += chain.notes
    companion = None
    others: list[str] = []
    kept: list[str] = []
    # A companion's static sections are baked into the checkpoint it belongs to: they come first.
    for node in sorted(chain.model, key=lambda n: not COMPANION_NODE.fullmatch(n.class_type)):
        if COMPANION_NODE.fullmatch(node.class_type):
            if companion is not None:
                raise CkptbendError(f"{label}: two ckptbend companion nodes ({companion.node.key}, {node.key}) on the "
                                    "model path; each replaces the other's attention hooks")
            companion = _add_companion(draft, node, source, opts.companions)
        elif _imports(node, "model"):
            _add_patch(draft, node)
        elif node.class_type in N.SAMPLING_ONLY["model"]:
            kept.append(str(node))
        else:
            others.append(f"{node} on the model path")
    idle = []                              # why nodes that were found change nothing
    for node in chain.clip:
        if node.class_type == "CLIPAttentionMultiply":
            sections, notes = clip_multiply(node, _values(node, N.PATCHES[node.class_type].keys, label),
                                            chain.clip_loader, label)
            draft.notes += notes
            idle += notes if not sections else []
            for section, values, comment in sections:
                draft.add(section, values, comment)
        elif node.class_type in N.SAMPLING_ONLY["clip"]:
            kept.append(str(node))
        else:
            others.append(f"{node} on the CLIP path")
    if others and not opts.ignore_other_patches:
        raise CkptbendError(f"{label}: cannot be expressed in a recipe: {'; '.join(others)}. LoRAs, model merges and "
                            "other patches change the model in ways a recipe cannot hold; pass --ignore-other-patches "
                            "to import the rest and list these as comments")
    draft.notes += [f"left out (not expressible in a recipe): {o}" for o in others]
    draft.notes += [f"kept in the workflow (changes sampling only, nothing a recipe holds): {k}" for k in kept]
    draft.notes += _loader_notes(chain, companion)
    draft.name = companion.recipe.name if companion else slug(source.stem)
    draft.description = f"Imported from {source.name}{where}: ComfyUI sampler {chain.sampler.key} ({chain.sampler.class_type})."
    if companion is not None:   # the graph is the companion's recipe exactly: keep its description (and hash)
        provenance, draft.description = draft.description, companion.recipe.description
        if draft.recipe(allow_out_of_range=True).sha256 != companion.recipe.sha256:
            draft.description = provenance
    draft.name = opts.name or draft.name
    if _empty(draft.recipe(allow_out_of_range=True)):
        raise CkptbendError(f"{label}: nothing to import: " + ("; ".join(idle) if idle else
                            f"every attention node on the path of {chain.sampler} is set to 1.0"))
    if draft.get("sag") is not None and _number(chain.cfg) is not None and chain.cfg <= 1:
        draft.warnings.append(f"{label}: SAG needs classifier-free guidance, but {chain.sampler} runs with cfg {chain.cfg}")
    return draft


def _empty(recipe) -> bool:
    return not (recipe.multipliers or recipe.sag or recipe.slothful or recipe.bending)


def _number(value):
    return value if isinstance(value, (int, float)) and not isinstance(value, bool) else None


_KINDS = {float: ("a number", lambda v: _number(v) is not None), bool: ("true or false", lambda v: isinstance(v, bool)),
          str: ("a string", lambda v: isinstance(v, str))}


def _values(node: Node, keys, label: str) -> dict:
    """The node's values for `keys`, each checked to be a value of the widget's kind, or one error that
    names the node and the input."""
    if node.widgets is not None:
        raise CkptbendError(f"{label}: {node} {widget_problem(node)}")
    kinds = dict(next(iter(N.WIDGETS.get(node.class_type, ())), ()))
    values = {}
    for key in keys:
        value = node.inputs.get(key)
        if isinstance(value, Broken):
            raise CkptbendError(f"{label}: {node} input '{key}' {value.reason}")
        if isinstance(value, Link):
            raise CkptbendError(f"{label}: {node} input '{key}' comes from node {value.key}; only values written "
                                "in the workflow can be imported")
        if value is None:
            raise CkptbendError(f"{label}: {node} has no value for '{key}'" + (" (it is null)" if key in node.inputs else ""))
        what, fits = _KINDS.get(kinds.get(key), (None, lambda v: True))
        shown = repr(value) if len(repr(value)) <= 40 else repr(value)[:37] + "..."
        if not fits(value):
            raise CkptbendError(f"{label}: {node} input '{key}' is {shown}, not {what}")
        if _number(value) is not None and not (math.isfinite(value) and abs(value) <= FLOAT32_MAX):
            raise CkptbendError(f"{label}: {node} input '{key}' is {shown if math.isfinite(value) else value}: "
                                "no weight or setting can take it (float32 holds up to 3.4e38)")
        values[key] = value
    return values


def _add_patch(draft: Draft, node: Node) -> None:
    patch = N.PATCHES[node.class_type]
    if node.class_type == "SlothfulAttention" and any(k in node.inputs for k in N.SLOTHFUL_LATER_MARKS):
        raise CkptbendError(
            f"{draft.source}: {node} is the later Slothful Attention (peak_time, in_slothful, out_slothful): its stride "
            "follows a bell curve in time around peak_time and (1/depth)^depth_decay in depth, not [slothful]'s "
            "t^time_decay and r^(depth_decay/2), and it has no keep_middle; only the modes and k/v blends mean the "
            "same, so it cannot become a recipe's [slothful] (the Dec 2023 node)")
    values = _values(node, patch.keys, draft.source)
    if patch.simple:
        values = {"simple": True, **values}
    draft.add(patch.section, values, str(node))


# --- companions --------------------------------------------------------------------------------------------

@dataclass
class _Companion:
    node: Node
    recipe: object
    manifest: dict
    folder: Path


def _find_companion(class_type: str, places) -> tuple[Path, dict] | None:
    from ckptbend.runtime.comfy_host import node_id   # imports torch: only when a companion node is met

    for place in places:
        for folder in [place, *sorted(p for p in place.iterdir() if p.is_dir())] if place.is_dir() else []:
            try:
                manifest = json.loads((folder / "companion.json").read_text(encoding="utf-8"))
                if node_id(manifest["recipe_name"], manifest["recipe_sha256"]) == class_type:
                    return folder, manifest
            except (OSError, ValueError, KeyError, TypeError):
                continue
    return None


def _add_companion(draft: Draft, node: Node, source: Path, companions) -> _Companion:
    from ckptbend.recipe import load_recipe
    from ckptbend.runtime.comfy_host import input_specs

    found = _find_companion(node.class_type, [*companions, source.parent])
    if found is None:
        raise CkptbendError(f"{draft.source}: {node} is a ckptbend companion node, but no companion folder with that "
                            f"recipe was found beside {source.name}; pass --companion DIR (the companion folder)")
    folder, manifest = found
    recipe = load_recipe(folder / "recipe.toml", allow_out_of_range=True)
    if recipe.sha256 != manifest["recipe_sha256"]:
        raise CkptbendError(f"{folder}: recipe.toml does not match companion.json's recipe_sha256")
    try:
        specs = input_specs(manifest["dynamic"])
    except (KeyError, TypeError, ValueError) as e:
        raise CkptbendError(f"{folder}: companion.json is malformed ({type(e).__name__}: {e})") from None
    if node.widgets is not None:    # UI format: widget values in the node's input order, links excluded
        fill_widgets(node, [n for n, spec in specs.items() if spec[0] not in ("CLIP", "MODEL")])
    blocks = draft.add_recipe(recipe, f"{node}: the ckptbend companion of {recipe.name!r} "
                                      f"({recipe.sha256[:12]}), {folder.name}/")
    bends = [b for b in blocks if b.section == "bending"]
    for name in list(node.inputs):
        if name in ("model", "bending_clip") or name not in specs:
            continue
        value = _values(node, [name], draft.source)[name]
        if name == "bending_prompt":
            draft.notes.append(f"the companion node's bending prompt: {value!r}")
        elif name.startswith(("sag_", "slothful_")):
            section, key = name.split("_", 1)
            draft.get(section).values[key] = value
        elif m := re.fullmatch(r"bend(\d+)_(token|strength)", name):
            bends[int(m.group(1)) - 1].values[m.group(2)] = value
    return _Companion(node, recipe, manifest, folder)


# --- notes on the files ---------------------------------------------------------------------------------------

def _files(loader: Node) -> str:
    names = [v for k in N.LOADERS.get(loader.class_type, ()) if isinstance(v := loader.inputs.get(k), str)]
    if loader.class_type not in N.LOADERS:   # a loader ckptbend does not know: whatever looks like a file name
        names = [v for v in [*loader.inputs.values(), *(loader.widgets or [])]
                 if isinstance(v, str) and re.search(r"\.(safetensors|sft|gguf|ckpt|pt|pth|bin)$", v)]
        return (", ".join(map(repr, names)) or "(no file name)") + " (a loader ckptbend does not know)"
    return ", ".join(map(repr, names)) or "(no file name)"


def _loader_notes(chain: Chain, companion: _Companion | None) -> list[str]:
    model, clip = chain.model_loader, chain.clip_loader
    if model is None:
        notes = ["model: no loader found on the model path"]
    else:
        notes = [f"model: {model} loads {_files(model)}"]
    if clip is not None and (model is None or clip.key != model.key):
        notes.append(f"CLIP: {clip} loads {_files(clip)}")
    if companion is not None and companion.recipe.multipliers:
        record = companion.manifest.get("checkpoint") or {}
        baked = f"{record['file']!r} (baked from {record.get('source')!r})" if record.get("file") else "its checkpoint"
        notes.append(f"the companion's static sections are already baked into {baked}: bake this recipe into the "
                     "unbaked source, not into the baked file")
    elif clip is not None and model is not None and clip.key != model.key:
        notes.append("bake this recipe into each file: the model's sections into the model file, [clip]/[text] into "
                     "the text encoders (--allow-missing lets one recipe serve both)")
    elif model is not None:
        notes.append("bake this recipe into that checkpoint")
    return notes
