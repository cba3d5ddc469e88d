"""The original Attention Bending YAML configs → [[bending]] entries (shared/docs/bending.md).

    attention_bending:          # or attention_bending_settings; a bare top-level `configs:` also works
      enabled: true
      configs:                  # `bending_configs` is what the original's create_bending_from_config reads
        - token: "kiss"
          mode: "scale"
          scale_factor: 2.5
          strength: 0.8

Read with PyYAML's safe loader (it comes with transformers), within limits.py's bounds. Where the original's meaning differs
from a recipe's, the value is converted, and the entry's comment says so.
"""

from __future__ import annotations

from pathlib import Path

from ckptbend.errors import CkptbendError
from ckptbend.recipe import BEND_COMMON, BEND_MODE_PARAMS

from .draft import Draft, slug
from .limits import load_yaml

SECTIONS = ("attention_bending", "attention_bending_settings")
LISTS = ("configs", "bending_configs")
# The fields of the original's BendingConfig (first public version); anything else is an error there too.
FIELDS = ("token", "mode", "scale_factor", "angle", "translate_x", "translate_y", "flip_horizontal",
          "flip_vertical", "zoom_factor", "kernel_size", "sigma", "sharpen_amount", "region", "region_feather",
          "strength", "apply_to_layers", "apply_to_timesteps", "renormalize", "preserve_sparsity")
UNUSED = ("preserve_sparsity",)   # declared by the original, read nowhere
RENORMALIZE = {True: "column", False: "none"}   # the first version divides each token's column by its sum


def _entries(data, source: str) -> tuple[dict, list]:
    section = data
    if isinstance(data, dict):
        section = next((data[k] for k in SECTIONS if isinstance(data.get(k), dict)), data)
    if not isinstance(section, dict):
        raise CkptbendError(f"{source}: not an Attention Bending config (expected attention_bending: {{enabled, configs}})")
    if section.get("enabled", True) is False:
        raise CkptbendError(f"{source}: bending is switched off (enabled: false); there is nothing to import")
    entries = next((section[k] for k in LISTS if k in section), None)
    if not isinstance(entries, list) or not entries:
        raise CkptbendError(f"{source}: no bending entries (expected attention_bending: configs: [...] with one "
                            "mapping per token)")
    return section, entries


def bending_draft(text: str, source: Path, name: str | None) -> Draft:
    data = load_yaml(text, str(source))
    section, entries = _entries(data, str(source))
    draft = Draft(str(source), name or slug(source.stem),
                  f"Imported from {source.name}: an Attention Bending config ({len(entries)} entr{'y' if len(entries) == 1 else 'ies'}).")
    draft.notes.append(f"Imported by `ckptbend recipe import` from {source.name} (Attention Bending YAML)")
    if section.get("apply_to_output") is False:
        draft.notes.append("the config is phase 1 (apply_to_output: false, maps only): use companion.apply(pipe, phase=1)")
    for i, entry in enumerate(entries, 1):
        if not isinstance(entry, dict):
            raise CkptbendError(f"{source}: bending entry {i} is not a mapping")
        for key in entry:
            if key not in FIELDS:
                raise CkptbendError(f"{source}: bending entry {i}: unknown key {key!r} (the original's BendingConfig "
                                    "has no such field)")
        draft.add("bending", *_convert(entry, i))
    return draft


def _convert(entry: dict, i: int) -> tuple[dict, ...]:
    values, notes = {}, [f"entry {i}"]
    mode = entry.get("mode")
    takes = BEND_MODE_PARAMS.get(mode, ()) if isinstance(mode, str) else ()
    for key, value in entry.items():
        if key in UNUSED:
            notes.append(f"{key}: {value!r} left out: the original never reads it")
        elif key == "renormalize" and value in RENORMALIZE:
            values[key] = RENORMALIZE[value]
        elif key in BEND_COMMON or key in takes or not takes:   # an unknown mode: let the reader name it
            values[key] = value
        else:
            notes.append(f"{key}: {value!r} left out: mode {mode!r} does not use it (nor does the original)")
    values.setdefault("renormalize", RENORMALIZE[True])        # the original's default
    return values, *notes

