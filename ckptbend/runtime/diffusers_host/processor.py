"""The attention sites of a model, and the processor that stands in for each one's."""

from __future__ import annotations

import dataclasses
import inspect

from .cross import cross_attention
from .families import FAMILIES, family_of
from .joint import JOINT_MODELS, joint_attention
from .unet import self_attention

BLOCK_KINDS = {"down_blocks": "input", "mid_block": "middle", "up_blocks": "output"}   # ComfyUI's names
# Wan VACE's control blocks: their cross-attentions read the control video's tokens, and the hosts run them in
# different orders (diffusers all before the main blocks, ComfyUI each after its main block, outside the block
# replaces), so no one layer numbering fits both: left unbent in both; their hints add into the bent main blocks.
UNBENT_BRANCHES = ("vace_blocks.",)
EXECUTION_ORDER = {"down_blocks": 0, "mid_block": 1, "up_blocks": 2}   # named_modules() gives down, up, mid
# What diffusers' set_attention_backend / enable_parallelism write on every processor that has them: they reach the
# original processor, which keeps serving the unbent calls, and recompute.host_attention reads them for bent ones.
HOST_SETTINGS = ("_attention_backend", "_parallel_config")


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
    then single blocks, as ComfyUI counts them; SD3.5's attn2 is image self-attention, left alone); on a
    family of families.FAMILIES that lists its text attentions, those."""
    family = family_of(model)
    if family is not None and family.sites is not None:    # the families that list their text attentions
        return [Site(name, module, family.cross, None, layer, joint=not family.cross)
                for name, module, layer in family.sites(model)]
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

    def __getattr__(self, name):            # only for what the instance and its class lack
        if name in HOST_SETTINGS:
            return getattr(self.__dict__.get("original"), name)
        raise AttributeError(name)

    def __setattr__(self, name, value):
        if name in HOST_SETTINGS:
            setattr(self.original, name, value)
        else:
            super().__setattr__(name, value)

    def __call__(self, attn, hidden_states, *args, **kwargs):
        def original():
            return self.original(attn, hidden_states, *args, **kwargs)

        session = self.session
        if session.call is None:              # called outside a model forward
            return original()
        given = self.signature.bind(attn, hidden_states, *args, **kwargs).arguments
        family = session.family and FAMILIES[session.family]
        if family and family.attention is not None:
            return family.attention(session, self.site, attn, given, original)
        if self.site.joint:
            return joint_attention(session, self.site, attn, given, original)
        run = cross_attention if self.site.cross else self_attention
        return run(session, self.site, attn, hidden_states, given.get("encoder_hidden_states"),
                   given.get("attention_mask"), original)
