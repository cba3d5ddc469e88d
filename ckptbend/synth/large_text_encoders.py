"""The large text encoders of DiT models as tiny real transformers models, and their tensors under the
names released files use: T5-XXL and UMT5-XXL (`encoder.block.N.layer.0.SelfAttention.{q,k,v,o}`),
Llama-3 (`model.layers.N.self_attn.{q,k,v,o}_proj`, no biases) and Qwen2.5-VL (the same with q/k/v biases,
plus its vision tower `visual.…`). transformers 5 renamed Qwen2.5-VL's modules (`model.language_model.`,
`model.visual.`); files keep the older names, which transformers still loads.
"""

from __future__ import annotations

import torch

_TINY_LM = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_attention_heads=2, num_hidden_layers=2)
_TINY_T5 = dict(vocab_size=64, d_model=32, d_kv=16, d_ff=64, num_layers=2, num_heads=2, feed_forward_proj="gated-gelu")
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
