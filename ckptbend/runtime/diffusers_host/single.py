"""Bending at the single-stream attentions of Z-Image and Lumina 2 (NextDiT): one self-attention over the text and
image tokens concatenated, in the model's main blocks (`layers`; the refiners see text or image alone).

Token layout per batch item, as each model builds it:
- Z-Image (ZImageTransformer2DModel): [image; text], each padded with its learned pad token to a multiple of 32
  (SEQ_MULTI_OF); items of unequal length are padded and masked. Image queries 0 … n_image − 1, text keys from the
  padded image length. Its pipeline batches CFG as [cond…; uncond…] (lists of per-prompt embeddings).
- Lumina 2 (Lumina2Transformer2DModel): [text; image], the text cut to its mask's length per item (the image
  follows each item's own text). Its pipeline runs CFG as two calls.
Both pass the model timestep 1 − t/1000 of the scheduler's t.
"""

from __future__ import annotations

import math

import torch

from .. import bent_attention
from .calls import Call, alpha_cumprod_at, scheduler_position, step_of
from .recompute import acting, host_attention, recorder, refuse_beyond

SINGLE_MODELS = {"ZImageTransformer2DModel": "zimage", "Lumina2Transformer2DModel": "lumina2"}
ZIMAGE_MULTIPLE = 32          # diffusers' SEQ_MULTI_OF: Z-Image pads image and text tokens to a multiple of it


def single_modules(model) -> list:
    """(name, attention module) of the main blocks, in order (Z-Image: .attention, Lumina 2: .attn)."""
    found = []
    for i, block in enumerate(model.layers):
        name = "attention" if hasattr(block, "attention") else "attn"
        found.append((f"layers.{i}.{name}", getattr(block, name)))
    return found


def describe(session, module, args, kwargs) -> Call:
    """The Call of a Z-Image / Lumina 2 model call: step, token grid, conditional rows and, per batch item, where
    its image queries and text keys sit (call.spans: (first image query, first text key, text tokens))."""
    family = session.single
    names = ("x", "t", "cap_feats") if family == "zimage" else ("hidden_states", "timestep", "encoder_hidden_states")
    given = dict(zip(names, args), **kwargs)
    x, t, text = (given.get(n) for n in names)
    t = float(torch.as_tensor(t).flatten().max())
    scheduler = session.pipe.scheduler
    train = getattr(scheduler.config, "num_train_timesteps", 1000)
    position = scheduler_position(scheduler, (1 - t) * train)
    if family == "zimage":
        p, pf = kwargs.get("patch_size", 2), kwargs.get("f_patch_size", 1)
        frames, height, width = x[0].shape[-3:]
        grid, frames = (height // p, width // p), frames // pf
        n_image = frames * grid[0] * grid[1]
        image_len = n_image + (-n_image) % ZIMAGE_MULTIPLE
        spans = [(0, image_len, len(c)) for c in text]
        rows = _zimage_cond_rows(session, text)
        cfg = len(rows) not in (0, len(text))
        frames = frames if frames > 1 else None
    else:
        p = module.config.patch_size
        grid, frames = (x.shape[-2] // p, x.shape[-1] // p), None
        lengths = given.get("encoder_attention_mask").sum(1).tolist()
        spans = [(int(n), 0, int(n)) for n in lengths]
        cfg, rows = session._layout(x.shape[0], text)
    return Call(latent_hw=grid, token_hw=grid, frames=frames, cfg=cfg, cond_rows=rows,
                step=step_of(scheduler, position),
                alpha_cumprod=alpha_cumprod_at(scheduler, t, position) if session.slothful else None,
                spans=spans)


def _zimage_cond_rows(session, text) -> list[int]:
    """The items whose embeddings are the encoded prompt's (ZImagePipeline passes prompt + negative lists, the
    same tensors); before any prompt, every item."""
    prompt = session.prompt_embeds
    if prompt is None:
        return list(range(len(text)))
    prompt = prompt if isinstance(prompt, (list, tuple)) else list(prompt)
    return [i for i, c in enumerate(text) if any(c is e or c.shape == e.shape and torch.equal(c, e) for e in prompt)]


def _rope(x, freqs):
    """RoPE on [b, n, heads, d]: interleaved pairs as complex numbers times freqs [b, n, d/2] (complex), in
    float32 (Z-Image's processor, diffusers' apply_rotary_emb with use_real=False)."""
    pairs = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))
    return torch.view_as_real(pairs * freqs.unsqueeze(2)).flatten(3).type_as(x)


def single_attention(session, site, attn, given, original):
    """The main block's attention where an entry acts: q, k, v as the model's processor forms them, PyTorch's
    attention, and for each conditional item its bent text columns' correction of its image-query rows."""
    active = acting(session, site)
    if not active:
        return original()
    call = session.call
    hidden = given["hidden_states"]
    heads = attn.heads
    q, k, v = (proj(hidden).unflatten(-1, (-1, attn.to_q.out_features // heads)) for proj in (attn.to_q, attn.to_k,
                                                                                               attn.to_v))
    if attn.norm_q is not None:
        q = attn.norm_q(q)
    if attn.norm_k is not None:
        k = attn.norm_k(k)
    rotary = given.get("freqs_cis", given.get("image_rotary_emb"))
    if rotary is not None:
        q, k = _rope(q, rotary), _rope(k, rotary)
    if k.shape[2] != heads:                              # Lumina 2's grouped key / value heads
        k, v = (t.repeat_interleave(heads // t.shape[2], dim=2) for t in (k, v))
    scale = attn.scale
    if given.get("base_sequence_length") is not None:   # Lumina 2's proportional attention
        scale = math.sqrt(math.log(hidden.shape[1], given["base_sequence_length"])) * attn.scale
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    mask = given.get("attention_mask")
    mask = None if mask is None else mask.bool().view(mask.shape[0], 1, 1, -1)
    out = host_attention(attn, q, k, v, attn_mask=mask, scale=scale)
    bias = None if mask is None else torch.zeros(mask.shape, device=q.device).masked_fill(~mask, float("-inf"))
    n_image = (call.frames or 1) * call.token_hw[0] * call.token_hw[1]
    target = out if session.phase == 2 else out.clone()
    for row in call.cond_rows:
        image_at, text_at, n_text = call.spans[row]
        refuse_beyond(session, active, n_text)
        observe = recorder(session, site, active, heads, call.token_hw, n_text) if session.record_maps else None
        bent_attention.bend_rows(target, q, k, v, [row], bias=bias, entries=active,
                                 token_indices=session.token_indices, grid_hw=call.token_hw, step_index=call.step,
                                 layer_index=site.layer, frames=call.frames, scale=scale,
                                 text=slice(text_at, text_at + n_text), queries=slice(image_at, image_at + n_image),
                                 observe=observe)
    out = out.transpose(1, 2).flatten(2).to(q.dtype)
    out = attn.to_out[0](out)
    return attn.to_out[1](out) if len(attn.to_out) > 1 else out
