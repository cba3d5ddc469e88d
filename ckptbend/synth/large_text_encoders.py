"""The large text encoders of DiT models as tiny real transformers models, and their tensors under the
names released files use: T5-XXL, UMT5-XXL and ByT5 (`encoder.block.N.layer.0.SelfAttention.{q,k,v,o}`; ByT5's
vocabulary of 384 bytes and specials, and q/k/v narrower than its width), Llama-3 and Mistral Small 3
(`model.layers.N.self_attn.{q,k,v,o}_proj`, no biases; Mistral's q rows = heads × 128 differ from its width, as here), Qwen2.5-VL (the same with q/k/v
biases, plus its vision tower `visual.…`), Qwen3 (q_norm / k_norm), Qwen3-VL (transformers 5 names
`model.language_model.…`, `model.visual.…`, as ComfyUI's qwen3vl files have them), Gemma 2 and Gemma 3
(`post_attention_layernorm` on the attention output; Gemma 3's qk-norm). Every model has fewer k/v heads than
q heads (GQA), as the released ones do. transformers 5 renamed Qwen2.5-VL's modules (`model.language_model.`,
`model.visual.`); its files keep the older names, which transformers still loads.
"""

from __future__ import annotations

import torch

_TINY_LM = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_attention_heads=2, num_hidden_layers=2)
_TINY_T5 = dict(vocab_size=64, d_model=32, d_kv=16, d_ff=64, num_layers=2, num_heads=2, feed_forward_proj="gated-gelu")
_TINY_GQA = dict(_TINY_LM, num_attention_heads=4, num_key_value_heads=2, head_dim=16)   # q 64 rows, k/v 32
_TINY_GEMMA = dict(_TINY_GQA, query_pre_attn_scalar=16, sliding_window=4)
# name → (transformers class, config class, config kwargs)
TINY = {
    "t5xxl": ("T5EncoderModel", "T5Config", _TINY_T5),
    "umt5xxl": ("UMT5EncoderModel", "UMT5Config", _TINY_T5),
    "llama": ("LlamaForCausalLM", "LlamaConfig", dict(num_key_value_heads=1, **_TINY_LM)),
    "qwen25_7b": ("Qwen2_5_VLForConditionalGeneration", "Qwen2_5_VLConfig", dict(
        vision_config=dict(depth=1, hidden_size=16, intermediate_size=32, num_heads=2, out_hidden_size=32,
                           fullatt_block_indexes=[0], window_size=8, patch_size=2, spatial_merge_size=1,
                           temporal_patch_size=1, in_channels=3),
        text_config=dict(num_key_value_heads=1, rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]},
                         **_TINY_LM))),
    "byt5_small": ("T5EncoderModel", "T5Config", dict(_TINY_T5, vocab_size=384, d_kv=8)),   # q 16 rows, width 32
    "mistral3_24b": ("MistralForCausalLM", "MistralConfig", dict(_TINY_GQA, head_dim=12)),
    "qwen3_4b": ("Qwen3ForCausalLM", "Qwen3Config", _TINY_GQA),
    "qwen3vl_4b": ("Qwen3VLForConditionalGeneration", "Qwen3VLConfig", dict(
        vision_config=dict(depth=1, hidden_size=16, intermediate_size=32, num_heads=2, out_hidden_size=32,
                           deepstack_visual_indexes=[0], patch_size=2, spatial_merge_size=1, temporal_patch_size=1,
                           num_position_embeddings=16),
        text_config=dict(rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3],
                                          "mrope_interleaved": True}, bos_token_id=1, eos_token_id=2,
                         **_TINY_GQA))),
    "gemma2_2b": ("Gemma2ForCausalLM", "Gemma2Config", _TINY_GEMMA),
    "gemma3_12b": ("Gemma3ForCausalLM", "Gemma3TextConfig", _TINY_GEMMA),
    # 3 layers: sliding, global (k_eq_v: v from k_proj, 1 kv head), and one reusing the global layer's k/v
    "gemma4_12b": ("Gemma4ForCausalLM", "Gemma4TextConfig", dict(
        _TINY_GEMMA, num_hidden_layers=3, layer_types=["sliding_attention", "full_attention", "full_attention"],
        global_head_dim=16, attention_k_eq_v=True, num_global_key_value_heads=1, num_kv_shared_layers=1,
        hidden_size_per_layer_input=0, vocab_size_per_layer_input=64)),
}
ENCODERS = tuple(TINY)


def build(name: str, seed: int = 0):
    """A tiny model of the encoder, every floating tensor perturbed (no all-zero / all-one norm weights)."""
    import transformers

    cls, config_cls, kwargs = TINY[name]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = getattr(transformers, cls)(getattr(transformers, config_cls)(**kwargs)).eval()
        with torch.no_grad():
            for t in model.state_dict().values():
                if t.is_floating_point():
                    t.add_(torch.randn_like(t) * 0.02)
    return model


def file_name(name: str, key: str) -> str:
    if name == "qwen25_7b":
        return key.replace("model.language_model.", "model.").replace("model.visual.", "visual.")
    return key


def model_key(name: str, file_key: str) -> str:
    """The inverse of `file_name`: a released-file key → the transformers 5 module name."""
    if name == "qwen25_7b":
        if file_key.startswith("visual."):
            return "model." + file_key
        if file_key.startswith("model."):
            return "model.language_model." + file_key.removeprefix("model.")
    return file_key


def file_state_dict(name: str, model) -> dict[str, torch.Tensor]:
    """The model's tensors under released-file names (tied / shared copies included, as files have them)."""
    return {file_name(name, k): v.clone() for k, v in model.state_dict().items()}


LAYOUTS = ("single", "comfy", "diffusers")


def write_checkpoint(path, arch: str, layout: str = "single", size: str = "tiny", dtype=None,
                     seed: int = 0, shard_size=None):
    """A tiny text encoder alone: `single` (the released names, as ComfyUI's text_encoders/ files),
    `comfy` (under ComfyUI's all-in-one prefix `text_encoders.<name>.transformer.`) or `diffusers` (a folder
    with the model's `text_encoder/`, saved by transformers); `dtype` a torch dtype or one of ComfyUI's
    quantised forms (single files)."""
    from pathlib import Path

    from ..errors import CkptbendError
    from .catalog import QUANTISED
    from .files import write_safetensors
    from .quantised import quantise

    if size != "tiny" or shard_size is not None:
        raise CkptbendError(f"synth: {arch} is available tiny and unsharded only")
    if layout not in LAYOUTS:
        raise CkptbendError(f"synth: {arch} has no layout {layout!r} (one of {', '.join(LAYOUTS)})")
    model, path = build(arch, seed), Path(path)
    if layout == "diffusers":
        if dtype in QUANTISED:
            raise CkptbendError(f"synth: {dtype} is a ComfyUI single-file form; use --layout single or comfy")
        model.to(dtype or torch.float32).save_pretrained(path / "text_encoder")
        return path
    prefix = f"text_encoders.{arch}.transformer." if layout == "comfy" else ""
    tensors = {prefix + k: v for k, v in file_state_dict(arch, model).items()}
    if dtype in QUANTISED:
        return write_safetensors(path, quantise(tensors, prefix, dtype), dtype=None)
    return write_safetensors(path, tensors, dtype)
