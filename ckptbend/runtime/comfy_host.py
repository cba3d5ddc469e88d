"""ComfyUI host: one custom node per recipe that patches a MODEL with the recipe's sampling-time part.

Imports only the standard library, torch and the sibling runtime modules: this file is copied
verbatim into the companion folder, which ComfyUI loads from custom_nodes/. ComfyUI's own modules
(comfy.samplers) are imported by name inside the functions that run during sampling, so importing
the folder outside ComfyUI works. The math lives in sag.py, slothful.py and bending.py; this file
only wires it into ComfyUI's model-patch hooks (shared/docs/comfyui-hooks.md):

  SAG       attn1_replace at ("middle", 0, 0) keeps the unconditional chunk's attention
            probabilities (its output is plain attention); a post-CFG function (cfg1 optimisation disabled)
            runs the extra unconditional model call through comfy.samplers.calc_cond_batch and
            returns sag.sag_step's result (x0 space).
  Slothful  attn1_patch reduces the key/value inputs (slothful.slothful_kv) before projection.
  Bending   attn2_replace at every cross-attention site that an entry may act on: explicit
            probabilities, bent for the conditional chunks only (bending.attention_with_bending).

Node API, used by the companion's __init__.py:
    NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS = node_class_mappings(dynamic, name, sha256)
and, for scripts and tests, patch_model(model, dynamic, **inputs) -> patched clone.
"""

from __future__ import annotations

import re
from typing import Mapping

import torch
import torch.nn.functional as F

from . import bending, sag, slothful

CATEGORY = "ckptbend"
# Set in transformer_options for SAG's extra model call. ComfyUI marks the chunks of a
# calc_cond_batch call by their position in its conds list, so the unconditional re-run looks
# conditional (cond_or_uncond == [0]); the flag keeps Bending (conditional only) and SAG's recorder
# out of it.
SAG_PASS = "ckptbend_sag_pass"
BEND_STRENGTH_RANGE = (-10.0, 10.0)   # bending.md gives none; 0 = off, 1 = the transform, beyond extrapolates


# --- the node -------------------------------------------------------------------------------------

def node_id(recipe_name: str, recipe_sha256: str) -> str:
    """ckptbend_<recipe name as an identifier>_<first 8 hex digits of the recipe hash>."""
    name = re.sub(r"\W+", "_", recipe_name, flags=re.ASCII).strip("_") or "recipe"
    return f"ckptbend_{name}_{recipe_sha256[:8]}"


def node_class_mappings(dynamic: Mapping, recipe_name: str, recipe_sha256: str) -> tuple[dict, dict]:
    """(NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS) with one node for the recipe."""
    input_specs(dynamic)                    # a malformed recipe fails here, at load time

    class Node:
        RETURN_TYPES = ("MODEL",)
        FUNCTION = "patch"
        DESCRIPTION = (f"The sampling-time part of the ckptbend recipe {recipe_name!r} "
                       f"(sha256 {recipe_sha256}). Returns a patched copy of the model.")

        @classmethod
        def INPUT_TYPES(cls):
            return {"required": {"model": ("MODEL",), **input_specs(dynamic)}}   # fresh: callers may edit it

        def patch(self, model, **values):
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
    bending_prompt (the prompt as encoded, words to bend may be marked "(word)"), and per entry
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
    values = {**{k: _default(s) for k, s in input_specs(dynamic).items()}, **values}
    m = model.clone()
    if dynamic.get("sag") is not None and values["sag_scale"] != 0:
        _patch_sag(m, float(values["sag_scale"]), float(values["sag_blur_sigma"]))
    if dynamic.get("slothful") is not None:
        if dynamic.get("slothful_simple"):
            params = slothful.simple_params(**{n: values["slothful_" + n] for n in slothful.SIMPLE_DEFAULTS})
        else:
            params = {n: values["slothful_" + n] for n in slothful.DEFAULTS}
        _patch_slothful(m, slothful.resolve_params(params))
    if dynamic.get("bending"):
        specs = [bending.BendSpec.from_dict({**entry, "token": values[f"bend{i}_token"].strip(),
                                             "strength": float(values[f"bend{i}_strength"])})
                 for i, entry in enumerate(dynamic["bending"], 1)]
        specs = [s for s in specs if s.strength != 0]
        if specs:
            columns = token_columns(values["bending_clip"], values["bending_prompt"], [s.token for s in specs])
            _patch_bending(m, specs, columns)
    return m


# --- attention helpers ------------------------------------------------------------------------------

def _attention(q, k, v, heads: int, precision=None):
    """Plain attention as ComfyUI's PyTorch backend computes it (scaled_dot_product_attention), in
    q's dtype unless attn_precision asks for float32. Used where a replace has nothing to do, so
    the output matches an unpatched model's."""
    b, _, inner = q.shape
    d = inner // heads
    dtype = q.dtype
    if precision == torch.float32:
        q, k, v = q.float(), k.float(), v.float()
    q, k, v = (t.reshape(b, -1, heads, d).transpose(1, 2) for t in (q, k, v))
    out = F.scaled_dot_product_attention(q, k, v)
    return out.transpose(1, 2).reshape(b, -1, heads * d).to(dtype)


def _chunk_rows(cond_or_uncond, kind: int, batch: int) -> list[int]:
    """Batch rows of the chunks marked `kind` (0 = conditional, 1 = unconditional); the batch is
    len(cond_or_uncond) equal chunks in that order."""
    size = batch // len(cond_or_uncond)
    return [c * size + i for c, k in enumerate(cond_or_uncond) if k == kind for i in range(size)]


def _grid_hw(extra: Mapping):
    """(h, w) of this transformer's token grid from its input shape, when the host says it."""
    shape = extra.get("activations_shape")
    return tuple(int(s) for s in shape[-2:]) if shape is not None and len(shape) == 4 else None


def step_index(sigma, sample_sigmas) -> int | None:
    """This step's index in the sampler's schedule: the position of sigma in sample_sigmas, or for a
    sigma between two entries (a sampler's intermediate evaluation) the step it belongs to."""
    if sample_sigmas is None:
        return None
    schedule = torch.as_tensor(sample_sigmas).detach().flatten().float().cpu()
    sigma = float(sigma)
    hits = torch.isclose(schedule, torch.tensor(sigma), rtol=1e-4, atol=1e-7).nonzero()
    if len(hits):
        return int(hits[0])
    return max(0, int((schedule > sigma).sum()) - 1)


# --- SAG -----------------------------------------------------------------------------------------

def _patch_sag(m, scale: float, blur_sigma: float) -> None:
    # Closures, not objects: ComfyUI deep-copies model_options on clone, and both functions must
    # keep sharing this state.
    state: dict = {}

    def record(q, k, v, extra):
        cond_or_uncond, heads = extra["cond_or_uncond"], extra["n_heads"]
        if 1 in cond_or_uncond and not extra.get(SAG_PASS):
            # The unconditional chunk's probabilities [b·heads, n, n], computed beside the usual
            # attention, whose output stays the unpatched model's.
            rows = _chunk_rows(cond_or_uncond, 1, q.shape[0])
            grid = _grid_hw(extra)
            if grid is not None and grid[0] * grid[1] != k.shape[1]:
                grid = None     # keys reduced by Slothful (keep_middle off): ComfyUI's guess, as its node
            state.update(probs=bending.attention_probs(q[rows], k[rows], heads), heads=heads, mid_hw=grid)
        return _attention(q, k, v, heads, extra.get("attn_precision"))

    def post_cfg(args):
        probs = state.pop("probs", None)       # this step's map, used once
        if probs is None:
            return args["denoised"]
        import comfy.samplers                  # only inside ComfyUI (or a stand-in)

        options = dict(args["model_options"])
        options["transformer_options"] = {**options.get("transformer_options", {}), SAG_PASS: True}

        def uncond_x0_at(x_degraded):
            return comfy.samplers.calc_cond_batch(args["model"], [args["uncond"]], x_degraded,
                                                  args["sigma"], options)[0]

        return sag.sag_step(args["input"], args["denoised"], args["uncond_denoised"], probs, state["heads"],
                            uncond_x0_at, scale=scale, blur_sigma=blur_sigma, mid_hw=state["mid_hw"])

    m.set_model_attn1_replace(record, "middle", 0, 0)
    m.set_model_sampler_post_cfg_function(post_cfg, disable_cfg1_optimization=True)


# --- Slothful Attention ---------------------------------------------------------------------------

def _patch_slothful(m, params: dict) -> None:
    def reduce_kv(q_in, k_in, v_in, extra):
        k, v = slothful.slothful_kv(k_in, v_in, extra["block"][0], extra["sigmas"][0], extra["n_heads"],
                                    tuple(extra["original_shape"][-2:]), params)
        return q_in, k, v

    m.set_model_attn1_patch(reduce_kv)


# --- Attention Bending ------------------------------------------------------------------------------

def cross_attention_sites(diffusion_model) -> list[tuple[str, int, int]]:
    """(block_name, number, transformer index) of every cross-attention, in bending.md's layer order:
    input blocks, middle, output blocks, each by block number, then transformer index. Read from
    ComfyUI's UNet structure: input_blocks / middle_block / output_blocks, whose SpatialTransformers
    hold transformer_blocks with an attn2."""
    if not hasattr(diffusion_model, "input_blocks"):
        raise ValueError("Attention Bending needs a UNet (input_blocks / middle_block / output_blocks); "
                         f"this model's diffusion_model is a {type(diffusion_model).__name__}")
    middle = getattr(diffusion_model, "middle_block", None)
    groups = (("input", list(diffusion_model.input_blocks)), ("middle", [] if middle is None else [middle]),
              ("output", list(diffusion_model.output_blocks)))
    sites = []
    for name, blocks in groups:
        for number, block in enumerate(blocks):
            for layer in block:
                for index, tb in enumerate(getattr(layer, "transformer_blocks", ())):
                    if getattr(tb, "attn2", None) is not None:
                        sites.append((name, number, index))
    return sites


def _chunks(tokens: Mapping) -> list[list]:
    """ComfyUI's clip.tokenize output {"l": [[(id, weight), …77], …]} (SDXL adds "g" with the same
    positions) as lists of token ids per 77-token chunk; the encoder's context is their concatenation."""
    key = "l" if "l" in tokens else sorted(tokens)[0]
    return [[t[0] if isinstance(t[0], int) else None for t in chunk] for chunk in tokens[key]]


def token_columns(clip, prompt: str, words) -> dict[str, list[int]]:
    """word → its text-token columns in the cross-attention context of `prompt` encoded by `clip`.

    The prompt's marks "(word)" are removed before tokenising, as the original does (ComfyUI's
    emphasis syntax keeps the same tokens in the same places); all of a word's sub-tokens are bent.
    """
    text, _marked = bending.parse_marked_prompt(prompt)
    prompt_ids = [i for chunk in _chunks(clip.tokenize(text)) for i in chunk]
    eos = _chunks(clip.tokenize(""))[0][1]               # "" encodes as BOS, EOS, padding

    def word_ids(word):                                  # the word's tokens between BOS and EOS
        ids = _chunks(clip.tokenize(word))[0][1:]
        return ids[:ids.index(eos)] if eos in ids else ids

    try:
        return bending.token_columns(words, prompt_ids, word_ids)
    except ValueError as e:
        raise ValueError(f"{e} in the bending prompt {text!r}; put the prompt you encode into the "
                         "node's bending_prompt, or change the entry's token") from None


def _patch_bending(m, specs: list, columns: Mapping) -> None:
    sites = cross_attention_sites(m.model.diffusion_model)
    for layer, (name, number, index) in enumerate(sites):
        if any(s.apply_to_layers is None or layer in s.apply_to_layers for s in specs):
            m.set_model_attn2_replace(_bend_site(specs, columns, layer), name, number, index)


def _bend_site(specs: list, columns: Mapping, layer: int):
    def bend(q, k, v, extra):
        heads, precision = extra["n_heads"], extra.get("attn_precision")
        cond_or_uncond = extra["cond_or_uncond"]
        step = step_index(extra["sigmas"][0], extra.get("sample_sigmas"))
        active = [s for s in specs if bending.entry_active(s, step, layer)]
        out = _attention(q, k, v, heads, precision)
        rows = _chunk_rows(cond_or_uncond, 0, q.shape[0])
        if not active or not rows or extra.get(SAG_PASS):
            return out
        last = max(j for s in active for j in columns[s.token])
        if last >= k.shape[1]:
            raise ValueError(f"Attention Bending: token column {last} lies beyond the {k.shape[1]} text tokens "
                             "the model sees; is bending_prompt the prompt you encode?")
        # Only the conditional chunks get explicit, bent attention; the others keep the plain result.
        grid = _grid_hw(extra) or bending.grid_for(q.shape[1], tuple(extra["original_shape"][-2:]))
        bent = bending.attention_with_bending(q[rows], k[rows], v[rows], heads, active, columns, grid,
                                              step, layer)
        out[rows] = bent.to(out.dtype)
        return out

    return bend
