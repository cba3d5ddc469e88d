"""The canonical form of a recipe: deterministic TOML text (independent of formatting, key order,
comments, `1` vs `1.0`, or values written at their default) and its SHA-256, which outputs record.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import asdict
from typing import Any

from .schema import (MULTIPLIER_SECTIONS, SAG_PARAMS, SLOTHFUL_PARAMS, SLOTHFUL_SIMPLE, SLOTHFUL_SIMPLE_PARAMS,
                     Param, bend_params, multiply_params)


_STRING_ESCAPES = {'"': '\\"', "\\": "\\\\", "\b": "\\b", "\t": "\\t", "\n": "\\n", "\f": "\\f", "\r": "\\r"}


def _toml(value) -> str:
    """A TOML literal. Floats use repr() (shortest round-trip form); callers pass floats as floats."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return '"' + "".join(_STRING_ESCAPES.get(c) or (f"\\u{ord(c):04X}" if ord(c) < 0x20 or ord(c) == 0x7F else c)
                             for c in value) + '"'
    if isinstance(value, (tuple, list)):
        return "[" + ", ".join(map(_toml, value)) + "]"
    raise TypeError(f"no TOML form for {value!r}")


def _as_stored(param: Param, value):
    """Number-kind values are floats (never -0.0), even if someone built the dataclass with ints."""
    if param.kind == "number" and value is not None:
        return float(value) + 0.0
    if param.kind == "region" and value is not None:
        return tuple(float(x) + 0.0 for x in value)
    return value


def _table_text(header: str, params: dict[str, Param], values: Mapping[str, Any]) -> str:
    lines = [header]
    for name, param in params.items():
        value = _as_stored(param, values.get(name, param.default))
        if value != param.default:
            lines.append(f"{name} = {_toml(value)}")
    return "\n".join(lines)


def recipe_text(recipe) -> str:
    """Deterministic TOML text that `parse_recipe` reads back to an equal Recipe."""
    architecture = recipe.architecture[0] if len(recipe.architecture) == 1 else recipe.architecture
    parts = ["\n".join(f"{key} = {_toml(value)}"
                       for key, value in (("schema", recipe.schema), ("name", recipe.name),
                                          ("description", recipe.description), ("architecture", architecture))
                       if value not in ("", ()))]
    for section in MULTIPLIER_SECTIONS:
        entries = [e for e in recipe.multipliers.get(section, ()) if e.factors or e.has_selector]
        # [[section]] when there are several entries or one selects blocks/depth; a lone [clip] keeps
        # its encoders key in the plain-table form users write.
        many = len(entries) > 1 or any(e.blocks or e.depth for e in entries)
        params = multiply_params(section)
        parts += [_table_text(f"[[{section}]]" if many else f"[{section}]", params, e.values())
                  for e in entries]
    if recipe.sag is not None:
        parts.append(_table_text("[sag]", SAG_PARAMS, asdict(recipe.sag)))
    if recipe.slothful is not None:
        s = recipe.slothful
        params = {"simple": SLOTHFUL_SIMPLE, **(SLOTHFUL_SIMPLE_PARAMS if s.simple else SLOTHFUL_PARAMS)}
        values = {"simple": s.simple, **(s.simple_values() if s.simple else asdict(s))}
        parts.append(_table_text("[slothful]", params, values))
    parts += [_table_text("[[bending]]", bend_params(b.mode), asdict(b)) for b in recipe.bending]
    return "\n\n".join(parts) + "\n"


def text_sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()
