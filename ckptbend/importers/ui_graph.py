"""UI-format workflows → the graph the frontend would queue, read as ComfyUI's frontend (1.58) builds a
prompt from the saved graph (graphToPrompt, ExecutableNodeDTO.resolveInput/resolveOutput):
- a link is followed back through Reroute nodes, GetNode → SetNode pairs, bypassed nodes (mode 4: the
  input of the wanted type passes through, the one at the output's position first) and subgraph
  instances (into the definition for an output; out to the instance for a subgraph input);
- a subgraph input is bound to the instance's input of the same name (and type), as the frontend binds
  them: a saved instance lists only some of its inputs, so positions do not match;
- a subgraph input nothing is linked to carries the value promoted onto the instance's widget (the
  instance's `widgets_values`, or the legacy `proxyWidgets` pairs); the inner widget's own value is stale;
- a muted node (mode 2) produces nothing: an input linked to it is dropped, and said so if the walk needs it;
- a PrimitiveNode's value is inlined; a legacy group node expands as the frontend expands it (group_nodes.py).
Inside instance N, node M is "N:M", as in ComfyUI's own prompts.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field

from ckptbend.errors import CkptbendError

from . import nodes as N
from .limits import MAX_NODES
from .workflow import Broken, Link, Node, fill_widgets, widget_names

MUTED, BYPASSED = 2, 4
INPUT_NODE, OUTPUT_NODE = "-10", "-20"   # a subgraph's own input and output nodes
MAX_NESTING = 32
VIRTUAL = N.REROUTES + N.PRIMITIVES + N.NOT_EXECUTED + ("SetNode", "GetNode")
LEGACY_PREFIX = re.compile(r"^\s*\d+\s*:\s*(.+)$")   # "12: seed", a proxyWidgets name of older frontends


@dataclass(frozen=True)
class Value:
    value: object


def _key(x) -> str | None:
    return str(x) if isinstance(x, (int, str)) and not isinstance(x, bool) else None


@dataclass
class _Scope:
    """One graph level: the top level, or the inside of one subgraph (or group node) instance."""
    prefix: str                                      # "" or "12:" (instance 12's nodes are "12:M")
    nodes: dict[str, dict]
    links: dict[str, tuple | None]                   # link id → (origin, origin slot, target, target slot); None: malformed
    outputs: dict[int, str] = field(default_factory=dict)   # subgraph output slot → the link id into it
    parent: _Scope | None = None
    names: dict[int, str] = field(default_factory=dict)     # subgraph input slot → its name
    bound: dict[int, tuple] = field(default_factory=dict)   # subgraph input slot → (parent's link id, type)
    promoted: dict[str, object] = field(default_factory=dict)          # subgraph input name → widget value
    direct: dict[tuple[str, str], object] = field(default_factory=dict)  # (inner node, widget) → value


def ui_graph(data: dict, source: str) -> dict[str, Node]:
    return _UIGraph(data, source).convert()


class _UIGraph:
    def __init__(self, data: dict, source: str):
        from .group_nodes import GroupNodes

        self.source = source
        self.definitions: dict[str, dict] = {}
        pending = [data]
        while pending:                                       # definitions may hold definitions
            holder = pending.pop().get("definitions")
            for d in (holder.get("subgraphs") if isinstance(holder, dict) else None) or []:
                if isinstance(d, dict) and _key(d.get("id")) is not None and isinstance(d.get("nodes"), list):
                    self.definitions.setdefault(str(d["id"]), d)
                    pending.append(d)
        self.groups = GroupNodes(data, source)
        self.expanded = 0
        self.scopes: dict[str, _Scope] = {}
        self.top = self._scope(data, "", None)

    def _fail(self, message: str):
        raise CkptbendError(f"{self.source}: {message}")

    def _scope(self, graph: dict, prefix: str, parent: _Scope | None) -> _Scope:
        nodes = {}
        for node in graph.get("nodes") or []:
            nid = _key(node.get("id")) if isinstance(node, dict) else None
            if nid is None:
                self._fail(f"a node{f' in subgraph instance {prefix[:-1]}' if prefix else ''} has no id: {str(node)[:60]}")
            if not isinstance(node.get("type"), str):
                self._fail(f"node {prefix}{nid} of the UI-format workflow has no type")
            nodes[nid] = node
        self.expanded += len(nodes)
        if self.expanded > MAX_NODES:
            self._fail(f"expands to more than {MAX_NODES} nodes (subgraphs or group nodes used within each other)")
        links, outputs = {}, {}
        for link in graph.get("links") or []:
            if isinstance(link, dict):
                fields = [link.get(k) for k in ("id", "origin_id", "origin_slot", "target_id", "target_slot")]
            else:
                fields = list(link[:5]) if isinstance(link, list) else [None]
            lid = _key(fields[0])
            if lid is None:
                continue
            ok = len(fields) == 5 and _key(fields[1]) is not None and isinstance(fields[2], int) \
                and not isinstance(fields[2], bool) and isinstance(fields[4], int)
            links[lid] = (_key(fields[1]), fields[2], _key(fields[3]), fields[4]) if ok else None
            if ok and _key(fields[3]) == OUTPUT_NODE:
                outputs[fields[4]] = lid
        scope = _Scope(prefix, nodes, links, outputs, parent)
        self.scopes[prefix] = scope
        return scope

    # --- subgraph instances ----------------------------------------------------------------------------

    def _inside(self, scope: _Scope, node: dict) -> _Scope:
        prefix = f"{scope.prefix}{node['id']}:"
        if prefix in self.scopes:
            return self.scopes[prefix]
        if prefix.count(":") > MAX_NESTING:
            self._fail(f"subgraphs nested more than {MAX_NESTING} deep (a subgraph that contains itself?)")
        definition = self.definitions.get(node["type"])
        if definition is None:                               # a legacy group node
            definition, node = self.groups.expand(node, prefix[:-1])
        inner = self._scope(definition, prefix, scope)
        declared = [d if isinstance(d, dict) else {} for d in definition.get("inputs") or []]
        inner.names = {i: d.get("name") for i, d in enumerate(declared)}
        inner.bound = _bind(declared, [i for i in node.get("inputs") or [] if isinstance(i, dict)])
        self._promote(inner, declared, node)
        return inner

    def _promote(self, inner: _Scope, declared: list[dict], instance: dict) -> None:
        """The values promoted onto the instance's widgets, as the frontend restores them: positionally
        over the subgraph inputs that feed a widget, then (legacy) over the `proxyWidgets` pairs."""
        props = instance.get("properties") if isinstance(instance.get("properties"), dict) else {}
        values = instance.get("widgets_values")
        named = values if isinstance(values, dict) else {}
        values = values if isinstance(values, list) else []
        held = {e["originalEntry"][1]: e["hostValue"] for e in _property(props, "proxyWidgetErrorQuarantine")
                if isinstance(e, dict) and "hostValue" in e and _pair(e.get("originalEntry"))
                and e["originalEntry"][0] == "-1"}
        with_widget = [d.get("name") for d in declared if self._feeds_widget(inner, d)]
        for name, value in zip(with_widget, values):
            inner.promoted[name] = value
        inner.promoted.update({name: v for name, v in held.items() if name in with_widget})
        for i, entry in enumerate(_property(props, "proxyWidgets")):
            if not _pair(entry) or i >= len(values):
                continue
            origin, widget = entry[0], entry[1]
            target = widget if origin == "-1" else self._promoting(inner, declared, origin, widget)
            if target is not None:
                inner.promoted[target] = values[i]
            else:
                m = LEGACY_PREFIX.match(widget)
                inner.direct[(origin, m[1] if m else widget)] = values[i]
        inner.promoted.update({k: v for k, v in named.items() if k in inner.names.values()})

    def _targets(self, inner: _Scope, declared: dict):
        """(inner node, its input) each link from a subgraph input reaches."""
        for lid in declared.get("linkIds") or []:
            link = inner.links.get(_key(lid) or "")
            node = inner.nodes.get(link[2]) if link else None
            for slot in (node or {}).get("inputs") or []:
                if isinstance(slot, dict) and _key(slot.get("link")) == _key(lid):
                    yield link[2], slot

    def _feeds_widget(self, inner: _Scope, declared: dict) -> bool:
        return any(isinstance(slot.get("widget"), dict) for _, slot in self._targets(inner, declared))

    def _promoting(self, inner: _Scope, declared: list[dict], origin: str, widget: str) -> str | None:
        m = LEGACY_PREFIX.match(widget)
        wanted = {widget, m[1]} if m else {widget}
        for d in declared:
            for nid, slot in self._targets(inner, d):
                if nid == origin and isinstance(slot.get("widget"), dict) and slot["widget"].get("name") in wanted:
                    return d.get("name")
        return None

    # --- following a link ------------------------------------------------------------------------------

    def resolve(self, scope: _Scope, link_id, want: object):
        """What a link delivers: a Link to a real node's output, a Value, a Broken input, or None (nothing:
        the frontend leaves the input out). `want` is the type of the input being resolved."""
        seen, fallback = set(), None
        while True:
            lid = _key(link_id)
            if link_id is None or lid is None:
                return fallback
            if (scope.prefix, lid) in seen:
                return Broken(f"leads round in a cycle (link {lid}{f' in subgraph instance {scope.prefix[:-1]}' if scope.prefix else ''})")
            seen.add((scope.prefix, lid))
            if lid not in scope.links:
                return Broken(f"comes through link {lid}, which is not in the workflow")
            if scope.links[lid] is None:
                return Broken(f"comes through link {lid}, which is malformed")
            origin, slot = scope.links[lid][:2]
            if origin == INPUT_NODE:                          # out of the subgraph, to its instance
                if scope.parent is None:
                    return Broken(f"comes from a subgraph input (link {lid}) outside any subgraph")
                name = scope.names.get(slot)
                if name in scope.promoted:                    # the outer instance's value wins over inner ones
                    fallback = Value(scope.promoted[name])
                if slot not in scope.bound:
                    return fallback
                link_id, want = scope.bound[slot]
                scope = scope.parent
                continue
            node = scope.nodes.get(origin)
            if node is None:
                return Broken(f"comes from node {scope.prefix}{origin}, which is not in the workflow")
            label = f"node {scope.prefix}{origin} ({node['type']})"
            mode = node.get("mode")
            if mode == MUTED:
                return Broken(f"comes from {label}, which is muted (mode 2): ComfyUI drops every input linked "
                              "to a muted node, so the workflow cannot run")
            if mode == BYPASSED:
                index = _bypass_input(node, slot, want)
                if index is None:
                    return Broken(f"comes from {label}, which is bypassed and has no {want} input to pass on")
                link_id, want = node["inputs"][index].get("link"), node["inputs"][index].get("type")
                continue
            kind = node["type"]
            if kind in self.definitions or self.groups.is_group(kind):
                scope = self._inside(scope, node)
                link_id = scope.outputs.get(slot)
            elif kind in N.PRIMITIVES:
                overrides = [v for (nid, _), v in scope.direct.items() if nid == origin]
                widgets = node.get("widgets_values")
                return Value(overrides[0] if overrides else widgets[0] if isinstance(widgets, list) and widgets else None)
            elif kind in N.REROUTES + ("SetNode",):
                link_id = _first_link(node)
            elif kind == "GetNode":
                link_id = self._setter_link(scope, node)
            elif kind in N.NOT_EXECUTED:
                return Broken(f"comes from {label}, which is a note")
            else:
                return Link(scope.prefix + origin, slot)

    def _setter_link(self, scope: _Scope, getter: dict):
        name = (getter.get("widgets_values") or [None])[0] if isinstance(getter.get("widgets_values"), list) else None
        setter = next((n for n in scope.nodes.values() if n["type"] == "SetNode"
                       and isinstance(n.get("widgets_values"), list) and n["widgets_values"][:1] == [name]), None)
        return _first_link(setter) if setter else None

    # --- the graph ---------------------------------------------------------------------------------------

    def convert(self) -> dict[str, Node]:
        graph: dict[str, Node] = {}
        pending = [self.top]
        while pending:
            scope = pending.pop()
            for nid, node in scope.nodes.items():
                kind = node["type"]
                if node.get("mode") in (MUTED, BYPASSED) or kind in VIRTUAL:
                    continue
                if kind in self.definitions or self.groups.is_group(kind):
                    pending.append(self._inside(scope, node))
                    continue
                graph[scope.prefix + nid] = self._node(scope, nid, node)
        return graph

    def _node(self, scope: _Scope, nid: str, node: dict) -> Node:
        inputs, types = {}, {}
        for slot in node.get("inputs") or []:
            if not isinstance(slot, dict) or not isinstance(slot.get("name"), str):
                continue
            types[slot["name"]] = slot.get("type")
            value = self.resolve(scope, slot.get("link"), slot.get("type"))
            if value is not None:
                inputs[slot["name"]] = value.value if isinstance(value, Value) else value
        title = node.get("title")
        out = Node(scope.prefix + nid, node["type"], inputs, title if isinstance(title, str) else "", None, types)
        values = node.get("widgets_values")
        if isinstance(values, dict):                          # named widget values (some custom nodes)
            out.inputs.update({k: v for k, v in values.items() if isinstance(k, str) and k not in out.inputs})
        elif isinstance(values, list):
            out.widgets = list(values)
            names = widget_names(out.class_type, out.widgets)
            if names is not None:
                fill_widgets(out, names)
        for (target, widget), value in scope.direct.items():  # legacy proxyWidgets values for this node
            if target == nid and not isinstance(out.inputs.get(widget), Link):
                out.inputs[widget] = value
        return out


def _bind(declared: list[dict], given: list[dict]) -> dict[int, tuple]:
    """Subgraph input slot → (the instance's link id, its type): each input the instance lists takes the
    first free subgraph input of the same name and type, else of the same name (the frontend's rebind)."""
    bound: dict[int, tuple] = {}
    for slot in given:
        free = [i for i, d in enumerate(declared) if i not in bound and d.get("name") == slot.get("name")]
        match = next((i for i in free if declared[i].get("type") == slot.get("type")), free[0] if free else None)
        if match is not None:
            bound[match] = (slot.get("link"), slot.get("type"))
    return bound


def _compatible(a, b) -> bool:
    """litegraph's isValidConnection: wildcards, equal types, or comma-separated lists that overlap."""
    if a in ("", "*", 0, None) or b in ("", "*", 0, None) or a == b:
        return True
    left, right = str(a).lower().split(","), str(b).lower().split(",")
    return any(x == y or x in ("", "*") or y in ("", "*") for x in left for y in right)


def _bypass_input(node: dict, slot: int, want) -> int | None:
    """The input a bypassed node passes to output `slot` for an input of type `want` (the frontend's
    _getBypassSlotIndex): the same position if it fits, else the first of exactly that type, else the
    first that fits."""
    inputs = [i if isinstance(i, dict) else {} for i in node.get("inputs") or []]
    outputs = node.get("outputs") or []
    out_type = outputs[slot].get("type") if 0 <= slot < len(outputs) and isinstance(outputs[slot], dict) else None
    if not inputs:
        return None
    if want in ("*", "", None):
        return slot if 0 <= slot < len(inputs) else 0
    if 0 <= slot < len(inputs) and _compatible(inputs[slot].get("type"), out_type) \
            and _compatible(inputs[slot].get("type"), want):
        return slot
    exact = next((i for i, s in enumerate(inputs) if s.get("type") == want), None)
    if exact is not None:
        return exact
    return next((i for i, s in enumerate(inputs)
                 if _compatible(s.get("type"), out_type) and _compatible(s.get("type"), want)), None)


def _first_link(node: dict):
    inputs = node.get("inputs") or []
    return inputs[0].get("link") if inputs and isinstance(inputs[0], dict) else None


def _property(props: dict, name: str) -> list:
    """A node property holding a list, maybe as JSON text (the frontend reads both)."""
    value = props.get(name)
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError:
            return []
    return value if isinstance(value, list) else []


def _pair(entry) -> bool:
    return isinstance(entry, list) and len(entry) in (2, 3) and all(isinstance(x, str) for x in entry)
