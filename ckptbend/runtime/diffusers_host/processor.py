"""The attention sites of a model, and the processor that stands in for each one's."""

from __future__ import annotations

import dataclasses
import inspect

from .cross import cross_attention
from .ernie import ERNIE_MODELS, ernie_attention, ernie_modules
from .flux3 import FLUX3_MODELS, flux3_attention, flux3_modules
from .joint import JOINT_MODELS, joint_attention
from .hidream import HIDREAM_MODELS, hidream_attention, hidream_modules
from .ideogram4 import IDEOGRAM4_MODELS, ideogram4_attention, ideogram4_modules
from .krea2 import KREA2_MODELS, krea2_attention, krea2_modules
from .minimax_h3 import MINIMAX_MODELS, minimax_attention, minimax_modules
from .mochi import MOCHI_MODELS, mochi_attention, mochi_modules
from .motif_video import MOTIF_MODELS, motif_attention, motif_modules
from .kandinsky5 import KANDINSKY5_MODELS, kandinsky5_attention, kandinsky5_modules
from .hunyuan10 import HUNYUAN10_MODELS, hunyuan10_attention, hunyuan10_modules
from .hunyuan15 import HUNYUAN15_MODELS, hunyuan15_attention, hunyuan15_modules
from .qwen21 import QWEN21_MODELS, qwen21_attention, qwen21_modules
from .single import SINGLE_MODELS, single_attention, single_modules
from .unet import self_attention
from .wan_animate2 import ANIMATE2_MODELS, animate2_attention, animate2_modules

BLOCK_KINDS = {"down_blocks": "input", "mid_block": "middle", "up_blocks": "output"}   # ComfyUI's names
# Wan VACE's control blocks: their cross-attentions read the control video's tokens, and the hosts run them in
# different orders (diffusers all before the main blocks, ComfyUI each after its main block, outside the block
# replaces), so no one layer numbering fits both: left unbent in both; their hints add into the bent main blocks.
UNBENT_BRANCHES = ("vace_blocks.",)
EXECUTION_ORDER = {"down_blocks": 0, "mid_block": 1, "up_blocks": 2}   # named_modules() gives down, up, mid


@dataclasses.dataclass(frozen=True)
class Site:
    name: str
    module: object
    cross: bool                 # attn2: text cross-attention
    block_kind: str | None      # UNet: "input" | "middle" | "output"
    layer: int | None           # cross-attention sites: position in the model's order
    joint: bool = False         # a joint attention over text and image tokens (its layer counts blocks)


def sites_of(model) -> list[Site]:
    """Every attn1 / attn2 of the model's transformer blocks, in execution order (UNet: down, mid, up);
    on a joint model (JOINT_MODELS) its blocks' joint attentions `attn` instead, in order (Flux: double
    then single blocks, as ComfyUI counts them; SD3.5's attn2 is image self-attention, left alone)."""
    single = {**{n: single_modules for n in SINGLE_MODELS}, **{n: qwen21_modules for n in QWEN21_MODELS},
              **{n: hunyuan15_modules for n in HUNYUAN15_MODELS}, **{n: hidream_modules for n in HIDREAM_MODELS},
              **{n: ernie_modules for n in ERNIE_MODELS}, **{n: krea2_modules for n in KREA2_MODELS},
              **{n: mochi_modules for n in MOCHI_MODELS}, **{n: ideogram4_modules for n in IDEOGRAM4_MODELS},
              **{n: flux3_modules for n in FLUX3_MODELS},
              **{n: minimax_modules for n in MINIMAX_MODELS},
              **{n: hunyuan10_modules for n in HUNYUAN10_MODELS}}
    if type(model).__name__ in single:    # the families whose modules lists its attentions (ERNIE, Krea 2, Mochi, ...)
        return [Site(n, m, False, None, layer, joint=True)
                for layer, (n, m) in enumerate(single[type(model).__name__](model))]
    if type(model).__name__ in MOTIF_MODELS:        # joint attn and text cross_attn, both the block's layer
        return [Site(n, m, False, None, layer, joint=True) for n, m, layer in motif_modules(model)]
    if type(model).__name__ in ANIMATE2_MODELS:       # text cross_attn (image keys a second attention), no attn2
        return [Site(n, m, True, None, layer) for layer, (n, m) in enumerate(animate2_modules(model))]
    if type(model).__name__ in KANDINSKY5_MODELS:     # visual→text cross-attention only (no attn1 / attn2 names)
        return [Site(n, m, True, None, layer) for layer, (n, m) in enumerate(kandinsky5_modules(model))]
    if type(model).__name__ in JOINT_MODELS:
        found = [(n, m) for n, m in model.named_modules() if n.rsplit(".", 1)[-1] == "attn" and hasattr(m, "processor")]
        return [Site(n, m, False, None, layer, joint=True) for layer, (n, m) in enumerate(found)]
    found = [(n, m) for n, m in model.named_modules() if n.rsplit(".", 1)[-1] in ("attn1", "attn2")
             and hasattr(m, "processor") and not n.startswith(UNBENT_BRANCHES)]
    found.sort(key=lambda nm: EXECUTION_ORDER.get(nm[0].split(".")[0], 0))      # stable
    sites, layer = [], 0
    for name, module in found:
        cross = name.endswith("attn2")
        sites.append(Site(name, module, cross, BLOCK_KINDS.get(name.split(".")[0]), layer if cross else None))
        layer += cross
    return sites


class Processor:
    """Stands in for one attention's processor and calls the original object when it has nothing to do.

    Transparent to the host: it takes the original's arguments as they come (Attention passes
    keywords, WanAttention positions), and diffusers' Attention.forward, which hands a processor only
    the cross_attention_kwargs that inspect.signature(processor.__call__) names, sees the original's
    signature (an instance attribute; calling the processor still runs the class's __call__).
    """

    def __init__(self, session, site: Site, original):
        self.session, self.site, self.original = session, site, original
        self.signature = inspect.signature(original)

        def shown(*args, **kwargs):
            return self(*args, **kwargs)

        shown.__signature__ = self.signature
        self.__call__ = shown

    def __call__(self, attn, hidden_states, *args, **kwargs):
        def original():
            return self.original(attn, hidden_states, *args, **kwargs)

        session = self.session
        if session.call is None:              # called outside a model forward
            return original()
        given = self.signature.bind(attn, hidden_states, *args, **kwargs).arguments
        if session.kandinsky5:
            return kandinsky5_attention(session, self.site, attn, given, original)
        if self.site.joint and session.minimax:
            return minimax_attention(session, self.site, attn, given, original)
        if self.site.joint and session.motif:
            return motif_attention(session, self.site, attn, given, original)
        if self.site.joint and session.mochi:
            return mochi_attention(session, self.site, attn, given, original)
        if self.site.joint and session.hidream:
            return hidream_attention(session, self.site, attn, given, original)
        if self.site.joint and session.hunyuan10:
            return hunyuan10_attention(session, self.site, attn, given, original)
        if self.site.joint and session.hunyuan15:
            return hunyuan15_attention(session, self.site, attn, given, original)
        if self.site.joint and session.flux3:
            return flux3_attention(session, self.site, attn, given, original)
        if self.site.joint and session.ideogram4:
            return ideogram4_attention(session, self.site, attn, given, original)
        if self.site.joint and session.ernie:
            return ernie_attention(session, self.site, attn, given, original)
        if self.site.joint and session.krea2:
            return krea2_attention(session, self.site, attn, given, original)
        if self.site.joint and session.qwen21:
            return qwen21_attention(session, self.site, attn, given, original)
        if self.site.joint and session.single:
            return single_attention(session, self.site, attn, given, original)
        if self.site.joint:
            return joint_attention(session, self.site, attn, given, original)
        if session.animate2:
            return animate2_attention(session, self.site, attn, given, original)
        run = cross_attention if self.site.cross else self_attention
        return run(session, self.site, attn, hidden_states, given.get("encoder_hidden_states"),
                   given.get("attention_mask"), original)
