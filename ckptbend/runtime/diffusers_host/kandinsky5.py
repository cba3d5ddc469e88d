"""Bending at Kandinsky 5's visual→text cross-attentions (Kandinsky5Transformer3DModel,
visual_transformer_blocks.N.cross_attention): queries are the visual tokens, keys the Qwen2.5-VL prompt tokens.

Layout, from diffusers' model and pipelines. The input is channels-last [b, frames, H, W, c]; its tokens are the
(frames, H/p, W/p) grid in raster order, unless the pipeline's sparse_params say to_fractal (nabla attention): then
fractal_flatten orders them in 8×8 blocks (frame, block row, block column, row in block, column in block). That is a
fixed permutation, so the queries are put back in grid order to bend and the output returned in the model's order
(cross-attention treats each query alone). The keys are the text embeddings as the pipeline padded them: the chat
template's tokens less its first prompt_template_encode_start_idx (128), every column attended (no mask, no RoPE
in the cross-attention); cu_seqlens only sets the text RoPE positions of the text blocks, not the columns.
"""

from __future__ import annotations

import torch

from .. import bending, bent_attention
from .recompute import host_attention, recorder, refuse_beyond

KANDINSKY5_MODELS = {"Kandinsky5Transformer3DModel"}
FRACTAL = 8                     # diffusers' fractal_flatten: 8×8 token blocks


def describe(call, module, x, kwargs) -> None:
    """The token grid of a channels-last input, and the fractal order when the call asks for it."""
    frame_patch, row_patch, column_patch = module.config.patch_size
    frames, height, width = x.shape[1] // frame_patch, x.shape[2] // row_patch, x.shape[3] // column_patch
    call.latent_hw, call.token_hw, call.frames = tuple(x.shape[2:4]), (height, width), frames
    sparse = kwargs.get("sparse_params")
    call.order = fractal_order(frames, height, width) if sparse is not None and sparse.get("to_fractal") else None


def fractal_order(frames: int, height: int, width: int) -> torch.Tensor:
    """order[i]: the grid (raster) index of the model's i-th visual token under fractal_flatten."""
    grid = torch.arange(frames * height * width).view(frames, height // FRACTAL, FRACTAL, width // FRACTAL, FRACTAL)
    return grid.permute(0, 1, 3, 2, 4).flatten()


def kandinsky5_modules(model) -> list:
    return [(f"visual_transformer_blocks.{i}.cross_attention", block.cross_attention)
            for i, block in enumerate(model.visual_transformer_blocks)]


def kandinsky5_attention(session, site, attn, given, original):
    """Kandinsky5AttnProcessor's cross-attention reproduced where an entry acts, with the conditional items' bent
    prompt columns' correction, the queries in grid order while bending."""
    call = session.call
    active = [e for e in session.entries if e.strength != 0 and bending.entry_active(e, call.step, site.layer)]
    context = given.get("encoder_hidden_states")
    if not active or not call.cond_rows or context is None or session.phase == 1 and not session.record_maps:
        return original()
    if session.token_indices is None:
        raise ValueError("Attention Bending has no token positions: run the pipeline with a prompt")
    hidden = given["hidden_states"]
    n_text = context.shape[1]
    refuse_beyond(session, active, n_text)

    def heads(x, proj, norm):
        x = proj(x).unflatten(-1, (attn.num_heads, -1))
        return x if norm is None else norm(x.float()).type_as(x)

    q, k = heads(hidden, attn.to_query, attn.query_norm), heads(context, attn.to_key, attn.key_norm)
    v = heads(context, attn.to_value, None)
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))               # [b, heads, L, d]
    out = host_attention(attn, q, k, v)
    order = None if call.order is None else call.order.to(q.device)
    if order is not None:                                           # fractal → grid order (copies)
        inverse = torch.argsort(order)
        q_grid, out_grid = q[:, :, inverse], out[:, :, inverse]
    else:
        q_grid, out_grid = q, out
    observe = recorder(session, site, active, attn.num_heads, call.token_hw, n_text) if session.record_maps else None
    bent_attention.bend_rows(out_grid, q_grid, k, v, call.cond_rows, entries=active,
                             token_indices=session.token_indices, grid_hw=call.token_hw, step_index=call.step,
                             layer_index=site.layer, frames=call.frames, observe=observe)
    if session.phase == 1:
        return original()                                           # phase 1: the maps only
    out = out_grid if order is None else out_grid[:, :, order]
    return attn.out_layer(out.transpose(1, 2).flatten(-2, -1))
