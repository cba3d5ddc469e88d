"""Reading a recipe: TOML text → a validated, defaults-filled `Recipe`, or one clear error with a
suggestion. One check per kind of value; the schema tables say which check each key gets.
"""

from __future__ import annotations

import difflib
import math
import tomllib
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, NoReturn

from ..errors import CkptbendError
from ..layouts.text_encoders import CLIP_ENCODERS, LARGE_ENCODERS
from .canonical import _toml
from .schema import (ARCHITECTURE, BEND_COMMON, BEND_MODE_PARAMS, BEND_PARAMS, BLOCK_GROUPS, BLOCK_LABEL, DIT_BLOCK_GROUPS,
                     DIT_BLOCK_KINDS, DIT_BLOCK_LABEL, MULTIPLIER_SECTIONS,
                     MULTIPLY_KEYS, NAME_SLUG, QK_WARN_PRODUCT, RENORMALIZE, SAG_PARAMS, SCHEMA_VERSION, SECTION_SELECTORS,
                     SECTIONS, SELECTORS, SIMPLE_EXPANDS, SIMPLE_FIXED, SLOTHFUL_PARAMS, SLOTHFUL_SIMPLE,
                     SLOTHFUL_SIMPLE_PARAMS, TOP_LEVEL_KEYS, Param, bend_params, multiply_params)
from .values import BendEntry, FrozenDict, MultiplyEntry, Recipe, SAGParams, SlothfulParams


def _type_name(value) -> str:
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


def _show(value) -> str:
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


def _hint(word: str, candidates, fmt: str = "'{}'") -> str:
    best = _closest(word, candidates)
    if best is not None:
        return f" (did you mean {fmt.format(best)}?)"
    return f" (expected one of: {', '.join(fmt.format(c) for c in candidates)})"


class _Reader:
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


def _check_bounds(r: _Reader, where: str, p: Param, x: float, shown: str) -> None:
    below = p.lo is not None and (x <= p.lo if p.open_lo else x < p.lo)
    above = p.hi is not None and (x >= p.hi if p.open_hi else x > p.hi)
    if below or above:
        r.fail(where, f"{p.name} = {shown} must be {_interval(p)}" + (f"; {p.note}" if p.note else ""))
    if p.soft and not r.allow_out_of_range and not p.soft[0] <= x <= p.soft[1]:
        r.fail(where, f"{p.name} = {shown} is outside {p.soft_label} {p.soft[0]:g} to {p.soft[1]:g} "
                      "(pass --allow-out-of-range to accept it)")


def _check_number(r: _Reader, where: str, p: Param, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        r.fail(where, f"{p.name} must be a number, not {_type_name(value)} ({_show(value)})")
    try:
        x = float(value) + 0.0      # + 0.0 turns -0.0 into 0.0
    except OverflowError:
        x = math.inf
    if not math.isfinite(x):
        r.fail(where, f"{p.name} = {_show(value)} is not a finite number")
    _check_bounds(r, where, p, x, _show(value))
    return x


def _check_int(r: _Reader, where: str, p: Param, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        r.fail(where, f"{p.name} must be an integer, not {_type_name(value)} ({_show(value)})")
    _check_bounds(r, where, p, value, _show(value))
    return value


def _check_bool(r: _Reader, where: str, p: Param, value) -> bool:
    if not isinstance(value, bool):
        r.fail(where, f"{p.name} must be true or false, not {_type_name(value)} ({_show(value)})")
    return value


def _check_text(r: _Reader, where: str, p: Param, value) -> str:
    if not isinstance(value, str):
        r.fail(where, f"{p.name} must be a string, not {_type_name(value)} ({_show(value)})")
    if not value.strip():
        r.fail(where, f"{p.name} must not be empty")
    return value


def _check_choice(r: _Reader, where: str, p: Param, value) -> str:
    if not isinstance(value, str):
        r.fail(where, f"{p.name} must be a string, not {_type_name(value)} ({_show(value)})")
    if value not in p.choices:
        r.fail(where, f"{p.name} = {_show(value)} is not valid{_hint(value, p.choices, QUOTED)}")
    return value


def _check_list(r: _Reader, where: str, p: Param, value, item: Callable[[Any], None], what: str) -> tuple:
    """A non-empty array without repeats whose items pass `item` (which fails on a bad one)."""
    if not isinstance(value, list):
        r.fail(where, f"{p.name} must be an array of {what}, not {_type_name(value)} ({_show(value)})")
    if not value:
        r.fail(where, f"{p.name} = [] selects nothing; leave {p.name} out to select all")
    for x in value:
        item(x)
    for x in value:
        if value.count(x) > 1:
            r.fail(where, f"{p.name} lists {_show(x)} twice")
    return tuple(value)


def _check_index_list(r: _Reader, where: str, p: Param, value) -> tuple[int, ...]:
    def item(x):
        if isinstance(x, bool) or not isinstance(x, int) or x < 0:
            r.fail(where, f"{p.name} must hold integers >= 0, not {_show(x)}")
    return tuple(sorted(_check_list(r, where, p, value, item, "integers >= 0")))


def _block_order(label: str) -> tuple[int, int]:
    group = {"IN": 0, "M": 1, "OUT": 2, "input": 0, "middle": 1, "output": 2}
    prefix = label.rstrip("0123456789")
    return group[prefix], int(label[len(prefix):] or -1)


def _check_labels(r: _Reader, where: str, p: Param, value, label, groups, what: str, order) -> tuple[str, ...]:
    """A list of block labels (matching `label`) or group names, sorted in model order by `order`."""
    def item(x):
        if not isinstance(x, str):
            r.fail(where, f"{p.name} must hold block labels (strings), not {_show(x)}")
        if not (label.fullmatch(x) or x in groups):
            guess = x.upper() if label.fullmatch(x.upper()) else _closest(x, groups)
            r.fail(where, f"{p.name}: {_show(x)} is not a {what} or group ({', '.join(groups)})"
                          + (f" (did you mean '{guess}'?)" if guess else ""))
    return tuple(sorted(_check_list(r, where, p, value, item, "block labels"), key=order))


def _check_blocks(r: _Reader, where: str, p: Param, value) -> tuple[str, ...]:
    return _check_labels(r, where, p, value, BLOCK_LABEL, BLOCK_GROUPS, "block label (IN00, M00, OUT03, ...)",
                         _block_order)


def _dit_block_order(label: str) -> tuple[int, int]:
    if label in DIT_BLOCK_GROUPS:
        return DIT_BLOCK_GROUPS.index(label) - len(DIT_BLOCK_GROUPS), 0
    return DIT_BLOCK_KINDS.index(label[0]), int(label[1:])


def _check_dit_blocks(r: _Reader, where: str, p: Param, value) -> tuple[str, ...]:
    return _check_labels(r, where, p, value, DIT_BLOCK_LABEL, DIT_BLOCK_GROUPS,
                         "transformer block label (D00, S12, J05, B07, ...)", _dit_block_order)


def _check_encoders(r: _Reader, where: str, p: Param, value) -> tuple[str, ...]:
    if value == "all" or value == ["all"]:
        return ()

    def item(x):
        if x == "all":
            r.fail(where, f"{p.name}: \"all\" cannot be combined with other encoders")
        if x in p.choices:
            return
        home = next((f"[{sec}]" for sec, names in (("clip", CLIP_ENCODERS), ("text", LARGE_ENCODERS)) if x in names), None)
        if home:
            r.fail(where, f"{p.name}: {_show(x)} is not an encoder of this section; it is set in {home}")
        r.fail(where, f"{p.name}: {_show(x)} is not a text encoder{_hint(str(x), p.choices + ('all',), QUOTED)}")
    encoders = _check_list(r, where, p, value, item, 'text encoder names or "all"')
    return tuple(e for e in p.choices if e in encoders)


def _check_architectures(r: _Reader, where: str, p: Param, value) -> tuple[str, ...]:
    def item(x):
        _check_choice(r, where, p, x)
    names = _check_list(r, where, p, [value] if isinstance(value, str) else value, item, "architecture names")
    return tuple(a for a in p.choices if a in names)


def _check_step_range(r: _Reader, where: str, p: Param, value) -> tuple[int, int]:
    ints = isinstance(value, list) and all(isinstance(x, int) and not isinstance(x, bool) for x in value)
    if not ints or len(value) != 2 or not 0 <= value[0] <= value[1]:
        r.fail(where, f"{p.name} must be [start, end]: step indices with 0 <= start <= end, not {_show(value)}")
    return tuple(value)


def _check_region(r: _Reader, where: str, p: Param, value) -> tuple[float, float, float, float]:
    if not isinstance(value, list) or len(value) != 4:
        r.fail(where, f"{p.name} must be [x1, y1, x2, y2], not {_show(value)}")
    corners = tuple(_check_number(r, where, Param(f"{p.name} {axis}", "number", lo=0.0, hi=1.0), x)
                    for axis, x in zip(("x1", "y1", "x2", "y2"), value))
    if not (corners[0] < corners[2] and corners[1] < corners[3]):
        r.fail(where, f"{p.name} = {_show(value)} needs x1 < x2 and y1 < y2")
    return corners


def _check_renormalize(r: _Reader, where: str, p: Param, value) -> str:
    if isinstance(value, (bool, str)) and value in RENORMALIZE:
        return RENORMALIZE[value]
    r.fail(where, f'{p.name} must be true, false, "row", "column" or "none", not {_show(value)}')


_CHECKS: dict[str, Callable[[_Reader, str, Param, Any], Any]] = {
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


def _read_value(r: _Reader, where: str, p: Param, raw: dict):
    if p.name in raw:
        return _CHECKS[p.kind](r, where, p, raw[p.name])
    if p.required:
        choices = f" (one of: {', '.join(p.choices)})" if p.choices else ""
        r.fail(where, f"missing required key '{p.name}'{choices}")
    return p.default


def _read_params(r: _Reader, where: str, raw: dict, params: dict[str, Param],
                 misplaced: Mapping[str, str] = FrozenDict()) -> dict[str, Any]:
    """Check a table against `params`: unknown keys (with a suggestion), then each value in order.
    `misplaced` holds a tailored message for keys that are valid elsewhere but not here."""
    for key in raw:
        if key not in params:
            r.fail(where, misplaced.get(key) or f"unknown key '{key}'{_hint(key, params)}")
    return {name: _read_value(r, where, p, raw) for name, p in params.items()}


# --- reading: sections --------------------------------------------------------------------------

def _entries(r: _Reader, section: str, value, many: bool = True) -> list[tuple[str, dict]]:
    """(where, table) for a section written as a table, or (if `many`) as an array of tables."""
    if isinstance(value, dict):
        return [(f"[{section}]", value)]
    if many and isinstance(value, list) and all(isinstance(e, dict) for e in value):
        return [(f"[[{section}]] entry {i}", e) for i, e in enumerate(value, 1)]
    shape = "a table or an array of tables" if many else "a table"
    r.fail("", f"[{section}] must be {shape}, not {_type_name(value)}")


def _read_multiply(r: _Reader, section: str, value) -> tuple[MultiplyEntry, ...]:
    params = multiply_params(section)
    here = ", ".join(p.name for p in SECTION_SELECTORS[section])
    misplaced = {s: f"'{s}' is not a selector of [{section}] (its selectors: {here})"
                 for s in SELECTORS if s not in params}
    entries = []
    for where, raw in _entries(r, section, value):
        values = _read_params(r, where, raw, params, misplaced)
        entry = MultiplyEntry(factors=tuple((k, values[k]) for k in MULTIPLY_KEYS[section] if values[k] != 1.0),
                              **{p.name: values[p.name] for p in SECTION_SELECTORS[section]})
        q, k = entry.factor("q"), entry.factor("k")
        if q * k > QK_WARN_PRODUCT:
            r.warn(where, f"q x k = {q:g} x {k:g} = {q * k:g} (> {QK_WARN_PRODUCT:g}) multiplies attention logits "
                          f"by {q * k:g}; UIs that run attention in fp16 without upcasting may overflow (NaN/black images)")
        if entry.factors or entry.has_selector:   # an entry of 1.0s that selects everything does nothing
            entries.append(entry)
    return tuple(entries)


def _read_sag(r: _Reader, value) -> SAGParams:
    [(where, raw)] = _entries(r, "sag", value, many=False)
    return SAGParams(**_read_params(r, where, raw, SAG_PARAMS))


def _slothful_misplaced(simple: bool) -> dict[str, str]:
    """Messages for names of the other Slothful node: the two name sets must not be mixed."""
    if simple:
        to_simple = {full: name for name, fulls in SIMPLE_EXPANDS.items() for full in fulls}
        messages = {full: f"'{full}' is not a parameter of Slothful Attention Simple (simple = true); "
                          f"use '{simple_name}', or remove simple = true"
                    for full, simple_name in to_simple.items() if full != simple_name}
        messages.update({name: f"'{name}' is fixed to {_toml(value)} in Slothful Attention Simple; "
                               "remove simple = true to set it" for name, value in SIMPLE_FIXED.items()})
        return messages
    return {name: f"'{name}' is a parameter of Slothful Attention Simple; add simple = true, "
                  f"or use {' and '.join(fulls)}"
            for name, fulls in SIMPLE_EXPANDS.items() if name not in SLOTHFUL_PARAMS}


def _read_slothful(r: _Reader, value) -> SlothfulParams:
    [(where, raw)] = _entries(r, "slothful", value, many=False)
    simple = _read_value(r, where, SLOTHFUL_SIMPLE, raw)
    params = {"simple": SLOTHFUL_SIMPLE, **(SLOTHFUL_SIMPLE_PARAMS if simple else SLOTHFUL_PARAMS)}
    values = _read_params(r, where, raw, params, _slothful_misplaced(simple))
    if simple:
        values = {"simple": True, **SIMPLE_FIXED,
                  **{full: values[name] for name, fulls in SIMPLE_EXPANDS.items() for full in fulls}}
    return SlothfulParams(**values)


def _check_frequency_filter(r: _Reader, where: str, raw: dict, entry: BendEntry) -> None:
    if "sigma" in raw and "filter" in raw:
        r.fail(where, "frequency_filter takes either sigma or filter + cutoff, not both")
    if ("filter" in raw) != ("cutoff" in raw):
        r.fail(where, 'filter and cutoff go together: filter = "lowpass" or "highpass", cutoff in (0, 1]')


def _warn_even_kernel(r: _Reader, where: str, raw: dict, entry: BendEntry) -> None:
    if entry.kernel_size % 2 == 0:
        r.warn(where, f"kernel_size = {entry.kernel_size} is even; the blur raises it to {entry.kernel_size + 1}")


# Rules that involve several keys of one mode.
BEND_MODE_CHECKS = {
    "frequency_filter": (_check_frequency_filter,),
    "blur": (_warn_even_kernel,),
    "sharpen": (_warn_even_kernel,),
}


def _read_bend(r: _Reader, where: str, raw: dict) -> BendEntry:
    mode = _read_value(r, where, BEND_COMMON["mode"], raw)
    params = bend_params(mode)
    takes = ", ".join(BEND_MODE_PARAMS[mode])
    misplaced = {name: f"mode \"{mode}\" has no parameter '{name}' (it takes {takes})"
                 for name in BEND_PARAMS if name not in params}
    entry = BendEntry(**_read_params(r, where, raw, params, misplaced))
    for check in BEND_MODE_CHECKS.get(mode, ()):
        check(r, where, raw, entry)
    return entry


def _read_bending(r: _Reader, value) -> tuple[BendEntry, ...]:
    return tuple(_read_bend(r, where, raw) for where, raw in _entries(r, "bending", value))


def _read_header(r: _Reader, data: dict) -> tuple[int, str, str, tuple[str, ...]]:
    if "schema" not in data:
        r.fail("", f"missing 'schema = {SCHEMA_VERSION}' (the recipe format version) at the top")
    schema = data["schema"]
    if isinstance(schema, bool) or not isinstance(schema, int):
        r.fail("", f"schema must be the integer {SCHEMA_VERSION}, not {_type_name(schema)} ({_show(schema)})")
    if schema != SCHEMA_VERSION:
        r.fail("", f"unsupported schema {schema}: this version of ckptbend reads schema {SCHEMA_VERSION}")
    if "name" not in data:
        r.fail("", "missing 'name' (a short slug, e.g. name = \"sharper-details\")")
    name = data["name"]
    if not isinstance(name, str):
        r.fail("", f"name must be a string, not {_type_name(name)} ({_show(name)})")
    if not NAME_SLUG.fullmatch(name):
        r.fail("", f"name = {_show(name)} must be a filename-safe slug: letters, digits, '.', '_' and '-', "
                   "starting with a letter or digit")
    description = data.get("description", "")
    if not isinstance(description, str):
        r.fail("", f"description must be a string, not {_type_name(description)} ({_show(description)})")
    return schema, name, description, _read_value(r, "", ARCHITECTURE, data)


NESTED = ("unet", "dit")   # [unet.self], [dit.joint]: TOML reads them as tables inside "unet" / "dit"


def _find_sections(r: _Reader, data: dict) -> dict[str, Any]:
    """Section name ("unet.self", "sag", ...) → its raw TOML value; unknown names are errors."""
    found: dict[str, Any] = {}
    for key, value in data.items():
        if key in TOP_LEVEL_KEYS:
            continue
        if key in NESTED:
            inner = [s for s in SECTIONS if s.startswith(key + ".")]
            if not isinstance(value, dict):
                r.fail("", f"{key} must hold the sections {', '.join(f'[{s}]' for s in inner)}, "
                           f"not {_type_name(value)}")
            for sub, sub_value in value.items():
                if not isinstance(sub_value, (dict, list)):
                    r.fail(f"[{key}]", f"unknown key '{sub}': factors go in "
                                       f"{', '.join(f'[{s}]' for s in inner)}")
                if f"{key}.{sub}" not in inner:
                    r.fail("", f"unknown section [{key}.{sub}]{_hint(f'{key}.{sub}', inner, '[{}]')}")
                found[f"{key}.{sub}"] = sub_value
        elif key in SECTIONS:
            found[key] = value
        elif isinstance(value, (dict, list)):
            # [self] / [cross] exist as both [unet.…] and [dit.…]: name every one.
            nested = [f"[{s}]" for s in SECTIONS if s.partition(".")[2] == key]
            hint = f" (did you mean {' or '.join(nested)}?)" if nested else _hint(key, SECTIONS, '[{}]')
            r.fail("", f"unknown section [{key}]{hint}")
        else:
            r.fail("", f"unknown top-level key '{key}'{_hint(key, TOP_LEVEL_KEYS)}")
    return found


def recipe_sections(data: dict, source: str) -> dict[str, Any]:
    """Section name → its raw TOML value, for every section of a parsed recipe; an unknown section is an
    error (the importer copies recorded recipes section by section, and must not drop one)."""
    return _find_sections(_Reader(source, True), data)


def parse_recipe(text: str, source: str = "<recipe>", *, allow_out_of_range: bool = False) -> Recipe:
    """Read and validate recipe TOML. Every problem is a CkptbendError naming `source` and the TOML path."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise CkptbendError(f"{source}: invalid TOML: {' '.join(str(e).split())}") from None
    except (RecursionError, MemoryError, ValueError):   # what the parser chokes on is a recipe error too
        raise CkptbendError(f"{source}: invalid TOML: nested too deeply or too large to read") from None
    try:
        return _parse(data, source, allow_out_of_range)
    except RecursionError:
        raise CkptbendError(f"{source}: a value is nested too deeply") from None


def _parse(data: dict, source: str, allow_out_of_range: bool) -> Recipe:
    r = _Reader(source, allow_out_of_range)
    schema, name, description, architecture = _read_header(r, data)
    found = _find_sections(r, data)
    multipliers = {}
    for section in MULTIPLIER_SECTIONS:
        if section in found and (entries := _read_multiply(r, section, found[section])):
            multipliers[section] = entries
    return Recipe(
        schema=schema, name=name, description=description, architecture=architecture,
        multipliers=FrozenDict(multipliers),
        sag=_read_sag(r, found["sag"]) if "sag" in found else None,
        slothful=_read_slothful(r, found["slothful"]) if "slothful" in found else None,
        bending=_read_bending(r, found["bending"]) if "bending" in found else (),
        warnings=tuple(r.warnings),
    )


def load_recipe(path, *, allow_out_of_range: bool = False) -> Recipe:
    """Read a recipe file (UTF-8; a byte-order mark is tolerated)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise CkptbendError(f"{path}: no such recipe file") from None
    except IsADirectoryError:
        raise CkptbendError(f"{path}: is a directory, not a recipe file") from None
    except UnicodeDecodeError as e:
        raise CkptbendError(f"{path}: not UTF-8 text (invalid byte at offset {e.start})") from None
    except OSError as e:
        raise CkptbendError(f"{path}: cannot read recipe: {e.strerror or e}") from None
    return parse_recipe(text, str(path), allow_out_of_range=allow_out_of_range)
