"""SAG and Slothful Attention on diffusers UNets: the recording at SAG_SITE, Slothful's reduced key/values, and
SAG's correction after each model call."""

from __future__ import annotations

import dataclasses
import warnings

import torch

from .. import bent_attention, sag, slothful
from .recompute import attention, plain, qk_norm
from .calls import first_rows, model_input, prediction

SAG_SITE = "mid_block.attentions.0.transformer_blocks.0.attn1"



def before_mid(session, module, args, kwargs):
    if session.call is not None:
        session.call.mid_hw = tuple(model_input(args, kwargs).shape[-2:])
    return None


def sag_correction(session, module, args, kwargs, output):
    """Add SAG's δ to both halves of the prediction (it lands on the CFG result for any guidance)."""
    call = session.call
    if not call.cfg:
        if not session._warned_no_cfg:
            warnings.warn("SAG needs classifier-free guidance (an unconditional half); skipped", stacklevel=2)
            session._warned_no_cfg = True
        return None
    if call.sag_probs is None:
        return None
    x, pred = model_input(args, kwargs), prediction(output)
    half = x.shape[0] // 2

    def uncond_pred_at(x_degraded):
        return _uncond_call(session, module, args, kwargs, x_degraded, half)

    delta = sag.sag_prediction_delta(
        x[:half], pred[:half], call.sag_probs, call.sag_heads, uncond_pred_at, call.alpha_cumprod,
        session.sag["scale"], session.sag["blur_sigma"],
        getattr(session.pipe.scheduler.config, "prediction_type", "epsilon"), mid_hw=call.mid_hw)
    if delta is None:
        return None
    pred = pred + torch.cat([delta, delta]).to(pred.dtype)
    return (pred, *output[1:]) if isinstance(output, tuple) else dataclasses.replace(output, sample=pred)

def _uncond_call(session, module, args, kwargs, x, half):
    """The model on x with the unconditional halves of every batched argument, SAG and bending off."""
    batch = 2 * half
    outer = session.call
    session.call = dataclasses.replace(outer, cfg=False, cond_rows=[])
    session._in_sag_call = True
    try:
        if args:
            out = module(x, *first_rows(args[1:], batch, half), **first_rows(kwargs, batch, half))
        else:
            out = module(**{**first_rows(kwargs, batch, half), "sample": x})
    finally:
        session._in_sag_call = False
        session.call = outer
    return prediction(out)


def self_attention(session, site, attn, hidden_states, encoder_hidden_states, attention_mask, original):
    call = session.call
    if session.sag and site.name == SAG_SITE and call.cfg and not session._in_sag_call:
        half = hidden_states[: hidden_states.shape[0] // 2]     # the unconditional items
        q = qk_norm(getattr(attn, "norm_q", None), attn.to_q(half), attn.heads)
        k = qk_norm(getattr(attn, "norm_k", None), attn.to_k(half), attn.heads)
        call.sag_probs, call.sag_heads = bent_attention.attention_probs(q, k, attn.heads), attn.heads
    if (session.slothful is None or encoder_hidden_states is not None or attention_mask is not None
            or not plain(attn, hidden_states)):
        return original()
    k_in, v_in = slothful.slothful_kv(hidden_states, hidden_states, site.block_kind,
                                      slothful.sigma_from_alpha_cumprod(call.alpha_cumprod),
                                      attn.heads, call.latent_hw, session.slothful)
    if k_in is hidden_states and v_in is hidden_states:      # stride ≤ 1 here
        return original()
    return attention(attn, hidden_states, k_in, v_in)
