"""[text] on GGUF text encoders in llama.cpp's names (ComfyUI-GGUF's t5encoder, llama, qwen3): tiny real
transformers models written with gguf-py's own name map, baked, read back with gguf-py."""

import gguf
import numpy as np
import pytest
import transformers as tf

from _dit import run
from test_gguf import rounding, tensors

from ckptbend.formats import ggml
from ckptbend.layouts.text_encoder_forms import transformers_name
from ckptbend.synth.gguf import write_text_encoder

FACTORS = {"q": 1.25, "k": 0.8, "v": 1.5, "out": 0.75}
RECIPE = 'schema = 1\nname = "t"\n[text]\n' + "".join(f"{k} = {v}\n" for k, v in FACTORS.items())
SMALL = dict(vocab_size=64, hidden_size=64, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, head_dim=16)
T5 = dict(vocab_size=64, d_model=64, d_kv=16, num_heads=4, d_ff=64, num_layers=2)
# (model, gguf arch, inspect's architecture, llama.cpp tensor → the factor it takes), from the forms' rules:
# T5 and Llama scale their projections; Qwen3's q/k act through its qk-norm weights.
MODELS = {
    "t5": (lambda: tf.T5EncoderModel(tf.T5Config(**T5)), "t5encoder", "t5xxl-only",
           {"attn_q": "q", "attn_k": "k", "attn_v": "v", "attn_o": "out"}),
    "umt5": (lambda: tf.UMT5EncoderModel(tf.UMT5Config(**T5)), "t5encoder", "umt5xxl-only",
             {"attn_q": "q", "attn_k": "k", "attn_v": "v", "attn_o": "out"}),
    "qwen3": (lambda: tf.Qwen3ForCausalLM(tf.Qwen3Config(**SMALL)), "qwen3", "qwen3_4b-only",
              {"attn_q_norm": "q", "attn_k_norm": "k", "attn_v": "v", "attn_output": "out"}),
    "llama": (lambda: tf.LlamaForCausalLM(tf.LlamaConfig(**SMALL)), "llama", "llama-only",
              {"attn_q": "q", "attn_k": "k", "attn_v": "v", "attn_output": "out"}),
    # (a Qwen3-VL GGUF holds its text model alone; llama.cpp names Mistral `llama`, its q wider than its width)
    "qwen3vl": (lambda: tf.Qwen3ForCausalLM(tf.Qwen3Config(**SMALL)), "qwen3vl", "qwen3vl_4b-only",
                {"attn_q_norm": "q", "attn_k_norm": "k", "attn_v": "v", "attn_output": "out"}),
    "qwen2vl": (lambda: tf.Qwen2ForCausalLM(tf.Qwen2Config(**SMALL)), "qwen2vl", "qwen25_7b-only",
                {"attn_q": "q", "attn_k": "k", "attn_v": "v", "attn_output": "out"}),
    "mistral": (lambda: tf.LlamaForCausalLM(tf.LlamaConfig(**SMALL | {"head_dim": 32})), "llama", "mistral3_24b-only",
                {"attn_q": "q", "attn_k": "k", "attn_v": "v", "attn_output": "out"}),
}


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    out = {}
    for name, (build, arch, *_) in MODELS.items():
        import torch
        torch.manual_seed(0)
        model = build()
        for p in model.parameters():   # qk-norm weights start at 1: make them tell a scaled one apart
            p.data.add_(torch.randn_like(p) * 0.1)
        out[name] = write_text_encoder(tmp_path_factory.mktemp(name) / f"{name}.gguf", model.state_dict(),
                                       "q8_0", arch, 2, small=256)
    return out


def test_llama_cpp_names_read_as_transformers_names():
    """The name form's table agrees with gguf-py's own map (HF name → llama.cpp name) for every site."""
    for arch, hf in ((gguf.MODEL_ARCH.T5ENCODER, "encoder.block.1.layer.0.SelfAttention.{}.weight"),
                     (gguf.MODEL_ARCH.QWEN3, "model.layers.1.self_attn.{}.weight"),
                     (gguf.MODEL_ARCH.LLAMA, "model.layers.1.self_attn.{}.weight")):
        names = gguf.TensorNameMap(arch, 2)
        for proj in ("q", "k", "v", "o", "relative_attention_bias", "q_proj", "k_proj", "v_proj", "o_proj",
                     "q_norm", "k_norm"):
            name = names.get_name(hf.format(proj), try_suffixes=(".weight",))
            if name is not None:
                assert transformers_name(name) == hf.format(proj), name


@pytest.mark.parametrize("model", MODELS)
def test_inspect_names_the_encoder(made, model):
    r = run("inspect", made[model])
    assert r.returncode == 0, r.stderr
    assert f"architecture: {MODELS[model][2]}" in r.stdout and "2 attention layers" in r.stdout


@pytest.mark.parametrize("model", MODELS)
def test_baked_text_gguf_is_factor_times_original(made, model, tmp_path):
    (tmp_path / "r.toml").write_text(RECIPE)
    out = tmp_path / "out.gguf"
    r = run("bake", tmp_path / "r.toml", made[model], "-o", out, "-q")
    assert r.returncode == 0, r.stderr
    a, b = tensors(made[model]), tensors(out)
    assert list(a) == list(b)
    rule, reached = MODELS[model][3], set()
    for name, (qtype, raw, shape) in a.items():
        role = name.split(".")[-2]
        f = FACTORS[rule[role]] if role in rule else 1.0       # weights and biases alike
        if f == 1.0:
            assert np.array_equal(raw, b[name][1]), name
            continue
        reached.add(role)
        x = gguf.quants.dequantize(raw, qtype).astype(np.float64).reshape(-1)
        y = gguf.quants.dequantize(b[name][1], qtype).astype(np.float64).reshape(-1)
        if qtype.name in ggml.FLOAT_TYPES:
            assert np.allclose(y, f * x, rtol=2 ** -8, atol=2 ** -24), name
        else:
            assert (np.abs(y - f * x) <= rounding(raw, qtype, np.full(x.shape, f)) + 1e-6 * np.abs(f * x)).all(), name
    assert reached == set(rule)
