"""Flux.3 klein (`Flux3Transformer2DModel`; base and step-distilled), as data.

Flux.3 replaces Flux.2's double blocks by *per-mode* blocks (diffusers' transformer_flux3.py): each token mode —
the generated image, the reference images (`image_cond`), the text — runs its own stack of parallel blocks whose
self-attention stays inside that mode; then the joint single blocks attend over [text; image; reference] with
one weight set. Every attention keeps q, k, v and the output projection apart (no fusion, no biases) and
normalises q and k per head with an RMSNorm (one weight [head_dim] shared by the heads, run in float32).

Sections and labels: the per-mode blocks are `[dit.self]`, block `D{i}` holding one attention per mode, as
streams `image`, `reference` (image_cond) and `text` (group `double`: they sit where Flux.1/2's double blocks
do); the single blocks are `[dit.joint]`, `S{i}`, no stream (one weight set for every token). What each factor
scales (dit-layouts.md §11, proved in tests/test_dit_flux3.py): q / k the qk-norm weight, v `v_proj`, out
`attn_out` (the attention's own output projection: the parallel MLP is added after it).

Names: BFL's (`content_mode_blocks.{image,image_cond}.N.`, `txt_mode_blocks.N.`, `single_blocks.N.` +
`q_proj`, `k_proj`, `v_proj`, `attn_out`, `norm.query_norm.scale`, `norm.key_norm.scale`; bare or under
`model.diffusion_model.`) and diffusers' (`mode_blocks.{mode}.N.attn.`, `txt_mode_blocks.N.attn.`,
`single_transformer_blocks.N.attn.` + `to_q`, `to_k`, `to_v`, `to_out.0`, `norm_q`, `norm_k`), as diffusers'
`convert_flux3_transformer_checkpoint_to_diffusers` maps them. The step-distilled (flow-map) model has a second
timestep embedder (`ref_time_in` / `target_timestep_embedder`). A file whose per-mode blocks name a mode
ckptbend does not know (video, action, `late_*` blocks) is refused rather than half baked.
"""

from __future__ import annotations

import re

from ..errors import CkptbendError
from .dit_files import dit_tensor_names, find_model, identified_under, scan
from .types import CheckpointFile, Identified, Site

COMPONENTS = ("dit",)
MODES = {"image": "image", "image_cond": "reference"}     # content mode → stream; the text mode is "text"
_ROLE = r"(?P<role>norm\.query_norm\.scale|norm\.key_norm\.scale|v_proj\.weight|attn_out\.weight)"
_DROLE = r"attn\.(?P<role>norm_q\.weight|norm_k\.weight|to_v\.weight|to_out\.0\.weight)"
PATTERNS = {   # naming → block pattern; `mode` absent: the text mode (txt_mode_blocks) or a single block
    "bfl": re.compile(r"(?:content_mode_blocks\.(?P<mode>\w+?)|(?P<kind>txt_mode|single)_blocks)\.(?P<i>\d+)\." + _ROLE + "$"),
    "diffusers": re.compile(r"(?:mode_blocks\.(?P<mode>\w+?)|(?P<kind>txt_mode|single_transformer)_blocks)\.(?P<i>\d+)\."
                            + _DROLE + "$"),
}
PROJ = {"norm.query_norm.scale": "q", "norm.key_norm.scale": "k", "v_proj.weight": "v", "attn_out.weight": "out",
        "norm_q.weight": "q", "norm_k.weight": "k", "to_v.weight": "v", "to_out.0.weight": "out"}
# naming → (detection key, flow-map key, width key), after the model prefix
MARKS = {"bfl": ("early_stream_modulations.image.lin.weight", "ref_time_in.in_layer.weight", "emb_in.image.weight"),
         "diffusers": ("early_stream_modulations.image.linear.weight", "target_timestep_embedder.linear_1.weight",
                       "x_embedders.image.weight")}
UNKNOWN = re.compile(r"(?:^|\.)(?:late_\w+|(?:content_)?mode_blocks\.(?!(?:image|image_cond)\.)\w+?\.\d+)\.")
REFUSED = "{path}: {key} is a Flux.3 part ckptbend does not know (only the image, reference and text modes); refusing"
KLEIN_WIDTH = 3072
VARIANTS = ("flux3-klein", "flux3-klein-base", "flux3", "flux3-base")
ARCHITECTURE_NAMES = {"flux3": VARIANTS, **{name: (name,) for name in VARIANTS[:2]}, "flux3-base": ("flux3-base",)}
TRANSFORMER_CLASS = "Flux3Transformer2DModel"
DIFFUSERS_PIPELINES = {}


def architecture(width: int, flow_map: bool) -> str:
    """flux3-klein (step-distilled) / flux3-klein-base at klein's width; flux3 / flux3-base at other widths."""
    return ("flux3-klein" if width == KLEIN_WIDTH else "flux3") + ("" if flow_map else "-base")


def _found(names) -> tuple[str, str] | None:
    return find_model(names, {naming: marks[0] for naming, marks in MARKS.items()})


def _refuse_unknown_parts(path, names, prefix: str) -> None:
    for n in sorted(names):   # the first in name order: the same message every time
        if n.startswith(prefix) and UNKNOWN.search(n[len(prefix):]):
            raise CkptbendError(REFUSED.format(path=path, key=n))


def identify(header) -> Identified | None:
    names = set(header.names)
    found = _found(names)
    if found is None:
        return None
    naming, prefix = found
    _refuse_unknown_parts(header.path, names, prefix)
    _, flow_key, width_key = MARKS[naming]
    width = header.tensor(prefix + width_key).shape[0] if prefix + width_key in names else 0
    return identified_under(header, prefix, architecture(width, prefix + flow_key in names))


def sites(cf: CheckpointFile, files) -> list[Site]:
    names = dit_tensor_names(files)
    found = _found(names)
    if found is None:
        return []
    naming, prefix = found
    _refuse_unknown_parts(cf.rel, names, prefix)
    out = []
    for t, m in scan(cf, prefix, PATTERNS[naming]):
        single = m["kind"] is not None and m["kind"].startswith("single")
        stream = None if single else MODES.get(m["mode"], m["mode"]) if m["mode"] else "text"
        out.append(Site(cf.rel, t.name, "dit", "joint" if single else "self", PROJ[m["role"]],
                        group="single" if single else "double", block=f"{'S' if single else 'D'}{int(m['i']):02d}",
                        stream=stream))
    return out


def folder_architecture(model_class: str, present: set[str], config: dict | None = None) -> str | None:
    if model_class != TRANSFORMER_CLASS:
        return None
    config = config or {}
    width = config.get("num_attention_heads", 24) * config.get("attention_head_dim", 128)
    return architecture(width, bool(config.get("flow_map", False)))


def has_qk_norm(files) -> bool:
    return False   # no UNet-node sites: q/k factors scale the qk-norm weights themselves
