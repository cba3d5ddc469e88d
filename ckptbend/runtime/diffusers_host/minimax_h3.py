"""Bending at MiniMax H3's self-attentions (MiniMaxH3Transformer3DModel, MiniMaxH3AttnProcessor), and its prompt's word
columns in the modular pipeline (MiniMaxH3ModularPipeline, which has no encode_prompt).

Every block attends once over one packed sequence [text | conditioning rows | target audio | target video]
(text_indices, audio_indices, video_indices say where each modality sits), RoPE on every row, no mask. The target
video's rows are the last of the sequence (the generated frames, after the target audio, in every task's layout); they
are the queries bent, against the prompt's keys. The text rows are the pipeline's presentation: labels and vision
blocks of the references (none in text-to-video), then the prompt's own tokens (its tokenizer, no special tokens, no
template), so a word's column j is key n_text − n_prompt + j. The checkpoint is guidance-distilled: one call per step,
always the prompt's. The token refiner (self-attention over the text alone, before the blocks) is left alone."""

from __future__ import annotations

import inspect

import torch

from .. import bent_attention, tokens
from .calls import Call, scheduler_position, step_of
from . import modular
from .prompts import same_columns
from .recompute import acting, host_attention, recorder, refuse_beyond

MINIMAX_MODELS = {"MiniMaxH3Transformer3DModel": "minimax_h3"}


def minimax_modules(model) -> list:
    """Every block's attention, in order (the token refiner's are not among them)."""
    return [(f"transformer_blocks.{i}.attn", block.attn) for i, block in enumerate(model.transformer_blocks)]


# --- the prompt ------------------------------------------------------------------------------------

def columns(session, prompt: str) -> dict[str, list[int]]:
    """word → its columns among the prompt's own tokens (the text encoder steps tokenize the prompt alone, after the
    references' labels and vision blocks); records their number in session.n_prompt."""
    tokenizer = session.pipe.tokenizer
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]

    def spell(word):                  # byte-level BPE: a word after a space or bare
        return tokenizer(word, add_special_tokens=False)["input_ids"]

    words = list(dict.fromkeys(e.token for e in session.entries))
    found = same_columns([tokens.token_columns(words, ids, lambda w: tokens.Alternatives((spell(" " + w),
                                                                                          spell(w))))])
    session.n_prompt = len(ids)
    return found


def wrap_blocks(session) -> None:
    """pipe._blocks wrapped (a modular pipeline: no encode_prompt to wrap); undone by remove()."""
    modular.wrap_blocks(session, "MiniMax H3", columns)


# --- the model call --------------------------------------------------------------------------------

def describe(session, model, args, kwargs) -> Call:
    """The call: the target video's grid and rows, the prompt's keys, the step of the target video's timestep."""
    given = inspect.signature(model.forward).bind_partial(*args, **kwargs).arguments
    video, text, positions = given["video_indices"], given["text_indices"], given["position_ids"]
    length = positions.shape[0]
    run = 0                                   # the target video: the video rows that end the sequence
    while run < len(video) and int(video[len(video) - 1 - run]) == length - 1 - run:
        run += 1
    start = length - run
    rows, cols = (positions[start:, axis].unique().numel() for axis in (1, 2))
    n_text = len(text)
    if n_text and not torch.equal(text.cpu(), torch.arange(int(text[0]), int(text[0]) + n_text)):
        raise ValueError("Attention Bending on MiniMax H3 needs the text rows in one run")
    n_prompt = getattr(session, "n_prompt", None) or n_text
    t = float(given["timestep"][given["timestep_indices"][length - 1]])
    scheduler = session.pipe.scheduler
    call = Call(latent_hw=(rows, cols), token_hw=(rows, cols), frames=run // (rows * cols), cfg=False,
                cond_rows=list(range(given["hidden_states"].shape[0])),
                step=step_of(scheduler, scheduler_position(scheduler, t)), alpha_cumprod=None, n_text=n_prompt)
    call.spans = [(start, (int(text[0]) if n_text else 0) + n_text - n_prompt, n_prompt)]
    return call


def _rope(x, cos, sin):
    """MiniMax H3's RoPE on [b, n, heads, d]: each head's leading cos.shape[-1] channels turned rotate-half style
    (halves x1, x2 → (−x2, x1)) in x's dtype, the rest passed through, as its processor does."""
    turned, rest = x[..., :cos.shape[-1]], x[..., cos.shape[-1]:]
    cos, sin = (t.to(x.dtype)[None, :, None, :] for t in (cos, sin))
    x1, x2 = turned.chunk(2, dim=-1)
    return torch.cat((turned * cos + torch.cat((-x2, x1), dim=-1) * sin, rest), dim=-1)


def minimax_attention(session, site, attn, given, original):
    """MiniMaxH3AttnProcessor reproduced where an entry acts, the target video's rows bent against the prompt's
    keys."""
    active = acting(session, site)
    if not active:
        return original()
    call = session.call
    hidden, rotary, mask = given["hidden_states"], given.get("rotary_emb"), given.get("attention_mask")
    if attn.fused_projections:
        q, k, v = attn.to_qkv(hidden).chunk(3, dim=-1)
    else:
        q, k, v = attn.to_q(hidden), attn.to_k(hidden), attn.to_v(hidden)
    q, k, v = (t.unflatten(-1, (attn.heads, -1)) for t in (q, k, v))
    q, k = attn.norm_q(q), attn.norm_k(k)
    if rotary is not None:
        q, k = _rope(q, *rotary), _rope(k, *rotary)
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    out = host_attention(attn, q, k, v, attn_mask=mask)
    first_video, first_prompt, n_prompt = call.spans[0]
    refuse_beyond(session, active, n_prompt, "prompt")
    observe = recorder(session, site, active, attn.heads, call.token_hw, n_prompt) if session.record_maps else None
    bias = mask
    if mask is not None and mask.dtype == torch.bool:
        bias = torch.zeros(mask.shape, device=q.device).masked_fill(~mask, float("-inf"))
    bent_attention.bend_rows(out if session.phase == 2 else out.clone(), q, k, v, call.cond_rows, bias=bias,
                             entries=active, token_indices=session.token_indices, grid_hw=call.token_hw,
                             step_index=call.step, layer_index=site.layer, frames=call.frames, observe=observe,
                             text=slice(first_prompt, first_prompt + n_prompt), queries=slice(first_video, None))
    out = out.transpose(1, 2).flatten(2, 3).type_as(q)
    return attn.to_out[1](attn.to_out[0](out))
