"""Bending at HunyuanVideo 1.0's attentions (HunyuanVideoTransformer3DModel, HunyuanVideoAttnProcessor2_0): double
blocks over [video; text] with separate text projections, single blocks over the same sequence with one projection;
RoPE on the video tokens only; a key mask that keeps each item's first n_video + (valid text) tokens.

The text the blocks attend to is the token refiner's output at the Llama tokens the pipeline kept: its chat template
around the prompt, the first crop_start tokens cut (HunyuanVideoPipeline: column 0 is the prompt's first token;
HunyuanVideoImageToVideoPipeline: the image's tokens first, every image_embed_interleave-th of them, then the prompt's),
right-padded. The refiner itself (text alone) is left alone."""

from __future__ import annotations

import inspect

import torch

from .. import bent_attention, tokens
from . import prompts
from .joint import _rope
from .recompute import acting, host_attention, recorder, refuse_beyond

HUNYUAN10_MODELS = {"HunyuanVideoTransformer3DModel": "hunyuan10"}


def describe(call, kwargs) -> None:
    """Per batch item, (0, its valid text tokens) into call.spans: the text keys follow the video tokens (the pipelines
    pass encoder_attention_mask by name; without it every text token counts)."""
    mask = kwargs.get("encoder_attention_mask")
    call.spans = None if mask is None else [(0, int(n)) for n in mask.bool().sum(1).tolist()]


def hunyuan10_modules(model) -> list:
    """The double blocks' then the single blocks' attention, in execution order."""
    return ([(f"transformer_blocks.{i}.attn", b.attn) for i, b in enumerate(model.transformer_blocks)]
            + [(f"single_transformer_blocks.{i}.attn", b.attn) for i, b in enumerate(model.single_transformer_blocks)])


def hunyuan10_attention(session, site, attn, given, original):
    """HunyuanVideoAttnProcessor2_0 reproduced where an entry acts, each conditional item's word columns bent for its
    video-query rows; returns (video, text) as the processor does."""
    active = acting(session, site)
    if not active or session.phase == 1 and not session.record_maps:
        return original()
    call = session.call
    hidden, context = given["hidden_states"], given["encoder_hidden_states"]
    n_video = hidden.shape[1]

    def heads(x, proj, norm):
        x = proj(x).unflatten(2, (attn.heads, -1))
        return x if norm is None else norm(x)

    double = attn.add_q_proj is not None
    joint = hidden if double else torch.cat([hidden, context], 1)       # a single block projects both at once
    q, k, v = heads(joint, attn.to_q, attn.norm_q), heads(joint, attn.to_k, attn.norm_k), heads(joint, attn.to_v, None)
    rotary = given.get("image_rotary_emb")
    if rotary is not None:
        q, k = (torch.cat([_rope(t[:, :n_video], rotary), t[:, n_video:]], 1) for t in (q, k))
    if double:
        cq, ck = heads(context, attn.add_q_proj, attn.norm_added_q), heads(context, attn.add_k_proj, attn.norm_added_k)
        q, k, v = (torch.cat(p, 1) for p in ((q, cq), (k, ck), (v, heads(context, attn.add_v_proj, None))))
    mask = given["attention_mask"]
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    out = host_attention(attn, q, k, v, attn_mask=mask)
    bias = None if mask is None else torch.zeros(mask.shape, device=q.device).masked_fill(~mask.bool(), float("-inf"))
    for row in call.cond_rows:
        offset, n_text = call.spans[row] if call.spans else (0, context.shape[1])
        refuse_beyond(session, active, n_text)
        observe = recorder(session, site, active, attn.heads, call.token_hw, n_text) if session.record_maps else None
        bent_attention.bend_rows(out, q, k, v, [row], bias=bias, entries=active,
                                 token_indices=session.token_indices, grid_hw=call.token_hw, step_index=call.step,
                                 layer_index=site.layer, frames=call.frames, observe=observe,
                                 text=slice(n_video + offset, n_video + offset + n_text), queries=slice(0, n_video))
    if session.phase == 1:                    # the maps only: the host's own attention, bit for bit
        return original()
    out = out.transpose(1, 2).flatten(2).to(q.dtype)
    video, text = out[:, :n_video], out[:, n_video:]
    if getattr(attn, "to_out", None) is not None:
        video = attn.to_out[1](attn.to_out[0](video))
    if getattr(attn, "to_add_out", None) is not None:
        text = attn.to_add_out(text)
    return video, text


def columns(session, arguments) -> dict[str, list[int]]:
    """word → its columns among the text tokens the blocks attend to, found as _get_llama_prompt_embeds encodes the
    prompt: its prompt_template's text around it, truncated at max_sequence_length + crop_start tokens, the first
    crop_start dropped (crop_start None: the template's own length, padded as diffusers pads it, less 2, or 5 for
    image-to-video); image-to-video puts the image's tokens (image_emb_start … image_emb_end, every
    image_embed_interleave-th) before them. A word after a space or bare (byte-level BPE), found from where the
    prompt's tokens part from the empty prompt's."""
    pipe = session.pipe
    tokenizer = pipe.tokenizer
    defaults = {n: p.default for n, p in inspect.signature(type(pipe).encode_prompt).parameters.items()}

    def given(name):
        value = arguments.get(name)
        return defaults.get(name) if value is None else value

    template, image = given("prompt_template"), "image" in defaults
    crop = template.get("crop_start")
    if crop is None:                          # diffusers: the template alone, padded to the tokenizer's length
        crop = len(tokenizer(template["template"], padding="max_length")["input_ids"]) - (5 if image else 2)
    limit = given("max_sequence_length") + crop
    first = 0
    if image:
        span = range(template.get("image_emb_start", 5), template.get("image_emb_end", 581))
        every = given("image_embed_interleave")
        first = len(span[::every] if 0 < every < 6 else span)

    def ids(prompt):
        return tokenizer(template["template"].format(prompt), max_length=limit, truncation=True)["input_ids"][crop:]

    def spell(word):
        return tokenizer(word, add_special_tokens=False)["input_ids"]

    def find(prompt):
        found, empty = ids(prompt), ids("")
        start = next((i for i, (a, b) in enumerate(zip(found, empty)) if a != b), min(len(found), len(empty)))
        at = tokens.token_columns(words, found[start:], lambda w: tokens.Alternatives((spell(" " + w), spell(w))))
        return {w: [first + start + j for j in js] for w, js in at.items()}

    words = list(dict.fromkeys(e.token for e in session.entries))
    prompt = arguments["prompt"]
    return prompts.same_columns([find(p) for p in ([prompt] if isinstance(prompt, str) else prompt)])
