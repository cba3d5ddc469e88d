"""Bending at Krea 2's single-stream attentions (Krea2TransformerBlock.attn of `transformer_blocks`; the text-fusion
blocks before them see text alone: left alone). One sequence [text; image] per item: the text's fixed length
(max_sequence_length) first, its padding masked (encoder_attention_mask), then the image tokens, whose grid is
read from position_ids (text rows zero, image rows (0, h, w)). Krea2Pipeline runs CFG as two calls and passes
timestep t / 1000.

Each attention: grouped key/value heads repeated, a sigmoid gate (to_gate of the block's input) on the attention
output before to_out. The host's processor computes the call; the conditional items' image-query rows are recomputed
(PyTorch's attention over the same q, k, v) with their text columns bent, gated and projected.
"""

from __future__ import annotations

import math

import torch

from .. import bent_attention
from .joint import _rope   # Flux's real-form RoPE on interleaved pairs
from .recompute import acting, host_attention, recorder, refuse_beyond

KREA2_MODELS = {"Krea2Transformer2DModel": "krea2"}


def krea2_modules(model) -> list:
    return [(f"transformer_blocks.{i}.attn", block.attn) for i, block in enumerate(model.transformer_blocks)]


def describe(call, kwargs) -> None:
    """The image grid (from position_ids' image rows) and the text length into `call`."""
    n_image = kwargs["hidden_states"].shape[1]
    image = kwargs["position_ids"][-n_image:]
    call.latent_hw = call.token_hw = (int(image[:, 1].max()) + 1, int(image[:, 2].max()) + 1)
    call.frames = None
    call.n_text = kwargs["encoder_hidden_states"].shape[1]




def krea2_attention(session, site, attn, given, original):
    active = acting(session, site)
    if not active:
        return original()
    call = session.call
    out = original()
    rows, n_text = call.cond_rows, call.n_text
    refuse_beyond(session, active, n_text)
    hidden = given["hidden_states"][rows]
    q = attn.norm_q(attn.to_q(hidden).unflatten(-1, (attn.num_heads, attn.head_dim)))
    k = attn.norm_k(attn.to_k(hidden).unflatten(-1, (attn.num_kv_heads, attn.head_dim)))
    v = attn.to_v(hidden).unflatten(-1, (attn.num_kv_heads, attn.head_dim))
    rotary = given.get("image_rotary_emb")
    if rotary is not None:
        q, k = _rope(q, rotary), _rope(k, rotary)
    groups = attn.num_heads // attn.num_kv_heads
    k, v = k.repeat_interleave(groups, dim=2), v.repeat_interleave(groups, dim=2)
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    mask = given.get("attention_mask")
    mask = None if mask is None else mask[rows].bool().view(len(rows), 1, 1, -1)
    target = host_attention(attn, q, k, v, attn_mask=mask)
    bias = None if mask is None else torch.zeros(mask.shape, device=q.device).masked_fill(~mask, -math.inf)
    observe = recorder(session, site, active, attn.num_heads, call.token_hw, n_text) if session.record_maps else None
    bent_attention.bend_rows(target, q, k, v, list(range(len(rows))), bias=bias, entries=active,
                             token_indices=session.token_indices, grid_hw=call.token_hw, step_index=call.step,
                             layer_index=site.layer, frames=None, text=slice(0, n_text),
                             queries=slice(n_text, q.shape[2]), observe=observe)
    if session.phase == 2:
        gated = target.transpose(1, 2).flatten(2).to(out.dtype) * torch.sigmoid(attn.to_gate(hidden))
        out = out.clone()
        out[rows] = attn.to_out[0](gated)
    return out
