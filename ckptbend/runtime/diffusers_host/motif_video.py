"""Bending at Motif-Video's text attentions (MotifVideoTransformer3DModel), and its prompt's word columns.

Both attentions of a block read the prompt: the joint `attn` attends over [video; context] (dual blocks project the
context with add_*_proj, single blocks with the video's own projections), and the optional `cross_attn` lets the
joint attention's video output attend to the text alone. Context = [image embeddings (image-to-video); T5Gemma 2's
tokens of the bare prompt, padded to max_sequence_length and masked]. Both are bent, the video queries against the
valid prompt keys; a block's attn and cross_attn share one layer index, the block's (dual, then single blocks, as
Flux's). The single blocks after num_decoder_layers' split attend to the video alone: left out. RoPE turns the video
queries and keys only (cross_attn: the queries)."""

from __future__ import annotations

import torch

from .. import bent_attention, tokens
from .joint import _rope
from .recompute import acting, host_attention, recorder, refuse_beyond

MOTIF_MODELS = {"MotifVideoTransformer3DModel": "motif"}


def motif_modules(model) -> list:
    """(name, attention, layer) of every text attention: each block's `attn` and, where enabled, its `cross_attn`,
    the layer the block's place among the dual then the encoder single blocks."""
    blocks = [(f"transformer_blocks.{i}", b) for i, b in enumerate(model.transformer_blocks)]
    single = model.single_transformer_blocks
    blocks += [(f"single_transformer_blocks.{i}", b)
               for i, b in enumerate(single[:len(single) - model.config.num_decoder_layers])]
    found = []
    for layer, (name, block) in enumerate(blocks):
        found.append((f"{name}.attn", block.attn, layer))
        if block.cross_attn is not None:
            found.append((f"{name}.cross_attn", block.cross_attn, layer))
    return found


def describe(call, model, x, kwargs) -> None:
    """frames by patch_size_t; per batch item, (first prompt key within the context, valid prompt tokens)."""
    call.frames = x.shape[2] // model.config.patch_size_t
    image = kwargs.get("image_embeds")
    n_image = 0 if image is None else image.shape[1]
    mask = kwargs.get("encoder_attention_mask")
    if mask is None:
        call.spans = [(n_image, call.n_text)] * x.shape[0]
        return
    spans = []
    for row in mask.bool():
        valid = torch.nonzero(row).flatten().tolist()
        if valid and valid != list(range(valid[0], valid[-1] + 1)):
            raise ValueError("Attention Bending on Motif-Video needs each prompt's valid tokens in one run")
        spans.append((n_image + (valid[0] if valid else 0), len(valid)))
    call.spans = spans


def columns(session, arguments) -> dict[str, list[int]]:
    """MotifVideoPipeline: the tokenizer's encoding of the bare prompt with its special tokens (T5Gemma 2: <bos>
    first), no template; a word spelled after a space or bare (SentencePiece without a dummy prefix spells them
    apart), the earlier in the prompt."""
    from .prompts import same_columns             # prompts dispatches here

    tokenizer = session.pipe.tokenizer
    limit = arguments.get("max_sequence_length") or 512
    words = list(dict.fromkeys(e.token for e in session.entries))

    def spell(word):
        return tokenizer(word, add_special_tokens=False)["input_ids"]

    prompt = arguments["prompt"]
    return same_columns([tokens.token_columns(
        words, tokenizer(p, truncation=True, max_length=limit)["input_ids"],
        lambda w: tokens.Alternatives((spell(" " + w), spell(w)))) for p in ([prompt] if isinstance(prompt, str)
                                                                              else prompt)])


def _heads(x, proj, norm, heads):
    x = proj(x).unflatten(2, (heads, -1))
    return x if norm is None else norm(x)


def motif_attention(session, site, attn, given, original):
    """The site's processor reproduced where an entry acts, each conditional item's video rows bent against its
    valid prompt keys; the rest as the processor computes it."""
    active = acting(session, site)
    if not active:
        return original()
    hidden, context = given["hidden_states"], given["encoder_hidden_states"]
    mask, rotary = given.get("attention_mask"), given.get("image_rotary_emb")
    n_video, n_image = hidden.shape[1], given.get("image_embed_seq_len") or 0
    cross = site.name.endswith("cross_attn")
    if cross:                                    # MotifVideoCrossAttnProcessor2_0: keys and values are the text
        text = context[:, n_image:]
        mask = None if mask is None else mask[:, :, :, n_image - context.shape[1]:]
        q = _heads(hidden, attn.to_q, attn.norm_q, attn.heads)
        k, v = _heads(text, attn.to_k, attn.norm_k, attn.heads), _heads(text, attn.to_v, None, attn.heads)
        if rotary is not None:
            q = _rope(q, rotary)
    else:                                        # MotifVideoAttnProcessor2_0: [video; context]
        q, k, v = _joint_qkv(attn, hidden, context, rotary)
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    out = host_attention(attn, q, k, v, attn_mask=mask)
    _bend(session, site, active, attn.heads, out, q, k, v, mask, -n_image if cross else n_video, n_video)
    out = out.transpose(1, 2).flatten(2, 3).to(q.dtype)
    if cross:
        return attn.to_out[1](attn.to_out[0](out))
    video, text = out[:, :n_video], out[:, n_video:]
    if attn.to_out is not None:
        video = attn.to_out[1](attn.to_out[0](video))
    return video, (attn.to_add_out(text) if attn.to_add_out is not None else text)


def _joint_qkv(attn, hidden, context, rotary):
    """q, k, v [b, L, heads, d] of [video; context], RoPE on the video's q and k, as the processor forms them."""
    n_video = hidden.shape[1]
    single = attn.add_q_proj is None             # single blocks: one projection for the joined sequence
    x = torch.cat([hidden, context], 1) if single else hidden
    q, k, v = (_heads(x, attn.to_q, attn.norm_q, attn.heads), _heads(x, attn.to_k, attn.norm_k, attn.heads),
               _heads(x, attn.to_v, None, attn.heads))
    if rotary is not None:
        q, k = (torch.cat([_rope(t[:, :n_video], rotary), t[:, n_video:]], 1)
                for t in (q, k))
    if not single:
        q, k, v = (torch.cat([a, _heads(context, proj, norm, attn.heads)], 1) for a, proj, norm in (
            (q, attn.add_q_proj, attn.norm_added_q), (k, attn.add_k_proj, attn.norm_added_k),
            (v, attn.add_v_proj, None)))
    return q, k, v


def _bend(session, site, active, heads, out, q, k, v, mask, first, n_video):
    """Each conditional item's video-query rows bent against its valid prompt keys: the item's offset in the
    context counted from `first`, the context's first key (cross_attn: minus the image tokens its keys leave out)."""
    call = session.call
    bias = None if mask is None else torch.zeros(mask.shape, device=q.device).masked_fill(~mask, float("-inf"))
    target = out if session.phase == 2 else out.clone()
    for row in call.cond_rows:
        offset, n_text = call.spans[row]
        refuse_beyond(session, active, n_text, "prompt")
        observe = recorder(session, site, active, heads, call.token_hw, n_text) if session.record_maps else None
        bent_attention.bend_rows(target, q, k, v, [row], bias=bias, entries=active,
                                 token_indices=session.token_indices, grid_hw=call.token_hw, step_index=call.step,
                                 layer_index=site.layer, frames=call.frames, observe=observe,
                                 text=slice(first + offset, first + offset + n_text), queries=slice(0, n_video))
