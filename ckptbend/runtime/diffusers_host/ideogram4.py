"""Bending at Ideogram 4's single-stream attentions (Ideogram4Transformer2DModel, `layers.i.attention`): one packed
sequence per item, [left padding; text; image] (Ideogram4Pipeline._prepare_ids): the text of n tokens sits at
max_sequence_length − n, the image's H·W tokens follow in raster order. A block-diagonal mask from segment_ids keeps
text and image apart from the padding; per-token indicators (3 text, 2 image) say which is which, and
position_ids' image rows give the grid (offset by IMAGE_POSITION_OFFSET).

Ideogram4Pipeline's CFG is asymmetric: the negative is a separate model (`unconditional_transformer`, image tokens
only, no text), which apply() leaves alone; every item of the conditional model with text is the prompt's. The model
time is reversed, 1 − t / num_train_timesteps, so the step is found from 1 − t (the scheduler's own step_index
first: the model's bf16 time is too coarse to tell late steps apart). The prompt is the user turn of the tokenizer's
chat template with the generation prompt, every token attended: column 0 is the template's first token.

The host's processor computes the call; the conditional items' image-query rows are recomputed (PyTorch's attention
over the same q, k, v and mask) with their text columns bent, then projected (to_out[0], as the processor): the other
rows keep the host's result bit for bit.
"""

from __future__ import annotations

import math

import torch

from .. import bent_attention, tokens
from .calls import Call, step_near
from .prompts import same_columns
from .recompute import acting, host_attention, recorder, refuse_beyond

IDEOGRAM4_MODELS = {"Ideogram4Transformer2DModel": "ideogram4"}
TEXT, IMAGE, IMAGE_OFFSET = 3, 2, 65536        # diffusers' LLM_TOKEN_INDICATOR, OUTPUT_IMAGE_INDICATOR, offset


def ideogram4_modules(model) -> list:
    return [(f"layers.{i}.attention", block.attention) for i, block in enumerate(model.layers)]


def step_at(scheduler, model_time) -> int | None:
    """The step of a call at model time 1 − t / num_train_timesteps."""
    time = torch.as_tensor(model_time)
    t = (1.0 - float(time.flatten().max())) * getattr(getattr(scheduler, "config", None), "num_train_timesteps", 1000)
    return step_near(scheduler, t, time.dtype if time.is_floating_point() else torch.float32)


def describe(session, module, args, kwargs) -> Call:
    """The Call of one model call: step, image grid, and per item (first image token, first text token, text
    tokens); the conditional items are those with text."""
    names = ("hidden_states", "timestep", "encoder_hidden_states", "position_ids", "segment_ids", "indicator")
    given = dict(zip(names, args), **kwargs)
    indicator, positions = given["indicator"], given["position_ids"]
    spans, grid = [], None
    for b in range(indicator.shape[0]):
        text, image = (torch.nonzero(indicator[b] == kind).flatten() for kind in (TEXT, IMAGE))
        for part in (text, image):
            if len(part) and int(part[-1] - part[0]) + 1 != len(part):
                raise ValueError("Attention Bending on Ideogram 4 needs each item's text and image tokens in one run")
        hw = positions[b, image, 1:] - IMAGE_OFFSET
        grid = (int(hw[:, 0].max()) + 1, int(hw[:, 1].max()) + 1)
        spans.append((int(image[0]), int(text[0]) if len(text) else 0, len(text)))
    rows = [b for b, span in enumerate(spans) if span[2] > 0]
    return Call(latent_hw=grid, token_hw=grid, frames=None, cfg=False, cond_rows=rows,
                step=step_at(session.pipe.scheduler, given["timestep"]), alpha_cumprod=None, spans=spans)


def _rope(x, cos, sin):
    """Ideogram 4's MRoPE on [b, n, heads, d]: cos / sin [b, n, d], halves rotated (its processor's formula)."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos.unsqueeze(2) + rotated * sin.unsqueeze(2)


def ideogram4_attention(session, site, attn, given, original):
    active = acting(session, site)
    if not active:
        return original()
    call = session.call
    out = original()
    rows = call.cond_rows
    hidden = given["hidden_states"][rows]
    q, k, v = (p(hidden).unflatten(-1, (attn.num_heads, attn.head_dim)) for p in (attn.to_q, attn.to_k, attn.to_v))
    q, k = attn.norm_q(q), attn.norm_k(k)
    cos, sin = given["image_rotary_emb"]
    q, k = _rope(q, cos[rows], sin[rows]), _rope(k, cos[rows], sin[rows])
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    mask = given["attention_mask"][rows]                       # [rows, 1, L, L] bool, block-diagonal
    n_image = call.token_hw[0] * call.token_hw[1]
    bent = out.clone() if session.phase == 2 else out
    for at, row in enumerate(rows):
        first_image, text_at, n_text = call.spans[row]
        refuse_beyond(session, active, n_text)
        # only the image queries are recomputed (the other rows keep the host's result bit for bit)
        image = slice(first_image, first_image + n_image)
        qi, ki, vi, keep = q[at:at + 1, :, image], k[at:at + 1], v[at:at + 1], mask[at:at + 1, :, image]
        target = host_attention(attn, qi, ki, vi, attn_mask=keep)
        bias = torch.zeros(keep[:, :, :1].shape, device=q.device).masked_fill(~keep[:, :, :1], -math.inf)
        observe = (recorder(session, site, active, attn.num_heads, call.token_hw, n_text)
                   if session.record_maps else None)
        bent_attention.bend_rows(target, qi, ki, vi, [0], bias=bias, entries=active,
                                 token_indices=session.token_indices, grid_hw=call.token_hw, step_index=call.step,
                                 layer_index=site.layer, frames=None, text=slice(text_at, text_at + n_text),
                                 observe=observe)
        if session.phase == 2:
            bent[row, image] = attn.to_out[0](target[0].transpose(0, 1).flatten(1).to(out.dtype))
    return bent


def ideogram4_columns(session, arguments) -> dict[str, list[int]]:
    """Ideogram4Pipeline.encode_prompt: the prompt as the user turn (one text part) of the tokenizer's chat template
    with the generation prompt, no special tokens added, never truncated (too long is the pipeline's error); every
    token is attended, so column 0 is the template's first. A word is found spelled after a space or bare (byte-level
    BPE), searched from where the prompt's tokens part from the empty prompt's."""
    tokenizer = session.pipe.tokenizer
    words = list(dict.fromkeys(e.token for e in session.entries))

    def ids(prompt):
        turn = [{"role": "user", "content": [{"type": "text", "text": prompt}]}]
        text = tokenizer.apply_chat_template(turn, add_generation_prompt=True, tokenize=False)
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    def spell(word):
        return tokenizer(word, add_special_tokens=False)["input_ids"]

    def columns(prompt):
        found, empty = ids(prompt), ids("")
        start = next((i for i, (a, b) in enumerate(zip(found, empty)) if a != b), min(len(found), len(empty)))
        at = tokens.token_columns(words, found[start:], lambda w: tokens.Alternatives((spell(" " + w), spell(w))))
        return {w: [start + j for j in js] for w, js in at.items()}

    prompt = arguments["prompt"]
    return same_columns([columns(p) for p in ([prompt] if isinstance(prompt, str) else prompt)])
