"""HiDream-I1: layouts checked by diffusers' own single-file converter, baked == run-time hooks on the real
`HiDreamImageTransformer2DModel` (dual-stream and single-stream blocks, MoE feed-forward), ComfyUI's
UNetSelfAttentionMultiply meaning kept by `[unet.self]`, and HiDream-O1 / unknown parts refused.
"""

import json

import pytest
import torch
from diffusers import HiDreamImageTransformer2DModel
from diffusers.loaders.single_file_utils import convert_hidream_transformer_to_diffusers
from safetensors.torch import load_file, save_file

from ckptbend.bake import bake
from ckptbend.errors import CkptbendError
from ckptbend.layouts import detect
from ckptbend.plan import make_plan
from ckptbend.synth import write_checkpoint
from ckptbend.synth.dit import MODEL_PREFIX, build
from ckptbend.synth.hidream import CONFIGS, FAMILY
from _dit import compare, dequantised, hook_outputs, load_strict, recipe, run

ARCH = "hidream"
LAYOUTS = ["single", "single_prefixed", "comfy", "transformer_diffusers"]
FACTORS = {"q": 1.7, "k": 0.6, "v": 1.9, "out": 0.55}
MODULE = {"q": "q_rms_norm", "k": "k_rms_norm", "v": "to_v", "out": "to_out"}


def to_diffusers(state: dict):
    state = {k: v.double() for k, v in state.items() if not k.startswith("text_encoders.")}
    return load_strict(HiDreamImageTransformer2DModel(**CONFIGS[ARCH]).double(), convert_hidream_transformer_to_diffusers(state))


@torch.no_grad()
def forward(model):
    g = torch.Generator().manual_seed(5)
    f64 = dict(dtype=torch.float64, generator=g)
    return model(hidden_states=torch.randn(1, 4, 4, 4, **f64), timesteps=torch.tensor([0.4], dtype=torch.float64),
                 encoder_hidden_states_t5=torch.randn(1, 5, 24, **f64), encoder_hidden_states_llama3=torch.randn(4, 1, 3, 16, **f64),
                 pooled_embeds=torch.randn(1, 20, **f64), return_dict=False)[0]


def hooks(streams, factors, modules=MODULE):
    """stream → that stream's modules in the double blocks ("image": no suffix, "text": `_t`); None → the single
    blocks too."""
    out = {}
    for stream in streams:
        for p, f in factors.items():
            out.update({f"double_stream_blocks.{i}.block.attn1.{modules[p]}{'_t' if stream == 'text' else ''}": f
                        for i in range(2) if stream})
            out.update({f"single_stream_blocks.{i}.block.attn1.{modules[p]}": f for i in range(2) if stream is None})
    return out


def models(path, layout, read):
    if layout == "diffusers":
        return HiDreamImageTransformer2DModel.from_pretrained(path / "transformer").double().eval()
    return to_diffusers(read(path))


def check(tmp_path, layout, body, hooked, dtype=None, read=load_file, rtol=1e-5):
    src = write_checkpoint(tmp_path / ("m" if layout == "diffusers" else "m.safetensors"), ARCH, layout, dtype=dtype)
    out = tmp_path / ("o" if layout == "diffusers" else "o.safetensors")
    result = bake(recipe(body), src, out, progress=False)
    plain, patched, baked = models(src, layout, read), models(src, layout, read), models(out, layout, read)
    hook_outputs(patched, hooked)
    compare(forward(baked), forward(patched), forward(plain), rtol=rtol)
    return result


def lines(factors):
    return "".join(f"{k} = {v}\n" for k, v in factors.items())


@pytest.mark.parametrize("layout", LAYOUTS)
def test_layout_maps_strict_to_the_real_class(tmp_path, layout):
    path = write_checkpoint(tmp_path / "m.safetensors", ARCH, layout)
    model = to_diffusers(load_file(str(path)))
    reference = build(FAMILY, ARCH).double().state_dict()
    assert all(torch.equal(model.state_dict()[k], reference[k]) for k in reference)
    assert detect(path).architecture == "hidream"


@pytest.mark.parametrize("layout", LAYOUTS + ["diffusers"])
def test_joint_attention_every_block_equals_run_time_hooks(tmp_path, layout):
    check(tmp_path, layout, "[dit.joint]\n" + lines(FACTORS), hooks(["image", "text", None], FACTORS))


@pytest.mark.parametrize("stream", ["image", "text"])
def test_one_stream_of_the_double_blocks(tmp_path, stream):
    body = f'[dit.joint]\nblocks = ["double"]\nstream = "{stream}"\n' + lines(FACTORS)
    check(tmp_path, "comfy", body, hooks([stream], FACTORS))


def test_scaled_fp8(tmp_path):
    check(tmp_path, "single_prefixed", "[dit.joint]\n" + lines(FACTORS), hooks(["image", "text", None], FACTORS),
          dtype="scaled_fp8", rtol=2e-2, read=lambda p: {k.removeprefix(MODEL_PREFIX): v for k, v in dequantised(p).items()
                                                        if k.startswith(MODEL_PREFIX)})


def test_unet_self_keeps_comfyuis_literal_meaning(tmp_path):
    """ComfyUI's node scales attn1.to_q/to_k/to_v (weight and bias) of the image stream and the single blocks:
    its v acts like a hook on those v projections; its q and k are cancelled by the qk-norm, and say so."""
    result = check(tmp_path, "single", "[unet.self]\nv = 1.3\n", hooks(["image", None], {"v": 1.3}))
    assert not result.plan.warnings
    ckpt = detect(write_checkpoint(tmp_path / "n.safetensors", ARCH))
    plan = make_plan(recipe("[unet.self]\nq = 1.5\nk = 1.2\n"), ckpt)
    keys = {e.key for e in plan.edits}
    assert keys == {f"{g}_stream_blocks.{i}.block.attn1.to_{p}.{wb}" for g in ("double", "single") for i in range(2)
                    for p in "qk" for wb in ("weight", "bias")}
    with pytest.raises(CkptbendError, match="out = 2 matches no tensor"):   # the node's to_out.0 is not here
        make_plan(recipe("[unet.self]\nout = 2.0\n"), ckpt)
    assert [w for w in plan.warnings if "qk-norm" in w] == [
        f"[unet.self]: {p} = {f:g} is cancelled by this model's qk-norm, as with ComfyUI's node; [dit.joint] scales "
        "the norm weight instead, which does act" for p, f in (("q", 1.5), ("k", 1.2))]


def test_inspect(tmp_path):
    result = run("inspect", "--json", str(write_checkpoint(tmp_path / "m.safetensors", ARCH, "comfy")))
    assert result.returncode == 0, result.stderr
    info = json.loads(result.stdout)
    assert info["architecture"] == "hidream"
    assert {k: (v["attn"], v["streams"]) for k, v in info["attention_blocks"].items()} == {
        **{f"D0{i}": (["attn1", "joint"], ["image", "text"]) for i in range(2)},
        **{f"S0{i}": (["attn1", "joint"], []) for i in range(2)}}
    assert info["text_encoder_attention_layers"] == {"clip_l": 2, "clip_g": 2, "t5xxl": 2, "llama": 2}
    assert f"{MODEL_PREFIX}double_stream_blocks.N.block.attn1.q_rms_norm_t.weight" in info["dit_qk_targets"]


@pytest.mark.parametrize("extra, says", [
    ({"t_embedder1.mlp.0.weight": (4, 4), "x_embedder.proj1.weight": (4, 4)}, "HiDream-O1"),
    ({"refiner.0.weight": (4,)}, "refiner.*"),
])
def test_o1_and_unknown_parts_are_refused(tmp_path, extra, says):
    state = load_file(str(write_checkpoint(tmp_path / "m.safetensors", ARCH)))
    if "t_embedder1.mlp.0.weight" in extra:   # O1 alone: not a HiDream-I1 with extras
        state = {}
    save_file({**state, **{k: torch.ones(s) for k, s in extra.items()}}, str(tmp_path / "x.safetensors"))
    result = run("inspect", str(tmp_path / "x.safetensors"))
    assert result.returncode != 0 and says in result.stderr and "refusing" in result.stderr
