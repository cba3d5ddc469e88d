"""AuraFlow (`AuraFlowTransformer2DModel`; ComfyUI `AuraFlow`), as data.

An MMDiT: `double_layers.{i}` (diffusers `joint_transformer_blocks.{i}`) project the image tokens (`attn.w2q/w2k/w2v/
w2o`, diffusers `to_q/to_k/to_v/to_out.0`) and the text tokens (`attn.w1q/…/w1o`, diffusers `add_q_proj/…/to_add_out`)
with their own weights and attend over both → `[dit.joint]` with streams image / text, labels D{i:02d}; then
`single_layers.{i}` (`single_transformer_blocks.{i}`, `attn.w1q/…/w1o`) serve the joined sequence with one weight set
→ `[dit.joint]` without stream, S{i:02d}. No projection has a bias.

v scales the v projection, out the output projection. q and k pass through a LayerNorm per head *without* weight or
bias (diffusers' `fp32_layer_norm`), so no tensor can carry a q or k factor: the bake scales the q / k projection
literally and warns that the norm divides it away (only its eps keeps a trace).

Names: the original / ComfyUI file bare, under `model.` (the prefix ComfyUI falls back to, and fal's all-in-one
file's) or `model.diffusion_model.`; diffusers names in one file; diffusers folders — as diffusers'
`convert_auraflow_transformer_checkpoint_to_diffusers` maps them.
"""

from __future__ import annotations

import re

from .dit_files import dit_tensor_names, identify_prefixed, scan
from .types import CheckpointFile, Identified, Site

COMPONENTS = ("dit",)
NAME = "AuraFlow"
PREFIXES = ("", "model.diffusion_model.", "model.")
MARKS = (("double_layers.0.attn.w1q.weight", "cond_seq_linear.weight"),                   # ComfyUI's / diffusers' sniffer
         ("joint_transformer_blocks.0.attn.add_q_proj.weight", "register_tokens"))
ATTENTION = re.compile(r"^(?P<kind>double_layers|single_layers|joint_transformer_blocks|single_transformer_blocks)\."
                       r"(?P<i>\d+)\.attn\.(?P<t>w[12][qkvo]|to_q|to_k|to_v|to_out\.0|add_[qkv]_proj|to_add_out)\.weight$")
# module → (stream in a double block, projection)
MODULES = {"w2q": ("image", "q"), "w2k": ("image", "k"), "w2v": ("image", "v"), "w2o": ("image", "out"),
           "w1q": ("text", "q"), "w1k": ("text", "k"), "w1v": ("text", "v"), "w1o": ("text", "out"),
           "to_q": ("image", "q"), "to_k": ("image", "k"), "to_v": ("image", "v"), "to_out.0": ("image", "out"),
           "add_q_proj": ("text", "q"), "add_k_proj": ("text", "k"), "add_v_proj": ("text", "v"),
           "to_add_out": ("text", "out")}
DOUBLE = ("double_layers", "joint_transformer_blocks")
_BLOCK = ("attn", "mlpX", "mlpC", "modX", "modC", "mlp", "modCX", "ff", "ff_context", "norm1", "norm1_context")
BLOCKS = {kind: _BLOCK for kind in (*DOUBLE, "single_layers", "single_transformer_blocks")}
PARTS = {"attn": (*MODULES, "to_out")}
NORM_WITHOUT_WEIGHT = ("AuraFlow normalises q and k with a LayerNorm that has no weight, so the factor on the "
                       "projection is divided away again")
ARCHITECTURE = "auraflow"
ARCHITECTURE_NAMES = {ARCHITECTURE: (ARCHITECTURE,)}
DIFFUSERS_PIPELINES: dict = {}   # AuraFlowPipeline folders are read sub-folder by sub-folder
TRANSFORMER_CLASS = "AuraFlowTransformer2DModel"


def _found(names) -> str | None:
    """The model prefix of an AuraFlow model in `names`, or None."""
    return next((p for p in PREFIXES for marks in MARKS if all(p + m in names for m in marks)), None)


def identify(header) -> Identified | None:
    return identify_prefixed(header, _found, NAME, BLOCKS, PARTS, ARCHITECTURE)


def sites(cf: CheckpointFile, files) -> list[Site]:
    found = []
    for t, m in scan(cf, _found(dit_tensor_names(files)), ATTENTION):
        stream, proj = MODULES[m["t"]]
        double = m["kind"] in DOUBLE
        found.append(Site(cf.rel, t.name, "dit", "joint", proj, group="double" if double else "single",
                          block=f"{'D' if double else 'S'}{int(m['i']):02d}", stream=stream if double else None,
                          inert=NORM_WITHOUT_WEIGHT if proj in ("q", "k") else None))
    return found


def folder_architecture(model_class: str, present: set[str], config: dict | None = None) -> str | None:
    return ARCHITECTURE if model_class == TRANSFORMER_CLASS else None


def has_qk_norm(files) -> bool:
    return False   # its q/k norms have no weight: q/k factors are literal (and warn)
