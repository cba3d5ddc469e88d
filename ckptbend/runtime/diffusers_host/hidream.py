"""Bending at HiDream's attentions (HiDreamImageTransformer2DModel; its MoE feed-forwards do not touch attention):
[image; text] queries and keys at once, in the double-stream blocks (image and text projected apart) and the
single-stream blocks (one projection over the joint tokens).

The text every block attends to is [T5; Llama's last layer; Llama's layer for this block]: a word's columns are its
T5 columns and its Llama columns twice (prompts.py finds them, the T5 and Llama lengths being the pipeline's
max_sequence_length). Image tokens come first; padded image tokens (hidden_states_masks) have their keys zeroed by
the model, as here.
"""

from __future__ import annotations

import torch

from .. import bent_attention
from .recompute import acting, host_attention, recorder, refuse_beyond

HIDREAM_MODELS = {"HiDreamImageTransformer2DModel": "hidream"}


def hidream_modules(model) -> list:
    """The double-stream blocks' attentions, then the single-stream blocks' (the model's order)."""
    found = [(f"double_stream_blocks.{i}.block.attn1", b.block.attn1) for i, b in enumerate(model.double_stream_blocks)]
    return found + [(f"single_stream_blocks.{i}.block.attn1", b.block.attn1)
                    for i, b in enumerate(model.single_stream_blocks)]


def describe(call, kwargs) -> None:
    """The text length every block sees: T5's plus twice Llama's."""
    call.n_text = kwargs["encoder_hidden_states_t5"].shape[1] + 2 * kwargs["encoder_hidden_states_llama3"].shape[-2]


def _rope(q, k, freqs):
    """HiDream's RoPE (its apply_rope) on the first half of each head when the table covers half a head."""
    def turn(x):
        pairs = x.float().reshape(*x.shape[:-1], -1, 1, 2)
        return (freqs[..., 0] * pairs[..., 0] + freqs[..., 1] * pairs[..., 1]).reshape(*x.shape).type_as(x)

    if q.shape[-1] == freqs.shape[-3] * 2:
        return turn(q), turn(k)
    (q1, q2), (k1, k2) = q.chunk(2, dim=-1), k.chunk(2, dim=-1)
    return torch.cat([turn(q1), q2], dim=-1), torch.cat([turn(k1), k2], dim=-1)


def hidream_attention(session, site, attn, given, original):
    """HiDreamAttnProcessor reproduced where an entry acts, with the conditional rows' bent text columns'
    correction of the image-query rows."""
    active = acting(session, site)
    if not active:
        return original()
    call = session.call
    hidden, context = given["hidden_states"], given.get("encoder_hidden_states")
    masks = given.get("hidden_states_masks")
    b, dtype = hidden.shape[0], hidden.dtype

    def stream(x, to_q, to_k, to_v, norm_q, norm_k):
        q, k, v = norm_q(to_q(x)).to(dtype), norm_k(to_k(x)).to(dtype), to_v(x)
        return (t.view(b, -1, attn.heads, t.shape[-1] // attn.heads) for t in (q, k, v))

    q, k, v = stream(hidden, attn.to_q, attn.to_k, attn.to_v, attn.q_rms_norm, attn.k_rms_norm)
    if masks is not None:
        k = k * masks.view(b, -1, 1, 1)
    n_hidden = hidden.shape[1]
    if not attn.single:
        qt, kt, vt = stream(context, attn.to_q_t, attn.to_k_t, attn.to_v_t, attn.q_rms_norm_t, attn.k_rms_norm_t)
        q, k, v = torch.cat([q, qt], 1), torch.cat([k, kt], 1), torch.cat([v, vt], 1)
    q, k = _rope(q, k, given["image_rotary_emb"])
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    out = host_attention(attn, q, k, v)
    n_text = call.n_text
    first = q.shape[2] - n_text                         # the image tokens (padded ones included) come first
    refuse_beyond(session, active, n_text)
    n_image = call.token_hw[0] * call.token_hw[1]
    observe = recorder(session, site, active, attn.heads, call.token_hw, n_text) if session.record_maps else None
    bent_attention.bend_rows(out if session.phase == 2 else out.clone(), q, k, v, call.cond_rows, entries=active,
                             token_indices=session.token_indices, grid_hw=call.token_hw, step_index=call.step,
                             layer_index=site.layer, text=slice(first, first + n_text), queries=slice(0, n_image),
                             observe=observe)
    out = out.transpose(1, 2).reshape(b, -1, q.shape[1] * q.shape[3]).to(q.dtype)
    if attn.single:
        return attn.to_out(out)
    return attn.to_out(out[:, :n_hidden]), attn.to_out_t(out[:, n_hidden:])
