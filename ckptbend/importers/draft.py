"""A recipe being imported: plain values and comments, written as recipe TOML text and then read back
by ckptbend's one recipe reader, so validation, the canonical form and the hash come from there."""

from __future__ import annotations

import json
import math
import re
import tomllib
from dataclasses import dataclass, field

from ckptbend.errors import CkptbendError
from ckptbend.recipe import SCHEMA_VERSION, SECTIONS, parse_recipe, recipe_sections

from .limits import MAX_VALUE_CHARS, bounded_size

SINGLE = ("sag", "slothful")    # sections a recipe holds once; the others are arrays of tables
TOML_INT = (-2**63, 2**63 - 1)  # TOML 1.0 integers are 64-bit
FLOAT32_MAX = 3.4028234663852886e38


@dataclass
class Block:
    section: str
    values: dict
    comments: list[str] = field(default_factory=list)


@dataclass
class Draft:
    source: str                                     # what was imported, for messages and comments
    name: str
    description: str = ""
    notes: list[str] = field(default_factory=list)  # comment lines at the top
    blocks: list[Block] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    architecture: tuple[str, ...] = ()

    def add(self, section: str, values: dict, *comments: str) -> Block:
        if section in SINGLE and (first := self.get(section)) is not None:
            raise CkptbendError(f"{self.source}: two sources of [{section}] ({'; '.join(first.comments[:1] + list(comments[:1]))}); "
                                "a recipe holds one")
        block = Block(section, dict(values), list(comments))
        self.blocks.append(block)
        return block

    def get(self, section: str) -> Block | None:
        return next((b for b in self.blocks if b.section == section), None)

    def add_recipe(self, recipe, comment: str) -> list[Block]:
        """Add every section of a recorded or companion recipe (its canonical form), architecture included;
        a section the reader does not know is an error, never dropped."""
        sections = recipe_sections(tomllib.loads(recipe.canonical()), self.source)
        self.architecture = self.architecture or recipe.architecture
        return [self.add(section, entry, comment) for section, value in sections.items()
                for entry in (value if isinstance(value, list) else [value])]

    def text(self) -> str:
        lines = [_comment(n) for n in self.notes]
        lines += [f"schema = {SCHEMA_VERSION}", f"name = {self._literal('', 'name', self.name)}"]
        if self.description:
            lines.append(f"description = {self._literal('', 'description', self.description)}")
        if self.architecture:
            arch = self.architecture[0] if len(self.architecture) == 1 else list(self.architecture)
            lines.append(f"architecture = {literal(arch)}")
        for block in sorted(self.blocks, key=lambda b: SECTIONS.index(b.section)):   # stable: chain order kept
            header = f"[{block.section}]" if block.section in SINGLE else f"[[{block.section}]]"
            lines += ["", *map(_comment, block.comments), header]
            lines += [f"{key} = {self._literal(block.section, key, value)}" for key, value in block.values.items()
                      if value is not None]
        return "\n".join(lines) + "\n"

    def _literal(self, section: str, key: str, value) -> str:
        where = f"[{section}] {key}" if section else key
        if not bounded_size(value):
            raise CkptbendError(f"{self.source}: {where}: a value longer than {MAX_VALUE_CHARS} characters "
                                "cannot be a recipe value")
        try:
            return literal(value)
        except (TypeError, OverflowError) as e:
            raise CkptbendError(f"{self.source}: {where}: {e}") from None

    def recipe(self, allow_out_of_range: bool = False):
        recipe = parse_recipe(self.text(), f"{self.source} (imported)", allow_out_of_range=allow_out_of_range)
        for section, entries in recipe.multipliers.items():
            for entry in entries:
                q, k = entry.factor("q"), entry.factor("k")
                big = [f"{name} = {f:g}" for name, f in entry.factors if f > FLOAT32_MAX] or \
                    ([f"q x k = {q:g} x {k:g}"] if q * k > FLOAT32_MAX else [])
                if big:
                    raise CkptbendError(f"{self.source}: [{section}] {big[0]} overflows: no float32 weight "
                                        "can hold the result")
        return recipe


def _comment(text: str) -> str:
    # Titles and file names come from the source; a newline or control character would end the comment.
    return "# " + re.sub(r"[\x00-\x1f\x7f]+", " ", text)


def literal(value) -> str:
    """A TOML literal for a value read from JSON/YAML/TOML (the reader then checks its type and range)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        if not TOML_INT[0] <= value <= TOML_INT[1]:
            digits = len(str(abs(value)))
            shown = str(value) if digits <= 30 else f"of {digits} digits"
            raise OverflowError(f"the integer {shown} is beyond TOML's 64-bit integers")
        return str(value)
    if isinstance(value, float):
        return repr(value) if math.isfinite(value) else ("nan" if math.isnan(value) else f"{'-' if value < 0 else ''}inf")
    if isinstance(value, str):
        # A JSON string is a TOML basic string, except that TOML wants DEL and lone surrogates escaped.
        return re.sub(r"[\x7f\ud800-\udfff]", lambda m: f"\\u{ord(m.group()):04X}", json.dumps(value, ensure_ascii=False))
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(map(literal, value)) + "]"
    raise TypeError(f"a {type(value).__name__} ({str(value)[:40]}) cannot be a recipe value")


def slug(text: str) -> str:
    """A recipe name from a file name: runs of other characters become '-'."""
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-._") or "imported"
