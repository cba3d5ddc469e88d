"""Bending at ERNIE-Image's single-stream attentions (ErnieImageTransformer2DModel): one self-attention per block
(`layers.i.self_attention`) over [image; text] per batch item: the H·W image queries first, then the item's text
tokens from column H·W, right-padded to the batch's longest text and masked (text_lens). ErnieImagePipeline batches
CFG as [uncond…; cond…] (its negative texts first), passes the scheduler's timestep as is, and encodes each prompt
bare (no template): the text encoder's tokens, <bos> first, are the text columns.

The host's processor computes the call as it does; the conditional items' rows are recomputed (PyTorch's attention
over the same q, k, v) with their image queries' text columns bent, then projected: the other items keep the host's
result bit for bit. Its pipeline's prompt enhancer (use_pe) rewrites the prompt before encoding: words are found in
the rewritten text, or refused there in one line.
"""

from __future__ import annotations

import math

import torch

from .. import bent_attention
from .calls import Call, model_input, scheduler_position, step_of
from .recompute import acting, host_attention, recorder, refuse_beyond

ERNIE_MODELS = {"ErnieImageTransformer2DModel": "ernie"}


def ernie_modules(model) -> list:
    return [(f"layers.{i}.self_attention", block.self_attention) for i, block in enumerate(model.layers)]


def describe(session, module, args, kwargs) -> Call:
    """The Call of one model call: step, token grid, and per item (first image query, first text key, text tokens);
    the conditional items are those whose text is one of the encoded prompt's (before any prompt, every item)."""
    x = model_input(args, kwargs)
    names = ("hidden_states", "timestep", "text_bth", "text_lens")
    given = dict(zip(names, args), **kwargs)
    t = float(torch.as_tensor(given["timestep"]).flatten().max())
    p = module.config.patch_size
    grid = (x.shape[-2] // p, x.shape[-1] // p)
    lengths = [int(n) for n in given["text_lens"]]
    text = given["text_bth"]
    prompt = session.prompt_embeds
    rows = list(range(len(lengths))) if prompt is None else [
        i for i, n in enumerate(lengths)
        if any(e.shape[0] == n and torch.equal(text[i, :n], e.to(text)) for e in prompt)]
    scheduler = session.pipe.scheduler
    return Call(latent_hw=grid, token_hw=grid, frames=None, cfg=len(rows) not in (0, len(lengths)), cond_rows=rows,
                step=step_of(scheduler, scheduler_position(scheduler, t)), alpha_cumprod=None,
                spans=[(0, grid[0] * grid[1], n) for n in lengths])


def _rope(x, angles):
    """ERNIE's rotary embedding on [b, n, heads, d]: angles [b, n, 1, d] (each repeated), halves rotated."""
    first, second = x.chunk(2, dim=-1)
    return x * torch.cos(angles).to(x.dtype) + torch.cat((-second, first), dim=-1) * torch.sin(angles).to(x.dtype)


def ernie_attention(session, site, attn, given, original):
    active = acting(session, site)
    if not active:
        return original()
    call = session.call
    out = original()
    rows = call.cond_rows
    hidden = given["hidden_states"][rows]
    q, k, v = (p(hidden).unflatten(-1, (attn.heads, -1)) for p in (attn.to_q, attn.to_k, attn.to_v))
    if attn.norm_q is not None:
        q, k = attn.norm_q(q), attn.norm_k(k)
    angles = given.get("freqs_cis")
    if angles is not None:
        q, k = _rope(q, angles[rows]), _rope(k, angles[rows])
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    mask = given.get("attention_mask")
    mask = None if mask is None else mask[rows].bool().view(len(rows), 1, 1, -1)
    target = host_attention(attn, q, k, v, attn_mask=mask)
    bias = None if mask is None else torch.zeros(mask.shape, device=q.device).masked_fill(~mask, -math.inf)
    for at, row in enumerate(rows):
        n_image, text_at, n_text = call.spans[row][1], call.spans[row][1], call.spans[row][2]
        refuse_beyond(session, active, n_text)
        observe = recorder(session, site, active, attn.heads, call.token_hw, n_text) if session.record_maps else None
        bent_attention.bend_rows(target, q, k, v, [at], bias=bias, entries=active,
                                 token_indices=session.token_indices, grid_hw=call.token_hw, step_index=call.step,
                                 layer_index=site.layer, frames=None, text=slice(text_at, text_at + n_text),
                                 queries=slice(0, n_image), observe=observe)
    if session.phase == 2:
        out = out.clone()
        out[rows] = attn.to_out[0](target.transpose(1, 2).flatten(2).to(out.dtype))
    return out
