"""Where a diffusion transformer sits in a single file and how its families read it: the model prefix found by
marker keys, what every other key of the file is, identification with unknown parts refused, and the walk over
the model's attention tensors that every family's sites() makes."""

from __future__ import annotations

from .flux import MODEL_PREFIXES
from .text_encoders import all_in_one_component
from .types import CheckpointFile, Identified
from .wan import identified, model_prefix, refuse_unknown_modules

VAE_PREFIX = "vae."
ENCODERS_PREFIX = "text_encoders."


def find_model(names, marks: dict[str, str]) -> tuple[str, str] | None:
    """(naming, model prefix) of the first naming whose marker key is present bare or under a model prefix."""
    for prefix in ("", *MODEL_PREFIXES):
        for naming, mark in marks.items():
            if prefix + mark in names:
                return naming, prefix
    return None


def component(key: str, prefix: str) -> str | None:
    """A key's component in a file whose model is under `prefix`: a text encoder of ComfyUI's all-in-one form,
    the VAE, nothing for an encoder the text-encoder family does not know (copied unchanged), else the model."""
    if c := all_in_one_component(key):
        return c
    if key.startswith(VAE_PREFIX):
        return "vae"
    if key.startswith(ENCODERS_PREFIX):
        return None
    return "dit" if key.startswith(prefix) else None


def identified_under(header, prefix: str, arch: str) -> Identified:
    """A file whose model sits under `prefix`, its other keys as component() sorts them."""
    components = {n: c for n in header.names if (c := component(n, prefix))}
    return Identified.model_file(arch, components)


def dit_tensor_names(files) -> set[str]:
    """The model's tensor names over every file of a checkpoint (shards split a model anywhere), as stored."""
    return {n for f in files for n, c in f.components.items() if c == "dit"}


def prefix_by_marks(names, *marks: tuple[str, ...]) -> str | None:
    """The model prefix ('' or `model.diffusion_model.`) under which every key of one of `marks` is present (its
    first key finds the prefix), or None for another model."""
    for keys in marks:
        found = model_prefix(names, keys[:1])
        if found and all(found[0] + k in names for k in keys):
            return found[0]
    return None


def identify_prefixed(header, find, name: str, blocks: dict, parts: dict, arch: str,
                      top: tuple = ()) -> Identified | None:
    """A family found by `find(names)` → model prefix: refused by name where it has a part the family's tables
    do not describe (refuse_unknown_modules), else identified."""
    prefix = find(set(header.names))
    if prefix is None:
        return None
    refuse_unknown_modules(header, prefix, name, blocks, parts, top)
    return identified(header, prefix, arch)


def scan(cf: CheckpointFile, prefix: str | None, *patterns):
    """(tensor, match) for each of `cf`'s model tensors whose name under `prefix` matches one of `patterns` (the
    first that does); nothing where `prefix` is None (another model)."""
    if prefix is None:
        return
    for t in cf.header.tensors:
        if cf.components.get(t.name) != "dit" or not t.name.startswith(prefix):
            continue
        bare = t.name[len(prefix):]
        if m := next((m for p in patterns if (m := p.match(bare))), None):
            yield t, m
