"""Checking one recipe value against its schema entry: one check per kind of value (number, block labels,
encoders, step range, ...), each failing with one clear line and, where it can, a suggestion. The schema
tables (schema.py) say which check each key gets; reader.py walks the sections and calls these.
"""


from __future__ import annotations

import difflib
import math
from collections.abc import Callable, Mapping
from typing import Any, NoReturn

from ..errors import CkptbendError
from ..layouts.text_encoders import CLIP_ENCODERS, LARGE_ENCODERS
from .canonical import _toml
from .schema import BLOCK_GROUPS, BLOCK_LABEL, DIT_BLOCK_GROUPS, DIT_BLOCK_KINDS, DIT_BLOCK_LABEL, RENORMALIZE, Param
from .values import FrozenDict


def type_name(value) -> str:
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a float"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "a table"
    return "a date/time"


def show(value) -> str:
    """How a value the user wrote is quoted back in a message."""
    if isinstance(value, float) and not math.isfinite(value):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, dict):
        return "{...}"
    try:
        text = _toml(value)
    except (TypeError, RecursionError):
        text = "[...]" if isinstance(value, list) else str(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _closest(word: str, candidates) -> str | None:
    """The nearest candidate to a misspelt word (case-insensitive), or None."""
    lowered = {c.lower(): c for c in candidates}
    match = difflib.get_close_matches(word.lower(), list(lowered), n=1, cutoff=0.6)
    return lowered[match[0]] if match else None


QUOTED = '"{}"'   # how string values (not key names) are quoted in suggestions


LISTED_AT_MOST = 16   # a longer list (the architectures: one per model variant) is named, not spelt out


def hint(word: str, candidates, fmt: str = "'{}'") -> str:
    best = _closest(word, candidates)
    if best is not None:
        return f" (did you mean {fmt.format(best)}?)"
    candidates = list(candidates)
    if len(candidates) > LISTED_AT_MOST:
        shown = ", ".join(fmt.format(c) for c in candidates[:4])
        return f" (expected one of {len(candidates)} names, such as {shown}; docs/recipes.md lists them all)"
    return f" (expected one of: {', '.join(fmt.format(c) for c in candidates)})"


class Reader:
    """Carries what every check needs: where messages come from, the range switch, the warnings."""

    def __init__(self, source: str, allow_out_of_range: bool):
        self.source = source
        self.allow_out_of_range = allow_out_of_range
        self.warnings: list[str] = []

    def _line(self, where: str, message: str) -> str:
        return f"{self.source}: {where} {message}" if where else f"{self.source}: {message}"

    def fail(self, where: str, message: str) -> NoReturn:
        raise CkptbendError(self._line(where, message))

    def warn(self, where: str, message: str) -> None:
        self.warnings.append(self._line(where, message))


def _interval(p: Param) -> str:
    if p.lo is not None and p.hi is not None:
        return f"in {'(' if p.open_lo else '['}{p.lo:g}, {p.hi:g}{')' if p.open_hi else ']'}"
    if p.lo is not None:
        return f"{'>' if p.open_lo else '>='} {p.lo:g}"
    return f"{'<' if p.open_hi else '<='} {p.hi:g}"


def _check_bounds(r: Reader, where: str, p: Param, x: float, shown: str) -> None:
    below = p.lo is not None and (x <= p.lo if p.open_lo else x < p.lo)
    above = p.hi is not None and (x >= p.hi if p.open_hi else x > p.hi)
    if below or above:
        r.fail(where, f"{p.name} = {shown} must be {_interval(p)}" + (f"; {p.note}" if p.note else ""))
    if p.soft and not r.allow_out_of_range and not p.soft[0] <= x <= p.soft[1]:
        r.fail(where, f"{p.name} = {shown} is outside {p.soft_label} {p.soft[0]:g} to {p.soft[1]:g} "
                      "(pass --allow-out-of-range to accept it)")


def _check_number(r: Reader, where: str, p: Param, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        r.fail(where, f"{p.name} must be a number, not {type_name(value)} ({show(value)})")
    try:
        x = float(value) + 0.0      # + 0.0 turns -0.0 into 0.0
    except OverflowError:
        x = math.inf
    if not math.isfinite(x):
        r.fail(where, f"{p.name} = {show(value)} is not a finite number")
    _check_bounds(r, where, p, x, show(value))
    return x


def _check_int(r: Reader, where: str, p: Param, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        r.fail(where, f"{p.name} must be an integer, not {type_name(value)} ({show(value)})")
    _check_bounds(r, where, p, value, show(value))
    return value


def _check_bool(r: Reader, where: str, p: Param, value) -> bool:
    if not isinstance(value, bool):
        r.fail(where, f"{p.name} must be true or false, not {type_name(value)} ({show(value)})")
    return value


def _check_text(r: Reader, where: str, p: Param, value) -> str:
    if not isinstance(value, str):
        r.fail(where, f"{p.name} must be a string, not {type_name(value)} ({show(value)})")
    if not value.strip():
        r.fail(where, f"{p.name} must not be empty")
    return value


def _check_choice(r: Reader, where: str, p: Param, value) -> str:
    if not isinstance(value, str):
        r.fail(where, f"{p.name} must be a string, not {type_name(value)} ({show(value)})")
    if value not in p.choices:
        r.fail(where, f"{p.name} = {show(value)} is not valid{hint(value, p.choices, QUOTED)}")
    return value


def _check_list(r: Reader, where: str, p: Param, value, item: Callable[[Any], None], what: str) -> tuple:
    """A non-empty array without repeats whose items pass `item` (which fails on a bad one)."""
    if not isinstance(value, list):
        r.fail(where, f"{p.name} must be an array of {what}, not {type_name(value)} ({show(value)})")
    if not value:
        r.fail(where, f"{p.name} = [] selects nothing; leave {p.name} out to select all")
    for x in value:
        item(x)
    for x in value:
        if value.count(x) > 1:
            r.fail(where, f"{p.name} lists {show(x)} twice")
    return tuple(value)


def _check_index_list(r: Reader, where: str, p: Param, value) -> tuple[int, ...]:
    def item(x):
        if isinstance(x, bool) or not isinstance(x, int) or x < 0:
            r.fail(where, f"{p.name} must hold integers >= 0, not {show(x)}")
    return tuple(sorted(_check_list(r, where, p, value, item, "integers >= 0")))


def _block_order(label: str) -> tuple[int, int]:
    group = {"IN": 0, "M": 1, "OUT": 2, "input": 0, "middle": 1, "output": 2}
    prefix = label.rstrip("0123456789")
    return group[prefix], int(label[len(prefix):] or -1)


def _check_labels(r: Reader, where: str, p: Param, value, label, groups, what: str, order) -> tuple[str, ...]:
    """A list of block labels (matching `label`) or group names, sorted in model order by `order`."""
    def item(x):
        if not isinstance(x, str):
            r.fail(where, f"{p.name} must hold block labels (strings), not {show(x)}")
        if not (label.fullmatch(x) or x in groups):
            guess = x.upper() if label.fullmatch(x.upper()) else _closest(x, groups)
            r.fail(where, f"{p.name}: {show(x)} is not a {what} or group ({', '.join(groups)})"
                          + (f" (did you mean '{guess}'?)" if guess else ""))
    return tuple(sorted(_check_list(r, where, p, value, item, "block labels"), key=order))


def _check_blocks(r: Reader, where: str, p: Param, value) -> tuple[str, ...]:
    return _check_labels(r, where, p, value, BLOCK_LABEL, BLOCK_GROUPS, "block label (IN00, M00, OUT03, ...)",
                         _block_order)


def _dit_block_order(label: str) -> tuple[int, int]:
    if label in DIT_BLOCK_GROUPS:
        return DIT_BLOCK_GROUPS.index(label) - len(DIT_BLOCK_GROUPS), 0
    return DIT_BLOCK_KINDS.index(label[0]), int(label[1:])


def _check_dit_blocks(r: Reader, where: str, p: Param, value) -> tuple[str, ...]:
    return _check_labels(r, where, p, value, DIT_BLOCK_LABEL, DIT_BLOCK_GROUPS,
                         "transformer block label (D00, S12, J05, B07, ...)", _dit_block_order)


def _check_encoders(r: Reader, where: str, p: Param, value) -> tuple[str, ...]:
    if value == "all" or value == ["all"]:
        return ()

    def item(x):
        if x == "all":
            r.fail(where, f"{p.name}: \"all\" cannot be combined with other encoders")
        if x in p.choices:
            return
        home = next((f"[{sec}]" for sec, names in (("clip", CLIP_ENCODERS), ("text", LARGE_ENCODERS)) if x in names), None)
        if home:
            r.fail(where, f"{p.name}: {show(x)} is not an encoder of this section; it is set in {home}")
        r.fail(where, f"{p.name}: {show(x)} is not a text encoder{hint(str(x), p.choices + ('all',), QUOTED)}")
    encoders = _check_list(r, where, p, value, item, 'text encoder names or "all"')
    return tuple(e for e in p.choices if e in encoders)


def _check_architectures(r: Reader, where: str, p: Param, value) -> tuple[str, ...]:
    def item(x):
        _check_choice(r, where, p, x)
    names = _check_list(r, where, p, [value] if isinstance(value, str) else value, item, "architecture names")
    return tuple(a for a in p.choices if a in names)


def _check_step_range(r: Reader, where: str, p: Param, value) -> tuple[int, int]:
    ints = isinstance(value, list) and all(isinstance(x, int) and not isinstance(x, bool) for x in value)
    if not ints or len(value) != 2 or not 0 <= value[0] <= value[1]:
        r.fail(where, f"{p.name} must be [start, end]: step indices with 0 <= start <= end, not {show(value)}")
    return tuple(value)


def _check_region(r: Reader, where: str, p: Param, value) -> tuple[float, float, float, float]:
    if not isinstance(value, list) or len(value) != 4:
        r.fail(where, f"{p.name} must be [x1, y1, x2, y2], not {show(value)}")
    corners = tuple(_check_number(r, where, Param(f"{p.name} {axis}", "number", lo=0.0, hi=1.0), x)
                    for axis, x in zip(("x1", "y1", "x2", "y2"), value))
    if not (corners[0] < corners[2] and corners[1] < corners[3]):
        r.fail(where, f"{p.name} = {show(value)} needs x1 < x2 and y1 < y2")
    return corners


def _check_renormalize(r: Reader, where: str, p: Param, value) -> str:
    if isinstance(value, (bool, str)) and value in RENORMALIZE:
        return RENORMALIZE[value]
    r.fail(where, f'{p.name} must be true, false, "row", "column" or "none", not {show(value)}')


_CHECKS: dict[str, Callable[[Reader, str, Param, Any], Any]] = {
    "number": _check_number,
    "int": _check_int,
    "bool": _check_bool,
    "text": _check_text,
    "choice": _check_choice,
    "index_list": _check_index_list,
    "blocks": _check_blocks,
    "dit_blocks": _check_dit_blocks,
    "encoders": _check_encoders,
    "step_range": _check_step_range,
    "region": _check_region,
    "renormalize": _check_renormalize,
    "architectures": _check_architectures,
}


def read_value(r: Reader, where: str, p: Param, raw: dict):
    if p.name in raw:
        return _CHECKS[p.kind](r, where, p, raw[p.name])
    if p.required:
        choices = f" (one of: {', '.join(p.choices)})" if p.choices else ""
        r.fail(where, f"missing required key '{p.name}'{choices}")
    return p.default


def read_params(r: Reader, where: str, raw: dict, params: dict[str, Param],
                 misplaced: Mapping[str, str] = FrozenDict()) -> dict[str, Any]:
    """Check a table against `params`: unknown keys (with a suggestion), then each value in order.
    `misplaced` holds a tailored message for keys that are valid elsewhere but not here."""
    for key in raw:
        if key not in params:
            r.fail(where, misplaced.get(key) or f"unknown key '{key}'{hint(key, params)}")
    return {name: read_value(r, where, p, raw) for name, p in params.items()}
