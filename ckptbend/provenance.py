"""What a baked output records about itself: the input's metadata, minus hashes that would lie, plus
provenance (ckptbend version, canonical recipe and its hash, source name and SHA-256, earlier bakes).

The hashes are written first as fixed-width placeholders so the header's length never changes: the
writer fills them in once the data is written (`final_metadata`).
"""

from __future__ import annotations

import json

from . import __version__

HEX_PLACEHOLDER = "0" * 64
PROVENANCE_KEYS = ("ckptbend.version", "ckptbend.recipe", "ckptbend.recipe_sha256",
                   "ckptbend.source", "ckptbend.source_sha256")


def output_metadata(source_meta: dict[str, str], recipe, source_name: str) -> dict[str, str]:
    """The input's metadata, minus hashes that would lie, plus provenance (hashes as placeholders)."""
    meta = {k: v for k, v in source_meta.items()
            if not k.startswith("sshs_") and k not in PROVENANCE_KEYS and k != "ckptbend.history"}
    if "ckptbend.recipe_sha256" in source_meta:   # baked before: keep the chain visible
        history = _history(source_meta.get("ckptbend.history", "[]"))
        history.append({k.removeprefix("ckptbend."): source_meta.get(k, "") for k in PROVENANCE_KEYS})
        meta["ckptbend.history"] = json.dumps(history, separators=(",", ":"), sort_keys=True)
    if "modelspec.hash_sha256" in meta:            # ModelSpec asks tools that modify weights to recompute it
        meta["modelspec.hash_sha256"] = "0x" + HEX_PLACEHOLDER
    meta.update({
        "ckptbend.version": __version__,
        "ckptbend.recipe": recipe.canonical(),
        "ckptbend.recipe_sha256": recipe.sha256,
        "ckptbend.source": source_name,
        "ckptbend.source_sha256": HEX_PLACEHOLDER,
    })
    return meta


def _history(text: str) -> list:
    """Earlier bakes recorded in the input; a damaged record is kept as text rather than trusted."""
    try:
        history = json.loads(text)
    except (ValueError, RecursionError):
        return [{"unreadable": text}]
    return history if isinstance(history, list) else [{"unreadable": text}]


def final_metadata(meta: dict[str, str], source_sha256: str, data_sha256: str | None) -> dict[str, str]:
    meta = dict(meta, **{"ckptbend.source_sha256": source_sha256})
    if data_sha256 is not None:
        meta["modelspec.hash_sha256"] = "0x" + data_sha256
    return meta
