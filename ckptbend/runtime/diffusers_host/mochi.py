"""Bending at Mochi's joint attentions (MochiTransformer3DModel, MochiAttnProcessor2_0): per batch item, [video;
the item's valid T5 tokens] queries and keys at once, RoPE on the video tokens only.

The processor drops each item's padded text tokens (encoder_attention_mask) before attending, so the text keys are
the valid tokens only; T5 pads on the right, so a word's column j is still key n_video + j, and a word past the
valid tokens is refused. The last block is context_pre_only (no to_add_out): its text output is thrown away."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import bent_attention
from .recompute import acting, host_attention, recorder, refuse_beyond

MOCHI_MODELS = {"MochiTransformer3DModel": "mochi"}


def mochi_modules(model) -> list:
    """Every block's joint attention attn1, in order."""
    return [(f"transformer_blocks.{i}.attn1", b.attn1) for i, b in enumerate(model.transformer_blocks)]


def _rope(x, cos, sin):
    """Mochi's RoPE on [b, n, heads, d]: pairs (x[2i], x[2i+1]) turned in float32, as its processor does."""
    even, odd = x[..., 0::2].float(), x[..., 1::2].float()
    return torch.stack([(even * cos - odd * sin).to(x.dtype), (even * sin + odd * cos).to(x.dtype)], -1).flatten(-2)


def mochi_attention(session, site, attn, given, original):
    """MochiAttnProcessor2_0 reproduced where an entry acts, the conditional items' text columns bent."""
    active = acting(session, site)
    if not active:
        return original()
    call = session.call
    hidden, context, mask = given["hidden_states"], given["encoder_hidden_states"], given["attention_mask"]

    def stream(x, names):
        out = []
        for proj, norm in names:
            t = getattr(attn, proj)(x).unflatten(2, (attn.heads, -1))
            out.append(t if norm is None or getattr(attn, norm) is None else getattr(attn, norm)(t))
        return out

    q, k, v = stream(hidden, (("to_q", "norm_q"), ("to_k", "norm_k"), ("to_v", None)))
    cq, ck, cv = stream(context, (("add_q_proj", "norm_added_q"), ("add_k_proj", "norm_added_k"),
                                  ("add_v_proj", None)))
    if given.get("image_rotary_emb") is not None:
        q, k = (_rope(t, *given["image_rotary_emb"]) for t in (q, k))
    q, k, v, cq, ck, cv = (t.transpose(1, 2) for t in (q, k, v, cq, ck, cv))
    n_video, total = q.shape[2], q.shape[2] + cq.shape[2]
    n_image = (call.frames or 1) * call.token_hw[0] * call.token_hw[1]
    outs = []
    for i in range(q.shape[0]):
        valid = torch.nonzero(mask[i].flatten(), as_tuple=False).flatten()
        qi, ki, vi = (torch.cat([a[i:i + 1], c[i:i + 1, :, valid]], 2) for a, c in ((q, cq), (k, ck), (v, cv)))
        out = host_attention(attn, qi, ki, vi)
        if i in call.cond_rows:
            n_text = len(valid)
            refuse_beyond(session, active, n_text)
            observe = (recorder(session, site, active, attn.heads, call.token_hw, n_text)
                       if session.record_maps else None)
            bent_attention.bend_rows(out if session.phase == 2 else out.clone(), qi, ki, vi, [0], entries=active,
                                     token_indices=session.token_indices, grid_hw=call.token_hw,
                                     step_index=call.step, layer_index=site.layer, frames=call.frames,
                                     text=slice(n_video, n_video + n_text), queries=slice(0, n_image),
                                     observe=observe)
        outs.append(F.pad(out, (0, 0, 0, total - out.shape[2])))
    out = torch.cat(outs, 0).transpose(1, 2).flatten(2, 3)
    video, text = out.split_with_sizes((n_video, total - n_video), dim=1)
    video = attn.to_out[1](attn.to_out[0](video))
    return video, (attn.to_add_out(text) if hasattr(attn, "to_add_out") else text)
