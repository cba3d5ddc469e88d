"""[text] on the large text encoders (T5-XXL, UMT5-XXL, Llama-3, Qwen2.5-VL) and [clip] beside it: files with
the released names, detected, baked, loaded back into the real transformers class, and compared with the
original model whose q/k/v/o projection outputs are multiplied at run time."""

import pytest
import torch
from safetensors.torch import load_file, save_file

from ckptbend.bake import bake
from ckptbend.layouts import detect
from ckptbend.recipe import parse_recipe
from ckptbend.synth import large_text_encoders as lte

FACTORS = {"q": 1.3, "k": 0.7, "v": 1.6, "out": 0.8}
PROJ = {"q": ("q", "q_proj"), "k": ("k", "k_proj"), "v": ("v", "v_proj"), "out": ("o", "o_proj")}
RECIPE = 'schema = 1\nname = "t"\n[text]\n' + "".join(f"{k} = {v}\n" for k, v in FACTORS.items())


def _attention_projections(model):
    """(name, module, factor) for every self-attention projection of the language model (not the vision tower)."""
    for name, module in model.named_modules():
        leaf = name.rsplit(".", 1)[-1]
        parent = name.rsplit(".", 2)[-2] if name.count(".") >= 1 else ""
        if parent not in ("SelfAttention", "self_attn") or "visual" in name:
            continue
        for key, names in PROJ.items():
            if leaf in names:
                yield name, module, FACTORS[key]


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
    projections = list(_attention_projections(model))
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
    hooks = [m.register_forward_hook(lambda mod, args, out, f=f: out * f) for _, m, f in _attention_projections(model)]
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
