"""Lumina 2 (Lumina-Image 2.0) and Z-Image (base, turbo; Omni): one NextDiT backbone, as data.

Blocks, in the order the model runs them (labels, section):
- `noise_refiner.{i}`: a self-attention over the image tokens alone, timestep-modulated → N{i:02d}, `[dit.self]`
- `context_refiner.{i}`: a self-attention over the caption tokens alone → C{i:02d}, `[dit.self]`
- `siglip_refiner.{i}` (Z-Image Omni): over the SigLIP reference-image tokens alone → R{i:02d}, `[dit.self]`
- `layers.{i}`: one weight set for the joined [caption; image] sequence → B{i:02d}, `[dit.joint]`
  (no streams: like Flux's single blocks, both token groups share every projection)

Attention names: original / ComfyUI `attention.qkv` (rows q | k | v; q has n_heads·hd rows, k and v
n_kv_heads·hd each: Lumina 2 24 and 8 heads of 96, Z-Image 30 and 30 of 128), `attention.q_norm` /
`k_norm` (RMSNorm per head, one weight [hd] for every head), `attention.out` (no bias); diffusers names
`attention.{to_q,to_k,to_v,to_out.0,norm_q,norm_k}` (Z-Image) and `attn.…` (Lumina 2).

What a factor scales: q/k the norm weights (scaling the projection is cancelled by the norm). v and out
scale `qkv`'s v rows and `out`, as everywhere, but they cannot act: every attention's output passes
through an RMSNorm (`attention_norm2`) before its gated residual, and `out` has no bias, so a factor
on v or out is divided away again (only the norm's eps keeps a trace, ~1e-5 relative). A bake of
v or out is the literal scaling and warns that it has no effect.

Files: original names bare or under `model.diffusion_model.` (ComfyUI's all-in-one files add their text
encoder, Qwen3-4B / Gemma-2-2B, under `text_encoders.`, left to the text-encoder tables), diffusers names
in one file, diffusers folders. A NextDiT with parts this table does not know (NewBie's CLIP pooling,
Z-Image's pixel-space decoder, Ming-Image) is refused by name, never baked as Lumina 2 or Z-Image.
"""

from __future__ import annotations

import re

from ..errors import CkptbendError
from .sd3 import dit_names, file_components, model_names
from .types import CheckpointFile, Identified, Site
from .validate import shape_in, weight_of

COMPONENTS = ("dit",)

# ComfyUI's detection keys (original names), and diffusers' own for each class.
ORIGINAL_MARKS = ("cap_embedder.1.weight", "noise_refiner.0.attention.k_norm.weight")
ZIMAGE_DIFFUSERS_MARKS = ("cap_embedder.1.weight", "noise_refiner.0.attention.norm_k.weight")
LUMINA2_DIFFUSERS_MARKS = ("time_caption_embed.caption_embedder.1.weight", "noise_refiner.0.attn.norm_k.weight")
# Z-Image's modulation is one Linear (`adaLN_modulation.0`), Lumina 2's SiLU + Linear (`adaLN_modulation.1`).
ZIMAGE_MODULATION = "layers.0.adaLN_modulation.0.weight"
LUMINA2_MODULATION = "layers.0.adaLN_modulation.1.weight"
ZIMAGE_PAD_TOKEN = "cap_pad_token"          # Z-Image's learned padding; Ming-Image (same modulation) has none

# Every top-level part of the three namings; any other part is a model this table does not describe.
KNOWN_PARTS = {"x_embedder", "final_layer", "cap_embedder", "t_embedder", "noise_refiner", "context_refiner",
               "layers", "x_pad_token", "cap_pad_token", "norm_final", "siglip_embedder", "siglip_refiner",
               "siglip_pad_token", "all_x_embedder", "all_final_layer", "time_caption_embed", "norm_out",
               "scaled_fp8"}   # ComfyUI's scaled-fp8 marker

ATTENTION = re.compile(r"^(?P<kind>noise_refiner|context_refiner|siglip_refiner|layers)\.(?P<i>\d+)\.(?:attention|attn)\."
                       r"(?P<t>q_norm|k_norm|norm_q|norm_k|qkv|to_v|out|to_out\.0)\.(?P<wb>weight|bias)$")
PROJ = {"q_norm": "q", "norm_q": "q", "k_norm": "k", "norm_k": "k", "qkv": "v", "to_v": "v", "out": "out",
        "to_out.0": "out"}
# block kind → (label letter, attention, token stream it sees, group)
KINDS = {"noise_refiner": ("N", "self", "image", "refiner"), "context_refiner": ("C", "self", "text", "refiner"),
         "siglip_refiner": ("R", "self", "image", "refiner"), "layers": ("B", "joint", None, None)}
OUTPUT_NORMED = ("every NextDiT attention output passes through an RMSNorm (attention_norm2) and its output "
                 "projection has no bias, so the factor is divided away again")

ARCHITECTURES = ("z-image", "z-image-omni", "lumina2")
ARCHITECTURE_NAMES = {name: (name,) for name in ARCHITECTURES}
FOLDER_CLASSES = {"ZImageTransformer2DModel": "z-image", "Lumina2Transformer2DModel": "lumina2"}
DIFFUSERS_PIPELINES = {}   # their folders are read sub-folder by sub-folder (text encoders by their config)


def _is_nextdit(names: set[str]) -> bool:
    return any(all(m in names for m in marks) for marks in (ORIGINAL_MARKS, ZIMAGE_DIFFUSERS_MARKS,
                                                           LUMINA2_DIFFUSERS_MARKS))


def variant(names: set[str], where) -> str:
    """z-image, z-image-omni or lumina2; a NextDiT with parts of another model is refused in one line."""
    unknown = sorted({n.split(".", 1)[0] for n in names} - KNOWN_PARTS)
    if unknown:
        raise CkptbendError(f"{where}: a Lumina 2 / Z-Image (NextDiT) transformer with parts ckptbend does not know "
                            f"({', '.join(p + '.*' for p in unknown)}); refusing rather than baking it as one of them")
    if all(m in names for m in LUMINA2_DIFFUSERS_MARKS) or LUMINA2_MODULATION in names:
        return "lumina2"
    if ZIMAGE_MODULATION not in names:
        raise CkptbendError(f"{where}: a NextDiT whose modulation is neither Lumina 2's nor Z-Image's; refusing")
    if ZIMAGE_PAD_TOKEN not in names:
        raise CkptbendError(f"{where}: a NextDiT with Z-Image's modulation but without its learned padding "
                            f"({ZIMAGE_PAD_TOKEN}): Ming-Image or another variant ckptbend does not know; refusing")
    return "z-image-omni" if any(n.startswith("siglip_refiner.") for n in names) else "z-image"


def identify(header) -> Identified | None:
    components = file_components(header.names, lambda rest: rest.split(".", 1)[0] in KNOWN_PARTS)
    names = dit_names(components)
    if not _is_nextdit(names):
        return None
    arch = variant(names, header.path.name)
    return Identified.model_file(arch, components)


def _v_rows(files, cf: CheckpointFile, key: str) -> tuple[tuple[int, int], int]:
    """The v rows of a fused `qkv` [(H + 2K)·hd, H·hd] and the length it must have: hd is the block's
    q_norm length, H the input width over hd, K what the rows leave for k and v. A shape that does not fit
    gives a range or a length that validate refuses."""
    qkv = shape_in(files, cf.rel, weight_of(key))
    norm = shape_in(files, cf.rel, key[:key.rindex(".qkv.")] + ".q_norm.weight")
    if qkv is None or len(qkv) != 2 or norm is None or len(norm) != 1 or not norm[0]:
        return (0, 0), 0
    hd = norm[0]
    heads, kv = qkv[1] // hd, (qkv[0] // hd - qkv[1] // hd) // 2
    return ((heads + kv) * hd, (heads + 2 * kv) * hd), (heads + 2 * kv) * hd


def sites(cf: CheckpointFile, files) -> list[Site]:
    names = model_names(files)
    if not _is_nextdit(names):
        return []
    found = []
    for t in cf.header.tensors:
        if cf.components.get(t.name) != "dit":
            continue
        bare = t.name.removeprefix("model.diffusion_model.")
        if not (m := ATTENTION.match(bare)):
            continue
        letter, attn, stream, group = KINDS[m["kind"]]
        proj = PROJ[m["t"]]
        rows, fused = _v_rows(files, cf, t.name) if m["t"] == "qkv" else (None, None)
        found.append(Site(cf.rel, t.name, "dit", attn, proj, rows=rows, group=group,
                          block=f"{letter}{int(m['i']):02d}", stream=stream, fused=fused,
                          inert=OUTPUT_NORMED if proj in ("v", "out") else None))
    return found


def folder_architecture(model_class: str, present: set[str], config: dict | None = None) -> str | None:
    name = FOLDER_CLASSES.get(model_class)
    return "z-image-omni" if name == "z-image" and (config or {}).get("siglip_feat_dim") else name


def has_qk_norm(files) -> bool:
    return False   # no unet.* sites: [dit.*] q/k factors scale the qk-norm weights themselves
