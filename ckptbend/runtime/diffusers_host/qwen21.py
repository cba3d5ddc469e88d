"""Bending at Qwen-Image 2.x's single-stream attentions (QwenImage21Transformer2DModel): one sequence [text;
target image], block-causal. The text (and condition images) form a causal prefix; the target image's queries
attend to every key, the prompt's padding masked (key_valid). With its KV cache (the pipeline's default) the first
step prefills the prefix and later steps query the target image only, against [cached prefix; target] keys.

Only the target image's queries are bent, against the text keys 0 … n_text − 1: the host's processor computes the
call as it does, and the conditional items' target rows are recomputed as its last attention call computes them
(SDPA over all keys) plus the bent columns' correction, then projected. Calls with condition images (whose slots
shift the text columns) are refused in one line.
"""

from __future__ import annotations

import math

import torch

from .. import bent_attention
from .recompute import acting, host_attention, recorder, refuse_beyond

QWEN21_MODELS = {"QwenImage21Transformer2DModel": "qwen21"}
SLOT_TOKENS = 4           # one image slot of the encoder's sequence stands for 2×2 latent tokens


def qwen21_modules(model) -> list:
    return [(f"transformer_blocks.{i}.attn", block.attn) for i, block in enumerate(model.transformer_blocks)]


def describe(call, kwargs) -> None:
    """A model call's target grid and text length into `call` (ValueError with condition images)."""
    shapes, img_mask = kwargs["img_shapes"][0], kwargs["img_mask"][0]
    if len(shapes) > 1:
        raise ValueError("Attention Bending on Qwen-Image 2.x bends text-to-image calls only: condition images "
                         "sit among the text tokens and shift the word's columns")
    frames, rows, cols = shapes[-1]
    call.latent_hw = call.token_hw = (int(rows), int(cols))
    call.frames = int(frames) if frames > 1 else None
    call.n_text = int((~img_mask).sum())


def _rope(x, freqs):
    """Qwen's RoPE on [b, n, heads, d] (apply_rotary_emb_qwen, use_real=False): freqs [n, d/2] complex."""
    pairs = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))
    return torch.view_as_real(pairs * freqs.unsqueeze(1)).flatten(3).type_as(x)


def qwen21_attention(session, site, attn, given, original):
    active = acting(session, site)
    if not active:
        return original()
    call = session.call
    out = original()                               # the host's result, its KV cache filled or read as usual
    hidden = given["hidden_states"]
    head_dim = attn.inner_dim // attn.heads
    q, k, v = (p(hidden).unflatten(-1, (-1, head_dim)) for p in (attn.to_q, attn.to_k, attn.to_v))
    q, k = attn.norm_q(q).to(v.dtype), attn.norm_k(k).to(v.dtype)
    rotary = given.get("rotary_emb")
    if rotary is not None:
        q, k = _rope(q, rotary), _rope(k, rotary)
    if given.get("kv_cache_mode") == "cached":     # target queries only; the prefix's keys come from the cache
        cached_k, cached_v = given["layer_cache"].get()
        k, v = torch.cat([cached_k, k], 1), torch.cat([cached_v, v], 1)
    n_image, n_text = call.token_hw[0] * call.token_hw[1] * (call.frames or 1), call.n_text
    refuse_beyond(session, active, n_text)
    first = q.shape[1] - n_image                   # the target image's queries are the last
    rows = call.cond_rows
    qt, k, v = (t.transpose(1, 2) for t in (q[rows, first:], k[rows], v[rows]))
    valid, mask = given.get("key_valid"), given.get("attention_mask")   # prefill: key_valid; cached: the mask
    mask = valid[rows][:, None, None, :] if valid is not None else mask[rows] if torch.is_tensor(mask) else None
    target = host_attention(attn, qt, k, v, attn_mask=mask)
    bias = None if mask is None else torch.zeros(mask.shape, device=q.device).masked_fill(~mask, -math.inf)
    observe = recorder(session, site, active, attn.heads, call.token_hw, n_text) if session.record_maps else None
    bent = target if session.phase == 2 else target.clone()
    bent_attention.bent_output(bent, qt, k, v, active, session.token_indices, call.token_hw, step_index=call.step,
                               layer_index=site.layer, frames=call.frames, text=slice(0, n_text), observe=observe,
                               bias=bias)
    if session.phase == 2:
        projected = attn.to_out[1](attn.to_out[0](bent.transpose(1, 2).flatten(2).type_as(q)))
        out = out.clone()
        out[rows, first:] = projected
    return out
