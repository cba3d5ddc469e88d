"""The node: its class and inputs from the recipe's dynamic part, and the patched clone(s) it returns."""

from __future__ import annotations

import re
from typing import Mapping

from .. import bending, sag, slothful
from .common import step_counter
from .dit import patch_bending_dit
from .dit_layouts import dit_layout
from .tokens import HUNYUAN_KEY, llama_prompt_tokens, token_columns
from .unet import SVD_REFUSAL, is_svd, is_unet, patch_bending, patch_sag, patch_slothful

CATEGORY = "ckptbend"
SECOND_MODEL = ("Optional: a second model sampled after the first over the rest of the same schedule (Wan 2.2 "
                "A14B: high-noise expert in model, low-noise expert in model_2); apply_to_timesteps counts the "
                "steps of both as one schedule.")
BEND_STRENGTH_RANGE = (-10.0, 10.0)   # bending.md gives none; 0 = off, 1 = the transform, beyond extrapolates

# --- the node -------------------------------------------------------------------------------------

def node_id(recipe_name: str, recipe_sha256: str) -> str:
    """ckptbend_<recipe name as an identifier>_<first 8 hex digits of the recipe hash>."""
    name = re.sub(r"\W+", "_", recipe_name, flags=re.ASCII).strip("_") or "recipe"
    return f"ckptbend_{name}_{recipe_sha256[:8]}"


def node_class_mappings(dynamic: Mapping, recipe_name: str, recipe_sha256: str) -> tuple[dict, dict]:
    """(NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS) with one node for the recipe."""
    input_specs(dynamic)                    # a malformed recipe fails here, at load time

    two = bool(dynamic.get("bending"))      # bending: an optional second model (Wan 2.2 A14B's low-noise expert)

    class Node:
        RETURN_TYPES = ("MODEL", "MODEL") if two else ("MODEL",)
        RETURN_NAMES = ("model", "model_2") if two else ("model",)
        FUNCTION = "patch"
        DESCRIPTION = (f"The sampling-time part of the ckptbend recipe {recipe_name!r} "
                       f"(sha256 {recipe_sha256}). Returns a patched copy of the model"
                       + (" (and of model_2, patched alike, when one is wired: Wan 2.2 A14B's two experts, "
                          "their steps counted as one schedule)." if two else "."))

        @classmethod
        def INPUT_TYPES(cls):
            types = {"required": {"model": ("MODEL",), **input_specs(dynamic)}}   # fresh: callers may edit it
            if two:
                types["optional"] = {"model_2": ("MODEL", {"tooltip": SECOND_MODEL})}
            return types

        def patch(self, model, model_2=None, **values):
            if two:
                return patch_models(model, model_2, dynamic, **values)
            return (patch_model(model, dynamic, **values),)

    Node.CATEGORY = CATEGORY
    Node.__name__ = Node.__qualname__ = node_id(recipe_name, recipe_sha256)
    return {Node.__name__: Node}, {Node.__name__: f"ckptbend: {recipe_name}"}


def _float(default, lo, hi, step=0.01):
    return ("FLOAT", {"default": float(default), "min": lo, "max": hi, "step": step})


def _simple_slothful_defaults(recipe: Mapping) -> dict:
    """The Simple node's values from the recipe's full parameter set (which the recipe keeps even
    for Simple, with equal in/out depth decays and equal k/v blends)."""
    full = {**slothful.DEFAULTS, **recipe}
    mapped = {"time_decay": full["time_decay"], "depth_decay": full["in_depth_decay"],
              "in_mode": full["in_mode"], "in_strength": full["in_strength"], "in_blend": full["in_k_blend"],
              "out_mode": full["out_mode"], "out_strength": full["out_strength"], "out_blend": full["out_k_blend"]}
    return {name: recipe.get(name, mapped[name]) for name in slothful.SIMPLE_DEFAULTS}


def input_specs(dynamic: Mapping) -> dict:
    """The node's inputs besides "model", in UI order: only the recipe's sections, each value
    defaulting to the recipe's, with the docs' ranges.

    sag_*: scale, blur_sigma. slothful_*: the full node's twelve parameters, or the Simple node's
    eight when dynamic["slothful_simple"]. Bending: bending_clip (maps words to token columns),
    bending_prompt (the prompt as encoded, emphasis included; words to bend may be marked "{word}"), and per entry
    i = 1, 2, …: bend<i>_token and bend<i>_strength; the rest of an entry is the recipe's.
    """
    specs: dict = {}
    if dynamic.get("sag") is not None:
        values = {**sag.SAG_DEFAULTS, **dynamic["sag"]}
        for name in ("scale", "blur_sigma"):
            specs["sag_" + name] = _float(values[name], *sag.SAG_RANGES[name])
    if dynamic.get("slothful") is not None:
        recipe = dynamic["slothful"]
        if dynamic.get("slothful_simple"):
            values, ranges = _simple_slothful_defaults(recipe), slothful.SIMPLE_RANGES
        else:
            values, ranges = {**slothful.DEFAULTS, **recipe}, slothful.RANGES
        for name in (slothful.SIMPLE_DEFAULTS if dynamic.get("slothful_simple") else slothful.DEFAULTS):
            value = values[name]
            if name.endswith("_mode"):
                spec = (list(slothful.MODES), {"default": value})
            elif name == "keep_middle":
                spec = ("BOOLEAN", {"default": bool(value)})
            else:
                spec = _float(value, *ranges[name], step=0.1 if name.endswith("strength") else 0.01)
            specs["slothful_" + name] = spec
    if dynamic.get("bending"):
        specs["bending_clip"] = ("CLIP",)
        specs["bending_prompt"] = ("STRING", {"multiline": True, "default": ""})
        for i, entry in enumerate(dynamic["bending"], 1):
            specs[f"bend{i}_token"] = ("STRING", {"default": entry["token"]})
            specs[f"bend{i}_strength"] = _float(entry.get("strength", 1.0), *BEND_STRENGTH_RANGE, step=0.05)
    return specs


def _default(spec):
    options = spec[1] if len(spec) > 1 else {}
    return options.get("default")


def patch_model(model, dynamic: Mapping, **values):
    """A clone of the ModelPatcher `model` with the recipe's techniques; `model` is left as it was.

    values: the node's inputs by name (input_specs); missing ones take the recipe's values.
    SAG with scale 0 and Bending whose entries all have strength 0 register nothing, so sampling
    stays bit-identical to the unpatched model.
    """
    return patch_models(model, None, dynamic, **values)[0]


def patch_models(model, model_2, dynamic: Mapping, **values) -> tuple:
    """(patched model, patched model_2 or None): both with the same values. For two models sampled one
    after the other over slices of one schedule (Wan 2.2 A14B: KSamplerAdvanced per expert, each seeing
    only its slice as sample_sigmas), bending's step index continues across them (step_counter)."""
    values = {**{k: _default(s) for k, s in input_specs(dynamic).items()}, **values}
    shared: dict = {}
    return tuple(None if m is None else _patch_one(m, dynamic, values, step_counter(shared, slot))
                 for slot, m in enumerate((model, model_2)))


def _patch_one(model, dynamic: Mapping, values: Mapping, steps):
    """patch_model's clone of one model; steps: its step_counter."""
    if is_svd(model.model.diffusion_model) and (dynamic.get("bending") or any(
            dynamic.get(k) is not None for k in ("sag", "slothful"))):
        raise ValueError(SVD_REFUSAL)
    if (dynamic.get("sag") is not None or dynamic.get("slothful") is not None) \
            and not is_unet(model.model.diffusion_model):
        raise ValueError("SAG and Slothful Attention need a UNet model (SD 1.x/2.x, SDXL); this model's "
                         f"diffusion_model is a {type(model.model.diffusion_model).__name__}")
    m = model.clone()
    if dynamic.get("sag") is not None and values["sag_scale"] != 0:
        patch_sag(m, float(values["sag_scale"]), float(values["sag_blur_sigma"]))
    if dynamic.get("slothful") is not None:
        if dynamic.get("slothful_simple"):
            params = slothful.simple_params(**{n: values["slothful_" + n] for n in slothful.SIMPLE_DEFAULTS})
        else:
            params = {n: values["slothful_" + n] for n in slothful.DEFAULTS}
        patch_slothful(m, slothful.resolve_params(params))
    if dynamic.get("bending"):
        specs = [bending.BendSpec.from_dict({**entry, "token": values[f"bend{i}_token"].strip(),
                                             "strength": float(values[f"bend{i}_strength"])})
                 for i, entry in enumerate(dynamic["bending"], 1)]
        specs = [s for s in specs if s.strength != 0]
        if specs:
            dit = None if is_unet(m.model.diffusion_model) else dit_layout(m.model.diffusion_model)
            columns = token_columns(values["bending_clip"], values["bending_prompt"], [s.token for s in specs],
                                    None if dit is None else dit.text_key)
            if dit is not None and dit.text_key == HUNYUAN_KEY:  # HunyuanVideo 1.0: image tokens may come first
                dit.prompt_tokens = llama_prompt_tokens(values["bending_clip"], values["bending_prompt"])
            (patch_bending if dit is None else patch_bending_dit)(m, specs, columns, steps, *([dit] if dit else []))
    return m
