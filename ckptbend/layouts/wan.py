"""Wan 2.1 / 2.2 (T2V, I2V, FLF2V, TI2V-5B; the 2.2 A14B experts by their layout), as data: the file
forms, the architecture names, and where each q/k/v/out factor lands (dit-layouts.md §4, §11).

Both attentions of a Wan block normalise q and k with an RMSNorm over the whole projected vector, so
q/k factors scale `norm_q` / `norm_k` (never the projection rows, which the norm cancels); v scales the
v projection, out the output projection (weight and bias). I2V's cross-attention also attends to CLIP
image tokens through `k_img` / `v_img` / `norm_k_img`; its result joins the text result before `o`.

Wan 2.2's extras: VACE adds `vace_blocks` (Wan blocks over the control video: self-attention, and
cross-attention to the same text) whose outputs are added to main blocks as hints: their attentions are
`[dit.self]` / `[dit.cross]` like the main blocks', labelled V00… (group `vace`). Animate 2's original file
wraps each block in `blocks.N.block.`; its blocks are Wan blocks (self-attention also over cached reference
tokens, projected by the same weights). Fun Control's `ref_conv` and the camera models' `control_adapter`
only embed an extra input (no attention); SkyReels V2's `fps_embedding` / `fps_projection` (diffusion-forcing
models) only add to the timestep modulation and name the file `skyreels-v2-…`. A SkyReels V2 file without them and a
ChronoEdit file have exactly Wan 2.1's keys and blocks (ChronoEdit changes only RoPE, a config value): their single
files are named by that layout, their diffusers folders by class. Any other part (S2V's audio blocks, HuMo,
Animate 1's face adapter, SCAIL, …) is refused in one line, never baked as plain Wan with that part left alone.

File forms: original (Wan-AI / ComfyUI) names, bare or under `model.diffusion_model.`; ComfyUI
all-in-one files (`text_encoders.umt5xxl.transformer.…`, `vae.…`); diffusers names in one file; diffusers
folders (`transformer/`, `transformer_2/` for the 2.2 A14B pair, `text_encoder/`).
"""

from __future__ import annotations

import re

from ..errors import CkptbendError
from .text_encoders import all_in_one_component
from .types import CheckpointFile, Identified, Site

COMPONENTS = ("dit",)
MODEL_PREFIX = "model.diffusion_model."
ORIGINAL_KEY = "head.modulation"                                    # ComfyUI's and diffusers' detection key
DIFFUSERS_KEY = "condition_embedder.time_embedder.linear_1.weight"
# The stand-alone scaled-fp8 marker and VAE prefix of ComfyUI all-in-one files.
VAE_PREFIX = "vae."

# Block (main or VACE's; Animate 2's original `block.` wrapper), index, attention, and the tensor's role, in
# original and diffusers names (Animate 2's diffusers file keeps `self_attn` / `cross_attn` around `to_v`).
ATTENTION = re.compile(r"(?:^|\.)(?P<vace>vace_)?blocks\.(?P<i>\d+)\.(?:block\.)?"
                       r"(?P<attn>self_attn|cross_attn|attn1|attn2)\."
                       r"(?P<t>norm_q\.weight|norm_k\.weight|norm_k_img\.weight|norm_added_k\.weight|"
                       r"(?:v|o|v_img|to_v|to_out\.0|add_v_proj)\.(?:weight|bias))$")
ATTN = {"self_attn": "self", "cross_attn": "cross", "attn1": "self", "attn2": "cross"}
PROJ = {"norm_q": "q", "norm_k": "k", "norm_k_img": "k", "norm_added_k": "k", "v": "v", "v_img": "v",
        "to_v": "v", "add_v_proj": "v", "o": "out", "to_out.0": "out"}

# What a Wan file may hold: top-level modules, what a (VACE) block holds, what an attention holds.
TOP = ("patch_embedding", "text_embedding", "time_embedding", "time_projection", "blocks", "head", "img_emb",
       "condition_embedder", "proj_out", "scale_shift_table", "norm_out", "vace_patch_embedding", "vace_blocks",
       "ref_conv", "control_adapter", "fps_embedding", "fps_projection", "scaled_fp8")
_BLOCK_PARTS = ("self_attn", "cross_attn", "attn1", "attn2", "norm1", "norm2", "norm3", "ffn", "modulation",
                "scale_shift_table", "block", "before_proj", "after_proj", "proj_in", "proj_out")
_ATTENTION_PARTS = ("q", "k", "v", "o", "norm_q", "norm_k", "k_img", "v_img", "norm_k_img", "to_q", "to_k", "to_v",
                    "to_out", "add_k_proj", "add_v_proj", "norm_added_k")
BLOCKS = {"blocks": _BLOCK_PARTS, "vace_blocks": _BLOCK_PARTS}
# Wan models with parts ckptbend does not bake yet (ComfyUI's detection keys), named in the refusal.
NOT_YET = {"casual_audio_encoder": "Wan S2V", "audio_injector": "Wan S2V", "audio_proj": "Wan HuMo",
           "face_adapter": "Wan-Animate", "motion_encoder": "Wan-Animate", "patch_embedding_pose": "Wan SCAIL",
           "patch_embedding_mask": "Wan SCAIL 2", "patch_embedding_global": "WanDancer"}
ATTENTION_PARTS = {a: _ATTENTION_PARTS for a in ("self_attn", "cross_attn", "attn1", "attn2")}
# The extras ckptbend bakes, by their detection key after the prefix (ComfyUI's keys; Animate 2: its wrapper).
EXTRAS = (("vace_patch_embedding.weight", "wan-vace"), ("blocks.0.block.self_attn.q.weight", "wan-animate2"),
          ("blocks.0.self_attn.to_q.weight", "wan-animate2"), ("ref_conv.weight", "wan22-fun-control"),
          ("control_adapter.conv.weight", "wan-camera"), ("fps_embedding.weight", "skyreels-v2"))

# Widths of the released sizes; the name keeps only the variant for other widths (tiny test files).
SIZES = {1536: "1.3b", 3072: "5b", 5120: "14b"}
VARIANTS = ("wan21-t2v", "wan21-i2v", "wan21-flf2v", "wan22-ti2v", "wan22-i2v", *dict.fromkeys(n for _, n in EXTRAS),
            "chronoedit")
DIFFUSERS_PIPELINES = {
    "WanPipeline": {"transformer": "dit", "transformer_2": "dit", "text_encoder": "umt5xxl"},
    "WanImageToVideoPipeline": {"transformer": "dit", "transformer_2": "dit", "text_encoder": "umt5xxl"},
    "WanVACEPipeline": {"transformer": "dit", "transformer_2": "dit", "text_encoder": "umt5xxl"},
}
TRANSFORMER_CLASS = "WanTransformer3DModel"
# SkyReels V2 and ChronoEdit are Wan blocks (the same attention processor and keys); diffusers names them by class.
EXTRA_CLASSES = {"WanVACETransformer3DModel": "wan-vace", "WanAnimate2Transformer3DModel": "wan-animate2",
                 "SkyReelsV2Transformer3DModel": "skyreels-v2", "ChronoEditTransformer3DModel": "chronoedit"}


def architecture(width: int, in_channels: int, out_channels: int, image: bool, first_last: bool,
                 extra: str | None = None) -> str:
    """wan21-t2v-1.3b, wan21-t2v-14b, wan21-i2v-14b, wan21-flf2v-14b, wan22-ti2v-5b, wan22-i2v-a14b.
    A Wan 2.2 A14B T2V expert has Wan 2.1 T2V-14B's layout and is named by it; the 2.2 I2V expert is
    the only 14B layout with 36 input channels and no image embedder."""
    size = SIZES.get(width)
    if extra:
        name = extra
    elif out_channels == 48:
        name = "wan22-ti2v"
    elif image:
        name = "wan21-flf2v" if first_last else "wan21-i2v"
    elif in_channels == 36:
        name, size = "wan22-i2v", ("a14b" if size == "14b" else size)
    else:
        name = "wan21-t2v"
    return f"{name}-{size}" if size else name


def _sized(variant: str) -> tuple[str, ...]:
    sizes = [("a14b" if s == "14b" and variant == "wan22-i2v" else s) for s in SIZES.values()]
    return tuple(f"{variant}-{s}" for s in sizes)


# recipe `architecture` name → the detected architectures it covers: a sized name itself; a variant's name
# every size of it (the blocks are the same kind, B00 the first at every size).
ARCHITECTURE_NAMES = {**{v: (v, *_sized(v)) for v in VARIANTS}, **{n: (n,) for v in VARIANTS for n in _sized(v)}}


def _arch_of(header, prefix: str, diffusers: bool) -> str:
    def shape(key):
        return header.tensor(prefix + key).shape if prefix + key in header.names else ()
    patch, head = shape("patch_embedding.weight"), shape("proj_out.weight" if diffusers else "head.head.weight")
    image_key = "condition_embedder.image_embedder.norm1.weight" if diffusers else "img_emb.proj.0.weight"
    # FLF2V's learned image-token positions (Wan-AI / ComfyUI `img_emb.emb_pos`; not in dit-layouts.md: unverified)
    pos_key = "condition_embedder.image_embedder.pos_embed" if diffusers else "img_emb.emb_pos"
    names = set(header.names)
    extra = next((name for key, name in EXTRAS if prefix + key in names), None)
    if extra == "wan-animate2":   # its diffusers file keeps the original head and embedders
        patch, head = shape("patch_embedding.weight"), shape("head.head.weight")
    return architecture(patch[0] if patch else 0, patch[1] if len(patch) > 1 else 0,
                        head[0] // 4 if head else 0, prefix + image_key in names, prefix + pos_key in names, extra)


def model_prefix(names, keys) -> tuple[str, str] | None:
    """(prefix, detection key) when one of `keys` is present bare or under `model.diffusion_model.`."""
    for key in keys:
        for prefix in ("", MODEL_PREFIX):
            if prefix + key in names:
                return prefix, key
    return None


def components_of(names, prefix: str) -> dict[str, str]:
    """key → component of a DiT single file: the model under `prefix` (everything else when bare),
    ComfyUI's all-in-one text encoders and VAE beside it."""
    out = {}
    for n in names:
        if c := all_in_one_component(n):
            out[n] = c
        elif n.startswith(VAE_PREFIX):
            out[n] = "vae"
        elif n.startswith(prefix):
            out[n] = "dit"
    return out


def refuse_unknown_modules(header, prefix: str, name: str, blocks: dict, parts: dict, top: tuple = (),
                           known_as: dict | None = None) -> None:
    """Refuse, in one line, a model file with a part its family does not know, rather than take it for the known
    model and leave that part silently alone: `top` the model's top-level modules (empty: any), `blocks`
    container → the modules a block `container.N.` may hold, `parts` module → its sub-modules; `known_as`
    top-level module → the model it marks, for the message."""
    for n in header.names:
        if not n.startswith(prefix) or all_in_one_component(n) or n.startswith(VAE_PREFIX):
            continue
        path = n[len(prefix):].split(".")
        unknown = top and path[0] not in top
        if path[0] in blocks and len(path) > 2 and path[1].isdigit():
            module = path[2]
            unknown = module not in blocks[path[0]] or (
                module in parts and len(path) > 3 and path[3] not in parts[module])
        if unknown:
            what = (known_as or {}).get(path[0], name)
            raise CkptbendError(f"{header.path}: {what} with a part ckptbend does not know ({n}); refusing rather "
                                f"than bake it as {name} and leave that part alone")


def identified(header, prefix: str, arch: str) -> Identified:
    components = components_of(header.names, prefix)
    return Identified.model_file(arch, components)


def identify(header) -> Identified | None:
    found = model_prefix(set(header.names), (ORIGINAL_KEY, DIFFUSERS_KEY))
    if found is None:
        return None
    prefix, key = found
    refuse_unknown_modules(header, prefix, "Wan", BLOCKS, ATTENTION_PARTS, TOP, NOT_YET)
    return identified(header, prefix, _arch_of(header, prefix, key == DIFFUSERS_KEY))


def is_family(files, keys) -> bool:
    """Whether the checkpoint's model carries one of the family's detection keys (in any file or shard):
    every family is asked about every file, and these patterns would match other DiTs' names too."""
    return any(n.endswith(keys) for f in files for n, c in f.components.items() if c == "dit")


def sites(cf: CheckpointFile, files) -> list[Site]:
    if not is_family(files, (ORIGINAL_KEY, DIFFUSERS_KEY)):
        return []
    found = []
    for t in cf.header.tensors:
        if cf.components.get(t.name) != "dit" or not (m := ATTENTION.search(t.name)):
            continue
        role, vace = m["t"].rsplit(".", 1)[0], bool(m["vace"])
        found.append(Site(cf.rel, t.name, "dit", ATTN[m["attn"]], PROJ[role], group="vace" if vace else None,
                          block=f"{'V' if vace else 'B'}{int(m['i']):02d}"))
    return found


def folder_architecture(model_class: str, present: set[str], config: dict | None = None) -> str | None:
    if model_class != TRANSFORMER_CLASS and model_class not in EXTRA_CLASSES:
        return None
    config = config or {}
    width = config.get("num_attention_heads", 0) * config.get("attention_head_dim", 0) or config.get("dim", 0)
    return architecture(width, config.get("in_channels", 0), config.get("out_channels", 0),
                        config.get("image_dim") is not None, config.get("pos_embed_seq_len") is not None,
                        EXTRA_CLASSES.get(model_class))


def has_qk_norm(files) -> bool:
    return False   # Wan has no UNet-node sites: ComfyUI's nodes match nothing here (dit-layouts.md §0)
