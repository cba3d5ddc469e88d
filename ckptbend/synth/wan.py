"""Synthetic Wan 2.1 / 2.2 and LTX-Video checkpoints: tiny configs of the real diffusers transformer
classes (`WanTransformer3DModel`, `LTXVideoTransformer3DModel`) and transformers text encoders
(`UMT5EncoderModel` for Wan, `T5EncoderModel` for LTX), written in the file forms real ones have.

The original (Wan-AI / Lightricks / ComfyUI) names come from the inverse of diffusers' single-file
converters (`convert_wan_transformer_to_diffusers`, `convert_ltx_transformer_checkpoint_to_diffusers`);
tests/test_dit_wan.py converts every file back with those converters and loads it strictly.

Layouts: ``single`` (original names, bare), ``comfy`` (ComfyUI all-in-one: the model under
``model.diffusion_model.``, the text encoder under ``text_encoders.<umt5xxl|t5xxl>.transformer.``),
``transformer_diffusers`` (diffusers names, one file), ``diffusers`` (pipeline folder with
``model_index.json``, ``transformer/`` and ``text_encoder/``), ``text_encoder`` (the text encoder alone,
transformers names). Dtypes: fp32, fp16, bf16, fp8 (e4m3fn, e5m2), and ComfyUI's quantised forms
(catalog.QUANTISED: scaled_fp8, fp8mixed, int8, int8_convrot, nvfp4; synth/quantised.py) in the
single-file layouts.

Tiny sizes only: width 32 = 2 heads × 16 (the Wan and LTX qk-norms span all heads, so the norm
weights have the full width), 2 blocks.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from ..errors import CkptbendError
from .catalog import QUANTISED
from .quantised import quantise
from .dit import randomise
from .files import write_safetensors

MODEL_PREFIX = "model.diffusion_model."
_WAN = dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16, out_channels=4, text_dim=24,
            freq_dim=32, ffn_dim=48, num_layers=2, rope_max_seq_len=32)
# arch → (transformer class, its config, text encoder, diffusers pipeline class)
ARCHES = {
    "wan21_t2v": ("WanTransformer3DModel", dict(_WAN, in_channels=4), "umt5xxl", "WanPipeline"),
    "wan21_i2v": ("WanTransformer3DModel", dict(_WAN, in_channels=8, image_dim=20, added_kv_proj_dim=32),
                  "umt5xxl", "WanImageToVideoPipeline"),
    # Wan 2.2 TI2V-5B: 48 latent channels in and out; A14B I2V expert: 36 input channels, no image encoder.
    "wan22_ti2v": ("WanTransformer3DModel", dict(_WAN, in_channels=48, out_channels=48), "umt5xxl", "WanPipeline"),
    "wan22_i2v": ("WanTransformer3DModel", dict(_WAN, in_channels=36), "umt5xxl", "WanImageToVideoPipeline"),
    # Wan VACE: its VACE blocks (`vace_blocks`) feed hints to main blocks 0 and 1.
    "wan_vace": ("WanVACETransformer3DModel", dict(_WAN, in_channels=4, vace_layers=[0, 1], vace_in_channels=8),
                 "umt5xxl", "WanVACEPipeline"),
    # SkyReels V2 diffusion forcing: Wan blocks, and an fps embedding added to the timestep modulation.
    "skyreels_v2": ("SkyReelsV2Transformer3DModel", dict(_WAN, in_channels=4, inject_sample_info=True), "umt5xxl",
                    "SkyReelsV2DiffusionForcingPipeline"),
    "ltx_video": ("LTXVideoTransformer3DModel", dict(in_channels=8, out_channels=8, num_attention_heads=2,
                                                     attention_head_dim=16, cross_attention_dim=32, num_layers=2,
                                                     caption_channels=24), "t5xxl", "LTXPipeline"),
}
LAYOUTS = ("single", "comfy", "transformer_diffusers", "diffusers", "text_encoder")
# heads × d_kv = d_model, as in every released T5 and UMT5 (ckptbend tells ByT5 by a narrower attention)
TEXT_CONFIG = dict(vocab_size=64, d_model=24, d_kv=12, d_ff=48, num_layers=2, num_heads=2,
                   feed_forward_proj="gated-gelu", relative_attention_num_buckets=8)
TEXT_CLASS = {"umt5xxl": ("UMT5EncoderModel", "UMT5Config"), "t5xxl": ("T5EncoderModel", "T5Config")}
DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float8_e4m3fn, torch.float8_e5m2, *QUANTISED)

# diffusers → original names, in order (the inverse of convert_wan_transformer_to_diffusers).
WAN_RENAMES = (
    ("condition_embedder.time_embedder.linear_1", "time_embedding.0"),
    ("condition_embedder.time_embedder.linear_2", "time_embedding.2"),
    ("condition_embedder.text_embedder.linear_1", "text_embedding.0"),
    ("condition_embedder.text_embedder.linear_2", "text_embedding.2"),
    ("condition_embedder.time_proj", "time_projection.1"),
    ("condition_embedder.image_embedder.norm1", "img_emb.proj.0"),
    ("condition_embedder.image_embedder.ff.net.0.proj", "img_emb.proj.1"),
    ("condition_embedder.image_embedder.ff.net.2", "img_emb.proj.3"),
    ("condition_embedder.image_embedder.norm2", "img_emb.proj.4"),
    (".attn1.", ".self_attn."), (".attn2.", ".cross_attn."),
    (".to_out.0.", ".o."), (".to_q.", ".q."), (".to_k.", ".k."), (".to_v.", ".v."),
    (".add_k_proj.", ".k_img."), (".add_v_proj.", ".v_img."), (".norm_added_k.", ".norm_k_img."),
    ("ffn.net.0.proj", "ffn.0"), ("ffn.net.2", "ffn.2"),
    ("fps_projection.net.0.proj", "fps_projection.0"), ("fps_projection.net.2", "fps_projection.2"),   # SkyReels' names
)
# diffusers → original (the inverse of convert_ltx_transformer_checkpoint_to_diffusers).
LTX_RENAMES = (("proj_in", "patchify_proj"), ("time_embed", "adaln_single"), ("norm_q", "q_norm"), ("norm_k", "k_norm"))


def _wan_name(key: str) -> str:
    if key == "scale_shift_table":
        return "head.modulation"
    if key.startswith("proj_out."):
        return "head.head." + key.removeprefix("proj_out.")
    for a, b in WAN_RENAMES:
        key = key.replace(a, b)
    key = re.sub(r"^((?:vace_)?blocks\.\d+)\.scale_shift_table$", r"\1.modulation", key)
    key = re.sub(r"^(vace_blocks\.\d+)\.proj_in\.", r"\1.before_proj.", key)    # VACE's block input / output
    key = re.sub(r"^(vace_blocks\.\d+)\.proj_out\.", r"\1.after_proj.", key)
    return re.sub(r"^((?:vace_)?blocks\.\d+)\.norm2\.", r"\1.norm3.", key)   # diffusers' norm2 is the original norm3


def _ltx_name(key: str) -> str:
    for a, b in LTX_RENAMES:
        key = key.replace(a, b)
    return key


def original_state_dict(arch: str, model) -> dict[str, torch.Tensor]:
    """The transformer's tensors under the original single-file names (bare)."""
    rename = _ltx_name if arch == "ltx_video" else _wan_name
    return {rename(k): v for k, v in model.state_dict().items()}


def build_models(arch: str, seed: int = 0) -> dict[str, torch.nn.Module]:
    """{"dit": the diffusers transformer, <text encoder name>: the transformers encoder}, float32."""
    import diffusers
    import transformers

    if arch not in ARCHES:
        raise CkptbendError(f"unknown architecture {arch!r} (one of {', '.join(ARCHES)})")
    cls, config, text, _ = ARCHES[arch]
    model_cls, config_cls = TEXT_CLASS[text]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        dit = getattr(diffusers, cls)(**config).eval()
        encoder = getattr(transformers, model_cls)(getattr(transformers, config_cls)(**TEXT_CONFIG)).eval()
    g = torch.Generator().manual_seed(seed)
    randomise(dit, g)
    randomise(encoder, g)
    return {"dit": dit, text: encoder}


def text_state_dict(encoder) -> dict[str, torch.Tensor]:
    """A T5/UMT5 encoder's tensors as its released files name them (`shared`, `encoder.block.N…`)."""
    return dict(encoder.state_dict())


def layout_state_dict(arch: str, layout: str, models) -> tuple[dict[str, torch.Tensor], str]:
    """(tensors, model prefix) of a one-file layout."""
    text = ARCHES[arch][2]
    if layout == "single":
        return original_state_dict(arch, models["dit"]), ""
    if layout == "comfy":
        state = {MODEL_PREFIX + k: v for k, v in original_state_dict(arch, models["dit"]).items()}
        state.update({f"text_encoders.{text}.transformer.{k}": v for k, v in text_state_dict(models[text]).items()})
        return state, MODEL_PREFIX
    if layout == "transformer_diffusers":
        return dict(models["dit"].state_dict()), ""
    if layout == "text_encoder":
        return text_state_dict(models[text]), None
    raise CkptbendError(f"synth: layout {layout!r} is not a single file")


def _cast(model, dtype):
    with torch.no_grad():
        for t in list(model.parameters()) + list(model.buffers()):
            if t.is_floating_point():
                t.data = t.data.to(dtype)
    return model


def _write_diffusers(root: Path, arch: str, models, dtype) -> Path:
    import diffusers

    if dtype in QUANTISED:
        raise CkptbendError(f"synth: {dtype} is a ComfyUI single-file form; use --layout single or comfy")
    cls, _, text, pipeline = ARCHES[arch]
    root.mkdir(parents=True, exist_ok=True)
    _cast(models["dit"], dtype).save_pretrained(root / "transformer", safe_serialization=True)
    _cast(models[text], dtype).save_pretrained(root / "text_encoder")
    index = {"_class_name": pipeline, "_diffusers_version": diffusers.__version__,
             "transformer": ["diffusers", cls], "text_encoder": ["transformers", type(models[text]).__name__],
             "tokenizer": [None, None], "scheduler": [None, None], "vae": [None, None]}
    if pipeline == "WanImageToVideoPipeline":
        index.update(image_encoder=[None, None], image_processor=[None, None], transformer_2=[None, None])
    (root / "model_index.json").write_text(json.dumps(dict(sorted(index.items())), indent=2) + "\n")
    return root


def write_checkpoint(path, arch: str, layout: str = "single", size: str = "tiny", dtype=torch.float32,
                     seed: int = 0, shard_size=None) -> Path:
    """Write a tiny synthetic Wan / LTX-Video checkpoint; return its path (the folder for ``diffusers``)."""
    if size != "tiny":
        raise CkptbendError(f"synth: {arch} is available in the tiny size only")
    if layout not in LAYOUTS:
        raise CkptbendError(f"synth: {arch} has no layout {layout!r} (one of {', '.join(LAYOUTS)})")
    if shard_size is not None:
        raise CkptbendError(f"synth: {arch} is not sharded")
    dtype = torch.float32 if dtype is None else dtype
    if dtype not in DTYPES:
        raise CkptbendError(f"synth: unsupported dtype {dtype}")
    models = build_models(arch, seed)
    path = Path(path)
    if layout == "diffusers":
        return _write_diffusers(path, arch, models, dtype)
    tensors, prefix = layout_state_dict(arch, layout, models)
    if dtype in QUANTISED:   # a text encoder file alone (prefix None): ComfyUI marks it at the top level too
        return write_safetensors(path, quantise(tensors, prefix or "", dtype), dtype=None)
    return write_safetensors(path, tensors, dtype)
