"""Bending at the joint attentions of Flux.1, Flux.2, Chroma, SD3.x, Qwen-Image and AuraFlow: [text; image] (SD3:
[image; text]) queries and keys at once, q, k, v formed as each model's diffusers processor forms them."""

from __future__ import annotations

import torch

from .. import bent_attention
from .longcat_ovis import LONGCAT_OVIS_MODELS
from .recompute import acting, host_attention, recorder, refuse_beyond

# Joint-attention DiTs by class name: their "attn" modules attend over [text; image] (Flux, Qwen-Image) or
# [image; text] (SD3) tokens at once.
JOINT_MODELS = {"FluxTransformer2DModel": "flux", "ChromaTransformer2DModel": "flux", "SD3Transformer2DModel": "sd3",
                "QwenImageTransformer2DModel": "qwen", "Flux2Transformer2DModel": "flux2",
                "AuraFlowTransformer2DModel": "auraflow"}
JOINT_MODELS.update(LONGCAT_OVIS_MODELS)      # LongCat-Image, Ovis-Image: Flux.1's processor (every other name: Flux)


def joint_attention(session, site, attn, given, original):
    """A joint attention where an entry acts: q, k, v as the model's processor forms them, the host's
    attention (recompute.host_attention), and for the conditional items the bent text columns' correction of the
    image-query rows (bent_attention.bent_output: no [L, L] matrix; the text-query rows stay the host's)."""
    active = acting(session, site)
    if not active:
        return original()
    call = session.call
    hidden, context = given["hidden_states"], given.get("encoder_hidden_states")
    # AuraFlow's context is [its learned register tokens; T5]: the word columns count from the registers' end.
    registers = getattr(session.models[0], "register_tokens", None)
    q, k, v, text, mlp = _joint_qkv(session.joint, attn, hidden, context, given.get("image_rotary_emb"), call.n_text,
                                    0 if registers is None else registers.shape[1])
    n_text = text.stop - text.start
    refuse_beyond(session, active, n_text)
    n_image = (call.frames or 1) * call.token_hw[0] * call.token_hw[1]
    first = 0 if session.joint == "sd3" else text.stop
    mask = _joint_mask(given.get("attention_mask"), given.get("encoder_hidden_states_mask"), hidden.shape[1])
    scale = attn.scale if session.joint == "auraflow" else None      # AuraFlow's processor passes attn.scale
    out = host_attention(attn, q, k, v, attn_mask=mask, scale=scale)
    observe = recorder(session, site, active, attn.heads, call.token_hw, n_text) if session.record_maps else None
    bias = mask
    if mask is not None and mask.dtype == torch.bool:
        bias = torch.zeros(mask.shape, device=q.device).masked_fill(~mask, float("-inf"))
    bent_attention.bend_rows(out if session.phase == 2 else out.clone(), q, k, v, call.cond_rows, entries=active,
                      token_indices=session.token_indices, grid_hw=call.token_hw, step_index=call.step,
                      layer_index=site.layer, frames=call.frames, text=text,
                      queries=slice(first, first + n_image), observe=observe, bias=bias, scale=scale)
    return _joint_output(session.joint, attn, out.to(q.dtype), hidden.shape[1], context, mlp)


def _heads(x, proj, norm, heads):
    """proj(x) split into heads, [b, n, heads, d], then the per-head norm if any."""
    x = proj(x).unflatten(-1, (heads, -1))
    return x if norm is None else norm(x)


def _joint_mask(mask, text_mask, n_image):
    """The mask the joint attention's processor hands SDPA, [b, 1, 1 or L, L]: `mask` as given (Chroma's
    blocks pass [b, 1, L, L], float 0/1 as its pipeline makes it, which SDPA adds to the logits: bent_output
    adds it alike; a 2-D one is widened as diffusers' dispatch does), or Qwen-Image's bool key mask
    (True = attend) from its text mask and the image tokens; None without either."""
    if mask is not None:
        return mask[:, None, None, :] if mask.ndim == 2 else mask
    if text_mask is None:
        return None
    keep = text_mask.bool()
    return torch.cat([keep, keep.new_ones(keep.shape[0], n_image)], 1)[:, None, None, :]


def _rope_complex(x, freqs):
    """Qwen-Image's RoPE on [b, n, heads, d]: each interleaved pair (x[2i], x[2i+1]) as a complex number
    times freqs [n, d/2] (complex), in float32 (diffusers' apply_rotary_emb_qwen, use_real=False)."""
    pairs = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))
    return torch.view_as_real(pairs * freqs[:, None, :].to(x.device)).flatten(3).type_as(x)


def _rope(x, rotary):
    """Flux's RoPE on [b, n, heads, d] (diffusers' apply_rotary_emb, real form): each interleaved pair
    (x[2i], x[2i+1]) turned by the angle whose cosine / sine rotary's [n, d] tables hold, in float32."""
    cos, sin = (t[None, :, None, :].to(x.device) for t in rotary)
    pairs = x.unflatten(-1, (-1, 2))
    turned = torch.stack([-pairs[..., 1], pairs[..., 0]], dim=-1).flatten(-2)
    return (x.float() * cos + turned.float() * sin).to(x.dtype)


def _joint_qkv(family, attn, hidden, context, rotary, n_text, registers=0):
    """q, k, v [b, heads, L, d] of a joint attention as its diffusers processor forms them (Flux:
    FluxAttnProcessor, [text; image] then RoPE; SD3: JointAttnProcessor2_0, [image; text], no RoPE), and
    the text keys' slice of L. A Flux single block's hidden states are already [text; image] (n_text).
    Qwen-Image (QwenDoubleStreamAttnProcessor2_0): RoPE per stream (rotary = image, text complex
    frequencies), then [text; image]. Flux.2 (Flux2AttnProcessor: Flux's, without biases); its single blocks
    (Flux2ParallelSelfAttnProcessor) take q, k, v and the MLP's input from one projection: the last value
    returned is that MLP input (None elsewhere). AuraFlow (AuraFlowAttnProcessor2_0): SD3's projections, [registers;
    text; image] as Flux orders them (its single blocks too), no RoPE: the text keys follow `registers` tokens."""
    def stream(x, names):
        return [_heads(x, getattr(attn, p), getattr(attn, n, None) if n else None, attn.heads) for p, n in names]

    mlp = None
    if hasattr(attn, "to_qkv_mlp_proj"):                    # Flux.2 single block
        fused = attn.to_qkv_mlp_proj(hidden)
        qkv, mlp = fused.split([3 * attn.inner_dim, fused.shape[-1] - 3 * attn.inner_dim], dim=-1)
        q, k, v = (t.unflatten(-1, (attn.heads, -1)) for t in qkv.chunk(3, dim=-1))
        q, k = attn.norm_q(q), attn.norm_k(k)
    else:
        q, k, v = stream(hidden, (("to_q", "norm_q"), ("to_k", "norm_k"), ("to_v", None)))
    text = slice(registers, registers + n_text)
    if context is not None:
        cq, ck, cv = stream(context, (("add_q_proj", "norm_added_q"), ("add_k_proj", "norm_added_k"),
                                      ("add_v_proj", None)))
        if family == "qwen" and rotary is not None:
            image_freqs, text_freqs = rotary
            q, k = _rope_complex(q, image_freqs), _rope_complex(k, image_freqs)
            cq, ck = _rope_complex(cq, text_freqs), _rope_complex(ck, text_freqs)
            rotary = None
        if family == "sd3":
            q, k, v = (torch.cat(p, 1) for p in ((q, cq), (k, ck), (v, cv)))
            text = slice(hidden.shape[1], hidden.shape[1] + context.shape[1])
        else:
            q, k, v = (torch.cat(p, 1) for p in ((cq, q), (ck, k), (cv, v)))
            text = slice(registers, context.shape[1])
    if rotary is not None:
        q, k = _rope(q, rotary), _rope(k, rotary)
    return (*(t.transpose(1, 2) for t in (q, k, v)), text, mlp)


def _joint_output(family, attn, out, n_hidden, context, mlp=None):
    """The processor's return from the joint attention output [b, heads, L, d]: the image part through
    to_out, the text part through to_add_out (unless the block is context_pre_only); a Flux single
    block returns the whole, unprojected; a Flux.2 single block projects it with its MLP branch; an AuraFlow
    single block projects the whole through to_out."""
    out = out.transpose(1, 2).flatten(2)
    if context is None and family == "auraflow":
        return attn.to_out[1](attn.to_out[0](out))
    if context is None:
        return out if mlp is None else attn.to_out(torch.cat([out, attn.mlp_act_fn(mlp)], dim=-1))
    if family == "sd3":
        image, text = out[:, :n_hidden], out[:, n_hidden:]
    else:
        text, image = out[:, :-n_hidden], out[:, -n_hidden:]
    image = attn.to_out[1](attn.to_out[0](image.contiguous()))
    if not getattr(attn, "context_pre_only", False):
        text = attn.to_add_out(text.contiguous())
    return image, text
