"""Legacy group nodes (frontends of 2024, before subgraphs): an instance of type "workflow>NAME" (older
"workflow/NAME") runs the nodes saved in the workflow's `extra.groupNodes[NAME]` = {nodes, links: [[from
index, slot, to index, slot, id, type]], external: [[index, slot, type]], config}. The frontend (1.58)
unpacks each instance into those nodes, copies the instance's widget values into them and makes them a
subgraph (groupNode.ts: GroupNodeConfig, convertToNodes); each instance becomes the equivalent subgraph
definition here, following the same order:
- the instance's inputs are the inner inputs no inner link feeds: each node's non-widget inputs, node by
  node, then every node's widget inputs converted to sockets; named as the frontend names them (a label or
  the config's name, a node title in front when two would share a name);
- its widget values are each node's own widgets, node by node (a PrimitiveNode's only if it feeds an
  inner node), then the converted widgets; they replace the saved inner values;
- its outputs are each node's outputs that no inner link consumes (or that `external` or the config shows).
Where the values cannot be lined up with known widget names, the saved inner values stay; a group holding
a node a recipe is read from is then refused rather than read from stale values.
"""

from __future__ import annotations

import copy

from ckptbend.errors import CkptbendError

from . import nodes as N
from .workflow import widget_names

PREFIXES = ("workflow>", "workflow/")
CONTROLLED = ("seed", "noise_seed")    # the frontend adds a control_after_generate widget after these


class GroupNodes:
    def __init__(self, data: dict, source: str):
        extra = data.get("extra") if isinstance(data.get("extra"), dict) else {}
        groups = extra.get("groupNodes")
        self.groups = groups if isinstance(groups, dict) else {}
        self.source = source

    def name(self, kind: str) -> str | None:
        name = next((kind[len(p):] for p in PREFIXES if kind.startswith(p)), None)
        return name if isinstance(self.groups.get(name), dict) else None

    def is_group(self, kind: str) -> bool:
        return self.groups and self.name(kind) is not None

    def expand(self, instance: dict, key: str) -> tuple[dict, dict]:
        """(a subgraph definition equivalent to the group, the instance as its subgraph node)."""
        group = self.groups[self.name(instance["type"])]
        try:
            return _Expansion(group, instance).result()
        except (TypeError, ValueError, IndexError, AttributeError, KeyError) as e:
            raise CkptbendError(f"{self.source}: group node {key} ({instance['type']}) is malformed "
                                f"({type(e).__name__}: {e})") from None
        except _Unaligned as e:
            raise CkptbendError(f"{self.source}: group node {key} ({instance['type']}) holds {e}, but its widget "
                                "values cannot be lined up with its inner nodes' widgets; ungroup it in ComfyUI "
                                "(or convert it to a subgraph) and save again") from None


class _Unaligned(Exception):
    pass


class _Expansion:
    def __init__(self, group: dict, instance: dict):
        self.nodes = [copy.deepcopy(n) if isinstance(n, dict) else {} for n in group.get("nodes") or []]
        self.config = group.get("config") if isinstance(group.get("config"), dict) else {}
        self.instance = instance
        self.internal = {}                 # (to index, to slot) → (from index, from slot)
        self.used = set()                  # (from index, from slot) consumed inside
        for link in group.get("links") or []:
            if isinstance(link, list) and len(link) >= 4 and link[0] is not None:
                self.internal[(link[2], link[3])] = (link[0], link[1])
                self.used.add((link[0], link[1]))
        self.external = {(e[0], e[1]) for e in group.get("external") or [] if isinstance(e, list) and len(e) >= 2}
        self.seen: dict[str, int] = {}

    def _config(self, i: int, side: str, key) -> dict:
        entry = self.config.get(str(i)) or self.config.get(i) or {}
        found = (entry.get(side) or {}).get(str(key)) if isinstance(entry, dict) else None
        return found if isinstance(found, dict) else {}

    def _name(self, i: int, node: dict, input_name: str) -> str:
        """GroupNodeConfig.getInputConfig's naming of an instance input."""
        label = next((s.get("label") for s in node.get("inputs") or [] if s.get("name") == input_name), None)
        name = self._config(i, "input", input_name).get("name") or label or input_name
        key = name
        if (node.get("type") == "PrimitiveNode" and node.get("title")) or name in self.seen:
            prefix = f"{node.get('title') or node.get('type')} "
            key = name = prefix + input_name
            if name in self.seen:
                name = f"{prefix}{self.seen[name]} {input_name}"
        self.seen[key] = self.seen.get(key, 1) + 1
        return name

    def _has_def(self, i: int, node: dict) -> bool:
        if node.get("type") == "PrimitiveNode":
            return any(origin == i for origin, _ in self.used)
        if node.get("type") == "Reroute":
            fed, feeds = (i, 0) in self.internal, (i, 0) in self.used
            return not (fed and feeds and (i, 0) not in self.external)
        return node.get("type") not in N.NOT_EXECUTED

    def result(self) -> tuple[dict, dict]:
        inputs, converted, widgets, outputs = [], [], [], []
        for i, node in enumerate(self.nodes):
            if not self._has_def(i, node):
                continue
            slots = [s for s in node.get("inputs") or [] if isinstance(s, dict)]
            for name in self._own_widgets(node):
                self._name(i, node, name)                    # names taken before the sockets' (seenInputs)
            for index, slot in enumerate(slots):
                if "widget" in slot:
                    converted.append((i, index, slot))
                elif (i, index) not in self.internal and self._config(i, "input", slot.get("name")).get("visible", True):
                    inputs.append((self._name(i, node, slot.get("name")), i, index, slot.get("type")))
            widgets.append((i, self._value_count(i, node, slots)))
            for j, out in enumerate(node.get("outputs") or []):
                hidden = (i, j) in self.used and (i, j) not in self.external
                if self._config(i, "output", j).get("visible", not hidden):
                    outputs.append((i, j))
        for i, index, slot in converted:
            if (i, index) not in self.internal:
                inputs.append((self._name(i, self.nodes[i], slot.get("name")), i, index, slot.get("type")))
                widgets.append((i, 1 + (slot.get("name") in CONTROLLED)))
        self._apply_values(widgets, converted)
        return self._definition(inputs, outputs), {**self.instance, "widgets_values": [], "properties": {}}

    def _own_widgets(self, node: dict) -> list[str]:
        names = widget_names(node.get("type"), node.get("widgets_values") or []) or ()
        converted = {s.get("name") for s in node.get("inputs") or [] if isinstance(s, dict) and "widget" in s}
        return [n for n in names if n not in converted and n != N.CONTROL]

    def _value_count(self, i: int, node: dict, slots: list[dict]) -> int:
        values = node.get("widgets_values") if isinstance(node.get("widgets_values"), list) else []
        if node.get("type") == "Reroute":
            return 0
        converted = [s for s in slots if "widget" in s]
        return len(values) - len(converted) - sum(s.get("name") in CONTROLLED for s in converted)

    def _apply_values(self, widgets: list[tuple[int, int]], converted) -> None:
        given = self.instance.get("widgets_values")
        given = given if isinstance(given, list) else []
        if sum(n for _, n in widgets) != len(given):
            held = [n.get("type") for n in self.nodes if n.get("type") in N.PATCHES or n.get("type") in N.SAMPLERS]
            if held:
                raise _Unaligned(f"a {held[0]} node")
            return
        at = 0
        for i, count in widgets:
            node, chunk = self.nodes[i], given[at:at + count]
            at += count
            saved = node.get("widgets_values") if isinstance(node.get("widgets_values"), list) else []
            names = widget_names(node.get("type"), saved)
            if node.get("type") == "PrimitiveNode" or count == len(saved):
                node["widgets_values"] = list(chunk) + saved[len(chunk):]
            elif names is not None:
                keep = {s.get("name") for s in node.get("inputs") or [] if isinstance(s, dict) and "widget" in s}
                spots = [k for k, n in enumerate(names) if n not in keep]
                for k, value in zip(spots, chunk):
                    saved[k] = value
        # converted widgets fed from outside take their values from the sockets' links, not from here

    def _definition(self, inputs, outputs) -> dict:
        links, fed = [], {}
        for n, ((to, slot), (origin, oslot)) in enumerate(self.internal.items()):
            links.append({"id": f"g{n}", "origin_id": origin, "origin_slot": oslot, "target_id": to, "target_slot": slot})
            fed[(to, slot)] = f"g{n}"
        declared = []
        for s, (name, i, index, kind) in enumerate(inputs):
            links.append({"id": f"in{s}", "origin_id": -10, "origin_slot": s, "target_id": i, "target_slot": index})
            fed[(i, index)] = f"in{s}"
            declared.append({"name": name, "type": kind, "linkIds": [f"in{s}"]})
        for k, (i, j) in enumerate(outputs):
            links.append({"id": f"out{k}", "origin_id": i, "origin_slot": j, "target_id": -20, "target_slot": k})
        nodes = []
        for i, node in enumerate(self.nodes):
            slots = [dict(s) if isinstance(s, dict) else {} for s in node.get("inputs") or []]
            for index, slot in enumerate(slots):
                slot["link"] = fed.get((i, index))
            nodes.append({**node, "id": i, "inputs": slots, "type": node.get("type") or "?"})
        return {"nodes": nodes, "links": links, "inputs": declared, "outputs": [{} for _ in outputs]}
