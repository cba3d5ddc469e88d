"""ComfyUI workflows → recipes.

Both formats are read into one graph of `Node`s keyed by node id:
- API format (`{"6": {"class_type": "KSampler", "inputs": {...}}}`, what /prompt takes and the
  `prompt` chunk of a saved image holds): inputs are values or links `[node id, output slot]`;
- UI format (`{"nodes": [...], "links": [...]}`, the `workflow` chunk): converted the way the frontend
  builds a prompt: widget values by position (nodes.WIDGETS), links through Reroute nodes, subgraphs
  and bypassed/muted nodes (their input of the same type passes through), PrimitiveNode values inlined.
  Inside a subgraph instance N, node M is "N:M", as in ComfyUI's own prompts.
Then, from the chosen sampler, the MODEL input is followed back to the loader and the conditioning's
CLIP inputs back to theirs; the patch nodes met on the way become the recipe's sections.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from ckptbend.errors import CkptbendError

from . import nodes as N
from .draft import Draft, slug

COMPANION_NODE = re.compile(r"ckptbend_\w+_[0-9a-f]{8}")   # comfy_host.node_id's shape
MUTED, BYPASSED = 2, 4


@dataclass
class Node:
    key: str
    class_type: str
    inputs: dict                          # name → value, or Link
    title: str = ""
    widgets: list | None = None           # UI format: widget values of a node whose widget names are not known yet

    def __str__(self):
        title = f" \"{self.title}\"" if self.title and self.title != self.class_type else ""
        return f"node {self.key} ({self.class_type}{title})"


@dataclass(frozen=True)
class Link:
    key: str
    slot: int


# --- reading the two formats ------------------------------------------------------------------------

def read_graph(data, source: str) -> tuple[dict[str, Node], str]:
    """(nodes by key, "API" or "UI") from a parsed workflow JSON document."""
    if isinstance(data, dict) and isinstance(data.get("nodes"), list):
        try:
            return _inline_values(_UIGraph(data, source).convert()), "UI"
        except (KeyError, TypeError, ValueError, IndexError, AttributeError) as e:
            raise CkptbendError(f"{source}: malformed UI-format workflow ({type(e).__name__}: {e})") from None
    if isinstance(data, dict) and data and all(isinstance(v, dict) and "class_type" in v for v in data.values()):
        graph = {}
        for key, node in data.items():
            inputs = node.get("inputs", {})
            if not isinstance(inputs, dict) or not isinstance(node["class_type"], str):
                raise CkptbendError(f"{source}: node {key} of the API-format workflow is malformed")
            graph[str(key)] = Node(str(key), node["class_type"], {k: _api_value(v) for k, v in inputs.items()},
                                   str((node.get("_meta") or {}).get("title", "")))
        return _inline_values(graph), "API"
    raise CkptbendError(f"{source}: not a ComfyUI workflow (neither the API format {{id: {{class_type, inputs}}}} "
                        "nor the UI format {nodes, links})")


def _inline_values(graph: dict[str, Node]) -> dict[str, Node]:
    """Inputs linked to a value node (PrimitiveFloat, ...) take its value, as if typed into the widget."""
    for node in graph.values():
        for name, value in node.inputs.items():
            source = graph.get(value.key) if isinstance(value, Link) else None
            if source is not None and source.class_type in N.VALUES and not isinstance(source.inputs.get("value"), Link):
                node.inputs[name] = source.inputs.get("value")
    return graph


def _api_value(value):
    if isinstance(value, list) and len(value) == 2 and isinstance(value[0], (str, int)) \
            and isinstance(value[1], int) and not isinstance(value[1], bool):
        return Link(str(value[0]), value[1])
    return value


def _kind_fits(kind: type, value) -> bool:
    if kind is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, kind)


def widget_names(class_type: str, values: list) -> tuple[str, ...] | None:
    """The widget names of a known node, in order, picking the version whose value kinds fit."""
    for version in N.WIDGETS.get(class_type, ()):
        if len(values) >= len(version) and all(_kind_fits(k, v) for (_, k), v in zip(version, values)):
            return tuple(name for name, _ in version)
    return None


def fill_widgets(node: Node, names) -> None:
    """Name a UI node's widget values; a widget converted to a linked input keeps the link's value."""
    for name, value in zip(names, node.widgets or ()):
        if name != N.CONTROL and name not in node.inputs:
            node.inputs[name] = value
    node.widgets = None


@dataclass
class _Scope:
    """One graph level: the top level, or the inside of one subgraph instance."""
    prefix: str                                   # "" or "12:" (instance 12's nodes are "12:M")
    nodes: dict[int, dict]
    links: dict[int, tuple[int, int]]             # link id → (origin node id, origin slot)
    outputs: dict[int, int] = field(default_factory=dict)   # subgraph output slot → link id into it
    instance: dict | None = None                  # the subgraph node this scope is the inside of
    parent: _Scope | None = None


class _UIGraph:
    INPUT_NODE, OUTPUT_NODE = -10, -20            # a subgraph's own input and output nodes

    def __init__(self, data: dict, source: str):
        self.source = source
        self.definitions = {d["id"]: d for d in (data.get("definitions") or {}).get("subgraphs", [])}
        self.top = self._scope(data, "", None, None)

    def _scope(self, graph: dict, prefix: str, instance, parent) -> _Scope:
        links, outputs = {}, {}
        for link in graph.get("links") or []:
            lid, origin, slot, target, target_slot = (
                (link["id"], link["origin_id"], link["origin_slot"], link["target_id"], link["target_slot"])
                if isinstance(link, dict) else link[:5])
            links[lid] = (origin, slot)
            if target == self.OUTPUT_NODE:
                outputs[target_slot] = lid
        return _Scope(prefix, {n["id"]: n for n in graph["nodes"]}, links, outputs, instance, parent)

    def _inside(self, scope: _Scope, node: dict) -> _Scope:
        if scope.prefix.count(":") >= 32:
            raise CkptbendError(f"{self.source}: subgraphs nested more than 32 deep (a subgraph that contains itself?)")
        return self._scope(self.definitions[node["type"]], f"{scope.prefix}{node['id']}:", node, scope)

    def resolve(self, scope: _Scope, link_id, depth: int = 0):
        """What a link delivers: a Link to a real node's output, a literal (PrimitiveNode), or None."""
        if link_id is None:
            return None
        if depth > 1000:
            raise CkptbendError(f"{self.source}: link {link_id} leads round in a cycle of reroutes or subgraphs")
        if link_id not in scope.links:
            raise CkptbendError(f"{self.source}: link {link_id} is used but not defined")
        origin, slot = scope.links[link_id]
        if origin == self.INPUT_NODE:              # a subgraph input: whatever feeds the instance's slot
            return self.resolve(scope.parent, scope.instance["inputs"][slot].get("link"), depth + 1)
        node = scope.nodes[origin]
        if node.get("mode") in (MUTED, BYPASSED):  # skipped: its input of the output's type passes through
            return self.resolve(scope, _pass_through(node, slot), depth + 1)
        if node["type"] in self.definitions:       # a subgraph instance's output: what feeds it inside
            inner = self._inside(scope, node)
            return self.resolve(inner, inner.outputs.get(slot), depth + 1)
        if node["type"] in N.PRIMITIVES:
            return (node.get("widgets_values") or [None])[0]
        if node["type"] in N.REROUTES:
            return self.resolve(scope, node["inputs"][0].get("link"), depth + 1)
        return Link(scope.prefix + str(origin), slot)

    def convert(self) -> dict[str, Node]:
        graph: dict[str, Node] = {}
        pending = [self.top]
        while pending:
            scope = pending.pop()
            for node in scope.nodes.values():
                kind = node["type"]
                if node.get("mode") in (MUTED, BYPASSED) or kind in N.REROUTES + N.PRIMITIVES + N.NOT_EXECUTED:
                    continue
                if kind in self.definitions:
                    pending.append(self._inside(scope, node))
                    continue
                inputs = {}
                for slot in node.get("inputs") or []:
                    value = self.resolve(scope, slot.get("link"))
                    if value is not None:
                        inputs[slot["name"]] = value
                key = scope.prefix + str(node["id"])
                graph[key] = Node(key, kind, inputs, str(node.get("title") or ""), list(node.get("widgets_values") or []))
                names = widget_names(kind, graph[key].widgets)
                if names is not None:
                    fill_widgets(graph[key], names)
        return graph


def _pass_through(node: dict, slot: int):
    """The input link a skipped node passes to output `slot`: the input at the same position if its
    type matches, else the first input of that type (as the frontend does for bypass)."""
    out_type = node["outputs"][slot]["type"]
    inputs = node.get("inputs") or []
    if slot < len(inputs) and inputs[slot]["type"] == out_type:
        return inputs[slot].get("link")
    return next((i.get("link") for i in inputs if i["type"] == out_type), None)


# --- following the graph from a sampler ---------------------------------------------------------------

@dataclass
class Chain:
    """What one sampler uses: the nodes on its MODEL and CLIP paths, loader first."""
    sampler: Node
    model: list[Node]
    model_loader: Node | None
    clip: list[Node]
    clip_loader: Node | None
    cfg: object = None

    @property
    def signature(self):
        return tuple(n.key for n in self.model), self.model_loader and self.model_loader.key, \
            tuple(n.key for n in self.clip), self.clip_loader and self.clip_loader.key


class _Walker:
    def __init__(self, graph: dict[str, Node], source: str):
        self.graph, self.source = graph, source

    def node(self, link: Link, user: Node, name: str) -> Node:
        if link.key not in self.graph:
            raise CkptbendError(f"{self.source}: {user} input '{name}' comes from node {link.key}, "
                                "which is not in the workflow (or is muted)")
        return self.graph[link.key]

    def path(self, start: Node, through: str) -> tuple[list[Node], Node | None]:
        """The nodes from `start`'s input `through` ("model"/"clip") back to a loader, loader first."""
        found, user, seen = [], start, set()
        while isinstance(link := user.inputs.get(through), Link):
            node = self.node(link, user, through)
            if node.key in seen:
                raise CkptbendError(f"{self.source}: the {through} path through {node} is a cycle")
            seen.add(node.key)
            if node.class_type in N.LOADERS:
                return found[::-1], node
            found.append(node)
            user = node
        if user is start:
            raise CkptbendError(f"{self.source}: {start} has no connected '{through}' input")
        return found[::-1], None

    def chain(self, sampler: Node) -> Chain:
        spec, holder = N.SAMPLERS[sampler.class_type], sampler
        if spec.guider:
            link = sampler.inputs.get(spec.guider)
            if not isinstance(link, Link):
                raise CkptbendError(f"{self.source}: {sampler} has no connected '{spec.guider}' input")
            holder = self.node(link, sampler, spec.guider)
            if holder.class_type not in N.GUIDERS:
                raise CkptbendError(f"{self.source}: {sampler} takes its model from the guider {holder}, which "
                                    f"ckptbend cannot follow (known guiders: {', '.join(N.GUIDERS)})")
            spec = N.GUIDERS[holder.class_type]
        model, model_loader = self.path(holder, spec.model)
        clips = {}
        for encoder in self._clip_users(holder, spec.conditioning):
            clip, loader = self.path(encoder, "clip")
            clips[(tuple(n.key for n in clip), loader and loader.key)] = (clip, loader, encoder)
        if len(clips) > 1:
            users = "; ".join(f"{enc} via {_route(ld, c)}" for c, ld, enc in clips.values())
            raise CkptbendError(f"{self.source}: {sampler}'s conditioning is encoded through different CLIP "
                                f"chains ({users}); a recipe has one [clip]")
        clip, clip_loader, _ = next(iter(clips.values()), ([], None, None))
        return Chain(sampler, model, model_loader, clip, clip_loader, holder.inputs.get(spec.cfg) if spec.cfg else None)

    def _clip_users(self, holder: Node, names) -> list[Node]:
        """Nodes upstream of the conditioning inputs that take a CLIP (text encoders), in order found."""
        users, seen = [], set()
        pending = [(holder, n) for n in names]
        while pending:
            user, name = pending.pop(0)
            link = user.inputs.get(name)
            if not isinstance(link, Link) or link.key in seen:
                continue
            seen.add(link.key)
            node = self.node(link, user, name)
            if isinstance(node.inputs.get("clip"), Link):
                users.append(node)
            pending += [(node, n) for n, v in node.inputs.items() if isinstance(v, Link) and n not in ("clip", "model")]
        return users


def _route(loader: Node | None, path: list[Node]) -> str:
    return " → ".join(([loader.key] if loader else []) + [n.key for n in path]) or "nothing"


# --- the recipe -----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Options:
    name: str | None = None
    sampler: str | None = None
    ignore_other_patches: bool = False
    companions: tuple[Path, ...] = ()
    allow_out_of_range: bool = False


def choose_chain(graph: dict[str, Node], source: str, sampler_id: str | None) -> tuple[Chain, list[Chain]]:
    walker = _Walker(graph, source)
    samplers = [n for n in graph.values() if n.class_type in N.SAMPLERS]
    if not samplers:
        raise CkptbendError(f"{source}: no sampler node ({', '.join(N.SAMPLERS)}) in the workflow")
    if sampler_id is not None:
        chosen = [s for s in samplers if s.key == str(sampler_id)]
        if not chosen:
            raise CkptbendError(f"{source}: no sampler with id {sampler_id} (samplers: "
                                f"{', '.join(f'{s.key} ({s.class_type})' for s in samplers)})")
        return walker.chain(chosen[0]), []
    chains = [walker.chain(s) for s in samplers]
    if len({c.signature for c in chains}) > 1:
        listing = "; ".join(f"{c.sampler.key} ({c.sampler.class_type}: {_route(c.model_loader, c.model)})"
                            for c in chains)
        raise CkptbendError(f"{source}: {len(chains)} samplers use different model/CLIP chains ({listing}); "
                            f"choose one with --sampler ID")
    return chains[0], chains[1:]


def workflow_draft(data, source: Path, opts: Options, where: str = "") -> Draft:
    """The recipe a workflow's chosen sampler runs with; `where` names the chunk it came from."""
    label = f"{source}{where}"
    graph, fmt = read_graph(data, label)
    chain, same = choose_chain(graph, label, opts.sampler)
    draft = Draft(label, opts.name or "")
    draft.notes.append(f"Imported by `ckptbend recipe import` from {source.name}{where} "
                       f"(ComfyUI {fmt}-format workflow)")
    draft.notes.append(f"sampler: {chain.sampler}" + (f" (same chain: {', '.join(c.sampler.key for c in same)})" if same else ""))
    companion = None
    others: list[str] = []
    # A companion's static sections are baked into the checkpoint it belongs to: they come first.
    for node in sorted(chain.model, key=lambda n: not COMPANION_NODE.fullmatch(n.class_type)):
        if COMPANION_NODE.fullmatch(node.class_type):
            if companion is not None:
                raise CkptbendError(f"{label}: two ckptbend companion nodes ({companion.node.key}, {node.key}) on the "
                                    "model path; each replaces the other's attention hooks")
            companion = _add_companion(draft, node, source, opts.companions)
        elif node.class_type in N.PATCHES and N.PATCHES[node.class_type].through == "model":
            _add_patch(draft, node)
        else:
            others.append(f"{node} on the model path")
    for node in chain.clip:
        if node.class_type in N.PATCHES and N.PATCHES[node.class_type].through == "clip":
            _add_patch(draft, node)
        else:
            others.append(f"{node} on the CLIP path")
    if others and not opts.ignore_other_patches:
        raise CkptbendError(f"{label}: cannot be expressed in a recipe: {'; '.join(others)}. LoRAs, model merges and "
                            "other patches change the model in ways a recipe cannot hold; pass --ignore-other-patches "
                            "to import the rest and list these as comments")
    draft.notes += [f"left out (not expressible in a recipe): {o}" for o in others]
    draft.notes += _loader_notes(chain, companion)
    draft.name = companion.recipe.name if companion else slug(source.stem)
    draft.description = f"Imported from {source.name}{where}: ComfyUI sampler {chain.sampler.key} ({chain.sampler.class_type})."
    if companion is not None:   # the graph is the companion's recipe exactly: keep its description (and hash)
        provenance, draft.description = draft.description, companion.recipe.description
        if draft.recipe(allow_out_of_range=True).sha256 != companion.recipe.sha256:
            draft.description = provenance
    draft.name = opts.name or draft.name
    if draft.get("sag") is not None and _number(chain.cfg) is not None and chain.cfg <= 1:
        draft.warnings.append(f"{label}: SAG needs classifier-free guidance, but {chain.sampler} runs with cfg {chain.cfg}")
    return draft


def _number(value):
    return value if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _values(node: Node, keys, label: str) -> dict:
    values = {}
    for key in keys:
        value = node.inputs.get(key)
        if value is None:
            raise CkptbendError(f"{label}: {node} has no value for '{key}'")
        if isinstance(value, Link):
            raise CkptbendError(f"{label}: {node} input '{key}' comes from node {value.key}; only values written "
                                "in the workflow can be imported")
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
    blocks = draft.add_recipe_text(recipe.canonical(), f"{node}: the ckptbend companion of {recipe.name!r} "
                                                       f"({recipe.sha256[:12]}), {folder.name}/")
    bends = [b for b in blocks if b.section == "bending"]
    for name, value in node.inputs.items():
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


def _loader_notes(chain: Chain, companion: _Companion | None) -> list[str]:
    loaders = {chain.model_loader.key: chain.model_loader} if chain.model_loader else {}
    if chain.clip_loader:
        loaders.setdefault(chain.clip_loader.key, chain.clip_loader)
    notes = [f"checkpoint: {loader} loads "
             + (", ".join(repr(v) for k in N.LOADERS[loader.class_type] if isinstance(v := loader.inputs.get(k), str))
                or "(no file name)")
             for loader in loaders.values()] or ["checkpoint: no loader found on the model path"]
    if companion is not None and companion.recipe.multipliers:
        record = companion.manifest.get("checkpoint") or {}
        baked = f"{record['file']!r} (baked from {record.get('source')!r})" if record.get("file") else "its checkpoint"
        notes.append(f"the companion's static sections are already baked into {baked}: bake this recipe into the "
                     "unbaked source, not into the baked file")
    elif loaders:
        notes.append("bake this recipe into that checkpoint")
    return notes
