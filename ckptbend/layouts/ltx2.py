"""LTX-2 / 2.3 / 2.5 (Lightricks' audio-video DiT; diffusers `LTX2VideoTransformer3DModel`, ComfyUI `LTXAVModel`),
as data: file forms, architecture names, and where each factor lands.

Every block `transformer_blocks.{i}` carries two token streams, video (h 4096 = 32 × 128 at full size) and audio
(2048 = 32 × 64), and six attentions. Each normalises q and k with an RMSNorm over the whole projected vector
(all heads together, right after the projection, before RoPE), so q/k scale `q_norm` / `k_norm` (diffusers
`norm_q` / `norm_k`; scaling `to_q` / `to_k` would be cancelled); v scales `to_v` and out `to_out.0`, weight and
bias. LTX-2.3/2.5's per-head gate (`to_gate_logits`, 2·sigmoid of the block input) multiplies the attention
output before `to_out`: a v or out factor passes through it unchanged. Which section and stream each is:

=====================  ================  =====================================================================
module                 section           stream (the tokens the tensor projects)
=====================  ================  =====================================================================
`attn1`                `[dit.self]`      video
`audio_attn1`          `[dit.self]`      audio
`attn2`                `[dit.cross]`     video (its queries; keys and values are the text, Gemma 3 features)
`audio_attn2`          `[dit.cross]`     audio (likewise)
`audio_to_video_attn`  `[dit.joint]`     q, out: video (video queries, written to video); k, v: audio
`video_to_audio_attn`  `[dit.joint]`     q, out: audio; k, v: video
=====================  ================  =====================================================================

`[dit.joint]` is the audio↔video exchange, read as joint attention is read elsewhere: `stream = "video"` scales
what the video tokens contribute (their queries in a2v, their keys and values in v2a, a2v's output into the
video), `stream = "audio"` the same for the audio tokens. ComfyUI's UNet attention-multiply nodes match key
suffixes, so on LTX-2 they scale `attn1` *and* `audio_attn1` (`…attn1.to_q`), `attn2` and `audio_attn2`:
those are the `[unet.*]` sites here, literal as for LTX-Video (their q/k are cancelled by the qk-norm).
The text connectors inside the model file (`video_embeddings_connector`, `audio_embeddings_connector`: small
transformers over the text features, like HunyuanVideo's token refiner) are left alone.

Variants by their keys (diffusers' config docs; real headers not read): LTX-2 (19B) neither gates nor modulates
the prompt; LTX-2.3 (22B) adds per-head gates, `prompt_scale_shift_table` and `prompt_adaln_single`; LTX-2.5
keeps the static prompt table without `prompt_adaln_single` (or drops the video feed-forward biases).

File forms: original / ComfyUI names bare or under `model.diffusion_model.` (released files also hold `vae.`,
`audio_vae.`, `vocoder.`, copied unchanged); diffusers names in one file; diffusers folders (`transformer/`;
the Gemma 3 / Gemma 4 `text_encoder/` is text_encoders.py's, `connectors/` a sub-folder ckptbend leaves alone).
"""

from __future__ import annotations

import re

from .dit_files import dit_tensor_names, scan
from .types import CheckpointFile, Identified, Site
from .wan import identified, model_prefix, refuse_unknown_modules

COMPONENTS = ("dit", "unet")
ORIGINAL_KEY = "audio_adaln_single.linear.weight"     # ComfyUI's LTXAV detection key
DIFFUSERS_KEY = "audio_time_embed.linear.weight"
NAME = "LTX-2"

# block module → (section, stream of q/out, stream of k/v)
MODULES = {
    "attn1": ("self", "video", "video"), "audio_attn1": ("self", "audio", "audio"),
    "attn2": ("cross", "video", "video"), "audio_attn2": ("cross", "audio", "audio"),
    "audio_to_video_attn": ("joint", "video", "audio"), "video_to_audio_attn": ("joint", "audio", "video"),
}
ROLES = {"q_norm": "q", "norm_q": "q", "k_norm": "k", "norm_k": "k", "to_v": "v", "to_out.0": "out"}
NODE_ROLES = {"to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "out"}   # what ComfyUI's UNet nodes match
ATTENTION = re.compile(r"^transformer_blocks\.(?P<i>\d+)\.(?P<m>" + "|".join(MODULES) + r")\."
                       r"(?P<t>q_norm|k_norm|norm_q|norm_k|to_q|to_k|to_v|to_out\.0)\.(?:weight|bias)$")
# Everything a block may hold (original and diffusers names); attentions' own parts after the module name.
BLOCK_PARTS = (*MODULES, "ff", "audio_ff", "scale_shift_table", "audio_scale_shift_table", "prompt_scale_shift_table",
               "audio_prompt_scale_shift_table", "scale_shift_table_a2v_ca_video", "scale_shift_table_a2v_ca_audio",
               "video_a2v_cross_attn_scale_shift_table", "audio_a2v_cross_attn_scale_shift_table")
ATTENTION_PARTS = ("to_q", "to_k", "to_v", "to_out", "q_norm", "k_norm", "norm_q", "norm_k", "to_gate_logits")

VERSIONS = ("ltx-2", "ltx-2.3", "ltx-2.5")
SIZES = {"ltx-2": "19b", "ltx-2.3": "22b", "ltx-2.5": "22b"}
FULL_WIDTHS = (4096, 2048)   # video and audio inner widths of the released models
ARCHITECTURE_NAMES = {**{v: (v, f"{v}-{SIZES[v]}") for v in VERSIONS}, **{f"{v}-{SIZES[v]}": (f"{v}-{SIZES[v]}",)
                                                                         for v in VERSIONS}}
DIFFUSERS_PIPELINES: dict = {}   # LTX2 pipelines are read sub-folder by sub-folder (Gemma: by its config)
TRANSFORMER_CLASS = "LTX2VideoTransformer3DModel"
NOT_REACHED = (("video_embeddings_connector", "LTX-2's video text connector (a transformer over the text features)"),
               ("audio_embeddings_connector", "LTX-2's audio text connector (a transformer over the text features)"))


def version(gated_prompt: bool, prompt_adaln: bool, ff_bias: bool) -> str:
    if not gated_prompt:
        return "ltx-2"
    return "ltx-2.3" if prompt_adaln and ff_bias else "ltx-2.5"


def architecture(name: str, widths: tuple[int, int]) -> str:
    return f"{name}-{SIZES[name]}" if widths == FULL_WIDTHS else name


def _arch_of(header, prefix: str, diffusers: bool) -> str:
    names = set(header.names)

    def rows(key):
        shape = header.tensor(prefix + key).shape if prefix + key in names else ()
        return shape[0] if len(shape) == 2 else 0
    adaln = "prompt_adaln.linear.weight" if diffusers else "prompt_adaln_single.linear.weight"
    name = version(prefix + "transformer_blocks.0.prompt_scale_shift_table" in names, prefix + adaln in names,
                   prefix + "transformer_blocks.0.ff.net.0.proj.bias" in names)
    return architecture(name, (rows("transformer_blocks.0.attn1.to_q.weight"),
                               rows("transformer_blocks.0.audio_attn1.to_q.weight")))


def identify(header) -> Identified | None:
    found = model_prefix(set(header.names), (ORIGINAL_KEY, DIFFUSERS_KEY))
    if found is None:
        return None
    prefix, key = found
    refuse_unknown_modules(header, prefix, NAME, {"transformer_blocks": BLOCK_PARTS},
                           {p: ATTENTION_PARTS for p in MODULES})
    return identified(header, prefix, _arch_of(header, prefix, key == DIFFUSERS_KEY))


def sites_prefix(files) -> str | None:
    """The model prefix of an LTX-2 checkpoint ('' or `model.diffusion_model.`), or None for another model."""
    found = model_prefix(dit_tensor_names(files), (ORIGINAL_KEY, DIFFUSERS_KEY))
    return found[0] if found else None


def sites(cf: CheckpointFile, files) -> list[Site]:
    found = []
    for t, m in scan(cf, sites_prefix(files), ATTENTION):
        block, module, role = f"B{int(m['i']):02d}", m["m"], m["t"]
        section, q_stream, kv_stream = MODULES[module]
        if role in ROLES:
            proj = ROLES[role]
            found.append(Site(cf.rel, t.name, "dit", section, proj, block=block,
                              stream=kv_stream if proj in ("k", "v") else q_stream,
                              softmax=module if section == "joint" else None))
        if role in NODE_ROLES and module.endswith(("attn1", "attn2")):
            found.append(Site(cf.rel, t.name, "unet", module[-5:], NODE_ROLES[role], block=block))
    return found


def folder_architecture(model_class: str, present: set[str], config: dict | None = None) -> str | None:
    if model_class != TRANSFORMER_CLASS:
        return None
    c = config or {}
    name = version(bool(c.get("cross_attn_mod") or c.get("audio_cross_attn_mod")),
                   c.get("use_prompt_adaln_single", True), c.get("ff_bias", True))
    widths = (c.get("num_attention_heads", 32) * c.get("attention_head_dim", 128),
              c.get("audio_num_attention_heads", 32) * c.get("audio_attention_head_dim", 64))
    return architecture(name, widths)


def has_qk_norm(files) -> bool:
    """LTX-2's UNet-node sites: their q/k factors are cancelled by the qk-norm."""
    return sites_prefix(files) is not None
