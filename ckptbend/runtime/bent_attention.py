"""Bent attention: a host's attention output with the bent word columns' exact correction (bent_output,
bend_rows: no [Lq, Lk] matrix), and explicit bent attention (attention_with_bending: the probabilities
materialised, for reference and small calls). The rules are bending.py's."""

from __future__ import annotations

from typing import Callable, Iterable, Mapping, Sequence

import torch

from .bending import _bend_columns, _safe_divide, active_entries, bend_probs, grid_for
from .tokens import columns_for

CHUNK_ELEMENTS = 1 << 25      # logits per query chunk in bent_output: 128 MiB of float32


def bent_output(out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, entries: Iterable,
                token_indices: Mapping[str, Sequence[int]], grid_hw: tuple[int, int],
                step_index: int | None = None, layer_index: int | None = None, frames: int | None = None,
                text: slice = slice(None), queries: slice = slice(None), scale: float | None = None,
                chunk_elements: int = CHUNK_ELEMENTS,
                observe: Callable[[torch.Tensor, torch.Tensor], None] | None = None,
                bias: torch.Tensor | None = None) -> torch.Tensor:
    """Bend the host's attention output `out` in place, computing only what bending changes; returns out.

    out, q: [b, heads, Lq, d]; k, v: [b, heads, Lk, d] (per head; a host's [b, L, heads·d] viewed so).
    out is the host's own attention result softmax(q·kᵀ·scale)·v (any backend). Only the query rows
    `queries` (the image tokens) are bent, against the text keys `text` (their column numbers count
    from text.start); the softmax runs over all Lk keys (joint attention: text and image). Per query
    chunk (chunk_elements logits), in float32: s = q·kᵀ·scale, lse = logsumexp(s), and the n bent
    columns P_J = exp(s_J − lse) only; they are bent (bend_probs' rules, _bend_columns) to P'_J, and

        out' = (out + (P'_J − P_J)·v_J) / r,   r = 1 − ΣP_J + ΣP'_J if any entry renormalises rows, else 1

    which is what bend_probs followed by P'·v gives, without the [Lq, Lk] matrix. Extra memory: the
    columns (2·b·heads·Lq·n float32) and one chunk's logits and temporaries (about 2·chunk_elements
    floats plus the chunk's float32 queries and output rows). observe(P_J, P'_J) ([b·heads, S, n])
    sees the columns (maps), in increasing column order. bias: an additive mask on the logits, broadcastable
    to [b, heads, Lq, Lk] (the query rows counted before `queries`). Nothing active: out untouched.
    """
    active = active_entries(entries, step_index, layer_index)
    if not active:
        return out
    b, heads, _, d = q.shape
    scale = d ** -0.5 if scale is None else scale
    first = text.start or 0
    n_text = len(range(k.shape[2])[text])
    per_spec = [(s, [first + j for j in columns_for(s.token, token_indices, n_text)]) for s in active]
    keys = sorted({j for _, js in per_spec for j in js})
    if keys and keys[-1] >= k.shape[2]:
        raise ValueError(f"token column {keys[-1] - first} lies beyond the {n_text} text tokens the model sees")
    local = {j: i for i, j in enumerate(keys)}
    qs, os = q[:, :, queries], out[:, :, queries]
    n_q = qs.shape[2]
    kf, vj = k.float(), v[:, :, keys].float()
    step = max(1, chunk_elements // max(1, b * heads * k.shape[2]))
    chunks = [slice(i, i + step) for i in range(0, n_q, step)]
    p = torch.empty(b, heads, n_q, len(keys), dtype=torch.float32, device=q.device)
    if bias is not None and bias.ndim == 4 and bias.shape[2] > 1:
        bias = bias[:, :, queries]
    for c in chunks:
        logits = torch.matmul(qs[:, :, c].float(), kf.transpose(-1, -2)).mul_(scale)
        if bias is not None:
            logits += (bias[:, :, c] if bias.ndim == 4 and bias.shape[2] > 1 else bias).float()
        p[:, :, c] = torch.exp(logits[..., keys] - torch.logsumexp(logits, dim=-1, keepdim=True))
        del logits
    bent = p.clone()
    _bend_columns(bent.view(b * heads, n_q, -1), [(s, [local[j] for j in js]) for s, js in per_spec], grid_hw,
                  frames)
    if observe is not None:
        observe(p.view(b * heads, n_q, -1), bent.view(b * heads, n_q, -1))
    rows = any(s.renormalize == "row" for s in active)
    for c in chunks:
        corrected = os[:, :, c].float() + torch.matmul(bent[:, :, c] - p[:, :, c], vj)
        if rows:
            corrected = _safe_divide(corrected, 1 - p[:, :, c].sum(-1, keepdim=True) + bent[:, :, c].sum(-1, keepdim=True))
        os[:, :, c] = corrected.to(out.dtype)
    return out


def bend_rows(out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rows: Sequence[int],
              bias: torch.Tensor | None = None, **bend) -> None:
    """bent_output on the batch items `rows` of per-head out/q/k/v (and of a per-item bias), written into
    out: consecutive rows as views (no copies), others gathered and written back. Both hosts use it."""
    index = slice(rows[0], rows[-1] + 1) if list(rows) == list(range(rows[0], rows[-1] + 1)) else list(rows)
    if bias is not None and bias.shape[0] > 1:
        bias = bias[index]
    if isinstance(index, slice):
        bent_output(out[index], q[index], k[index], v[index], bias=bias, **bend)
    else:
        out[index] = bent_output(out[index], q[index], k[index], v[index], bias=bias, **bend)


def _split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """[b, n, heads·d] → [b·heads, n, d], batch-major (row i·heads + h is item i, head h)."""
    b, n, inner = x.shape
    return x.reshape(b, n, heads, inner // heads).transpose(1, 2).reshape(b * heads, n, inner // heads)


def attention_probs(q: torch.Tensor, k: torch.Tensor, heads: int, scale: float | None = None,
                    bias: torch.Tensor | None = None) -> torch.Tensor:
    """softmax(q·kᵀ·scale + bias) in float32, [b·heads, S, T], from projected q [b, S, heads·d] and
    k [b, T, heads·d]. scale defaults to d^−½; bias is an additive mask broadcastable to the result
    (diffusers' Attention.prepare_attention_mask gives [b·heads, 1, T]: 0 keeps, −10000 drops)."""
    d = q.shape[-1] // heads
    scale = d ** -0.5 if scale is None else scale
    logits = torch.bmm(_split_heads(q, heads).float(), _split_heads(k, heads).float().transpose(1, 2)) * scale
    if bias is not None:
        logits = logits + bias.float()
    return torch.softmax(logits, dim=-1)


def attention_with_bending(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, entries: Iterable = (),
                           token_indices: Mapping[str, Sequence[int]] | None = None,
                           grid_hw: tuple[int, int] | None = None, step_index: int | None = None,
                           layer_index: int | None = None, frames: int | None = None,
                           scale: float | None = None, bend_batch: Sequence[int] | None = None,
                           apply: bool = True,
                           observe: Callable[[torch.Tensor, torch.Tensor], None] | None = None,
                           bias: torch.Tensor | None = None) -> torch.Tensor:
    """Explicit attention with bent probabilities: q [b, S, heads·d], k, v [b, T, heads·d] (projected)
    → out [b, S, heads·d] before to_out.

    softmax(q·kᵀ·scale) in float32 (scale defaults to d^−½), bent for the batch items in bend_batch
    (the conditional ones; default all), then times V in float32, returned in v's dtype. grid_hw defaults to the most square
    factorisation (pass grid_for(S, latent_hw) when the latent is known). Phase 1 (visualisation):
    apply=False computes the bent maps, hands (original, bent) to observe, and uses the original.
    bias: an additive mask on the logits (attention_probs).
    """
    b, n_q, inner = q.shape
    n_kv = k.shape[1]
    d = inner // heads
    probs = attention_probs(q, k, heads, scale, bias)
    vh = _split_heads(v, heads)
    bent = probs
    entries = list(entries)
    if entries:
        grid_hw = grid_hw or grid_for(n_q, frames=frames)
        token_indices = token_indices or {}
        if bend_batch is None:
            bent = bend_probs(probs, token_indices, grid_hw, entries, step_index, layer_index, frames)
        else:
            rows = torch.as_tensor(list(bend_batch), dtype=torch.long, device=probs.device)
            per_item = probs.view(b, heads, n_q, n_kv)
            part = bend_probs(per_item[rows].reshape(-1, n_q, n_kv), token_indices, grid_hw, entries,
                              step_index, layer_index, frames)
            bent = per_item.clone()
            bent[rows] = part.view(len(rows), heads, n_q, n_kv)
            bent = bent.view(b * heads, n_q, n_kv)
    if observe is not None:
        observe(probs, bent)
    used = bent if apply else probs
    out = torch.bmm(used, vh.float()).to(v.dtype)          # float32 probabilities, not v's fp16 / bf16
    return out.reshape(b, heads, n_q, d).transpose(1, 2).reshape(b, n_q, heads * d)
