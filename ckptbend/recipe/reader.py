"""Reading a recipe: TOML text → a validated, defaults-filled `Recipe`, or one clear error with a
suggestion. This module walks the header and the sections; checks.py checks each value (one check per kind
of value; the schema tables say which check each key gets).
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

from ..errors import CkptbendError
from .canonical import _toml
from .schema import (ARCHITECTURE, BEND_COMMON, BEND_MODE_PARAMS, BEND_PARAMS, MULTIPLIER_SECTIONS, MULTIPLY_KEYS,
                     NAME_SLUG, QK_WARN_PRODUCT, SAG_PARAMS, SCHEMA_VERSION, SECTION_SELECTORS, SECTIONS, SELECTORS,
                     SIMPLE_EXPANDS, SIMPLE_FIXED, SLOTHFUL_PARAMS, SLOTHFUL_SIMPLE, SLOTHFUL_SIMPLE_PARAMS,
                     TOP_LEVEL_KEYS, bend_params, multiply_params)
from .values import BendEntry, FrozenDict, MultiplyEntry, Recipe, SAGParams, SlothfulParams
from .checks import Reader, hint, read_params, read_value, show, type_name


# --- reading: sections --------------------------------------------------------------------------

def _entries(r: Reader, section: str, value, many: bool = True) -> list[tuple[str, dict]]:
    """(where, table) for a section written as a table, or (if `many`) as an array of tables."""
    if isinstance(value, dict):
        return [(f"[{section}]", value)]
    if many and isinstance(value, list) and all(isinstance(e, dict) for e in value):
        return [(f"[[{section}]] entry {i}", e) for i, e in enumerate(value, 1)]
    shape = "a table or an array of tables" if many else "a table"
    r.fail("", f"[{section}] must be {shape}, not {type_name(value)}")


def _read_multiply(r: Reader, section: str, value) -> tuple[MultiplyEntry, ...]:
    params = multiply_params(section)
    here = ", ".join(p.name for p in SECTION_SELECTORS[section])
    misplaced = {s: f"'{s}' is not a selector of [{section}] (its selectors: {here})"
                 for s in SELECTORS if s not in params}
    entries = []
    for where, raw in _entries(r, section, value):
        values = read_params(r, where, raw, params, misplaced)
        entry = MultiplyEntry(factors=tuple((k, values[k]) for k in MULTIPLY_KEYS[section] if values[k] != 1.0),
                              **{p.name: values[p.name] for p in SECTION_SELECTORS[section]})
        q, k = entry.factor("q"), entry.factor("k")
        if q * k > QK_WARN_PRODUCT:
            r.warn(where, f"q x k = {q:g} x {k:g} = {q * k:g} (> {QK_WARN_PRODUCT:g}) multiplies attention logits "
                          f"by {q * k:g}; UIs that run attention in fp16 without upcasting may overflow (NaN/black images)")
        if entry.factors or entry.has_selector:   # an entry of 1.0s that selects everything does nothing
            entries.append(entry)
    return tuple(entries)


def _read_sag(r: Reader, value) -> SAGParams:
    [(where, raw)] = _entries(r, "sag", value, many=False)
    return SAGParams(**read_params(r, where, raw, SAG_PARAMS))


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


def _read_slothful(r: Reader, value) -> SlothfulParams:
    [(where, raw)] = _entries(r, "slothful", value, many=False)
    simple = read_value(r, where, SLOTHFUL_SIMPLE, raw)
    params = {"simple": SLOTHFUL_SIMPLE, **(SLOTHFUL_SIMPLE_PARAMS if simple else SLOTHFUL_PARAMS)}
    values = read_params(r, where, raw, params, _slothful_misplaced(simple))
    if simple:
        values = {"simple": True, **SIMPLE_FIXED,
                  **{full: values[name] for name, fulls in SIMPLE_EXPANDS.items() for full in fulls}}
    return SlothfulParams(**values)


def _check_frequency_filter(r: Reader, where: str, raw: dict, entry: BendEntry) -> None:
    if "sigma" in raw and "filter" in raw:
        r.fail(where, "frequency_filter takes either sigma or filter + cutoff, not both")
    if ("filter" in raw) != ("cutoff" in raw):
        r.fail(where, 'filter and cutoff go together: filter = "lowpass" or "highpass", cutoff in (0, 1]')


def _warn_even_kernel(r: Reader, where: str, raw: dict, entry: BendEntry) -> None:
    if entry.kernel_size % 2 == 0:
        r.warn(where, f"kernel_size = {entry.kernel_size} is even; the blur raises it to {entry.kernel_size + 1}")


# Rules that involve several keys of one mode.
BEND_MODE_CHECKS = {
    "frequency_filter": (_check_frequency_filter,),
    "blur": (_warn_even_kernel,),
    "sharpen": (_warn_even_kernel,),
}


def _read_bend(r: Reader, where: str, raw: dict) -> BendEntry:
    mode = read_value(r, where, BEND_COMMON["mode"], raw)
    params = bend_params(mode)
    takes = ", ".join(BEND_MODE_PARAMS[mode])
    misplaced = {name: f"mode \"{mode}\" has no parameter '{name}' (it takes {takes})"
                 for name in BEND_PARAMS if name not in params}
    entry = BendEntry(**read_params(r, where, raw, params, misplaced))
    for check in BEND_MODE_CHECKS.get(mode, ()):
        check(r, where, raw, entry)
    return entry


def _read_bending(r: Reader, value) -> tuple[BendEntry, ...]:
    return tuple(_read_bend(r, where, raw) for where, raw in _entries(r, "bending", value))


def _read_header(r: Reader, data: dict) -> tuple[int, str, str, tuple[str, ...]]:
    if "schema" not in data:
        r.fail("", f"missing 'schema = {SCHEMA_VERSION}' (the recipe format version) at the top")
    schema = data["schema"]
    if isinstance(schema, bool) or not isinstance(schema, int):
        r.fail("", f"schema must be the integer {SCHEMA_VERSION}, not {type_name(schema)} ({show(schema)})")
    if schema != SCHEMA_VERSION:
        r.fail("", f"unsupported schema {schema}: this version of ckptbend reads schema {SCHEMA_VERSION}")
    if "name" not in data:
        r.fail("", "missing 'name' (a short slug, e.g. name = \"sharper-details\")")
    name = data["name"]
    if not isinstance(name, str):
        r.fail("", f"name must be a string, not {type_name(name)} ({show(name)})")
    if not NAME_SLUG.fullmatch(name):
        r.fail("", f"name = {show(name)} must be a filename-safe slug: letters, digits, '.', '_' and '-', "
                   "starting with a letter or digit")
    description = data.get("description", "")
    if not isinstance(description, str):
        r.fail("", f"description must be a string, not {type_name(description)} ({show(description)})")
    return schema, name, description, read_value(r, "", ARCHITECTURE, data)


NESTED = ("unet", "dit")   # [unet.self], [dit.joint]: TOML reads them as tables inside "unet" / "dit"


def _find_sections(r: Reader, data: dict) -> dict[str, Any]:
    """Section name ("unet.self", "sag", ...) → its raw TOML value; unknown names are errors."""
    found: dict[str, Any] = {}
    for key, value in data.items():
        if key in TOP_LEVEL_KEYS:
            continue
        if key in NESTED:
            inner = [s for s in SECTIONS if s.startswith(key + ".")]
            if not isinstance(value, dict):
                r.fail("", f"{key} must hold the sections {', '.join(f'[{s}]' for s in inner)}, "
                           f"not {type_name(value)}")
            for sub, sub_value in value.items():
                if not isinstance(sub_value, (dict, list)):
                    r.fail(f"[{key}]", f"unknown key '{sub}': factors go in "
                                       f"{', '.join(f'[{s}]' for s in inner)}")
                if f"{key}.{sub}" not in inner:
                    r.fail("", f"unknown section [{key}.{sub}]{hint(f'{key}.{sub}', inner, '[{}]')}")
                found[f"{key}.{sub}"] = sub_value
        elif key in SECTIONS:
            found[key] = value
        elif isinstance(value, (dict, list)):
            # [self] / [cross] exist as both [unet.…] and [dit.…]: name every one.
            nested = [f"[{s}]" for s in SECTIONS if s.partition(".")[2] == key]
            suggestion = f" (did you mean {' or '.join(nested)}?)" if nested else hint(key, SECTIONS, '[{}]')
            r.fail("", f"unknown section [{key}]{suggestion}")
        else:
            r.fail("", f"unknown top-level key '{key}'{hint(key, TOP_LEVEL_KEYS)}")
    return found


def recipe_sections(data: dict, source: str) -> dict[str, Any]:
    """Section name → its raw TOML value, for every section of a parsed recipe; an unknown section is an
    error (the importer copies recorded recipes section by section, and must not drop one)."""
    return _find_sections(Reader(source, True), data)


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
    r = Reader(source, allow_out_of_range)
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
