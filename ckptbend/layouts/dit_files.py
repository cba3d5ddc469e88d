"""Where a diffusion transformer sits in a single file, for the families that find it by one marker key
(Flux.2, Flux.3, Krea 2): bare or under ComfyUI's model prefixes, and what every other key of the file is."""

from __future__ import annotations

from .flux import MODEL_PREFIXES
from .text_encoders import all_in_one_component

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
