"""Attention Bending on ComfyUI's DiTs.

ComfyUI ≥ 0.3.60 hands every attention call of a DiT to transformer_options["optimized_attention_override"]
(its wrap_attn decorator). Three hooks, all on the clone:
  - a "dit" block replace per block tags the block's transformer_options with its layer and a call
    counter (the call index tells self / cross / joint attention apart), then runs the block (or the
    replace another node put there);
  - an APPLY_MODEL wrapper records each model call's token grid (frames, rows, cols) from the latent
    and the patch size, and, on joint models, the text length of the block arguments;
  - the override runs ComfyUI's own attention (the backend the user selected, or another node's
    override) and, at the text attention of a tagged block where an entry acts, adds the bent
    columns' correction for the conditional chunks (bent_attention.bent_output: no [Lq, Lk] matrix).
"""

from __future__ import annotations

from typing import Mapping

from .. import bending, bent_attention, tokens
from . import counted, nextdit
from .common import SAG_PASS, chunk_rows, logit_bias, per_head, step_counter
from .dit_layouts import DiTLayout

MIN_COMFYUI = "0.3.60"
DIT_TAG = "ckptbend_dit_block"     # transformer_options: {"layer": n, "calls": [count]}
DIT_CALL = "ckptbend_dit_call"     # transformer_options: {"grid": (f, h, w), "text": n | None}


def patch_bending_dit(m, specs: list, columns: Mapping, steps, layout: DiTLayout) -> None:
    import importlib

    attention = importlib.import_module("comfy.ldm.modules.attention")
    if not hasattr(attention, "wrap_attn"):
        raise ValueError(f"Attention Bending on {layout.kind} models needs ComfyUI {MIN_COMFYUI} or newer "
                         "(optimized_attention_override); update ComfyUI")
    from comfy.patcher_extension import WrappersMP

    replaced = m.model_options["transformer_options"].get("patches_replace", {}).get("dit", {})
    for name, index, layer in layout.blocks:         # all of them: Flux's double blocks give the text length
        m.set_model_patch_replace(_tag_block(layer, replaced.get((name, index))), "dit", name, index)
    if layout.kind == "nextdit":                     # ComfyUI 0.3.64 writes no block_index: main calls counted
        layout.refiner_calls = nextdit.refiners(m.model.diffusion_model)
    m.add_wrapper_with_key(WrappersMP.APPLY_MODEL, "ckptbend_bending", _record_call(layout))
    # Read only now: set_model_patch_replace puts a new transformer_options dict in place each time.
    options = m.model_options["transformer_options"]
    options["optimized_attention_override"] = _dit_override(specs, columns, layout,
                                                            options.get("optimized_attention_override"), steps)


def _tag_block(layer: int, previous):
    def replace(args, extra):
        if "txt" in args and DIT_CALL in args["transformer_options"]:      # joint: the text length
            n_text = args["txt"].shape[1]
            if "num_tokens" in args:                    # Mochi's blocks crop the text to its first num_tokens
                n_text = min(n_text, int(args["num_tokens"]))
            args["transformer_options"][DIT_CALL]["text"] = n_text
        tagged = {**args["transformer_options"], DIT_TAG: {"layer": layer, "calls": [0]}}
        args = {**args, "transformer_options": tagged}
        return previous(args, extra) if previous is not None else extra["original_block"](args)

    return replace


def _record_call(layout):
    """Each model call's grid; where the blocks are told by the host (NextDiT, Qwen-Image 2.x: no block arguments to
    read) also its text length (the context; NextDiT pads it to layout.pad, Lumina 2 not) and its joint length, text
    and image tokens (NextDiT: each padded up)."""
    def wrapper(executor, x, *args, **kwargs):
        # ComfyUI calls wrapper(executor, x, t, c_concat, c_crossattn, control, transformer_options, …)
        options = args[4] if len(args) > 4 else kwargs["transformer_options"]
        frames = x.shape[2] if x.ndim == 5 else 1
        grid = tuple(-(-size // p) for size, p in zip((frames, *x.shape[-2:]), layout.patch))   # ComfyUI pads up
        options[DIT_CALL] = {"grid": grid, "text": None}
        if layout.kind == "wan":
            options[DIT_CALL]["extra"] = _wan_extra_tokens(grid, layout.patch, kwargs)
        context = args[2] if len(args) > 2 else kwargs.get("c_crossattn")
        if layout.kind == "hunyuan":                     # the prompt's tokens, before the ByT5 glyphs
            options[DIT_CALL]["prompt"] = context.shape[1]
        if layout.kind in counted.CALLS_PER_BLOCK:       # HiDream, Cosmos Predict2: blocks told by call order
            counted.record(layout.kind, options[DIT_CALL], context, kwargs)
        if layout.kind in HOST_TAGGED or layout.kind in JOINT_COUNTED:
            text, image = 0 if context is None else context.shape[1], grid[0] * grid[1] * grid[2]
            if layout.kind == "nextdit":
                options[DIT_CALL].update(calls=0, main=-1, refiners=layout.refiner_calls)
                text = text if layout.pad else nextdit.text_length(context, kwargs)
            if layout.pad:
                text, image = text + (-text) % layout.pad, image + (-image) % layout.pad
            options[DIT_CALL].update(text=text, joint=text + image)
        return executor(x, *args, **kwargs)

    return wrapper


def _wan_extra_tokens(grid, patch, conds) -> tuple[int, int]:
    """(tokens before, tokens after) the video's in a Wan model call: Wan 2.2 Fun Control's reference image
    (reference_latent, one frame through ref_conv: its tokens first, where the model has a ref_conv) and Phantom's
    subject images (time_dim_concat: frames after the video's, padded to the patch as the video is)."""
    before = after = 0
    ref = conds.get("reference_latent")
    if ref is not None:
        before = (ref.shape[-2] // patch[1]) * (ref.shape[-1] // patch[2])
    more = conds.get("time_dim_concat")
    if more is not None:
        after = -(-more.shape[2] // patch[0]) * grid[1] * grid[2]
    return before, after


HOST_TAGGED = {"nextdit": "double", "qwen21": "single"}    # kind → transformer_options["block_type"] of its blocks
JOINT_COUNTED = ("krea2", "ideogram4")    # kinds whose loop tells a block neither by a "dit" replace nor by block_index


def _joint_counted_layer(call, n_queries, n_keys):
    """Krea 2, Ideogram 4: each main block makes one attention call over the joint [text; image] tokens, in order
    (Krea 2's text-fusion blocks' calls before them see text alone), so the block is the number of joint calls before
    it in this model call; any other call is not bent, nor a call without text (Ideogram 4's image-only pass)."""
    if not n_queries == n_keys == call["joint"] or not call["text"]:
        return None
    call["counted"] = call.get("counted", -1) + 1
    return call["counted"]


def _host_tagged_layer(kind, options, call, n_queries, n_keys):
    """The block an attention call of a model whose loop writes transformer_options["block_index"] is in, or None
    for a call not bent. NextDiT: the main blocks' joint call (not a refiner's: text or image alone, before the
    loop; nor a longer one: Z-Image's omni edit with reference images and SigLIP tokens). Qwen-Image 2.x: the
    target image's call (its queries the image tokens alone, against text and image keys: its block-causal prefix
    calls and the prefix-cached ones alike); with reference images among the keys it refuses. NextDiT on a
    ComfyUI that writes no block_index (0.3.64): its main layers told by call order (nextdit.py)."""
    if kind == "nextdit" and "block_index" not in options:
        return nextdit.counted_layer(call, n_queries, n_keys)
    if options.get("block_type") != HOST_TAGGED[kind] or "block_index" not in options:
        return None
    if kind == "nextdit":
        return options["block_index"] if n_queries == n_keys == call.get("joint") else None
    if n_queries != call["joint"] - call["text"]:
        return None
    if n_keys != call["joint"]:
        raise ValueError("Attention Bending on Qwen-Image 2.x bends text-to-image sampling only: reference images "
                         "sit among the text tokens and shift the word's columns")
    return options["block_index"]


def _video_queries(n_queries: int, n_image: int, call) -> slice:
    """The video's query rows of a cross-attention: all of them, or those between a Wan call's reference-image tokens
    and its concatenated frames (_wan_extra_tokens: left unbent, as conditioning; a model without ref_conv ignores
    its reference image)."""
    before, after = call.get("extra", (0, 0))
    for first, total in ((0, n_image), (before, before + n_image + after), (0, n_image + after)):
        if n_queries == total:
            return slice(first, first + n_image)
    raise ValueError(f"Attention Bending: {n_queries} image tokens do not fit the grid {call['grid']}")


def _dit_override(specs: list, columns: Mapping, layout: DiTLayout, previous, steps=None):
    def override(func, q, k, v, *args, **kwargs):
        out = previous(func, q, k, v, *args, **kwargs) if previous is not None else func(q, k, v, *args, **kwargs)
        options = kwargs.get("transformer_options") or {}
        tag, call = options.get(DIT_TAG), options.get(DIT_CALL)
        if call is None or options.get(SAG_PASS):
            return out
        if layout.kind in HOST_TAGGED or layout.kind in JOINT_COUNTED:
            lengths = (q.shape[2], k.shape[2]) if kwargs.get("skip_reshape") else (q.shape[1], k.shape[1])
            layer = (_joint_counted_layer(call, *lengths) if layout.kind in JOINT_COUNTED
                     else _host_tagged_layer(layout.kind, options, call, *lengths))
            if layer is None:
                return out
        elif layout.kind in counted.CALLS_PER_BLOCK:
            lengths = (q.shape[2], k.shape[2]) if kwargs.get("skip_reshape") else (q.shape[1], k.shape[1])
            layer = counted.layer_of(layout.kind, layout.text_call, call, *lengths)
            if layer is None:
                return out
        else:
            if tag is None:
                return out
            index, layer = tag["calls"][0], tag["layer"]
            tag["calls"][0] += 1
            if index != layout.text_call:
                return out
        step = (steps or step_counter({}, 0))(options)
        active = bending.active_entries(specs, step, layer)
        rows = chunk_rows(options["cond_or_uncond"], 0, q.shape[0])
        if not active or not rows:
            return out
        heads = args[0] if args else kwargs["heads"]
        mask = args[1] if len(args) > 1 else kwargs.get("mask")
        qh, kh, vh = (t if kwargs.get("skip_reshape") else per_head(t, heads) for t in (q, k, v))
        per_head_out = kwargs.get("skip_output_reshape")
        oh = out if per_head_out else per_head(out, heads)
        frames, h, w = call["grid"]
        n_image = frames * h * w
        if layout.joint:
            n_text = call["text"]
            text, queries = slice(0, n_text), slice(n_text, n_text + n_image)
            if layout.kind == "qwen21":                  # the target image's queries alone
                queries = slice(0, n_image)
            if layout.kind == "mochi":                   # [video; text]
                text, queries = slice(n_image, n_image + n_text), slice(0, n_image)
            if layout.registers:                         # AuraFlow: [registers; text; image]
                text = slice(layout.registers, n_text)
            if layout.kind == "hunyuan":                 # [(reference;) image; prompt; glyphs]
                first = kh.shape[2] - n_text
                text, queries = slice(first, first + call["prompt"]), slice(first - n_image, first)
                if layout.prompt_tokens:                 # 1.0: [(image tokens;) prompt], the prompt's tokens last
                    if layout.prompt_tokens > call["prompt"]:
                        raise ValueError(f"Attention Bending: the bending prompt has {layout.prompt_tokens} tokens, "
                                         f"the model sees {call['prompt']}; is bending_prompt the prompt you encode?")
                    text = slice(text.stop - layout.prompt_tokens, text.stop)
            if layout.kind == "hidream":                 # [image; T5; Llama's last layer; the block's layer]
                text, queries = slice(n_image, n_image + n_text), slice(0, n_image)
        else:
            text, queries = slice(None), _video_queries(qh.shape[2], n_image, call)
        here = columns
        if layout.kind == "sd3":         # the T5 columns are absent when SD3 samples without T5
            here = {w: [j for j in js if j < n_text] for w, js in columns.items()}
        last = max(j for s in active for j in tokens.columns_for(s.token, here, len(range(kh.shape[2])[text])))
        if last >= len(range(kh.shape[2])[text]):
            raise ValueError(f"Attention Bending: token column {last} lies beyond the text tokens the model sees; "
                             "is bending_prompt the prompt you encode?")
        bent_attention.bend_rows(oh, qh, kh, vh, rows, bias=None if mask is None else logit_bias(mask), entries=active,
                          token_indices=here, grid_hw=(h, w),
                          step_index=step, layer_index=layer, frames=frames if frames > 1 else None,
                          text=text, queries=queries)
        return out

    return override
