"""A ComfyUI workflow as one graph of `Node`s keyed by node id, from either format:
- API format (`{"6": {"class_type": "KSampler", "inputs": {...}}}`, what /prompt takes and the `prompt`
  chunk of a saved image holds): inputs are values or links `[node id, output slot]`;
- UI format (`{"nodes": [...], "links": [...]}`, the `workflow` chunk): read by ui_graph.py the way the
  frontend builds a prompt from it.
Inputs linked to a value node (PrimitiveFloat, ...) take its value, as if typed into the widget.
"""

from __future__ import annotations

from dataclasses import dataclass

from ckptbend.errors import CkptbendError

from . import nodes as N


@dataclass
class Node:
    key: str
    class_type: str
    inputs: dict                        # name → value, Link or Broken
    title: str = ""
    widgets: list | None = None         # UI format: widget values by position, until their names are known
    types: dict | None = None           # UI format: each input's slot type ("MODEL", "CONDITIONING", ...)

    def __str__(self):
        title = f" \"{self.title}\"" if self.title and self.title != self.class_type else ""
        return f"node {self.key} ({self.class_type}{title})"


@dataclass(frozen=True)
class Link:
    key: str
    slot: int


@dataclass(frozen=True)
class Broken:
    """An input whose link cannot be followed. Only an error if the walk from the sampler needs it:
    a broken link elsewhere in the workflow changes nothing a recipe holds."""
    reason: str                         # completes "node 3 (KSampler) input 'model' …"


def read_graph(data, source: str) -> tuple[dict[str, Node], str]:
    """(nodes by key, "API" or "UI") from a parsed workflow JSON document."""
    if isinstance(data, dict) and isinstance(data.get("nodes"), list):
        from .ui_graph import ui_graph
        return _inline_values(ui_graph(data, source)), "UI"
    if isinstance(data, dict) and data and all(isinstance(v, dict) and "class_type" in v for v in data.values()):
        return _inline_values(_api_graph(data, source)), "API"
    raise CkptbendError(f"{source}: not a ComfyUI workflow (neither the API format {{id: {{class_type, inputs}}}} "
                        "nor the UI format {nodes, links})")


def _api_graph(data: dict, source: str) -> dict[str, Node]:
    graph = {}
    for key, node in data.items():
        inputs, kind = node.get("inputs", {}), node["class_type"]
        if not isinstance(inputs, dict) or not isinstance(kind, str):
            raise CkptbendError(f"{source}: node {key} of the API-format workflow is malformed "
                                "(class_type must be a string and inputs a mapping)")
        meta = node.get("_meta")
        title = meta.get("title") if isinstance(meta, dict) else ""
        graph[str(key)] = Node(str(key), kind, {str(k): _api_value(v) for k, v in inputs.items()},
                               title if isinstance(title, str) else "")
    return graph


def _api_value(value):
    if isinstance(value, list) and len(value) == 2 and isinstance(value[0], (str, int)) \
            and not isinstance(value[0], bool) and isinstance(value[1], int) and not isinstance(value[1], bool):
        return Link(str(value[0]), value[1])
    if isinstance(value, dict) and set(value) <= {"__value__", "__type__"} and "__value__" in value:
        return value["__value__"]       # the frontend wraps list values so they are not read as links
    return value


def _inline_values(graph: dict[str, Node]) -> dict[str, Node]:
    for node in graph.values():
        for name, value in node.inputs.items():
            seen = set()
            while isinstance(value, Link) and value.key not in seen and (source := graph.get(value.key)) is not None \
                    and source.class_type in N.VALUES and "value" in source.inputs:
                seen.add(value.key)
                value = source.inputs["value"]
            node.inputs[name] = value
    return graph


# --- widget values (UI format) -------------------------------------------------------------------------

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


_KIND_NAMES = {float: "a number", int: "an integer", str: "a string", bool: "true or false"}


def widget_problem(node: Node) -> str:
    """Why a known node's widget values fit none of its versions: the first value that is wrong."""
    versions = N.WIDGETS.get(node.class_type, ())
    values = node.widgets or []
    version = next((v for v in versions if len(v) == len(values)), versions[0] if versions else ())
    for i, (name, kind) in enumerate(version):
        if i >= len(values):
            return f"has {len(values)} widget values; its widget '{name}' (#{i + 1}) has none"
        if not _kind_fits(kind, values[i]):
            return f"widget '{name}' is {_shown(values[i])}, not {_KIND_NAMES[kind]}"
    return "has widget values that fit no version of the node"


def _shown(value) -> str:
    if value is None:
        return "null"
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."
