"""Bending at text cross-attentions (UNets' attn2, Wan 2.x's attn2 with I2V's image key/values, PixArt)."""

from __future__ import annotations

from .. import bending
from .recompute import attention, bent_sdpa, plain, recorder, refuse_beyond

WAN_TEXT_LENGTH = 512          # diffusers' WanAttnProcessor: I2V's text is the context's last 512 tokens



def cross_attention(session, site, attn, hidden_states, encoder_hidden_states, attention_mask, original):
    call = session.call
    active = [e for e in session.entries if e.strength != 0 and bending.entry_active(e, call.step, site.layer)]
    if (not active or not call.cond_rows or encoder_hidden_states is None
            or not plain(attn, hidden_states, image_kv=True) or session.phase == 1 and not session.record_maps):
        return original()
    if session.token_indices is None:
        raise ValueError("Attention Bending has no token positions: run the pipeline with a prompt")
    context, image = encoder_hidden_states, None
    if getattr(attn, "add_k_proj", None) is not None:          # Wan I2V: [image; text]
        split = context.shape[1] - WAN_TEXT_LENGTH
        image, context = context[:, :split], context[:, split:]
    n_text = context.shape[1]
    refuse_beyond(session, active, n_text)
    if getattr(attn, "norm_cross", None):
        context = attn.norm_encoder_hidden_states(context)
    grid = bending.grid_for(hidden_states.shape[1], call.token_hw, call.frames)
    observe = recorder(session, site, active, attn.heads, grid, n_text) if session.record_maps else None

    def attend(q, k, v, heads, bias):
        return bent_sdpa(q, k, v, heads, bias, call.cond_rows, apply=session.phase == 2, observe=observe, attn=attn,
                              entries=active, token_indices=session.token_indices, grid_hw=grid,
                              step_index=call.step, layer_index=site.layer, frames=call.frames)

    out = attention(attn, hidden_states, context, context, attention_mask, attend, image)
    return out if session.phase == 2 else original()       # phase 1: the maps only
