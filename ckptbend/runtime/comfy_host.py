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
  Bending   attn2_replace at every cross-attention site that an entry may act on: ComfyUI's own
            attention, plus for the conditional chunks where an entry acts the correction of the
            bent columns (bending.bent_output, float32).
Every hooked site computes its unchanged output with ComfyUI's own attention function, the backend
the user selected (host_attention), so wherever nothing is bent the result is bit-identical.

Node API, used by the companion's __init__.py:
    NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS = node_class_mappings(dynamic, name, sha256)
and, for scripts and tests, patch_model(model, dynamic, **inputs) -> patched clone.
"""

from __future__ import annotations

import math
import re
from typing import Mapping

import torch

from . import bending, sag, slothful

CATEGORY = "ckptbend"
# Set in transformer_options for SAG's extra model call. ComfyUI marks the chunks of a
# calc_cond_batch call by their position in its conds list, so the unconditional re-run looks
# conditional (cond_or_uncond == [0]); the flag keeps Bending (conditional only) and SAG's recorder
# out of it.
SAG_PASS = "ckptbend_sag_pass"
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
    only its slice as sample_sigmas), bending's step index continues across them (_step_counter)."""
    values = {**{k: _default(s) for k, s in input_specs(dynamic).items()}, **values}
    shared: dict = {}
    return tuple(None if m is None else _patch_one(m, dynamic, values, _step_counter(shared, slot))
                 for slot, m in enumerate((model, model_2)))


def _step_counter(shared: dict, slot: int):
    """steps(options) → this call's scheduler step index. The models of one node share `shared`: when
    this model's schedule slice begins at the sigma where the other's last slice ended, its steps
    follow the other's (offset = the other's offset + its step count). A closure, not an object:
    ComfyUI deep-copies objects in model_options on clone."""
    def steps(options):
        schedule = options.get("sample_sigmas")
        local = step_index(options["sigmas"][0], schedule)
        if local is None:
            return None
        sigmas = [float(s) for s in torch.as_tensor(schedule).detach().flatten().cpu()]
        offset = 0
        for other, (their, their_offset) in shared.items():
            if other != slot and len(their) > 1 and sigmas and math.isclose(their[-1], sigmas[0], rel_tol=1e-4):
                offset = their_offset + len(their) - 1
        shared[slot] = (sigmas, offset)
        return offset + local

    return steps


def _patch_one(model, dynamic: Mapping, values: Mapping, steps):
    """patch_model's clone of one model; steps: its _step_counter."""
    if (dynamic.get("sag") is not None or dynamic.get("slothful") is not None) \
            and not _is_unet(model.model.diffusion_model):
        raise ValueError("SAG and Slothful Attention need a UNet model (SD 1.x/2.x, SDXL); this model's "
                         f"diffusion_model is a {type(model.model.diffusion_model).__name__}")
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
            dit = None if _is_unet(m.model.diffusion_model) else dit_layout(m.model.diffusion_model)
            columns = token_columns(values["bending_clip"], values["bending_prompt"], [s.token for s in specs],
                                    None if dit is None else dit.text_key)
            (_patch_bending if dit is None else _patch_bending_dit)(m, specs, columns, steps, *([dit] if dit else []))
    return m


def _is_unet(diffusion_model) -> bool:
    return hasattr(diffusion_model, "input_blocks")


# --- attention helpers ------------------------------------------------------------------------------

def host_attention(q, k, v, heads: int, extra: Mapping, mask=None):
    """ComfyUI's own attention, the backend the user selected (sub-quadratic, split, PyTorch, xformers,
    sage, flash: comfy.ldm.modules.attention.optimized_attention), called as ComfyUI's CrossAttention
    calls it, so a site the node does not change computes exactly what the unpatched model does.
    Another node's optimized_attention_override (ComfyUI ≥ 0.3.60) is honoured as ComfyUI would."""
    import importlib

    attention = importlib.import_module("comfy.ldm.modules.attention")
    kwargs = {"attn_precision": extra.get("attn_precision")}
    if "optimized_attention_override" in extra:
        kwargs["transformer_options"] = extra
    if mask is not None:
        return attention.optimized_attention_masked(q, k, v, heads, mask, **kwargs)
    return attention.optimized_attention(q, k, v, heads, **kwargs)


def _per_head(x: torch.Tensor, heads: int) -> torch.Tensor:
    """[b, n, heads·d], or [b, n, heads, d] (SD3's v: ComfyUI's backends view both alike) → [b, heads, n, d]
    (a view: the correction is written through it into the host's output)."""
    return x.view(x.shape[0], x.shape[1], heads, -1).transpose(1, 2)


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
        return host_attention(q, k, v, heads, extra)

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


def _token_ids(tokens: Mapping, key: str | None = None) -> list:
    """The token ids of ComfyUI's clip.tokenize output {"l": [[(id, weight, …), …77], …]} in
    cross-attention column order (the chunks' concatenation); an embedding vector counts as None.
    key: the encoder whose tokens the model attends to; default "l" (SDXL's "g" has the same
    positions), or the only one."""
    if key is None:
        key = "l" if "l" in tokens or len(tokens) != 1 else next(iter(tokens))
    if key not in tokens:
        raise ValueError(f"bending_clip tokenizes for {', '.join(sorted(tokens))}, but this model reads "
                         f"{key!r} tokens: wire the text encoder you sample with")
    return [t[0] if isinstance(t[0], int) else None for chunk in tokens[key] for t in chunk]


def token_columns(clip, prompt: str, words, key: str | tuple | None = None) -> dict[str, list[int]]:
    """token → its text-token columns in the cross-attention context of `prompt` as `clip` encodes it.

    The prompt goes to the wired CLIP's own tokenize() exactly as the user encodes it, after removing
    only the "{word}" bending marks (bending.py): ComfyUI parses its emphasis ("(word:1.2)", "((word))",
    "\\(" escapes) and chunking itself, so a weighted word keeps its place and a target may carry a
    weight. A word's ids are clip.tokenize(word) less the ids an empty prompt has (start, end,
    padding); all of its sub-tokens are bent. Wildcards and comma groups: bending.token_columns.
    key: a tuple names encoders whose tokens follow one another in the context (SD3: ("l", "t5xxl"),
    77 CLIP tokens per chunk, then T5's): a word must be in the first; its columns in the others, shifted
    by the tokens before them, are bent too where it is found there.
    """
    text, _marked = bending.parse_marked_prompt(prompt)
    tokens, empty = clip.tokenize(text), clip.tokenize("")
    keys = key if isinstance(key, tuple) else (key,)
    try:
        found = _columns_of(clip, words, tokens, empty, keys[0])
    except ValueError as e:
        raise ValueError(f"{e} in the bending prompt {text!r}; put the prompt you encode into the "
                         "node's bending_prompt, or change the entry's token") from None
    offset = len(_token_ids(tokens, keys[0]))
    for later in keys[1:]:
        if later not in tokens:
            break
        for word in words:
            try:
                more = _columns_of(clip, [word], tokens, empty, later).get(word, [])
            except ValueError:
                continue                       # not among this encoder's tokens (or a wildcard)
            found[word] = found.get(word, []) + [offset + j for j in more]
        offset += len(_token_ids(tokens, later))
    return found


def _columns_of(clip, words, tokens: Mapping, empty: Mapping, key) -> dict[str, list[int]]:
    if key == QWEN_KEY:
        return _qwen_columns(clip, words, tokens, empty)
    special = set(_token_ids(empty, key))
    prompt = _token_ids(tokens, key)

    def ids(text):
        return [i for i in _token_ids(clip.tokenize(text), key) if i not in special]

    return bending.token_columns(words, prompt, bending.spelled_in(prompt, ids))     # T5: after punctuation too


# Qwen-Image: ComfyUI's QwenImageTokenizer puts the prompt into the chat template (system prompt, then
# "<|im_start|>user\n", the prompt, "<|im_end|>\n<|im_start|>assistant\n"; a prompt that starts with
# "<|im_start|>" is its own template) and tokenises it whole with weights disabled: "(word:1.2)" stays literal
# text, only the "\(" escapes are resolved. Its encoder (QwenImageTEModel.encode_token_weights) drops the
# embeddings before the second "<|im_start|>" and that token's "user\n": the joint attention's text key 0 is
# the prompt's first token, and the template's tail follows the prompt. These are Qwen2.5's token ids.
QWEN_KEY = "qwen25_7b"
QWEN_IM_START, QWEN_USER, QWEN_NEWLINE = 151644, 872, 198


def _qwen_text(ids: list) -> list:
    """The ids whose embeddings ComfyUI's Qwen-Image encoder keeps (its template_end rule)."""
    starts = [i for i, t in enumerate(ids) if t == QWEN_IM_START][:2]
    if not starts:
        raise ValueError("the Qwen-Image prompt has no <|im_start|> (ComfyUI then keeps only its last token)")
    end = starts[-1]
    if len(ids) > end + 3 and ids[end + 1] == QWEN_USER and ids[end + 2] == QWEN_NEWLINE:
        end += 3
    return ids[end:]


def _qwen_columns(clip, words, tokens: Mapping, empty: Mapping) -> dict[str, list[int]]:
    """Qwen-Image: word → its columns among the kept text tokens. A word is found spelled after a space
    (" kiss") or bare (at the prompt's start, after "(" …): byte-level BPE gives them different ids; the
    earlier one in the prompt wins. Its spellings are tokenised inside the template, as the prompt is, and
    cut out of the kept tokens (less the template's tail)."""
    tail = len(_qwen_text(_token_ids(empty, QWEN_KEY)))

    def spell(text):
        kept = _qwen_text(_token_ids(clip.tokenize(text), QWEN_KEY))
        return kept[:len(kept) - tail]

    return bending.token_columns(words, _qwen_text(_token_ids(tokens, QWEN_KEY)),
                                 lambda word: bending.Alternatives((spell(" " + word), spell(word))))


def _patch_bending(m, specs: list, columns: Mapping, steps) -> None:
    """UNet: an attn2 replace at every cross-attention site an entry may act on."""
    sites = cross_attention_sites(m.model.diffusion_model)
    for layer, (name, number, index) in enumerate(sites):
        if any(s.apply_to_layers is None or layer in s.apply_to_layers for s in specs):
            m.set_model_attn2_replace(_bend_site(specs, columns, layer, steps), name, number, index)


def _bend_site(specs: list, columns: Mapping, layer: int, steps):
    def bend(q, k, v, extra):
        heads = extra["n_heads"]
        step = steps(extra)
        active = bending.active_entries(specs, step, layer)
        out = host_attention(q, k, v, heads, extra)
        rows = _chunk_rows(extra["cond_or_uncond"], 0, q.shape[0])
        if not active or not rows or extra.get(SAG_PASS):
            return out
        last = max(j for s in active for j in bending.columns_for(s.token, columns, k.shape[1]))
        if last >= k.shape[1]:
            raise ValueError(f"Attention Bending: token column {last} lies beyond the {k.shape[1]} text tokens "
                             "the model sees; is bending_prompt the prompt you encode?")
        # Only the conditional chunks are bent: the host's output plus the bent columns' correction.
        grid = _grid_hw(extra) or bending.grid_for(q.shape[1], tuple(extra["original_shape"][-2:]))
        bending.bend_rows(*(_per_head(t, heads) for t in (out, q, k, v)), rows, entries=active,
                          token_indices=columns, grid_hw=grid, step_index=step, layer_index=layer)
        return out

    return bend


# --- Attention Bending on DiTs ----------------------------------------------------------------------
#
# ComfyUI ≥ 0.3.60 hands every attention call of a DiT to transformer_options["optimized_attention_override"]
# (shared/docs/comfyui-dit-hooks.md). Three hooks, all on the clone:
#   - a "dit" block replace per block tags the block's transformer_options with its layer and a call
#     counter (the call index tells self / cross / joint attention apart), then runs the block (or the
#     replace another node put there);
#   - an APPLY_MODEL wrapper records each model call's token grid (frames, rows, cols) from the latent
#     and the patch size, and, on joint models, the text length of the block arguments;
#   - the override runs ComfyUI's own attention (the backend the user selected, or another node's
#     override) and, at the text attention of a tagged block where an entry acts, adds the bent
#     columns' correction for the conditional chunks (bending.bent_output: no [Lq, Lk] matrix).

MIN_COMFYUI = "0.3.60"
DIT_TAG = "ckptbend_dit_block"     # transformer_options: {"layer": n, "calls": [count]}
DIT_CALL = "ckptbend_dit_call"     # transformer_options: {"grid": (f, h, w), "text": n | None}


class DiTLayout:
    """How a DiT's text attention is reached: its blocks as (replace name, index, layer), which call
    of a block is the text attention, whether it is joint ([text; image] keys and queries), the patch
    (frames, rows, cols) and the tokenizer key of the text it attends to."""

    def __init__(self, kind, blocks, text_call, joint, patch, text_key):
        self.kind, self.blocks, self.text_call, self.joint = kind, blocks, text_call, joint
        self.patch, self.text_key = patch, text_key


def dit_layout(diffusion_model) -> DiTLayout:
    """Wan 2.1/2.2 (T2V: call 1 of a block is the text cross-attention; I2V/FLF: call 2, after the
    CLIP-image attention), Flux.1/Chroma (double then single blocks, joint) and SD3/SD3.5 (joint
    blocks; the dual blocks' second call is image self-attention) and Qwen-Image (transformer_blocks, joint
    [text; image], mask passed positionally: None). Layers count the blocks in order.
    SD3's text_key ("l", "t5xxl"): its context is the CLIP tokens then T5's; a word's keys in both are
    bent (token_columns)."""
    dm = diffusion_model
    name = type(dm).__name__

    def patch3(size):
        size = tuple(size) if isinstance(size, (tuple, list)) else (size, size)
        return (1, *size) if len(size) == 2 else size

    if hasattr(dm, "blocks") and hasattr(dm, "patch_size"):                        # Wan
        blocks = [("double_block", i, i) for i in range(len(dm.blocks))]
        image_call = hasattr(dm.blocks[0].cross_attn, "k_img") if len(dm.blocks) else False
        return DiTLayout("wan", blocks, 2 if image_call else 1, False, patch3(dm.patch_size), "umt5xxl")
    if hasattr(dm, "double_blocks"):                                                # Flux, Chroma
        n = len(dm.double_blocks)
        blocks = [("double_block", i, i) for i in range(n)]
        blocks += [("single_block", i, n + i) for i in range(len(getattr(dm, "single_blocks", ())))]
        return DiTLayout("flux", blocks, 0, True, patch3(getattr(dm, "patch_size", 2)), "t5xxl")
    if hasattr(dm, "transformer_blocks") and hasattr(dm, "txt_norm"):              # Qwen-Image
        blocks = [("double_block", i, i) for i in range(len(dm.transformer_blocks))]
        return DiTLayout("qwen", blocks, 0, True, patch3(getattr(dm, "patch_size", 2)), QWEN_KEY)
    if hasattr(dm, "joint_blocks"):                                                 # SD3, SD3.5
        blocks = [("double_block", i, i) for i in range(len(dm.joint_blocks))]
        return DiTLayout("sd3", blocks, 0, True, patch3(getattr(dm, "patch_size", 2)), ("l", "t5xxl"))
    raise ValueError("Attention Bending in ComfyUI supports UNets (SD 1.x/2.x, SDXL), Wan 2.1/2.2, Flux.1/Chroma, "
                     f"SD3/SD3.5 and Qwen-Image; this model's diffusion_model is a {name}")


def _patch_bending_dit(m, specs: list, columns: Mapping, steps, layout: DiTLayout) -> None:
    import importlib

    attention = importlib.import_module("comfy.ldm.modules.attention")
    if not hasattr(attention, "wrap_attn"):
        raise ValueError(f"Attention Bending on {layout.kind} models needs ComfyUI {MIN_COMFYUI} or newer "
                         "(optimized_attention_override); update ComfyUI")
    from comfy.patcher_extension import WrappersMP

    replaced = m.model_options["transformer_options"].get("patches_replace", {}).get("dit", {})
    for name, index, layer in layout.blocks:         # all of them: Flux's double blocks give the text length
        m.set_model_patch_replace(_tag_block(layer, replaced.get((name, index))), "dit", name, index)
    m.add_wrapper_with_key(WrappersMP.APPLY_MODEL, "ckptbend_bending", _record_call(layout.patch))
    # Read only now: set_model_patch_replace puts a new transformer_options dict in place each time.
    options = m.model_options["transformer_options"]
    options["optimized_attention_override"] = _dit_override(specs, columns, layout,
                                                            options.get("optimized_attention_override"), steps)


def _tag_block(layer: int, previous):
    def replace(args, extra):
        if "txt" in args and DIT_CALL in args["transformer_options"]:
            args["transformer_options"][DIT_CALL]["text"] = args["txt"].shape[1]   # joint: the text length
        tagged = {**args["transformer_options"], DIT_TAG: {"layer": layer, "calls": [0]}}
        args = {**args, "transformer_options": tagged}
        return previous(args, extra) if previous is not None else extra["original_block"](args)

    return replace


def _record_call(patch):
    def wrapper(executor, x, *args, **kwargs):
        # ComfyUI calls wrapper(executor, x, t, c_concat, c_crossattn, control, transformer_options, …)
        options = args[4] if len(args) > 4 else kwargs["transformer_options"]
        frames = x.shape[2] if x.ndim == 5 else 1
        grid = tuple(-(-size // p) for size, p in zip((frames, *x.shape[-2:]), patch))   # ComfyUI pads up
        options[DIT_CALL] = {"grid": grid, "text": None}
        return executor(x, *args, **kwargs)

    return wrapper


def _logit_bias(mask: torch.Tensor) -> torch.Tensor:
    """A ComfyUI attention mask (Flux's attn_mask, e.g. Redux's attn_bias: [b, L, L] added to the logits) as
    its backends read it: [q, k] → [1, 1, q, k], [b, q, k] → [b, 1, q, k]; a boolean mask keeps True keys."""
    if mask.dtype == torch.bool:
        mask = torch.zeros(mask.shape, device=mask.device).masked_fill_(~mask, float("-inf"))
    if mask.ndim == 2:
        mask = mask[None]
    return (mask[:, None] if mask.ndim == 3 else mask).float()


def _dit_override(specs: list, columns: Mapping, layout: DiTLayout, previous, steps=None):
    def override(func, q, k, v, *args, **kwargs):
        out = previous(func, q, k, v, *args, **kwargs) if previous is not None else func(q, k, v, *args, **kwargs)
        options = kwargs.get("transformer_options") or {}
        tag, call = options.get(DIT_TAG), options.get(DIT_CALL)
        if tag is None or call is None:
            return out
        index = tag["calls"][0]
        tag["calls"][0] += 1
        if index != layout.text_call or options.get(SAG_PASS):
            return out
        step = (steps or _step_counter({}, 0))(options)
        active = bending.active_entries(specs, step, tag["layer"])
        rows = _chunk_rows(options["cond_or_uncond"], 0, q.shape[0])
        if not active or not rows:
            return out
        heads = args[0] if args else kwargs["heads"]
        mask = args[1] if len(args) > 1 else kwargs.get("mask")
        qh, kh, vh = (t if kwargs.get("skip_reshape") else _per_head(t, heads) for t in (q, k, v))
        per_head_out = kwargs.get("skip_output_reshape")
        oh = out if per_head_out else _per_head(out, heads)
        frames, h, w = call["grid"]
        n_image = frames * h * w
        if layout.joint:
            n_text = call["text"]
            text, queries = slice(0, n_text), slice(n_text, n_text + n_image)
        else:
            text, queries = slice(None), slice(None)
            if qh.shape[2] != n_image:
                raise ValueError(f"Attention Bending: {qh.shape[2]} image tokens do not fit the grid {call['grid']}")
        here = columns
        if layout.kind == "sd3":         # the T5 columns are absent when SD3 samples without T5
            here = {w: [j for j in js if j < n_text] for w, js in columns.items()}
        last = max(j for s in active for j in bending.columns_for(s.token, here, len(range(kh.shape[2])[text])))
        if last >= len(range(kh.shape[2])[text]):
            raise ValueError(f"Attention Bending: token column {last} lies beyond the text tokens the model sees; "
                             "is bending_prompt the prompt you encode?")
        bending.bend_rows(oh, qh, kh, vh, rows, bias=None if mask is None else _logit_bias(mask), entries=active,
                          token_indices=here, grid_hw=(h, w),
                          step_index=step, layer_index=tag["layer"], frames=frames if frames > 1 else None,
                          text=text, queries=queries)
        return out

    return override
