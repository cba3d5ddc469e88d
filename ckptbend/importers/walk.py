"""Following a workflow's graph from a sampler: the nodes on its MODEL path back to the loader, and the CLIP
its conditioning is encoded with back to its loader. Every walk is a loop over a worklist (no recursion:
a chain of thousands of nodes, or a cycle, ends in a result or one error line).

- A loader is any node without a MODEL (or CLIP) input; the walk stops there.
- A Switch (ComfySwitchNode) passes on the input its `switch` value selects, as ComfyUI evaluates it
  lazily; the other branch never runs. A switch set at run time by another node cannot be followed.
- Only CONDITIONING inputs are followed from the sampler to its text encoders (nodes with a CLIP input):
  an image decoded by an earlier stage, or a prompt written by an LLM node, is not the sampler's
  conditioning, so the text encoders upstream of those are not its CLIP. Zeroed conditioning
  (ConditioningZeroOut) does not depend on the CLIP at all.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from ckptbend.errors import CkptbendError

from . import nodes as N
from .workflow import Broken, Link, Node

# API-format inputs carry no types: the names ComfyUI's nodes give inputs of each type.
NAMED = {"MODEL": re.compile(r"model(_?\d+)?"), "CLIP": re.compile(r"clip(_?\d+)?"),
         "CONDITIONING": re.compile(r"(positive|negative|conditioning)(_\w+)?|cond_?\d*")}


@dataclass
class Chain:
    """What one sampler uses: the nodes on its MODEL and CLIP paths (loader side first), their loaders."""
    sampler: Node
    model: list[Node]
    model_loader: Node | None
    clip: list[Node]
    clip_loader: Node | None
    cfg: object = None
    notes: list[str] = field(default_factory=list)   # switches followed
    merged: dict[str, list[Node]] = field(default_factory=dict)   # a merge on a path → the nodes behind it

    @property
    def signature(self):
        return tuple(n.key for n in self.model), self.model_loader and self.model_loader.key, \
            tuple(n.key for n in self.clip), self.clip_loader and self.clip_loader.key


def inputs_of(node: Node, kind: str) -> list[str]:
    """The node's inputs of type `kind`: UI, by slot type, connected or not; API (no types), the links
    whose input name is one ComfyUI gives inputs of that type (a widget value is never one)."""
    if node.types is not None:
        return [n for n, t in node.types.items() if kind in str(t).upper().split(",")]
    return [n for n, v in node.inputs.items() if isinstance(v, (Link, Broken)) and NAMED[kind].fullmatch(n)]


class Walker:
    def __init__(self, graph: dict[str, Node], source: str):
        self.graph, self.source = graph, source
        self.notes: dict[str, str] = {}
        self.merged: dict[str, list[Node]] = {}

    def fail(self, message: str):
        raise CkptbendError(f"{self.source}: {message}")

    def node(self, user: Node, name: str) -> Node:
        """The node that input `name` of `user` comes from, through any switches."""
        value, hops = user.inputs.get(name), 0
        while True:
            if isinstance(value, Broken):
                self.fail(f"{user} input '{name}' {value.reason}")
            if not isinstance(value, Link):
                self.fail(f"{user} has no connected '{name}' input" if value is None else
                          f"{user} input '{name}' is the value {str(value)[:40]!r}, not a link")
            node = self.graph.get(value.key)
            if node is None:
                self.fail(f"{user} input '{name}' comes from node {value.key}, which is not in the workflow")
            if node.class_type not in N.SWITCHES:
                return node
            if hops > len(self.graph):
                self.fail(f"{user} input '{name}' leads round in a cycle of switches")
            user, name, hops = node, self._active(node), hops + 1
            value = node.inputs.get(name)

    def _active(self, switch: Node) -> str:
        """ComfySwitchNode: on_true if switch else on_false; a missing input gives the other one."""
        connected = [n for n in ("on_false", "on_true") if switch.inputs.get(n) is not None]
        if not connected:
            self.fail(f"{switch} has neither on_true nor on_false connected")
        if len(connected) == 1:
            self.notes[switch.key] = f"{switch}: only {connected[0]} is connected, followed"
            return connected[0]
        flag = switch.inputs.get("switch")
        if not isinstance(flag, bool):
            where = f"comes from node {flag.key} at run time" if isinstance(flag, Link) else f"is {str(flag)[:40]!r}"
            self.fail(f"{switch} selects on_true or on_false by its 'switch' input, which {where}; ckptbend "
                      "cannot tell which input runs (set the switch to true or false in the workflow)")
        name = "on_true" if flag else "on_false"
        self.notes[switch.key] = f"{switch}: switch = {str(flag).lower()}, followed {name}"
        return name

    def _carrier(self, node: Node, kind: str) -> str | None:
        """The input of `kind` the walk continues through, or None at a loader. A node with several
        (a model merge) ends the walk as it is: it is not a loader, and no single path goes on."""
        names = inputs_of(node, kind)
        if not names:
            return None
        connected = [n for n in names if node.inputs.get(n) is not None]
        if len(connected) > 1:
            return ""
        if not connected:
            self.fail(f"{node} has no connected '{names[0]}' input")
        return connected[0]

    def path(self, start: Node, name: str, kind: str) -> tuple[list[Node], Node | None]:
        """The nodes from `start`'s input `name` back to a loader (loader side first), and the loader."""
        found, user, seen = [], start, set()
        while True:
            node = self.node(user, name)
            if node.key in seen:
                self.fail(f"the {kind} path of {start} leads round in a cycle through {node}")
            seen.add(node.key)
            name = self._carrier(node, kind)
            if name is None:
                return found[::-1], node
            found.append(node)
            if name == "":
                self.merged[node.key] = self._behind(node, kind)
                return found[::-1], None
            user = node

    def _behind(self, merge: Node, kind: str) -> list[Node]:
        """Every node upstream of a merge through its `kind` inputs: none of them can join one model's recipe."""
        found, seen = [], {merge.key}
        pending = [(merge, n) for n in inputs_of(merge, kind) if merge.inputs.get(n) is not None]
        while pending:
            user, name = pending.pop()
            node = self.node(user, name)
            if node.key not in seen:
                seen.add(node.key)
                found.append(node)
                pending += [(node, n) for n in inputs_of(node, kind) if node.inputs.get(n) is not None]
        return found

    def encoders(self, holder: Node, names) -> list[Node]:
        """The nodes that encode `holder`'s conditioning with a CLIP, following CONDITIONING inputs only."""
        found, seen = [], set()
        pending = [(holder, n) for n in names if holder.inputs.get(n) is not None]
        while pending:
            user, name = pending.pop(0)
            node = self.node(user, name)
            if node.key in seen or node.class_type in N.ZEROED:
                continue
            seen.add(node.key)
            if self._carrier(node, "CLIP"):
                found.append(node)
            pending += [(node, n) for n in inputs_of(node, "CONDITIONING") if node.inputs.get(n) is not None]
        return found

    def chain(self, sampler: Node) -> Chain:
        self.notes, self.merged = {}, {}
        spec, holder = N.SAMPLERS[sampler.class_type], sampler
        if spec.guider:
            holder = self.node(sampler, spec.guider)
            if holder.class_type not in N.GUIDERS:
                self.fail(f"{sampler} takes its model from the guider {holder}, which ckptbend cannot follow "
                          f"(known guiders: {', '.join(N.GUIDERS)})")
            spec = N.GUIDERS[holder.class_type]
        model, model_loader = self.path(holder, spec.model, "MODEL")
        clips = {}
        for encoder in self.encoders(holder, spec.conditioning):
            clip, loader = self.path(encoder, self._carrier(encoder, "CLIP"), "CLIP")
            clips.setdefault((tuple(n.key for n in clip), loader and loader.key), (clip, loader, encoder))
        if len(clips) > 1:
            users = "; ".join(f"{enc} via {route(ld, c)}" for c, ld, enc in clips.values())
            self.fail(f"{sampler}'s conditioning is encoded through different CLIP chains ({users}); "
                      "a recipe has one [clip]")
        clip, clip_loader, _ = next(iter(clips.values()), ([], None, None))
        cfg = holder.inputs.get(spec.cfg) if spec.cfg else None
        return Chain(sampler, model, model_loader, clip, clip_loader, cfg, list(self.notes.values()), self.merged)


def route(loader: Node | None, path: list[Node]) -> str:
    return " → ".join(([loader.key] if loader else []) + [n.key for n in path]) or "nothing"


def choose_chain(graph: dict[str, Node], source: str, sampler_id: str | None,
                 holds_recipe=lambda chain: True) -> tuple[Chain, list[Chain]]:
    """The chain of the one sampler to import; samplers on one chain count as one. `holds_recipe`
    tells chains with something to import from those without (only the former need choosing)."""
    walker = Walker(graph, source)
    samplers = [n for n in graph.values() if n.class_type in N.SAMPLERS]
    if not samplers:
        raise CkptbendError(f"{source}: no sampler node ({', '.join(N.SAMPLERS)}) in the workflow, so there is no "
                            "model path to import from")
    if sampler_id is not None:
        chosen = [s for s in samplers if s.key == str(sampler_id)]
        if not chosen:
            raise CkptbendError(f"{source}: no sampler with id {sampler_id} (samplers: "
                                f"{', '.join(f'{s.key} ({s.class_type})' for s in samplers)})")
        return walker.chain(chosen[0]), []
    chains, failed = [], []
    for sampler in samplers:
        try:
            chains.append(walker.chain(sampler))
        except CkptbendError as e:
            failed.append(e)
    distinct = {}
    for c in chains:
        if holds_recipe(c):
            distinct.setdefault(c.signature, c)
    if failed and len(distinct) != 1:
        raise failed[0]                  # it may be the sampler wanted; --sampler ID picks another
    distinct = distinct or {chains[0].signature: chains[0]}
    if len(distinct) > 1:
        listing = "; ".join(f"{c.sampler.key} ({c.sampler.class_type}: {route(c.model_loader, c.model)})"
                            for c in distinct.values())
        raise CkptbendError(f"{source}: {len(distinct)} samplers use different model/CLIP chains ({listing}); "
                            "choose one with --sampler ID")
    first = next(iter(distinct.values()))
    others = [c for c in chains if c is not first]
    first.notes += [f"sampler {c.sampler} uses another chain, with nothing to import" for c in others
                    if c.signature != first.signature]
    first.notes += [f"not followed: {' '.join(str(e).split(': ', 1)[-1:])}" for e in failed]
    return first, [c for c in others if c.signature == first.signature]
