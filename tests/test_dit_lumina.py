"""Z-Image and Lumina 2 (NextDiT): layouts checked by diffusers' own single-file converters, and baked ==
run-time hooks on the real `ZImageTransformer2DModel` / `Lumina2Transformer2DModel`; v and out factors are
shown cancelled by the attention-output RMSNorm, and say so.

diffusers' Lumina 2 converter cuts `qkv` at the real widths (2304 | 768 | 768); here it cuts at the file's
own widths (the same code, two constants replaced), so tiny files convert.
ComfyUI's detection (`cap_embedder.1.weight` + `noise_refiner.0.attention.k_norm.weight`; Z-Image by its
width and learned pad tokens) reads the original names synth writes.
"""

import json

import pytest
import torch
from diffusers import Lumina2Transformer2DModel, ZImageTransformer2DModel
from diffusers.loaders import single_file_utils as sfu
from safetensors.torch import load_file, save_file

from ckptbend.bake import bake
from ckptbend.errors import CkptbendError
from ckptbend.layouts import detect
from ckptbend.layouts.lumina import OUTPUT_NORMED
from ckptbend.plan import make_plan
from ckptbend.synth import write_checkpoint
from ckptbend.synth.dit import MODEL_PREFIX, build
from ckptbend.synth.lumina import CONFIGS, FAMILIES
from _comfy_kitchen import dequantised as kitchen_dequantised
from _dit import compare, dequantised, hook_outputs, load_strict, recipe, run
from _dit_flux import _patched

CLASSES = {"z_image": ZImageTransformer2DModel, "lumina2": Lumina2Transformer2DModel}
ATTN = {"z_image": "attention", "lumina2": "attn"}
ARCHITECTURE = {"z_image": "z-image", "lumina2": "lumina2"}
CONVERTERS = {
    "z_image": sfu.convert_z_image_transformer_checkpoint_to_diffusers,
    "lumina2": _patched(sfu.convert_lumina2_to_diffusers, "q_dim = 2304\n        k_dim = v_dim = 768",
                        "q_dim = tensor.shape[1]\n        k_dim = v_dim = (tensor.shape[0] - q_dim) // 2"),
}
LAYOUTS = ["single", "single_prefixed", "comfy", "transformer_diffusers"]
BLOCKS = {"N": "noise_refiner", "C": "context_refiner", "B": "layers"}


def to_diffusers(arch, state: dict, layout: str):
    # diffusers' Lumina 2 converter fails on `model.diffusion_model.` keys (it renames them, then reads the
    # old names): the prefix is removed first, for both
    state = {k.removeprefix(MODEL_PREFIX): v.double() for k, v in state.items() if not k.startswith("text_encoders.")}
    mapped = state if layout == "transformer_diffusers" else CONVERTERS[arch](state)
    return load_strict(CLASSES[arch](**CONFIGS[arch]).double(), mapped)


@torch.no_grad()
def forward(arch, model):
    g = torch.Generator().manual_seed(7)
    image = torch.randn(1, 4, 4, 4, generator=g, dtype=torch.float64)
    caption = torch.randn(1, 5, 24, generator=g, dtype=torch.float64)
    t = torch.tensor([0.37], dtype=torch.float64)
    if arch == "z_image":
        return model([image[0][:, None]], t, [caption[0]], return_dict=False)[0][0]
    return model(image, t, caption, torch.ones(1, 5, dtype=torch.bool), return_dict=False)[0]


def hooks(arch, groups):
    """[(labels, factors)] → each labelled block's (N00, C01, B00) modules, times each factor."""
    names = {"q": "norm_q", "k": "norm_k", "v": "to_v", "out": "to_out.0"}
    return {f"{BLOCKS[label[0]]}.{int(label[1:])}.{ATTN[arch]}.{names[p]}": f for labels, factors in groups
            for label in labels for p, f in factors.items()}


def models(arch, path, layout, read):
    if layout == "diffusers":
        return CLASSES[arch].from_pretrained(path / "transformer").double().eval()
    return to_diffusers(arch, read(path), layout)


def baked_vs_hooked(arch, tmp_path, src, layout, body, groups, read=load_file, rtol=1e-5):
    out = tmp_path / ("o" if layout == "diffusers" else "o.safetensors")
    result = bake(recipe(body), src, out, progress=False)
    plain, patched, baked = models(arch, src, layout, read), models(arch, src, layout, read), models(arch, out, layout, read)
    hook_outputs(patched, hooks(arch, groups))
    compare(forward(arch, baked), forward(arch, patched), forward(arch, plain), rtol=rtol)
    return result


# every main layer's q and k; each noise refiner's q; the second context refiner's k
QK_BODY = ('[dit.joint]\nq = 1.7\nk = 0.6\n'
           '[[dit.self]]\nblocks = ["N00", "N01"]\nq = 1.4\n[[dit.self]]\nblocks = ["C01"]\nk = 2.1\n')
QK_GROUPS = [(["B00", "B01"], {"q": 1.7, "k": 0.6}), (["N00", "N01"], {"q": 1.4}), (["C01"], {"k": 2.1})]


@pytest.mark.parametrize("arch", list(CLASSES))
@pytest.mark.parametrize("layout", LAYOUTS)
def test_layout_maps_strict_to_the_real_class(tmp_path, arch, layout):
    path = write_checkpoint(tmp_path / "m.safetensors", arch, layout)
    model = to_diffusers(arch, load_file(str(path)), layout)
    reference = build(FAMILIES[arch], arch).double().state_dict()
    assert all(torch.equal(model.state_dict()[k], reference[k]) for k in reference)
    ckpt = detect(path)
    assert (ckpt.architecture, ckpt.kind, ckpt.qk_norm) == (
        ARCHITECTURE[arch], "single-file" if layout == "comfy" else "dit", True)


@pytest.mark.parametrize("arch", list(CLASSES))
@pytest.mark.parametrize("layout", LAYOUTS + ["diffusers"])
def test_q_k_bake_equals_run_time_hooks(tmp_path, arch, layout):
    src = write_checkpoint(tmp_path / ("m" if layout == "diffusers" else "m.safetensors"), arch, layout)
    assert detect(src).architecture == ARCHITECTURE[arch]
    result = baked_vs_hooked(arch, tmp_path, src, layout, QK_BODY, QK_GROUPS)
    assert not [w for w in result.plan.warnings if "no effect" in w]


@pytest.mark.parametrize("arch", list(CLASSES))
@pytest.mark.parametrize("dtype", ["scaled_fp8", "fp8mixed"])
def test_quantised_files_bake_by_the_same_rule(tmp_path, arch, dtype):
    src = write_checkpoint(tmp_path / "m.safetensors", arch, "single_prefixed", dtype=dtype)
    read = dequantised if dtype == "scaled_fp8" else kitchen_dequantised
    # q/k land on the norm weights, stored bf16 beside the quantised Linears: each is the bf16 rounding of
    # its scaled value, the quantised weights are untouched, and the forward agrees to that rounding
    result = baked_vs_hooked(arch, tmp_path, src, "single_prefixed", QK_BODY, QK_GROUPS, rtol=1e-2,
                             read=lambda p: {k: v for k, v in read(p).items() if k.startswith(MODEL_PREFIX)})
    before, after = load_file(str(src)), load_file(str(tmp_path / "o.safetensors"))
    changed = {k for k in before if not torch.equal(before[k].reshape(-1).view(torch.uint8),
                                                    after[k].reshape(-1).view(torch.uint8))}
    assert changed == {e.key for e in result.plan.edits} and all(k.endswith("_norm.weight") for k in changed)
    factor = {(e.key): e.segments[0].factors for e in result.plan.edits}
    assert all(torch.equal(after[k], (before[k].double() * torch.tensor(factor[k]).prod()).to(torch.bfloat16))
               for k in changed)


@pytest.mark.parametrize("arch", list(CLASSES))
@torch.no_grad()
def test_v_and_out_are_cancelled_by_the_output_norm_and_say_so(tmp_path, arch):
    src = write_checkpoint(tmp_path / "m.safetensors", arch)
    original = load_file(str(src))
    plain = forward(arch, to_diffusers(arch, original, "single"))
    q_moved = to_diffusers(arch, original, "single")
    hook_outputs(q_moved, hooks(arch, [(["B00"], {"q": 1.5})]))
    scale = (forward(arch, q_moved) - plain).abs().max().item()
    for section, label, proj in (("dit.joint", "B00", "v"), ("dit.joint", "B01", "out"), ("dit.self", "N00", "v"),
                                 ("dit.self", "C00", "out")):
        hooked = to_diffusers(arch, original, "single")
        hook_outputs(hooked, hooks(arch, [([label], {proj: 1.5})]))
        assert (forward(arch, hooked) - plain).abs().max().item() < 1e-3 * scale, (label, proj)
        out = tmp_path / f"{label}{proj}.safetensors"
        result = bake(recipe(f'[{section}]\nblocks = ["{label}"]\n{proj} = 1.5\n'), src, out, progress=False)
        assert result.plan.warnings == (f"[{section}]: {proj} = 1.5 has no effect: {OUTPUT_NORMED}",)
        moved = (forward(arch, to_diffusers(arch, load_file(str(out)), "single")) - plain).abs().max().item()
        assert moved < 1e-3 * scale, (label, proj, moved, scale)


@pytest.mark.parametrize("arch", list(CLASSES))
def test_v_rows_of_the_fused_qkv(tmp_path, arch):
    plan = make_plan(recipe('[dit.joint]\nblocks = ["B01"]\nq = 1.1\nk = 1.2\nv = 1.3\nout = 1.4\n'),
                     detect(write_checkpoint(tmp_path / "m.safetensors", arch)))
    heads, kv, hd = (4, 4, 16) if arch == "z_image" else (4, 2, 16)
    b = "layers.1.attention."
    got = {(e.key, s.rows, ", ".join(s.reasons)) for e in plan.edits for s in e.segments}
    assert got == {(b + "q_norm.weight", None, "dit.joint.q"), (b + "k_norm.weight", None, "dit.joint.k"),
                   (b + "qkv.weight", ((heads + kv) * hd, (heads + 2 * kv) * hd), "dit.joint.v"),
                   (b + "out.weight", None, "dit.joint.out")}


@pytest.mark.parametrize("arch", list(CLASSES))
def test_inspect_names_model_blocks_and_what_q_k_scale(tmp_path, arch):
    result = run("inspect", "--json", str(write_checkpoint(tmp_path / "m.safetensors", arch, "comfy")))
    assert result.returncode == 0, result.stderr
    info = json.loads(result.stdout)
    assert info["architecture"] == ARCHITECTURE[arch] and info["qk_norm"] is True
    refiner = {"depth": 1, "attn": ["self"], "qk_norm": True}
    assert info["attention_blocks"] == {
        **{f"C0{i}": {**refiner, "streams": ["text"]} for i in range(2)},
        **{f"N0{i}": {**refiner, "streams": ["image"]} for i in range(2)},
        **{f"B0{i}": {"depth": 1, "attn": ["joint"], "streams": [], "qk_norm": True} for i in range(2)}}
    assert list(info["attention_blocks"])[:4] == ["C00", "C01", "N00", "N01"]   # refiners run first
    prefix = MODEL_PREFIX
    assert info["dit_qk_targets"] == sorted(f"{prefix}{kind}.N.attention.{n}_norm.weight" for kind in
                                            ("context_refiner", "layers", "noise_refiner") for n in "qk")


@pytest.mark.parametrize("arch, encoder", [("z_image", "qwen3_4b"), ("lumina2", "gemma2_2b")])
def test_the_text_encoder_of_an_all_in_one_file_is_its_own(tmp_path, arch, encoder):
    ckpt = detect(write_checkpoint(tmp_path / "aio.safetensors", arch, "comfy"))
    assert set(ckpt.components) == {"dit", encoder}
    for section, prefix in (("text", f"text_encoders.{encoder}."), ("dit.joint", MODEL_PREFIX)):
        plan = make_plan(recipe(f"[{section}]\nq = 1.1\n"), ckpt)
        assert plan.edits and all(e.key.startswith(prefix) for e in plan.edits)


@pytest.mark.parametrize("extra, missing, says", [
    ({"clip_text_pooled_proj.0.weight": (8,)}, (), "clip_text_pooled_proj.*"),        # NewBie (Lumina 2 + CLIP)
    ({"dec_net.cond_embed.weight": (8, 8)}, (), "dec_net.*"),                         # Z-Image pixel space
    ({}, ("cap_pad_token", "x_pad_token"), "Ming-Image"),                             # Z-Image blocks, no padding
])
def test_a_nextdit_with_unknown_parts_is_refused_not_taken_for_z_image(tmp_path, extra, missing, says):
    state = load_file(str(write_checkpoint(tmp_path / "m.safetensors", "z_image")))
    state = {k: v for k, v in state.items() if k not in missing} | {k: torch.ones(s) for k, s in extra.items()}
    save_file(state, str(tmp_path / "x.safetensors"))
    with pytest.raises(CkptbendError, match="refusing") as e:
        detect(tmp_path / "x.safetensors")
    assert says in str(e.value) and "\n" not in str(e.value)
    result = run("inspect", str(tmp_path / "x.safetensors"))
    assert result.returncode != 0 and says in result.stderr


def test_z_image_omni_siglip_refiners_are_their_own_blocks(tmp_path):
    model = ZImageTransformer2DModel(**CONFIGS["z_image"], siglip_feat_dim=8)
    save_file(FAMILIES["z_image"].to_original(model.state_dict()), str(tmp_path / "omni.safetensors"))
    ckpt = detect(tmp_path / "omni.safetensors")
    refiner = {(s.block, s.attn, s.proj, s.stream) for s in ckpt.sites if s.key.startswith("siglip_refiner.")}
    assert ckpt.architecture == "z-image-omni"
    assert refiner == {(f"R0{i}", "self", p, "image") for i in range(2) for p in ("q", "k", "v", "out")}
