"""A recipe being imported: plain values and comments, written as recipe TOML text and then read back
by ckptbend's one recipe reader, so validation, the canonical form and the hash come from there."""

from __future__ import annotations

import json
import math
import re
import tomllib
from dataclasses import dataclass, field

from ckptbend.errors import CkptbendError
from ckptbend.recipe import SCHEMA_VERSION, SECTIONS, parse_recipe

SINGLE = ("sag", "slothful")    # sections a recipe holds once; the others are arrays of tables


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

    def add(self, section: str, values: dict, *comments: str) -> Block:
        if section in SINGLE and (first := self.get(section)) is not None:
            raise CkptbendError(f"{self.source}: two sources of [{section}] ({'; '.join(first.comments[:1] + list(comments[:1]))}); "
                                "a recipe holds one")
        block = Block(section, dict(values), list(comments))
        self.blocks.append(block)
        return block

    def get(self, section: str) -> Block | None:
        return next((b for b in self.blocks if b.section == section), None)

    def add_recipe_text(self, text: str, comment: str) -> list[Block]:
        """Add every section of a recipe's TOML text (a recorded or companion recipe's canonical form)."""
        return [self.add(section, entry, comment) for section, value in _sections(tomllib.loads(text))
                for entry in (value if isinstance(value, list) else [value])]

    def text(self) -> str:
        lines = [_comment(n) for n in self.notes]
        lines += [f"schema = {SCHEMA_VERSION}", f"name = {literal(self.name)}"]
        if self.description:
            lines.append(f"description = {literal(self.description)}")
        for block in sorted(self.blocks, key=lambda b: SECTIONS.index(b.section)):   # stable: chain order kept
            header = f"[{block.section}]" if block.section in SINGLE else f"[[{block.section}]]"
            lines += ["", *map(_comment, block.comments), header]
            lines += [f"{key} = {self._literal(block, key, value)}" for key, value in block.values.items()
                      if value is not None]
        return "\n".join(lines) + "\n"

    def _literal(self, block: Block, key: str, value) -> str:
        try:
            return literal(value)
        except TypeError:
            raise CkptbendError(f"{self.source}: [{block.section}] {key}: a {type(value).__name__} "
                                f"({value!r}) cannot be a recipe value") from None

    def recipe(self, allow_out_of_range: bool = False):
        return parse_recipe(self.text(), f"{self.source} (imported)", allow_out_of_range=allow_out_of_range)


def _comment(text: str) -> str:
    # Titles and file names come from the source; a newline or control character would end the comment.
    return "# " + re.sub(r"[\x00-\x1f\x7f]+", " ", text)


def _sections(data: dict):
    for key, value in data.items():
        if key == "unet":
            yield from ((f"unet.{sub}", v) for sub, v in value.items())
        elif key in SECTIONS:
            yield key, value


def literal(value) -> str:
    """A TOML literal for a value read from JSON/YAML/TOML (the reader then checks its type and range)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return repr(value) if math.isfinite(value) else ("nan" if math.isnan(value) else f"{'-' if value < 0 else ''}inf")
    if isinstance(value, str):
        # A JSON string is a TOML basic string, except that TOML wants DEL and lone surrogates escaped.
        return re.sub(r"[\x7f\ud800-\udfff]", lambda m: f"\\u{ord(m.group()):04X}", json.dumps(value, ensure_ascii=False))
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(map(literal, value)) + "]"
    raise TypeError(value)


def slug(text: str) -> str:
    """A recipe name from a file name: runs of other characters become '-'."""
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-._") or "imported"

