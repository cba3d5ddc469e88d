"""[text] on the large text encoders (T5-XXL, UMT5-XXL, ByT5, Llama-3, Mistral 3, Qwen2.5-VL, Qwen3, Qwen3-VL,
Gemma 2, Gemma 3) and [clip] beside it: files with the released names, detected, baked, loaded back into the real
transformers class, and compared with the original model whose q, k (as they enter the attention product: after
the qk-norm where there is one), v and attention output are multiplied at run time."""

import pytest
import torch
from safetensors.torch import load_file, save_file

from ckptbend.bake import bake
from ckptbend.errors import CkptbendError
from ckptbend.layouts import detect
from ckptbend.plan import make_plan
from ckptbend.recipe import parse_recipe
from ckptbend.layouts import text_encoder_forms as forms
from ckptbend.synth import catalog as synth_catalog
from ckptbend.synth import large_text_encoders as lte
from ckptbend.synth import write_checkpoint

FACTORS = {"q": 1.3, "k": 0.7, "v": 1.6, "out": 0.8}
PROJ = {"q": ("q", "q_proj"), "k": ("k", "k_proj"), "v": ("v", "v_proj"), "out": ("o", "o_proj")}
QK_NORMED = {"q": ("q_norm",), "k": ("k_norm",)}   # where a qk-norm follows the projection, q and k leave it
RECIPE = 'schema = 1\nname = "t"\n[text]\n' + "".join(f"{k} = {v}\n" for k, v in FACTORS.items())


def _attention_projections(model, encoder=None, factors=FACTORS):
    """(name, module, factor) for every module of the language model's self-attention (not the vision tower)
    whose output is q, k, v or the attention output: q and k leave the qk-norm where the encoder has one."""
    normed = encoder is not None and forms.LLM_QK_NORM in forms.LARGE[encoder].sites
    where = PROJ | QK_NORMED if normed else PROJ
    for name, module in model.named_modules():
        leaf = name.rsplit(".", 1)[-1]
        parent = name.rsplit(".", 2)[-2] if name.count(".") >= 1 else ""
        if parent not in ("SelfAttention", "self_attn") or "visual" in name:
            continue
        for key, names in where.items():
            if leaf in names and key in factors:
                yield name, module, factors[key]


def _forward(model, ids):
    with torch.no_grad():
        out = model(input_ids=ids)
    return out.last_hidden_state if hasattr(out, "last_hidden_state") else out.logits


@pytest.mark.parametrize("name", lte.ENCODERS)
def test_detected_alone(tmp_path, name):
    model = lte.build(name)
    path = save_file(lte.file_state_dict(name, model), tmp_path / "te.safetensors") or tmp_path / "te.safetensors"
    ckpt = detect(path)
    assert (ckpt.kind, ckpt.architecture) == ("text-encoder", f"{name}-only")
    projections = list(_attention_projections(model, name))
    weights_and_biases = sum(1 for _, m, _ in projections for p in ("weight", "bias") if getattr(m, p, None) is not None)
    assert len(ckpt.sites) == weights_and_biases > 0


@pytest.mark.parametrize("name", lte.ENCODERS)
def test_baked_equals_runtime_multiplied_projections(tmp_path, name):
    model = lte.build(name, seed=3)
    src = tmp_path / "te.safetensors"
    save_file(lte.file_state_dict(name, model), src)
    bake(parse_recipe(RECIPE), src, tmp_path / "baked.safetensors", progress=False)

    ids = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(0))
    plain = _forward(model, ids)
    hooks = [m.register_forward_hook(lambda mod, args, out, f=f: out * f)
             for _, m, f in _attention_projections(model, name)]
    expected = _forward(model, ids)
    for h in hooks:
        h.remove()

    baked = lte.build(name, seed=99)
    state = {lte.model_key(name, k): v for k, v in load_file(tmp_path / "baked.safetensors").items()}
    result = baked.load_state_dict(state, strict=True)
    assert not result.unexpected_keys and not result.missing_keys
    got = _forward(baked, ids)
    assert (expected - plain).abs().max() > 1e-3        # the factors act
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_encoders_selector_and_clip_leave_each_other_alone(tmp_path):
    t5, llama = lte.build("t5xxl"), lte.build("llama")
    state = {f"text_encoders.t5xxl.transformer.{k}": v for k, v in lte.file_state_dict("t5xxl", t5).items()}
    state |= {f"text_encoders.llama.transformer.{k}": v for k, v in lte.file_state_dict("llama", llama).items()}
    path = tmp_path / "two.safetensors"
    save_file(state, path)
    ckpt = detect(path)
    assert {s.component for s in ckpt.sites} == {"t5xxl", "llama"}
    recipe = parse_recipe('schema = 1\nname = "t"\n[text]\nencoders = ["llama"]\nv = 1.5\n')
    bake(recipe, path, tmp_path / "out.safetensors", progress=False)
    before, after = load_file(path), load_file(tmp_path / "out.safetensors")
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == {k for k in before if k.startswith("text_encoders.llama.") and k.endswith("self_attn.v_proj.weight")}
    with pytest.raises(Exception, match="clip"):
        bake(parse_recipe('schema = 1\nname = "t"\n[clip]\nq = 1.2\n'), path, tmp_path / "o2.safetensors", progress=False)


def _write(tmp_path, name, seed=0, state=None):
    path = tmp_path / f"{name}.safetensors"
    save_file(state if state is not None else lte.file_state_dict(name, lte.build(name, seed)), path)
    return path


def _changed(before_path, after_path):
    before, after = load_file(before_path), load_file(after_path)
    return {k for k in before if not torch.equal(before[k], after[k])}, before, after


@pytest.mark.parametrize("name", ["qwen3_4b", "qwen3vl_4b", "gemma3_12b", "gemma4_12b"])
def test_qk_norm_encoders_scale_the_norm_weights(tmp_path, name):
    """q/k on q_norm/k_norm (a factor on q_proj/k_proj would be cancelled by the norm); Gemma 3's weight acts
    as (1 + w), so w' = f·(1 + w) − 1."""
    src = _write(tmp_path, name)
    bake(parse_recipe('schema = 1\nname = "t"\n[text]\nq = 1.3\nk = 0.7\n'), src, tmp_path / "o.safetensors",
         progress=False)
    changed, before, after = _changed(src, tmp_path / "o.safetensors")
    assert changed == {k for k in before if k.endswith(("self_attn.q_norm.weight", "self_attn.k_norm.weight"))}
    offset = forms.LARGE[name].norm_offset
    for k in changed:
        f = 1.3 if ".q_norm." in k else 0.7
        torch.testing.assert_close(after[k] + offset, (before[k] + offset) * f, rtol=0, atol=1e-6)


def _moved(model, name, factors, ids):
    plain = _forward(model, ids)
    hooks = [m.register_forward_hook(lambda mod, args, out, f=f: out * f)
             for _, m, f in _attention_projections(model, name, factors)]
    moved = (_forward(model, ids) - plain).abs().max()
    for h in hooks:
        h.remove()
    return moved, plain.abs().max()


@pytest.mark.parametrize("name", ["gemma2_2b", "gemma3_12b", "gemma4_12b"])
def test_gemma_v_and_out_are_cancelled_and_warned(tmp_path, name):
    """Gemma's post_attention_layernorm normalises o_proj's output (Gemma 4's v_norm v too): v and out factors
    only move their eps (with eps 0 they cancel to rounding; with the model's eps, tiny random weights, they move
    the output < 5% as much as a q factor does), and the plan says so."""
    model = lte.build(name, seed=5)
    src = _write(tmp_path, name, state=lte.file_state_dict(name, model))
    warnings = make_plan(parse_recipe('schema = 1\nname = "t"\n[text]\nv = 1.6\nout = 0.5\n'), detect(src)).warnings
    assert len(warnings) == 2 and all("has no effect" in w and "post_attention_layernorm" in w for w in warnings)
    assert ("v_norm" in warnings[0]) == (name == "gemma4_12b")
    ids = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(0))
    assert _moved(model, name, {"v": 1.6, "out": 0.5}, ids)[0] < 0.05 * _moved(model, name, {"q": 1.6}, ids)[0]
    for module_name, module in model.named_modules():
        if module_name.endswith(("post_attention_layernorm", "v_norm")):
            for eps in ("eps", "variance_epsilon"):     # Gemma 2/3's name, Gemma 4's
                if hasattr(module, eps):
                    setattr(module, eps, 0.0)
    moved, scale = _moved(model, name, {"v": 1.6, "out": 0.5}, ids)
    assert moved < 1e-5 * scale


def test_released_widths_and_configs_name_the_encoder():
    """A diffusers folder's config names its encoder, a size by its width as ComfyUI's detection does."""
    cases = [({"model_type": "qwen3", "hidden_size": 4096}, "qwen3_8b"),
             ({"model_type": "qwen3", "hidden_size": 2560}, "qwen3_4b"),
             ({"model_type": "qwen3_vl", "text_config": {"hidden_size": 4096}}, "qwen3vl_8b"),
             ({"model_type": "gemma3", "text_config": {"hidden_size": 3840}}, "gemma3_12b"),
             ({"model_type": "gemma3_text", "hidden_size": 2560}, "gemma3_4b"), ({"model_type": "gemma2"}, "gemma2_2b"),
             ({"model_type": "mistral3", "text_config": {"hidden_size": 5120}}, "mistral3_24b"),
             ({"model_type": "t5", "d_model": 1472, "num_heads": 6, "d_kv": 64, "vocab_size": 1510}, "byt5_small"),
             ({"model_type": "t5", "d_model": 4096, "num_heads": 64, "d_kv": 64}, "t5xxl"),
             ({"model_type": "qwen2_5_vl_text", "hidden_size": 3584}, "qwen25_7b"),
             ({"model_type": "gemma4_unified", "text_config": {"hidden_size": 3840}}, "gemma4_12b"),
             ({"model_type": "llama"}, "llama"), ({"model_type": "qwen3_5"}, None)]
    assert [forms.of_config(c) for c, _ in cases] == [name for _, name in cases]


@pytest.mark.parametrize("suffix, says", [("linear_attn.A_log", "Qwen3.5"), ("self_attn.sinks", "GPT-OSS"),
                                          ("self_attn.qkv_proj.weight", "fused")])
def test_llms_it_does_not_know_are_refused_by_name(tmp_path, suffix, says):
    state = lte.file_state_dict("qwen3_4b", lte.build("qwen3_4b"))
    state[f"model.layers.0.{suffix}"] = torch.ones(4, 4)
    with pytest.raises(CkptbendError, match=says):
        detect(_write(tmp_path, "gemma2_2b", state=state))


def test_mistral3_vision_language_names(tmp_path):
    """Mistral3ForConditionalGeneration's own file names (`language_model.model.…`, a Pixtral vision tower and
    projector): the language model is Mistral Small 3 (q rows ≠ width), the rest left alone."""
    model = lte.build("mistral3_24b")
    state = {f"language_model.{k}": v for k, v in lte.file_state_dict("mistral3_24b", model).items()}
    state |= {"vision_tower.transformer.layers.0.attention.q_proj.weight": torch.ones(8, 8),
              "multi_modal_projector.linear_1.weight": torch.ones(8, 8)}
    ckpt = detect(_write(tmp_path, "m", state=state))
    assert (ckpt.architecture, {s.component for s in ckpt.sites}) == ("mistral3_24b-only", {"mistral3_24b"})
    assert all(s.key.startswith("language_model.model.layers.") for s in ckpt.sites)
    assert len(ckpt.left_alone) == 2


@pytest.mark.parametrize("name", synth_catalog.GENERATORS["large_text_encoders"][0])
@pytest.mark.parametrize("layout", ["single", "comfy", "diffusers"])
def test_synth_writes_each_encoder(tmp_path, name, layout):
    path = write_checkpoint(tmp_path / ("te" if layout == "diffusers" else "te.safetensors"), name, layout=layout)
    ckpt = detect(path)
    assert {s.component for s in ckpt.sites} == {name}
    assert ckpt.architecture == f"{name}-only"
    plan = make_plan(parse_recipe(RECIPE), ckpt)
    assert {e.segments[0].reasons[0] for e in plan.edits} == {"text.q", "text.k", "text.v", "text.out"}


def test_gemma3_norm_weights_bake_in_float_files_only(tmp_path):
    """ComfyUI's fp8mixed keeps norms in bf16: q/k bake there; a norm weight stored in fp8 is refused (fp8
    codes scale without an offset)."""
    recipe = parse_recipe('schema = 1\nname = "t"\n[text]\nq = 1.3\nv = 1.2\n')
    mixed = write_checkpoint(tmp_path / "mixed.safetensors", "gemma3_12b", dtype="fp8mixed")
    bake(recipe, mixed, tmp_path / "o.safetensors", progress=False)
    changed, before, after = _changed(mixed, tmp_path / "o.safetensors")
    norms = {k for k in changed if k.endswith("q_norm.weight")}
    assert norms and all(torch.allclose(after[k].float() + 1, (before[k].float() + 1) * 1.3, atol=1e-2) for k in norms)
    fp8 = write_checkpoint(tmp_path / "fp8.safetensors", "gemma3_12b", dtype=torch.float8_e4m3fn)
    with pytest.raises(CkptbendError, match=r"used as \(w \+ 1\), stored as F8_E4M3"):
        make_plan(recipe, detect(fp8))


@pytest.mark.parametrize("extra, width, q_rows, expected", [
    ((), 32, 32, "llama"), ((), 5120, 8, "mistral3_24b"), ((), 3072, 8, "ministral3_3b"),
    (("self_attn.q_norm",), 2560, 8, "qwen3_4b"), (("self_attn.q_norm",), 4096, 8, "qwen3_8b"),
    (("post_feedforward_layernorm",), 2304, 8, "gemma2_2b"),
    (("post_feedforward_layernorm", "self_attn.q_norm"), 3840, 8, "gemma3_12b"),
    (("post_feedforward_layernorm", "self_attn.q_norm", "layer_scalar"), 3840, 8, "gemma4_12b"),
])
def test_a_released_width_names_the_size(tmp_path, extra, width, q_rows, expected):
    """One layer's q_proj at the released width (a few rows: small files) tells which encoder and which size a
    decoder LLM file is, as ComfyUI's detection does; Llama's q spans its width, Mistral's does not."""
    layer = "model.layers.0."
    state = {layer + "self_attn.q_proj.weight": torch.zeros(q_rows, width, dtype=torch.float16),
             layer + "self_attn.o_proj.weight": torch.zeros(8, q_rows, dtype=torch.float16),
             layer + "input_layernorm.weight": torch.ones(width)}
    state |= {layer + part + ".weight" if part != "layer_scalar" else layer + part: torch.ones(1) for part in extra}
    assert detect(_write(tmp_path, "w", state=state)).architecture == f"{expected}-only"


def test_inspect_names_the_encoder_and_where_q_k_land(tmp_path):
    from ckptbend.report import describe, format_text

    state = {f"text_encoders.gemma3_12b.transformer.{k}": v
             for k, v in lte.file_state_dict("gemma3_12b", lte.build("gemma3_12b")).items()}
    state |= {f"text_encoders.qwen3_4b.transformer.{k}": v
              for k, v in lte.file_state_dict("qwen3_4b", lte.build("qwen3_4b")).items()}
    text = format_text(describe(detect(_write(tmp_path, "two", state=state))))
    assert "architecture: qwen3_4b+gemma3_12b-only" in text
    assert "qwen3_4b: 2 attention layers (q/k scale the q_norm/k_norm weights)" in text
    assert ("gemma3_12b: 2 attention layers (q/k scale the q_norm/k_norm weights, used as 1 + w; v/out cancelled "
            "by post_attention_layernorm)") in text
