"""Sweeps: one base recipe expanded over a grid of multiplier values (`--grid unet.self.q=1.0,1.1,1.2`)."""

from __future__ import annotations

import itertools
from dataclasses import replace

from .errors import CkptbendError
from .recipe import MULTIPLIER_SECTIONS, MultiplyEntry, Recipe, multiply_params, parse_recipe
from .recipe.schema import MULTIPLY_KEYS


def parse_grid(spec: str) -> tuple[str, str, list[float]]:
    """'unet.self.q=1.0,1.1' → ('unet.self', 'q', [1.0, 1.1])."""
    target, _, values = spec.partition("=")
    section, _, key = target.rpartition(".")
    if section not in MULTIPLIER_SECTIONS or key not in MULTIPLY_KEYS[section]:
        raise CkptbendError(f"--grid {spec!r}: expected SECTION.KEY=V1,V2,… with SECTION one of "
                            f"{', '.join(MULTIPLIER_SECTIONS)} and KEY one of its multipliers "
                            "(selectors such as blocks cannot be swept)")
    try:
        numbers = [float(v) for v in values.split(",") if v.strip()]
    except ValueError:
        raise CkptbendError(f"--grid {spec!r}: values must be numbers separated by commas") from None
    if not numbers:
        raise CkptbendError(f"--grid {spec!r}: no values given")
    return section, key, numbers


def _set_factor(recipe: Recipe, section: str, key: str, value: float) -> Recipe:
    entries = recipe.multipliers.get(section, ())
    if len(entries) > 1 or any(e.has_selector for e in entries):
        raise CkptbendError(f"--grid {section}.{key}: the recipe's [{section}] has selectors or several "
                            "entries; a grid sets one plain table")
    entry = entries[0] if entries else MultiplyEntry(())
    factors = dict(entry.factors, **{key: value})
    ordered = tuple((k, factors[k]) for k in multiply_params(section) if k in factors)
    return replace(recipe, multipliers={**recipe.multipliers, section: (replace(entry, factors=ordered),)})


def expand(recipe: Recipe, grids: list[tuple[str, str, list[float]]], *, allow_out_of_range=False) -> list[Recipe]:
    """Every combination of the grid values, each a validated recipe named after its values."""
    keys = [f"{section}.{key}" for section, key, _ in grids]
    if len(set(keys)) != len(keys):
        raise CkptbendError(f"--grid {next(k for k in keys if keys.count(k) > 1)} is given twice; "
                            "give each key once, with all its values")
    variants = []
    for combo in itertools.product(*(values for _, _, values in grids)):
        variant = recipe
        suffix = []
        for (section, key, _), value in zip(grids, combo):
            variant = _set_factor(variant, section, key, value)
            suffix.append(f"{section}.{key}-{value:g}")
        variant = replace(variant, name=".".join([recipe.name, *suffix]))
        # Re-read the canonical text: the same validation as a hand-written recipe (ranges, 1.0 dropped).
        variants.append(parse_recipe(variant.canonical(), f"grid variant {variant.name}",
                                     allow_out_of_range=allow_out_of_range))
    return variants
