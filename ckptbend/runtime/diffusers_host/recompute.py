"""diffusers' AttnProcessor2_0 (and WanAttnProcessor) for a transformer block's attention, reproduced with two
seams: separate key/value inputs (Slothful) and a replaceable core (Bending)."""

from __future__ import annotations

import functools
import inspect

import torch
import torch.nn.functional as F

from .. import bending, tokens
from ..bent_attention import bend_rows


def plain(attn, hidden_states, image_kv: bool = False) -> bool:
    """A transformer block's attention: what attention() reproduces. image_kv: also Wan I2V's text
    cross-attention with its added image key/values (WanAttention: add_k_proj, norm_added_k)."""
    added = getattr(attn, "add_k_proj", None) is not None
    return (hidden_states.ndim == 3 and getattr(attn, "spatial_norm", None) is None
            and getattr(attn, "group_norm", None) is None and not getattr(attn, "fused_projections", False)
            and (not added or image_kv and hasattr(attn, "norm_added_k")))


def qk_norm(norm, x, heads):
    """norm_q / norm_k: a norm sized for all heads (WanAttention) acts on [b, n, heads·d], one sized
    for a head (Attention) on each head."""
    if norm is None:
        return x
    size = tuple(getattr(norm, "normalized_shape", None) or getattr(norm, "dim", None) or ())
    if size and size[-1] == x.shape[-1]:
        return norm(x)
    return norm(x.unflatten(-1, (heads, -1))).flatten(-2)


def host_attention(attn, q, k, v, attn_mask=None, scale=None):
    """softmax(q·kᵀ·scale)·v on [b, heads, L, d] as the host's processor of `attn` computes it: the
    dispatch_attention_fn its own module calls, with the backend the user chose (set_attention_backend,
    attention_backend(...)), where that processor dispatches; PyTorch's SDPA where it calls SDPA itself
    (AttnProcessor2_0, Mochi, Lumina 2, HiDream). Bending then corrects this result exactly."""
    processor = getattr(attn, "processor", None)
    original = getattr(processor, "original", processor)       # ckptbend's Processor wraps the host's
    dispatch = getattr(inspect.getmodule(type(original)), "dispatch_attention_fn", None)
    if dispatch is None or not hasattr(processor, "_attention_backend"):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, scale=scale)
    out = dispatch(*(x.transpose(1, 2) for x in (q, k, v)), attn_mask=attn_mask, scale=scale,
                   backend=processor._attention_backend, parallel_config=getattr(processor, "_parallel_config", None))
    return out.transpose(1, 2)


def sdpa(q, k, v, heads, bias=None, attn=None):
    """The processor's attention on [b, n, heads·d] (host_attention: attn's processor decides how), as
    AttnProcessor2_0 / WanAttnProcessor call it."""
    b = q.shape[0]
    q, k, v = (x.unflatten(-1, (heads, -1)).transpose(1, 2) for x in (q, k, v))
    if bias is not None:
        bias = bias.view(b, heads, -1, bias.shape[-1])
    return host_attention(attn, q, k, v, attn_mask=bias).transpose(1, 2).flatten(2)


def attention(attn, hidden_states, k_in, v_in, attention_mask=None, attend=None, image=None):
    """AttnProcessor2_0 (WanAttnProcessor) for a transformer block's attention (plain), with the
    key/value inputs given separately (Slothful passes reduced ones; the query keeps every token)
    and the core attend(q, k, v, heads, bias) -> [b, S, heads·d] replaceable (Bending). image: Wan
    I2V's CLIP-image tokens, attended through add_k_proj / add_v_proj and added to the text's result. LTX-2's
    gated attention (to_gate_logits) scales each head's output by 2·sigmoid of its gate, as its processor does."""
    residual = hidden_states
    bias = None
    if attention_mask is not None:
        bias = attn.prepare_attention_mask(attention_mask, k_in.shape[1], hidden_states.shape[0])
    q = qk_norm(getattr(attn, "norm_q", None), attn.to_q(hidden_states), attn.heads)
    k = qk_norm(getattr(attn, "norm_k", None), attn.to_k(k_in), attn.heads)
    v = attn.to_v(v_in)
    out = (attend or functools.partial(sdpa, attn=attn))(q, k, v, attn.heads, bias).to(q.dtype)
    gate = getattr(attn, "to_gate_logits", None)          # LTX-2's gated attention: a gate per head and token
    if gate is not None:
        out = (out.unflatten(2, (attn.heads, -1)) * (2.0 * torch.sigmoid(gate(hidden_states))).unsqueeze(-1)).flatten(2)
    if image is not None:
        k_img, v_img = attn.norm_added_k(attn.add_k_proj(image)), attn.add_v_proj(image)
        out = out + sdpa(q, k_img, v_img, attn.heads, attn=attn).to(q.dtype)
    out = attn.to_out[1](attn.to_out[0](out))            # linear, dropout
    if getattr(attn, "residual_connection", False):
        out = out + residual
    return out / getattr(attn, "rescale_output_factor", 1.0)


def bent_sdpa(q, k, v, heads, bias, rows, apply=True, observe=None, attn=None, **bend):
    """The processor's own attention (host_attention) for every batch item, plus bent_attention.bent_output's exact
    float32 correction of the bent text columns on the batch rows `rows`: no [S, T] probability matrix.
    q [b, S, heads·d], k, v [b, T, heads·d]; bias: prepare_attention_mask's [b·heads, 1, T]; bend:
    bent_output's entries, token_indices, grid_hw, step_index, layer_index, frames. apply=False (phase 1):
    observe sees the columns, the output stays unbent."""
    out = sdpa(q, k, v, heads, bias, attn=attn)
    if not rows:
        return out

    def per_head(x):
        return x.unflatten(-1, (heads, -1)).transpose(1, 2)

    if bias is not None:
        bias = bias.view(q.shape[0], heads, -1, bias.shape[-1])
    bend_rows(per_head(out if apply else out.clone()), per_head(q), per_head(k), per_head(v), rows, bias=bias,
              observe=observe, **bend)
    return out


def word_map(columns, heads, local, shape):
    """A word's map: its columns (local positions in bent_output's columns [rows·heads, S, n]) averaged
    over sub-tokens, heads and the bent rows."""
    return columns[..., local].mean(dim=(0, 2)).reshape(shape).float().cpu()


def acting(session, site) -> list:
    """The entries that bend this site at this call; empty where the host's own attention stands (no entry
    acts, or no conditional rows). Entries acting without the prompt's token positions are an error."""
    call = session.call
    active = [e for e in session.entries if e.strength != 0 and bending.entry_active(e, call.step, site.layer)]
    if not active or not call.cond_rows:
        return []
    if session.token_indices is None:
        raise ValueError("Attention Bending has no token positions: run the pipeline with a prompt")
    return active


def refuse_beyond(session, active, n_text: int, what: str = "text") -> None:
    """A word whose columns lie past the n_text keys the model sees is an error (never a silent wrong bend)."""
    for e in active:
        if max(tokens.columns_for(e.token, session.token_indices, n_text)) >= n_text:
            raise ValueError(f"Token '{e.token}' lies beyond the {n_text} {what} tokens the model sees")


def recorder(session, site, active, heads, grid, n_text):
    """observe() for bent_output: appends the maps of this call's words to session.maps."""
    call = session.call
    shape = grid if call.frames is None else (call.frames, *grid)
    words = list(dict.fromkeys(e.token for e in active))
    keys = sorted({j for e in active for j in tokens.columns_for(e.token, session.token_indices, n_text)})

    rows = any(e.renormalize == "row" for e in active)

    def observe(columns, bent):                  # bent_output's columns, in `keys` order
        if rows:                                 # as the output sees them: each row renormalised
            total = 1 - columns.sum(-1, keepdim=True) + bent.sum(-1, keepdim=True)
            bent = bent / torch.where(total > bending.EPS, total, torch.ones_like(total))
        for word in words:
            local = [keys.index(j) for j in tokens.columns_for(word, session.token_indices, n_text)]
            session.maps.append({"token": word, "layer": site.layer, "step": call.step,
                             "site": site.name.rsplit(".", 1)[-1],     # a layer may record two attentions
                             "original": word_map(columns, heads, local, shape),
                             "bent": word_map(bent, heads, local, shape)})
    return observe
