"""The model families the diffusers host treats apart from its generic paths (UNet / cross-attention attn1·attn2,
joint attention `attn`): one row each, naming only what differs. The Session and the processors read this table;
a family's maths stays in its own module."""

from __future__ import annotations

import dataclasses
from typing import Callable

from . import (ernie, flux3, hidream, hunyuan10, hunyuan15, ideogram4, kandinsky5, krea2, minimax_h3, mochi,
               motif_video, prompts, qwen21, sana, single, wan_animate2)


@dataclasses.dataclass(frozen=True)
class Family:
    name: str                                 # Session.family
    models: tuple[str, ...]                   # diffusers model class names
    sites: Callable | None = None             # model → [(name, attention, layer)] its text attentions; None: generic
    cross: bool = False                       # those attentions are text cross-attentions (else joint attentions)
    attention: Callable | None = None         # (session, site, attn, given, original) → one bent-or-not call
    describe: Callable | None = None          # (session, model, args, kwargs) → Call: reads its model call itself
    refine: Callable | None = None            # (call, model, x, kwargs): adds to the generic reading of a call
    refine_always: bool = False               # refine without [[bending]] too (its attention reads what it adds)
    separate_cfg: bool = False                # CFG in two model calls, and no do_classifier_free_guidance flag
    columns: Callable | None = None           # (session, encode_prompt's arguments) → each word's text columns


def _numbered(modules):
    """A family's `*_modules(model)` ([(name, attention)] in order) with each attention's layer: its place."""
    return lambda model: [(name, module, layer) for layer, (name, module) in enumerate(modules(model))]


def _kwargs_only(refine):
    """A refine that reads the call's keyword arguments alone."""
    return lambda call, model, x, kwargs: refine(call, kwargs)


FAMILIES = {f.name: f for f in (
    # single-stream [image; text] or [text; image] sequences, read per batch item
    Family("single", tuple(single.SINGLE_MODELS), _numbered(single.single_modules), attention=single.single_attention,
           describe=single.describe, columns=prompts.single_columns),  # Z-Image, Lumina 2
    Family("ernie", tuple(ernie.ERNIE_MODELS), _numbered(ernie.ernie_modules), attention=ernie.ernie_attention,
           describe=ernie.describe, columns=prompts.ernie_columns),    # [image; text], CFG [uncond; cond]
    Family("ideogram4", tuple(ideogram4.IDEOGRAM4_MODELS), _numbered(ideogram4.ideogram4_modules),
           attention=ideogram4.ideogram4_attention, describe=ideogram4.describe,
           columns=ideogram4.ideogram4_columns),                        # [pad; text; image] per item
    Family("flux3", tuple(flux3.FLUX3_MODELS), _numbered(flux3.flux3_modules), attention=flux3.flux3_attention,
           describe=flux3.describe),                                    # [text; image; refs], modular pipeline
    Family("minimax_h3", tuple(minimax_h3.MINIMAX_MODELS), _numbered(minimax_h3.minimax_modules),
           attention=minimax_h3.minimax_attention, describe=minimax_h3.describe),   # one packed sequence, no CFG
    Family("krea2", tuple(krea2.KREA2_MODELS), _numbered(krea2.krea2_modules), attention=krea2.krea2_attention,
           refine=_kwargs_only(krea2.describe), separate_cfg=True,
           columns=prompts.krea2_columns),                              # [text; image], CFG in two calls
    Family("qwen21", tuple(qwen21.QWEN21_MODELS), _numbered(qwen21.qwen21_modules), attention=qwen21.qwen21_attention,
           refine=_kwargs_only(qwen21.describe), separate_cfg=True,
           columns=prompts.single_columns),                             # Qwen-Image 2.x: block-causal
    Family("hunyuan15", tuple(hunyuan15.HUNYUAN15_MODELS), _numbered(hunyuan15.hunyuan15_modules),
           attention=hunyuan15.hunyuan15_attention, refine=_kwargs_only(hunyuan15.describe),
           separate_cfg=True, columns=prompts.single_columns),          # [video; context]
    Family("hunyuan10", tuple(hunyuan10.HUNYUAN10_MODELS), _numbered(hunyuan10.hunyuan10_modules),
           attention=hunyuan10.hunyuan10_attention, refine=_kwargs_only(hunyuan10.describe),
           separate_cfg=True, columns=hunyuan10.columns),               # [video; cropped Llama]
    Family("hidream", tuple(hidream.HIDREAM_MODELS), _numbered(hidream.hidream_modules),
           attention=hidream.hidream_attention, refine=_kwargs_only(hidream.describe),
           columns=prompts.hidream_columns),                            # [image; T5, Llama ×2]
    Family("mochi", tuple(mochi.MOCHI_MODELS), _numbered(mochi.mochi_modules),
           attention=mochi.mochi_attention),                            # [video; valid T5] per item
    Family("motif", tuple(motif_video.MOTIF_MODELS), motif_video.motif_modules, attention=motif_video.motif_attention,
           refine=motif_video.describe, refine_always=True, separate_cfg=True,
           columns=motif_video.columns),                                # joint attn and cross_attn
    # text cross-attentions, named otherwise than attn2
    Family("kandinsky5", tuple(kandinsky5.KANDINSKY5_MODELS), _numbered(kandinsky5.kandinsky5_modules), cross=True,
           attention=kandinsky5.kandinsky5_attention, refine=kandinsky5.describe, refine_always=True,
           separate_cfg=True, columns=prompts.single_columns),          # channels-last, fractal token order
    Family("wan_animate2", tuple(wan_animate2.ANIMATE2_MODELS), _numbered(wan_animate2.animate2_modules), cross=True,
           attention=wan_animate2.animate2_attention, describe=wan_animate2.describe),   # reference pass left alone
    # the generic cross-attention path; only its prompt's columns (Gemma 2 after an instruction) and Sprint's steps
    Family("sana", tuple(sana.SANA_MODELS), columns=sana.sana_columns),
)}
BY_MODEL = {model: family for family in FAMILIES.values() for model in family.models}


def family_of(model) -> Family | None:
    """The row of `model`'s class, or None: a model the generic paths serve."""
    return BY_MODEL.get(type(model).__name__)
