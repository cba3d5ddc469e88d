"""Bending at Wan Animate 2's text cross-attentions (WanAnimate2Transformer3DModel: each block's `cross_attn`, run by
WanAnimate2CrossAttnProcessor), and its prompt's word columns in the modular pipeline (WanAnimate2ModularPipeline,
which has no encode_prompt).

Each segment runs one reference pass (kv_cache_mode="extract": the driving video's tokens, the reference prompt
`prompt_ref`, fixed timestep; it fills the K/V cache) and, per step, the generation passes (kv_cache_mode="cached":
the segment's video tokens, frames × rows × columns under the (1, 2, 2) patch, the reference slot's frame first). The
generation pass's cross-attention is Wan's: the video queries against the prompt's T5 keys (padded to text_len),
plus a second, separate attention over the CLIP image keys added to it. Only that text attention is bent, on the
conditional branch (the guider's CFG runs two calls, the unconditional one with is_uncondtion=True); the reference
pass attends to prompt_ref, not the prompt: left alone, its cache the host's own. The self-attentions (dense, or a
flex BlockMask over [generation | reference]) hold no text keys.
"""

from __future__ import annotations

import inspect

from .calls import Call, patch_size_of, scheduler_position, step_of
from . import modular
from .prompts import _columns
from .recompute import acting, attention, bent_sdpa, plain, recorder, refuse_beyond

ANIMATE2_MODELS = {"WanAnimate2Transformer3DModel": "wan_animate2"}


def animate2_modules(model) -> list:
    """Every block's text cross-attention, in order (the self-attentions have no text keys)."""
    return [(f"blocks.{i}.cross_attn", block.cross_attn) for i, block in enumerate(model.blocks)]


def describe(session, model, args, kwargs) -> Call | None:
    """A generation pass's Call (its video grid, step, conditional or not); None for the reference pass."""
    given = inspect.signature(model.forward).bind_partial(*args, **kwargs).arguments
    if given["kv_cache_mode"] != "cached":
        return None
    frames, rows, cols = given["hidden_states"][0].shape[1:]
    frame_patch, row_patch, col_patch = patch_size_of(model)
    grid = (rows // row_patch, cols // col_patch)
    scheduler = session.pipe.scheduler
    t = float(given["timestep"].flatten().max())
    return Call(latent_hw=(rows, cols), token_hw=grid, frames=frames // frame_patch, cfg=False,
                cond_rows=[] if given.get("is_uncondtion") else list(range(len(given["hidden_states"]))),
                step=step_of(scheduler, scheduler_position(scheduler, t)), alpha_cumprod=None,
                n_text=model.config.text_len)


def animate2_attention(session, site, attn, given, original):
    """WanAnimate2CrossAttnProcessor reproduced where an entry acts: the text attention bent, the image keys'
    attention added unbent."""
    active = acting(session, site)
    hidden, text = given["hidden_states"], given["encoder_hidden_states"]
    if not active or not plain(attn, hidden, image_kv=True) or session.phase == 1 and not session.record_maps:
        return original()
    call = session.call
    n_text = text.shape[1]
    refuse_beyond(session, active, n_text)
    observe = recorder(session, site, active, attn.heads, call.token_hw, n_text) if session.record_maps else None

    def attend(q, k, v, heads, bias):
        return bent_sdpa(q, k, v, heads, bias, call.cond_rows, apply=session.phase == 2, observe=observe, attn=attn,
                         entries=active, token_indices=session.token_indices, grid_hw=call.token_hw,
                         step_index=call.step, layer_index=site.layer, frames=call.frames)

    image = given.get("encoder_hidden_states_image")
    out = attention(attn, hidden, text, text, None, attend, image if attn.add_k_proj is not None else None)
    return out if session.phase == 2 else original()       # phase 1: the maps only


# --- the prompt ------------------------------------------------------------------------------------

def wrap_blocks(session) -> None:
    """pipe._blocks wrapped (a modular pipeline: no encode_prompt to wrap); undone by remove()."""
    modular.wrap_blocks(session, "Wan Animate 2", lambda s, prompt: _columns(s, s.pipe.tokenizer, prompt))   # T5
