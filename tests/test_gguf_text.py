"""[text] on GGUF text encoders in llama.cpp's names (ComfyUI-GGUF's t5encoder, llama, qwen3): tiny real
transformers models written with gguf-py's own name map, baked, read back with gguf-py."""

import gguf
import numpy as np
import pytest
import torch
import transformers as tf

from _dit import run
from test_gguf import rounding, tensors

from ckptbend.formats import ggml
from ckptbend.layouts.text_encoder_forms import transformers_name
from ckptbend.synth.gguf import TEXT_ARCH, write_text_encoder

FACTORS = {"q": 1.25, "k": 0.8, "v": 1.5, "out": 0.75}
RECIPE = 'schema = 1\nname = "t"\n[text]\n' + "".join(f"{k} = {v}\n" for k, v in FACTORS.items())
SMALL = dict(vocab_size=64, hidden_size=64, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, head_dim=16)
T5 = dict(vocab_size=64, d_model=64, d_kv=16, num_heads=4, d_ff=64, num_layers=2)
# llama.cpp tensor → the factor it takes, from the forms' rules: T5 and the plain decoder LLMs scale their
# projections; Qwen3's q/k act through its qk-norm weights.
T5_RULE = {"attn_q": "q", "attn_k": "k", "attn_v": "v", "attn_o": "out"}
LLM_RULE = {"attn_q": "q", "attn_k": "k", "attn_v": "v", "attn_output": "out"}
QK_NORM_RULE = {"attn_q_norm": "q", "attn_k_norm": "k", "attn_v": "v", "attn_output": "out"}
RULES = {"t5xxl": T5_RULE, "umt5xxl": T5_RULE, "llama": LLM_RULE, "mistral3_24b": LLM_RULE, "qwen25_7b": LLM_RULE,
         "qwen3_4b": QK_NORM_RULE, "qwen3vl_4b": QK_NORM_RULE}
# (model, gguf arch, inspect's architecture, rule)
MODELS = {
    "t5": (lambda: tf.T5EncoderModel(tf.T5Config(**T5)), "t5encoder", "t5xxl-only", T5_RULE),
    "umt5": (lambda: tf.UMT5EncoderModel(tf.UMT5Config(**T5)), "t5encoder", "umt5xxl-only", T5_RULE),
    "qwen3": (lambda: tf.Qwen3ForCausalLM(tf.Qwen3Config(**SMALL)), "qwen3", "qwen3_4b-only", QK_NORM_RULE),
    "llama": (lambda: tf.LlamaForCausalLM(tf.LlamaConfig(**SMALL)), "llama", "llama-only", LLM_RULE),
    # (a Qwen3-VL GGUF holds its text model alone; llama.cpp names Mistral `llama`, its q rows other than its width)
    "qwen3vl": (lambda: tf.Qwen3ForCausalLM(tf.Qwen3Config(**SMALL)), "qwen3vl", "qwen3vl_4b-only", QK_NORM_RULE),
    "qwen2vl": (lambda: tf.Qwen2ForCausalLM(tf.Qwen2Config(**SMALL)), "qwen2vl", "qwen25_7b-only", LLM_RULE),
    "mistral": (lambda: tf.LlamaForCausalLM(tf.LlamaConfig(**SMALL | {"head_dim": 32})), "llama",
                "mistral3_24b-only", LLM_RULE),
}


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    out = {}
    for name, (build, arch, *_) in MODELS.items():
        torch.manual_seed(0)
        model = build()
        for p in model.parameters():   # qk-norm weights start at 1: make them tell a scaled one apart
            p.data.add_(torch.randn_like(p) * 0.1)
        out[name] = write_text_encoder(tmp_path_factory.mktemp(name) / f"{name}.gguf", model.state_dict(),
                                       "q8_0", arch)
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


def assert_baked(src, out, rule):
    """Each tensor `rule` reaches (llama.cpp role → factor name) reads back as f × the original (quantised: up to
    one fp16 rounding of each block scale, codes byte for byte); every other tensor is byte-identical."""
    a, b = tensors(src), tensors(out)
    assert list(a) == list(b)
    reached = set()
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


def bake(src, tmp_path):
    (tmp_path / "r.toml").write_text(RECIPE)
    out = tmp_path / "out.gguf"
    r = run("bake", tmp_path / "r.toml", src, "-o", out, "-q")
    assert r.returncode == 0, r.stderr
    return out


@pytest.mark.parametrize("model", MODELS)
def test_baked_text_gguf_is_factor_times_original(made, model, tmp_path):
    out = bake(made[model], tmp_path)
    assert_baked(made[model], out, MODELS[model][3])
    assert run("verify", out, "--source", made[model]).returncode == 0


@pytest.mark.parametrize("arch, gguf_arch", TEXT_ARCH.items())
def test_synth_writes_and_bakes_llama_cpp_text_encoders(arch, gguf_arch, tmp_path):
    src = tmp_path / f"{arch}.gguf"
    assert run("synth", arch, src, "--dtype", "q8_0").returncode == 0
    assert gguf.GGUFReader(src).get_field("general.architecture").contents() == gguf_arch
    info = run("inspect", src)
    assert info.returncode == 0 and f"architecture: {arch}-only" in info.stdout, info.stderr
    assert_baked(src, bake(src, tmp_path), RULES[arch])


def test_general_architecture_must_agree_with_the_encoder(tmp_path):
    """A Llama written under `qwen3` (gguf-py maps the same names) is refused, not baked as either."""
    torch.manual_seed(0)
    src = write_text_encoder(tmp_path / "x.gguf", tf.LlamaForCausalLM(tf.LlamaConfig(**SMALL)).state_dict(), "q8_0",
                             "qwen3")
    r = run("inspect", src)
    assert r.returncode != 0 and "general.architecture says 'qwen3', but its tensors are llama-only's" in r.stderr
