"""Bounds that keep an import small on hostile input: how deep a value may nest, how many digits an
integer may have, how many nodes a workflow may expand to, how long a value written into a recipe may
be. Each bound is far above what a real workflow needs (ComfyUI's official templates nest 9 deep and
expand to at most ~300 nodes); passing one is an error, not a slow run.

JSON and YAML are read here, so every source goes through the same bounds.
"""

from __future__ import annotations

import json

from ckptbend.errors import CkptbendError

MAX_DEPTH = 100              # nesting of JSON/YAML values
MAX_INT_DIGITS = 4300        # Python's own bound on int(str)
MAX_NODES = 20_000           # nodes a UI workflow may expand to (subgraph and group-node instances)
MAX_ALIASES = 1_000          # YAML aliases (*name) in one document
MAX_ITEMS = 100_000          # values a YAML document expands to (aliases repeat what they name)
MAX_VALUE_CHARS = 65_536     # characters of one value written into a recipe
MAX_TEXT_BYTES = 64 << 20    # one metadata text of an image, decompressed


def _json_int(text: str):
    # A longer integer cannot be an int in Python; the frontend (JavaScript) reads it as a double too.
    return int(text) if len(text.lstrip("-")) <= MAX_INT_DIGITS else float(text)


def load_json(text: str, label: str):
    try:
        data = json.loads(text, parse_int=_json_int)
    except json.JSONDecodeError as e:
        raise CkptbendError(f"{label}: invalid JSON: {e.msg} at line {e.lineno} column {e.colno}") from None
    except RecursionError:
        raise CkptbendError(f"{label}: invalid JSON: nested more than {MAX_DEPTH} deep") from None
    check_depth(data, label)
    return data


def check_depth(data, label: str, max_items: int | None = None) -> None:
    """Refuse a value nested more than MAX_DEPTH deep (later steps walk values recursively), or, given
    `max_items`, one that expands to more values (YAML aliases make a small file expand without bound)."""
    pending, items = [(data, 1)], 0
    while pending:
        value, depth = pending.pop()
        items += 1
        if depth > MAX_DEPTH:
            raise CkptbendError(f"{label}: a value is nested more than {MAX_DEPTH} deep")
        if max_items is not None and items > max_items:
            raise CkptbendError(f"{label}: expands to more than {max_items} values (YAML aliases repeat what they name)")
        if isinstance(value, dict):
            pending += [(v, depth + 1) for v in value.values() if isinstance(v, (dict, list))]
        elif isinstance(value, list):
            pending += [(v, depth + 1) for v in value if isinstance(v, (dict, list))]


def load_yaml(text: str, label: str):
    """yaml.safe_load with bounds on nesting, aliases and integer length."""
    import yaml

    class Loader(yaml.SafeLoader):
        depth = aliases = 0

        def compose_node(self, parent, index):
            if self.check_event(yaml.AliasEvent):
                self.aliases += 1
                if self.aliases > MAX_ALIASES:
                    raise CkptbendError(f"{label}: more than {MAX_ALIASES} YAML aliases (*name)")
            self.depth += 1
            try:
                if self.depth > MAX_DEPTH:
                    raise CkptbendError(f"{label}: a value is nested more than {MAX_DEPTH} deep")
                return super().compose_node(parent, index)
            finally:
                self.depth -= 1

        def construct_yaml_int(self, node):
            digits = sum(c.isdigit() for c in node.value)
            if digits > MAX_INT_DIGITS:
                raise CkptbendError(f"{label}: line {node.start_mark.line + 1}: an integer of {digits} digits")
            return super().construct_yaml_int(node)

    Loader.add_constructor("tag:yaml.org,2002:int", Loader.construct_yaml_int)
    try:
        data = yaml.load(text, Loader=Loader)   # noqa: S506 (a SafeLoader)
    except yaml.YAMLError as e:
        raise CkptbendError(f"{label}: invalid YAML: {' '.join(str(e).split())}") from None
    check_depth(data, label, MAX_ITEMS)
    return data


def bounded_size(value, limit: int = MAX_VALUE_CHARS) -> bool:
    """Whether a value read from a source (shared YAML aliases included) stays under `limit` characters
    when written out, found without writing it: each item counts at least one character."""
    budget, pending = limit, [value]
    while pending:
        v = pending.pop()
        budget -= len(v) if isinstance(v, str) else 1
        if budget < 0:
            return False
        if isinstance(v, dict):
            pending += [*v.keys(), *v.values()]
        elif isinstance(v, (list, tuple)):
            pending += v
    return True
