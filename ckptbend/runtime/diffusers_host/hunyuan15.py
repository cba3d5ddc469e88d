"""Bending at HunyuanVideo 1.5's joint attentions (HunyuanVideo15Transformer3DModel): [video; context] queries and
keys at once, the video's q/k turned by RoPE before the context is appended, a pairwise mask from the context mask.

The context of each batch item, as the model reorders it: the valid image-embedding tokens (none in text-to-video),
the valid ByT5 glyph tokens, the valid Qwen2.5-VL prompt tokens, then all padding. A word's columns count among the
prompt tokens (the pipeline's chat template less its crop_start tokens), so its keys sit after the video tokens and
the item's image and ByT5 tokens: an offset per item.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import bent_attention
from .joint import _rope
from .recompute import acting, host_attention, recorder, refuse_beyond

HUNYUAN15_MODELS = {"HunyuanVideo15Transformer3DModel": "hunyuan15"}


def describe(call, kwargs) -> None:
    """Per batch item, (first prompt key after the video tokens, valid prompt tokens) into call.spans."""
    image = kwargs.get("image_embeds")
    n_image = 0 if image is None or torch.all(image == 0) else image.shape[1]
    glyphs = kwargs.get("encoder_attention_mask_2")
    prompt = kwargs["encoder_attention_mask"].bool().sum(1).tolist()
    glyph = [0] * len(prompt) if glyphs is None else glyphs.bool().sum(1).tolist()
    call.spans = [(n_image + int(g), int(p)) for g, p in zip(glyph, prompt)]


def hunyuan15_modules(model) -> list:
    return [(f"transformer_blocks.{i}.attn", block.attn) for i, block in enumerate(model.transformer_blocks)]


def hunyuan15_attention(session, site, attn, given, original):
    """HunyuanVideo15AttnProcessor2_0 reproduced where an entry acts, with each conditional item's bent prompt
    columns' correction of its video-query rows; returns (video, context) as the processor does."""
    active = acting(session, site)
    if not active:
        return original()
    call = session.call
    hidden, context = given["hidden_states"], given["encoder_hidden_states"]

    def heads(x, proj, norm):
        x = proj(x).unflatten(2, (attn.heads, -1))
        return x if norm is None else norm(x)

    q, k, v = (heads(hidden, attn.to_q, attn.norm_q), heads(hidden, attn.to_k, attn.norm_k),
               heads(hidden, attn.to_v, None))
    rotary = given.get("image_rotary_emb")
    if rotary is not None:
        q, k = _rope(q, rotary), _rope(k, rotary)
    cq, ck = heads(context, attn.add_q_proj, attn.norm_added_q), heads(context, attn.add_k_proj, attn.norm_added_k)
    cv = heads(context, attn.add_v_proj, None)
    q, k, v = (torch.cat(p, 1) for p in ((q, cq), (k, ck), (v, cv)))
    b, length = q.shape[:2]
    keep = F.pad(given["attention_mask"], (length - given["attention_mask"].shape[1], 0), value=True).bool()
    mask = keep.view(b, 1, 1, length) & keep.view(b, 1, length, 1)
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    out = host_attention(attn, q, k, v, attn_mask=mask)
    bias = torch.zeros(mask.shape, device=q.device).masked_fill(~mask, float("-inf"))
    n_video = hidden.shape[1]
    target = out if session.phase == 2 else out.clone()
    for row in call.cond_rows:
        offset, n_text = call.spans[row]
        refuse_beyond(session, active, n_text, "prompt")
        observe = recorder(session, site, active, attn.heads, call.token_hw, n_text) if session.record_maps else None
        bent_attention.bend_rows(target, q, k, v, [row], bias=bias, entries=active,
                                 token_indices=session.token_indices, grid_hw=call.token_hw, step_index=call.step,
                                 layer_index=site.layer, frames=call.frames, observe=observe,
                                 text=slice(n_video + offset, n_video + offset + n_text), queries=slice(0, n_video))
    out = out.transpose(1, 2).flatten(2).to(q.dtype)
    video, text = out[:, :n_video], out[:, n_video:]
    return attn.to_out[1](attn.to_out[0](video)), attn.to_add_out(text)
