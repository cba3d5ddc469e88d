"""What every ComfyUI hook of the node shares: ComfyUI's own attention, batch chunks, the step index."""

from __future__ import annotations

import math
from typing import Mapping

import torch

# Set in transformer_options for SAG's extra model call. ComfyUI marks the chunks of a
# calc_cond_batch call by their position in its conds list, so the unconditional re-run looks
# conditional (cond_or_uncond == [0]); the flag keeps Bending (conditional only) and SAG's recorder
# out of it.
SAG_PASS = "ckptbend_sag_pass"


def host_attention(q, k, v, heads: int, extra: Mapping, mask=None):
    """ComfyUI's own attention, the backend the user selected (sub-quadratic, split, PyTorch, xformers,
    sage, flash: comfy.ldm.modules.attention.optimized_attention), called as ComfyUI's CrossAttention
    calls it, so a site the node does not change computes exactly what the unpatched model does.
    Another node's optimized_attention_override (ComfyUI ≥ 0.3.60) is honoured as ComfyUI would."""
    import importlib

    attention = importlib.import_module("comfy.ldm.modules.attention")
    kwargs = {"attn_precision": extra.get("attn_precision")}
    if "optimized_attention_override" in extra:
        kwargs["transformer_options"] = extra
    if mask is not None:
        return attention.optimized_attention_masked(q, k, v, heads, mask, **kwargs)
    return attention.optimized_attention(q, k, v, heads, **kwargs)


def per_head(x: torch.Tensor, heads: int) -> torch.Tensor:
    """[b, n, heads·d], or [b, n, heads, d] (SD3's v: ComfyUI's backends view both alike) → [b, heads, n, d]
    (a view: the correction is written through it into the host's output)."""
    return x.view(x.shape[0], x.shape[1], heads, -1).transpose(1, 2)


def chunk_rows(cond_or_uncond, kind: int, batch: int) -> list[int]:
    """Batch rows of the chunks marked `kind` (0 = conditional, 1 = unconditional); the batch is
    len(cond_or_uncond) equal chunks in that order."""
    size = batch // len(cond_or_uncond)
    return [c * size + i for c, k in enumerate(cond_or_uncond) if k == kind for i in range(size)]


def grid_hw(extra: Mapping):
    """(h, w) of this transformer's token grid from its input shape, when the host says it."""
    shape = extra.get("activations_shape")
    return tuple(int(s) for s in shape[-2:]) if shape is not None and len(shape) == 4 else None


def step_index(sigma, sample_sigmas) -> int | None:
    """This step's index in the sampler's schedule: the position of sigma in sample_sigmas, or for a
    sigma between two entries (a sampler's intermediate evaluation) the step it belongs to."""
    if sample_sigmas is None:
        return None
    schedule = torch.as_tensor(sample_sigmas).detach().flatten().float().cpu()
    sigma = float(sigma)
    hits = torch.isclose(schedule, torch.tensor(sigma), rtol=1e-4, atol=1e-7).nonzero()
    if len(hits):
        return int(hits[0])
    return max(0, int((schedule > sigma).sum()) - 1)


def logit_bias(mask: torch.Tensor) -> torch.Tensor:
    """A ComfyUI attention mask (Flux's attn_mask, e.g. Redux's attn_bias: [b, L, L] added to the logits) as
    its backends read it: [q, k] → [1, 1, q, k], [b, q, k] → [b, 1, q, k]; a boolean mask keeps True keys."""
    if mask.dtype == torch.bool:
        mask = torch.zeros(mask.shape, device=mask.device).masked_fill_(~mask, float("-inf"))
    if mask.ndim == 2:
        mask = mask[None]
    return (mask[:, None] if mask.ndim == 3 else mask).float()


def step_counter(shared: dict, slot: int):
    """steps(options) → this call's scheduler step index. The models of one node share `shared`: when
    this model's schedule slice begins at the sigma where the other's last slice ended, its steps
    follow the other's (offset = the other's offset + its step count). A closure, not an object:
    ComfyUI deep-copies objects in model_options on clone."""
    def steps(options):
        schedule = options.get("sample_sigmas")
        local = step_index(options["sigmas"][0], schedule)
        if local is None:
            return None
        sigmas = [float(s) for s in torch.as_tensor(schedule).detach().flatten().cpu()]
        offset = 0
        for other, (their, their_offset) in shared.items():
            if other != slot and len(their) > 1 and sigmas and math.isclose(their[-1], sigmas[0], rel_tol=1e-4):
                offset = their_offset + len(their) - 1
        shared[slot] = (sigmas, offset)
        return offset + local

    return steps
