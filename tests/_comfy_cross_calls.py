"""The node's result on a recorded cross-attention call (video queries against text keys), computed independently of
the node: the stand-in's backend, except the batch items `rows`, which come from the explicit fp32 softmax (the
call's mask added) with the video × text probabilities bent by bending.bend_probs, rows renormalised where an entry
asks. q, k, v as the call gave them: [B, heads, L, d] (skip_reshape) or [B, L, heads·d]."""

import torch

import comfy_standin as cs
from ckptbend.runtime import bending


def explicit_cross(call, rows, entries, columns, step, grid, heads, frames=None):
    mask = call.get("mask")
    if call["q"].ndim == 4:
        q, k, v = (call[n].float() for n in ("q", "k", "v"))
        out = cs.attention_chunked(call["q"], call["k"], call["v"], heads, skip_reshape=True).clone()
    else:
        q, k, v = (t.float() for t in cs._heads_first(call["q"], call["k"], call["v"], heads))
        out = cs.attention_chunked(call["q"], call["k"], call["v"], heads, mask).clone()
    logits = q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5
    probs = torch.softmax(logits if mask is None else logits + mask.float(), dim=-1)[rows]
    n_video, n_text = probs.shape[-2:]
    unrowed = [{**e, "renormalize": "none"} if e["renormalize"] == "row" else e for e in entries]
    probs = bending.bend_probs(probs.reshape(-1, n_video, n_text), columns, grid, unrowed, step, call["layer"],
                               frames=frames).view(len(rows), heads, n_video, n_text)
    if any(e["renormalize"] == "row" for e in entries):
        probs = probs / probs.sum(-1, keepdim=True)
    bent = (probs @ v[rows]).transpose(1, 2).flatten(2)
    for i, r in enumerate(rows):
        out[r] = bent[i].to(out.dtype)
    return out
