"""The ComfyUI node (ckptbend/runtime/comfy_host.py), driven through the stand-in host of
tests/comfy_standin.py (ComfyUI's protocol of shared/docs/comfyui-hooks.md around a real tiny
diffusers UNet), and compared with the diffusers host on the same weights."""

import contextlib
import copy
import json
import math
import pathlib
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

import comfy_standin as cs
from ckptbend.companion import RUNTIME_DIR
from ckptbend.runtime import comfy_host, slothful
from ckptbend.runtime import diffusers_host as dh

H, W = 16, 24                        # latent; token grids 16×24, 8×12, 4×6 and the middle's 2×3
PROMPT = "a romantic {kiss} at {sunset}"
RECIPE_NAME, RECIPE_SHA = "Kiss at sunset", "0123abcd" + "e" * 56
DYNAMIC = {
    "sag": {"scale": 0.6, "blur_sigma": 2.0},
    "slothful": {**slothful.DEFAULTS, "in_strength": 7.0, "out_k_blend": 0.25},
    "slothful_simple": False,
    "bending": [
        {"token": "kiss", "mode": "scale", "strength": 1.0, "scale_factor": 3.0,
         "apply_to_timesteps": None, "apply_to_layers": None, "renormalize": "row"},
        {"token": "sunset", "mode": "translate", "strength": 0.5, "translate_x": 0.5, "translate_y": 0.0,
         "apply_to_timesteps": [1, 3], "apply_to_layers": [0, 7], "renormalize": "column"},
    ],
}


pytestmark = pytest.mark.usefixtures("one_thread_no_grad", "comfy")     # conftest.py


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("clip")
    cs.write_tokenizer(folder)
    return folder


@pytest.fixture(scope="module")
def clip(tokenizer_dir):
    return cs.CLIP(tokenizer_dir)


@pytest.fixture
def model():
    return cs.EPSModel(cs.tiny_unet())


def contexts(seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(1, 77, cs.CONTEXT_DIM, generator=g), torch.randn(1, 77, cs.CONTEXT_DIM, generator=g)


def latent(seed=2, sigma=1.0):
    return torch.randn(1, 4, H, W, generator=torch.Generator().manual_seed(seed)) * sigma


def patched(model, dynamic, clip=None, **values):
    """The node as ComfyUI runs it: the class from node_class_mappings, its FUNCTION on a MODEL."""
    (cls,) = comfy_host.node_class_mappings(dynamic, RECIPE_NAME, RECIPE_SHA)[0].values()
    if dynamic.get("bending"):
        values = {"bending_clip": clip, "bending_prompt": PROMPT, **values}
    m = getattr(cls(), cls.FUNCTION)(model=cs.ModelPatcher(model), **values)[0]   # bending: (model, model_2)
    return m


def options(patcher, sample_sigmas=None):
    """model_options as the sampler passes them (sample_sigmas and wrappers in transformer_options)."""
    return patcher.sampling_options(sample_sigmas)


@contextlib.contextmanager
def attention_io(unet, kind=("attn1", "attn2")):
    """{module name: [[input hidden states, output], … per call]} for the UNet's attentions."""
    records, handles = {}, []
    for name, module in unet.named_modules():
        if name.rsplit(".", 1)[-1] in kind:
            def pre(m, args, kwargs, name=name):
                records.setdefault(name, []).append([args[0] if args else kwargs["hidden_states"], None])

            def post(m, args, kwargs, out, name=name):
                records[name][-1][1] = out
            handles += [module.register_forward_pre_hook(pre, with_kwargs=True),
                        module.register_forward_hook(post, with_kwargs=True)]
    try:
        yield records
    finally:
        for h in handles:
            h.remove()


def site_name(model, block, index, kind):
    """The diffusers module name of the attention at a ComfyUI site of the stand-in."""
    names = {id(m): n for n, m in model.unet.named_modules()}
    for site, tb in model.sites:
        if site.block == block and site.index == index:
            return names[id(getattr(tb, kind))]
    raise KeyError(block)


# --- packaging and the node's surface -----------------------------------------------------------

def test_companion_copy_imports_without_diffusers_ckptbend_or_comfy(tmp_path):
    shutil.copytree(RUNTIME_DIR, tmp_path / "my_companion")          # the runtime package, as a companion holds it
    script = textwrap.dedent(f"""
        import importlib.abc, json, sys
        BLOCKED = ("diffusers", "ckptbend", "comfy")
        class Block(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in BLOCKED:
                    raise ImportError(f"{{name}} is blocked")
        sys.meta_path.insert(0, Block())
        sys.path[:] = [{str(tmp_path)!r}] + [p for p in sys.path if p not in ("", ".")]
        from my_companion import comfy_host
        nodes, names = comfy_host.node_class_mappings(json.loads({json.dumps(DYNAMIC)!r}),
                                                      {RECIPE_NAME!r}, {RECIPE_SHA!r})
        (cls,) = nodes.values()
        print(json.dumps({{"ids": list(nodes), "names": names, "inputs": cls.INPUT_TYPES(),
                          "function": cls.FUNCTION, "returns": cls.RETURN_TYPES, "category": cls.CATEGORY,
                          "loaded": sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED)}}))
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout.strip().splitlines()[-1])
    node = "ckptbend_Kiss_at_sunset_0123abcd"
    assert result["ids"] == [node]
    assert result["names"] == {node: "ckptbend: Kiss at sunset"}
    assert (result["function"], result["returns"], result["category"]) == ("patch", ["MODEL", "MODEL"], "ckptbend")
    assert result["inputs"]["optional"] == {"model_2": ["MODEL", {"tooltip": comfy_host.node.SECOND_MODEL}]}
    assert result["loaded"] == []
    required = result["inputs"]["required"]
    assert required["model"] == ["MODEL"]
    assert required["sag_scale"] == ["FLOAT", {"default": 0.6, "min": -2.0, "max": 5.0, "step": 0.01}]
    assert required["slothful_in_strength"][1]["default"] == 7.0
    for spec in required.values():            # well-formed: a type name or a combo list, then options
        assert isinstance(spec[0], (str, list)) and len(spec) in (1, 2)
        if spec[0] == "FLOAT":
            assert spec[1]["min"] <= spec[1]["default"] <= spec[1]["max"] and spec[1]["step"] > 0


def test_input_types_expose_the_recipe_sections_with_their_values():
    (cls,) = comfy_host.node_class_mappings(DYNAMIC, RECIPE_NAME, RECIPE_SHA)[0].values()
    required = cls.INPUT_TYPES()["required"]
    assert list(required) == (
        ["model", "sag_scale", "sag_blur_sigma"]
        + ["slothful_" + n for n in slothful.DEFAULTS]
        + ["bending_clip", "bending_prompt", "bend1_token", "bend1_strength", "bend2_token", "bend2_strength"])
    assert required["sag_blur_sigma"] == ("FLOAT", {"default": 2.0, "min": 0.0, "max": 10.0, "step": 0.01})
    assert required["slothful_in_mode"] == (list(slothful.MODES), {"default": "2D_AVG"})
    assert required["slothful_keep_middle"] == ("BOOLEAN", {"default": True})
    assert required["slothful_out_k_blend"] == ("FLOAT", {"default": 0.25, "min": 0.0, "max": 1.0, "step": 0.01})
    assert required["slothful_in_depth_decay"][1]["min"] == -2.0
    assert required["bending_clip"] == ("CLIP",)
    assert required["bending_prompt"] == ("STRING", {"multiline": True, "default": ""})
    assert required["bend2_token"] == ("STRING", {"default": "sunset"})
    assert required["bend2_strength"][1]["default"] == 0.5

    simple = {"slothful": {**slothful.simple_params(depth_decay=-1.0, in_blend=0.5, out_strength=9.0)},
              "slothful_simple": True}
    (cls,) = comfy_host.node_class_mappings(simple, "s", "f" * 64)[0].values()
    required = cls.INPUT_TYPES()["required"]
    assert list(required) == ["model"] + ["slothful_" + n for n in slothful.SIMPLE_DEFAULTS]
    assert required["slothful_depth_decay"][1]["default"] == -1.0
    assert required["slothful_in_blend"][1]["default"] == 0.5
    assert required["slothful_out_strength"][1]["default"] == 9.0
    (cls,) = comfy_host.node_class_mappings({"sag": {}}, "only sag", "a" * 64)[0].values()
    assert list(cls.INPUT_TYPES()["required"]) == ["model", "sag_scale", "sag_blur_sigma"]
    assert cls.INPUT_TYPES()["required"]["sag_scale"][1]["default"] == 0.5


def test_node_returns_a_clone_and_leaves_the_input_model_alone(model, clip):
    (cls,) = comfy_host.node_class_mappings(DYNAMIC, RECIPE_NAME, RECIPE_SHA)[0].values()
    source = cs.ModelPatcher(model)
    source.set_model_attn2_output_patch(lambda out, extra: out)       # something already there
    before = copy.deepcopy(source.model_options)
    m, _ = cls().patch(model=source, bending_clip=clip, bending_prompt=PROMPT)
    m2, _ = cls().patch(model=source, bending_clip=clip, bending_prompt=PROMPT)
    assert m is not source and m.model is source.model
    assert repr(source.model_options) == repr(before)
    to = m.model_options["transformer_options"]
    assert len(to["patches"]["attn1_patch"]) == 1 and len(to["patches"]["attn2_output_patch"]) == 1
    assert list(to["patches_replace"]["attn1"]) == [("middle", 0, 0)]
    assert len(to["patches_replace"]["attn2"]) == 16             # "kiss" acts on every layer
    assert len(m.model_options["sampler_post_cfg_function"]) == 1 and m.model_options["disable_cfg1_optimization"]
    assert len(m2.model_options["sampler_post_cfg_function"]) == 1      # no accumulation across runs


def test_stand_in_numbers_blocks_as_comfyui_numbers_sd1(model):
    assert comfy_host.cross_attention_sites(model.diffusion_model) == (
        [("input", n, 0) for n in (1, 2, 4, 5, 7, 8)] + [("middle", 0, 0)]
        + [("output", n, 0) for n in range(3, 12)])
    assert [s.transformer_index for s, _ in model.sites] == list(range(16))


# --- identity ----------------------------------------------------------------------------------

def test_zero_strength_samples_bit_identically(model, clip):
    cond, uncond = contexts()
    noise = latent()
    plain = cs.sample(cs.ModelPatcher(model), noise, cond, uncond, steps=3)
    zero = {"slothful_in_strength": 0.0, "slothful_out_strength": 0.0, "sag_scale": 0.0,
            "bend1_strength": 0.0, "bend2_strength": 0.0}
    m = patched(model, DYNAMIC, clip, **zero)
    assert torch.equal(cs.sample(m, noise, cond, uncond, steps=3), plain)
    assert not torch.equal(cs.sample(patched(model, DYNAMIC, clip), noise, cond, uncond, steps=3), plain)


class CountingBackend(cs.Backend):
    """The stand-in's selected backend, counting its calls."""

    def __init__(self, func=cs.attention_chunked):
        super().__init__(func)
        self.calls = 0

    def optimized_attention(self, *args, **kwargs):
        self.calls += 1
        return super().optimized_attention(*args, **kwargs)


def test_stand_in_backend_differs_from_sdpa(model, monkeypatch):
    """So that the next test can fail: a node computing plain attention with its own PyTorch call
    instead of the selected backend would not sample bit-identically."""
    cond, uncond = contexts()
    noise = latent()
    chunked = cs.sample(cs.ModelPatcher(model), noise, cond, uncond, steps=2)
    cs.install_comfy(monkeypatch, cs.Backend(cs.attention_sdpa))
    sdpa = cs.sample(cs.ModelPatcher(model), noise, cond, uncond, steps=2)
    assert not torch.equal(chunked, sdpa)
    # Same maths, other float32 summation order: two sampler steps carry it to ~1.5e-4 on some CPUs' kernels.
    assert_close(chunked, sdpa, rtol=1e-3, atol=1e-3)


def test_sites_the_node_does_not_change_run_the_selected_backend(model, clip, monkeypatch):
    """A bending entry whose steps lie outside the run (issue 12: 1e-5 off in real ComfyUI), and every
    unbent site and chunk, compute ComfyUI's own attention: bit-identical, and every call goes there."""
    cond, uncond = contexts()
    noise = latent()
    backend = CountingBackend()
    cs.install_comfy(monkeypatch, backend)
    plain = cs.sample(cs.ModelPatcher(model), noise, cond, uncond, steps=3)
    plain_calls, backend.calls = backend.calls, 0
    late = [{**e, "apply_to_timesteps": [5, 9]} for e in DYNAMIC["bending"]]
    m = patched(model, {"bending": late}, clip)
    assert len(m.model_options["transformer_options"]["patches_replace"]["attn2"]) == 16
    assert torch.equal(cs.sample(m, noise, cond, uncond, steps=3), plain)
    assert backend.calls == plain_calls == 3 * 32
    # bending at step 1 only: the other steps stay bit-identical, all calls still reach the backend
    backend.calls = 0
    steps, plain_steps = [], []
    one = [{**DYNAMIC["bending"][0], "apply_to_timesteps": [1, 1]}]
    cs.sample(patched(model, {"bending": one}, clip), noise, cond, uncond, steps=3,
              on_step=lambda i, x, d: steps.append(d))
    assert backend.calls == 3 * 32
    cs.sample(cs.ModelPatcher(model), noise, cond, uncond, steps=1, on_step=lambda i, x, d: plain_steps.append(d))
    assert torch.equal(steps[0], plain_steps[0]) and not torch.equal(steps[1], steps[0])


def test_bending_with_one_chunk_or_several_positive_chunks(model, clip):
    """cond_or_uncond decides the rows: a lone positive chunk (cfg 1, low memory) is bent, a lone
    negative one is not, and several positive chunks are each bent as the single one is."""
    m = patched(model, {"bending": DYNAMIC["bending"][:1]}, clip)
    bend = m.model_options["transformer_options"]["patches_replace"]["attn2"][("output", 5, 0)]
    g = torch.Generator().manual_seed(4)
    q, k, v = torch.randn(3, 48, 32, generator=g), torch.randn(3, 77, 32, generator=g), torch.randn(3, 77, 32, generator=g)
    extra = {"n_heads": 8, "original_shape": [1, 4, H, W], "sigmas": torch.tensor([2.0]), "attn_precision": None,
             "sample_sigmas": model.schedule(3), "activations_shape": [1, 32, 6, 8]}
    plain = cs.BACKEND.optimized_attention(q, k, v, 8)
    alone = [bend(q[i:i + 1], k[i:i + 1], v[i:i + 1], {**extra, "cond_or_uncond": [0]}) for i in range(3)]
    assert all(not torch.allclose(alone[i], plain[i:i + 1], atol=1e-4) for i in range(3))
    assert torch.equal(bend(q[:1], k[:1], v[:1], {**extra, "cond_or_uncond": [1]}),
                       cs.BACKEND.optimized_attention(q[:1], k[:1], v[:1], 8))
    mixed = bend(q, k, v, {**extra, "cond_or_uncond": [1, 0, 0]})
    assert torch.equal(mixed[0], plain[0])
    assert_close(mixed[1:], torch.cat(alone[1:]), rtol=1e-6, atol=1e-6)


# --- SAG ---------------------------------------------------------------------------------------

def formula_blur(x, sigma):
    taps = torch.linspace(-4, 4, 9)
    k1 = torch.exp(-0.5 * (taps / sigma) ** 2)
    k1 = k1 / k1.sum()
    kernel = torch.outer(k1, k1).expand(x.shape[1], 1, 9, 9)
    return F.conv2d(F.pad(x, (4, 4, 4, 4), mode="reflect"), kernel, groups=x.shape[1])


@pytest.mark.parametrize("max_chunks", [8, 1])
def test_sag_post_cfg_follows_the_formula(model, max_chunks):
    model.max_chunks = max_chunks
    scale, blur, cfg = 0.7, 1.5, 4.0
    m = patched(model, {"sag": {"scale": scale, "blur_sigma": blur}})
    cond, uncond = contexts()
    sigma = model.schedule(3)[1:2]
    x = latent(sigma=float(sigma))
    model.log.clear()
    result = cs.sampling_function(model, x, sigma, cs.cond(uncond), cs.cond(cond), cfg, options(m))
    # One model call for CFG (two when chunks run separately), one for SAG.
    assert sum(e == ("attn1", ("middle", 0), 0) for e in model.log) == (2 if max_chunks > 1 else 3)

    # The same step recomputed from sag.md with the unpatched model.
    plain = options(cs.ModelPatcher(model))
    mid_name = "mid_block.attentions.0.transformer_blocks.0.attn1"
    mid = model.unet.get_submodule(mid_name)
    with attention_io(model.unet, ("attn1",)) as io:
        cond_x0, uncond_x0 = cs.calc_cond_batch(model, [cs.cond(cond), cs.cond(uncond)], x, sigma, plain)
    hidden = torch.cat([h for h, _ in io[mid_name]])                      # chunks in call order
    hidden = hidden[:1]                                                   # ComfyUI order: uncond first
    heads, n = mid.heads, hidden.shape[1]
    q = mid.to_q(hidden).view(1, n, heads, -1).transpose(1, 2)
    k = mid.to_k(hidden).view(1, n, heads, -1).transpose(1, 2)
    probs = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]), -1)   # [1, heads, n, n]
    mask = (probs.mean(1).sum(1) > 1.0).float().view(1, 1, 2, 3)         # the middle grid of 16×24
    assert 0 < mask.sum() < mask.numel()
    mask = F.interpolate(mask, size=(H, W), mode="nearest")
    degraded = formula_blur(uncond_x0, blur) * mask + uncond_x0 * (1 - mask)
    (sag_x0,) = cs.calc_cond_batch(model, [cs.cond(uncond)], degraded + x - uncond_x0, sigma, plain)
    cfg_result = uncond_x0 + (cond_x0 - uncond_x0) * cfg
    expected = cfg_result + scale * (degraded - sag_x0)
    assert_close(result, expected, rtol=1e-5, atol=1e-5)
    assert (result - cfg_result).abs().max() > 1e-2


def test_sag_extra_call_is_flagged_and_not_bent(model, clip, comfy, monkeypatch):
    seen = []
    inner = comfy.samplers.calc_cond_batch

    def spy(model_, conds, x, sigma, model_options):
        seen.append(model_options["transformer_options"].get(comfy_host.common.SAG_PASS))
        return inner(model_, conds, x, sigma, model_options)
    monkeypatch.setattr(comfy.samplers, "calc_cond_batch", spy)
    m = patched(model, DYNAMIC, clip)
    cond, uncond = contexts()
    sigmas = model.schedule(3)
    cs.sampling_function(model, latent(sigma=float(sigmas[0])), sigmas[:1], cs.cond(uncond), cs.cond(cond), 4.0,
                         options(m, sigmas))
    assert seen == [True]
    # ComfyUI marks the [uncond] re-run as conditional (cond_or_uncond [0]); the flag keeps bending out.
    flagged = options(patched(model, {"bending": DYNAMIC["bending"]}, clip), sigmas)
    flagged["transformer_options"][comfy_host.common.SAG_PASS] = True
    x = latent()
    assert torch.equal(cs.calc_cond_batch(model, [cs.cond(uncond)], x, sigmas[:1], flagged)[0],
                       cs.calc_cond_batch(model, [cs.cond(uncond)], x, sigmas[:1],
                                          options(cs.ModelPatcher(model), sigmas))[0])


# --- Slothful Attention --------------------------------------------------------------------------

@pytest.mark.parametrize("simple", [False, True])
def test_slothful_patch_gives_slothful_kv_and_keeps_the_middle(model, simple):
    if simple:
        dynamic = {"slothful": slothful.simple_params(in_strength=50.0, out_mode="1D_MAX", in_blend=0.3),
                   "slothful_simple": True}
        params = slothful.simple_params(in_strength=50.0, out_mode="1D_MAX", in_blend=0.3)
    else:
        dynamic = {"slothful": {**slothful.DEFAULTS, "in_strength": 50.0, "keep_middle": False,
                                "out_mode": "2D_MAX", "in_v_blend": 0.6}, "slothful_simple": False}
        params = dynamic["slothful"]
    m = patched(model, dynamic)
    (patch,) = m.model_options["transformer_options"]["patches"]["attn1_patch"]
    calls = []

    def spy(q_in, k_in, v_in, extra):
        out = patch(q_in, k_in, v_in, extra)
        calls.append((q_in, k_in, v_in, dict(extra), out))
        return out
    m.model_options["transformer_options"]["patches"]["attn1_patch"] = [spy]
    cond, uncond = contexts()
    sigma = model.schedule(4)[1:2]
    cs.calc_cond_batch(model, [cs.cond(cond), cs.cond(uncond)], latent(), sigma, options(m))
    assert len(calls) == 16
    reduced = {}
    for q_in, k_in, v_in, extra, (q, k, v) in calls:
        assert q is q_in
        ek, ev = slothful.slothful_kv(k_in, v_in, extra["block"][0], float(sigma), extra["n_heads"], (H, W), params)
        assert torch.equal(k, ek) and torch.equal(v, ev)
        reduced[extra["block"]] = k.shape[1] < k_in.shape[1]
    assert reduced[("middle", 0)] is (not slothful.resolve_params(params)["keep_middle"])
    assert reduced[("input", 1)] and reduced[("output", 11)]


@pytest.mark.parametrize("k_blend, v_blend", [(1.0, 0.0), (0.5, 0.5), (1.0, 1.0)])
def test_slothful_attention_uses_kv_projected_from_pooled_hidden_states(model, k_blend, v_blend):
    params = {**slothful.DEFAULTS, "in_strength": 4.0, "out_strength": 4.0, "in_k_blend": k_blend,
              "in_v_blend": v_blend, "out_k_blend": k_blend, "out_v_blend": v_blend}
    m = patched(model, {"slothful": params})
    cond, uncond = contexts()
    sigma = torch.tensor([20.0])            # progress t = 1: stride = strength = 4 on the 16×24 level, a 2×2 window
    with attention_io(model.unet, ("attn1",)) as io:
        cs.calc_cond_batch(model, [cs.cond(cond), cs.cond(uncond)], latent(), sigma, options(m))
    top = [n for n in io if n.startswith(("down_blocks.0.", "up_blocks.3."))]
    assert len(top) == 5
    for name in top:
        (hidden, out), = io[name]
        attn = model.unet.get_submodule(name)
        grid = hidden.transpose(1, 2).reshape(hidden.shape[0], -1, H, W)
        pooled = grid.reshape(*grid.shape[:2], H // 2, 2, W // 2, 2).mean((3, 5)).flatten(2).transpose(1, 2)
        one = grid[:, :, ::2, ::2].flatten(2).transpose(1, 2)
        if k_blend == v_blend == 1.0:           # the reference's quirk: the subsampled tensor for both
            k_in = v_in = one
        else:
            k_in, v_in = one * (1 - k_blend) + pooled * k_blend, one * (1 - v_blend) + pooled * v_blend
        q, k, v = attn.to_q(hidden), attn.to_k(k_in), attn.to_v(v_in)
        b, heads = q.shape[0], attn.heads
        q, k, v = (t.view(b, t.shape[1], heads, -1).transpose(1, 2) for t in (q, k, v))
        probs = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]), -1)
        expected = attn.to_out[0]((probs @ v).transpose(1, 2).reshape(b, H * W, -1))
        assert_close(out, expected, rtol=1e-5, atol=1e-5)


# --- Attention Bending -----------------------------------------------------------------------------

def test_stand_in_tokenizes_like_comfyui(clip):
    """Weights from ComfyUI's emphasis syntax, escapes as literal parentheses, brackets literal (no
    A1111 de-emphasis in ComfyUI); ids from the tiny vocabulary, positions counted by hand."""
    vocab = clip.tokenizer.get_vocab()
    ids = [vocab[w + "</w>"] for w in ("a", "lake", "at", "kiss", "(", "dog", ")", "[", "car", "]")]
    a, lake, at, kiss, lpar, dog, rpar, lbr, car, rbr = ids
    (chunk,) = clip.tokenize("a (lake:1.2) at ((kiss)) \\(dog\\) [car]")["l"]
    assert [t for t, _ in chunk[:12]] == [clip.bos, a, lake, at, kiss, lpar, dog, rpar, lbr, car, rbr, clip.eos]
    assert [round(w, 4) for _, w in chunk[:12]] == [1.0, 1.0, 1.2, 1.0, 1.21] + [1.0] * 7
    assert len(chunk) == 77 and {t for t, _ in chunk[12:]} == {clip.eos}
    # a short weighted segment that would cross the 75-token boundary moves whole to the next chunk
    first, second = clip.tokenize("a " * 74 + "(kiss at a dog:1.1)")["l"]
    assert [t for t, _ in first[75:]] == [clip.eos, clip.eos] and first[74][0] == a
    assert [t for t, _ in second[:6]] == [clip.bos, kiss, at, a, dog, clip.eos]


def test_token_columns_via_clip(clip):
    assert comfy_host.token_columns(clip, PROMPT, ["kiss", "sunset"]) == {"kiss": [3], "sunset": [5, 6]}
    long = "a " * 80 + "(kiss)"                  # second 77-token chunk: BOS + 5 × "a" before it
    assert comfy_host.token_columns(clip, long, ["kiss"]) == {"kiss": [77 + 1 + 5]}


@pytest.mark.parametrize("prompt, columns", [
    ("a photo of a lake at sunset", [7, 8]),
    ("a photo of a (lake:1.2) at sunset", [7, 8]),          # issue 12: was column 11 (padding)
    ("a photo of a ((lake)) at (sunset)", [7, 8]),
    ("a photo of a lake at {(sunset:1.3)}", [7, 8]),        # a marked target with a weight
    ("a photo of a lake at ({sunset}:0.8)", [7, 8]),
    ("a \\(photo\\) of a lake at sunset", [9, 10]),          # escaped: two literal tokens more
    ("a photo of a [lake] at sunset", [9, 10]),              # brackets are text in ComfyUI
])
def test_token_columns_follow_the_hosts_emphasis_parsing(clip, prompt, columns):
    """The node's columns are where the host's tokenizer puts the word (its weights do not move it)."""
    assert comfy_host.token_columns(clip, prompt, ["sunset"]) == {"sunset": columns}
    tokens = [t for t, _ in clip.tokenize(prompt.replace("{", "").replace("}", ""))["l"][0]]
    vocab = clip.tokenizer.get_vocab()
    assert tokens[columns[0]:columns[-1] + 1] == [vocab["sun"], vocab["set</w>"]]


def test_token_columns_of_groups_and_wildcards(clip):
    assert comfy_host.token_columns(clip, "a (kiss:1.2) at sunset", ["kiss, sunset, dog", "ALL"]) == \
        {"kiss, sunset, dog": [2, 4, 5]}
    with pytest.raises(ValueError, match="Token not found: 'dog'"):
        comfy_host.token_columns(clip, PROMPT, ["dog"])


def test_node_reports_a_missing_word(model, clip):
    with pytest.raises(ValueError, match="Token not found: 'dog'.*bending_prompt"):
        patched(model, DYNAMIC, clip, bend1_token="dog")
    m = patched(model, DYNAMIC, clip, bending_prompt="a photo of a dog", bend1_token="dog", bend2_strength=0.0)
    assert len(m.model_options["transformer_options"]["patches_replace"]["attn2"]) == 16


@pytest.mark.parametrize("max_chunks", [8, 1])
def test_bending_changes_only_conditional_chunks(model, clip, max_chunks):
    model.max_chunks = max_chunks
    m = patched(model, {"bending": DYNAMIC["bending"][:1]}, clip)
    cond, uncond = contexts()
    sigma, x = model.schedule(3)[:1], latent()
    plain = cs.calc_cond_batch(model, [cs.cond(cond), cs.cond(uncond)], x, sigma, options(cs.ModelPatcher(model)))
    bent = cs.calc_cond_batch(model, [cs.cond(cond), cs.cond(uncond)], x, sigma, options(m, model.schedule(3)))
    assert torch.equal(bent[1], plain[1])
    assert (bent[0] - plain[0]).abs().max() > 1e-3


def test_bending_layer_filter(model, clip):
    entry = {**DYNAMIC["bending"][0], "apply_to_layers": [9]}          # the 10th site: output block 5
    m = patched(model, {"bending": [entry]}, clip)
    assert list(m.model_options["transformer_options"]["patches_replace"]["attn2"]) == [("output", 5, 0)]
    cond, uncond = contexts()
    sigma, x = model.schedule(3)[:1], latent()
    runs = []
    for patcher in (cs.ModelPatcher(model), m):
        with attention_io(model.unet, ("attn2",)) as io:
            cs.calc_cond_batch(model, [cs.cond(cond), cs.cond(uncond)], x, sigma, options(patcher, model.schedule(3)))
        runs.append(io)
    order = [site_name(model, s.block, s.index, "attn2") for s, _ in model.sites]
    for layer, name in enumerate(order):
        (h0, o0), = runs[0][name]
        (h1, o1), = runs[1][name]
        if layer < 9:
            assert torch.equal(o1, o0)
        elif layer == 9:
            assert torch.equal(h1, h0)
            assert torch.equal(o1[:1], o0[:1])                      # uncond chunk
            assert not torch.allclose(o1[1:], o0[1:])              # cond chunk


def test_bending_timestep_filter(model, clip):
    entry = {**DYNAMIC["bending"][0], "apply_to_timesteps": [1, 2]}      # steps 1 and 2, both ends inclusive
    m = patched(model, {"bending": [entry]}, clip)
    plain = cs.ModelPatcher(model)
    cond, uncond = contexts()
    steps = []
    cs.sample(m, latent(), cond, uncond, steps=4, on_step=lambda i, x, d: steps.append((x, d)))
    sigmas = model.schedule(4)
    for i, (x, denoised) in enumerate(steps):
        s = sigmas[i:i + 1]
        unbent = cs.sampling_function(model, x, s, cs.cond(uncond), cs.cond(cond), 5.0, options(plain, sigmas))
        assert torch.equal(denoised, unbent) is (i not in (1, 2)), i


def test_replace_functions_keep_q_dtype_and_honour_fp32_precision(model, clip):
    m = patched(model, DYNAMIC, clip)
    replace = m.model_options["transformer_options"]["patches_replace"]
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 6, 32, generator=g), torch.randn(2, 77, 32, generator=g)
    extra = {"n_heads": 8, "cond_or_uncond": [1, 0], "original_shape": [2, 4, H, W], "sigmas": torch.tensor([2.0, 2.0]),
             "sample_sigmas": model.schedule(3), "activations_shape": [2, 32, 2, 3]}
    for precision in (None, torch.float32):
        extra["attn_precision"] = precision
        for f, kv in ((replace["attn1"][("middle", 0, 0)], q), (replace["attn2"][("middle", 0, 0)], k)):
            full = f(q, kv, kv, extra)
            half = f(q.bfloat16(), kv.bfloat16(), kv.bfloat16(), extra)
            assert full.dtype == torch.float32 and half.dtype == torch.bfloat16
            assert_close(half.float(), full, rtol=0.05, atol=0.05)
    with pytest.raises(ValueError, match="beyond the 3 text tokens"):
        replace["attn2"][("middle", 0, 0)](q, k[:, :3], k[:, :3], extra)


def test_step_index():
    sigmas = torch.tensor([14.6, 2.9, 0.93, 0.03, 0.0])
    assert [comfy_host.step_index(s, sigmas) for s in sigmas[:4]] == [0, 1, 2, 3]
    assert comfy_host.step_index(1.5, sigmas) == 1          # an intermediate evaluation of step 1
    assert comfy_host.step_index(14.6, None) is None


# --- the same techniques through the diffusers host -----------------------------------------------

def tiny_pipeline(tokenizer_dir):
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionPipeline
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(str(tokenizer_dir))
    with torch.random.fork_rng():
        torch.manual_seed(3)
        text_encoder = CLIPTextModel(CLIPTextConfig(
            vocab_size=len(tokenizer), hidden_size=cs.CONTEXT_DIM, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=2, max_position_embeddings=77, bos_token_id=0, eos_token_id=1, pad_token_id=1))
        vae = AutoencoderKL(block_out_channels=(8,), down_block_types=("DownEncoderBlock2D",),
                            up_block_types=("UpDecoderBlock2D",), latent_channels=4, norm_num_groups=4,
                            layers_per_block=1)
    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                       timestep_spacing="leading", steps_offset=1)   # integer timesteps
    return StableDiffusionPipeline(vae=vae.eval(), text_encoder=text_encoder.eval(), tokenizer=tokenizer,
                                   unet=cs.tiny_unet(), scheduler=scheduler, safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)


def diffusers_step(pipe, dynamic, x, step, steps=4):
    """One batched [uncond, cond] UNet call of `pipe` with `dynamic` applied at the scheduler's step.
    Returns (eps [2, …], {attention name: output}, prompt embeddings (cond, uncond), sigma, token columns)."""
    session = dh.apply(pipe, dynamic)
    try:
        cond, uncond = pipe.encode_prompt(PROMPT, "cpu", 1, True, "")
        pipe.scheduler.set_timesteps(steps)
        t, sigma = pipe.scheduler.timesteps[step], pipe.scheduler.sigmas[step:step + 1]
        x_in = x / (sigma.view(-1, 1, 1, 1) ** 2 + 1).sqrt()
        with attention_io(pipe.unet) as io:
            eps = pipe.unet(torch.cat([x_in] * 2), t, encoder_hidden_states=torch.cat([uncond, cond])).sample
        columns = session.token_indices
    finally:
        dh.remove(pipe)
    return eps, {n: calls[0][1] for n, calls in io.items()}, (cond, uncond), sigma, columns


def test_attention_outputs_match_the_diffusers_host(model, clip, tokenizer_dir):
    dynamic = {"slothful": {**slothful.DEFAULTS, "in_strength": 8.0, "out_strength": 6.0, "in_mode": "2D_MAX",
                            "out_mode": "1D_AVG", "in_k_blend": 0.3, "out_v_blend": 0.7, "keep_middle": False},
               "bending": DYNAMIC["bending"] + [
                   {"token": "kiss", "mode": "flip", "strength": 1.0, "flip_horizontal": True,
                    "apply_to_timesteps": [0, 1], "renormalize": "none"}]}
    pipe = tiny_pipeline(tokenizer_dir)
    x = latent(sigma=2.0)
    eps, d_out, (cond, uncond), sigma, columns = diffusers_step(pipe, dynamic, x, step=1)
    assert columns == comfy_host.token_columns(clip, PROMPT, ["kiss", "sunset"])

    m = patched(model, dynamic, clip)
    with attention_io(model.unet) as io:
        c_uncond, c_cond = cs.calc_cond_batch(model, [cs.cond(cond), cs.cond(uncond)], x, sigma,
                                              options(m, pipe.scheduler.sigmas))[::-1]
    c_out = {n: calls[0][1] for n, calls in io.items()}
    with attention_io(model.unet) as io:
        cs.calc_cond_batch(model, [cs.cond(cond), cs.cond(uncond)], x, sigma, options(cs.ModelPatcher(model)))
    plain = {n: calls[0][1] for n, calls in io.items()}
    assert sorted(c_out) == sorted(d_out) and len(c_out) == 32
    for name in c_out:
        assert_close(c_out[name], d_out[name], rtol=1e-4, atol=1e-5, msg=name)
    changed = [n for n in c_out if not torch.allclose(c_out[n], plain[n], atol=1e-4)]
    assert any(n.endswith("attn1") for n in changed) and any(n.endswith("attn2") for n in changed)
    assert_close(torch.cat([c_uncond, c_cond]), x - sigma * eps, rtol=1e-4, atol=1e-4)


def test_sag_correction_matches_the_diffusers_host(model, tokenizer_dir):
    dynamic, cfg = {"sag": {"scale": 0.8, "blur_sigma": 1.0}}, 4.0
    pipe = tiny_pipeline(tokenizer_dir)
    x = latent(sigma=2.0)
    results = []
    for d in (dynamic, {}):
        eps, _, (cond, uncond), sigma, _ = diffusers_step(pipe, d, x, step=1)
        eps_cfg = eps[:1] + (eps[1:] - eps[:1]) * cfg
        results.append(x - sigma * eps_cfg)                   # x0 of the CFG result
    d_correction = results[0] - results[1]

    args = (x, sigma, cs.cond(uncond), cs.cond(cond), cfg)
    with_sag = cs.sampling_function(model, *args, options(patched(model, dynamic), pipe.scheduler.sigmas))
    without = cs.sampling_function(model, *args, options(cs.ModelPatcher(model), pipe.scheduler.sigmas))
    c_correction = with_sag - without
    assert c_correction.abs().max() > 1e-2
    assert_close(c_correction, d_correction, rtol=1e-4, atol=1e-4)
    assert_close(with_sag, results[0], rtol=1e-4, atol=1e-4)


def test_emitted_example_workflow_runs_the_node(model, clip):
    """The companion's workflow_api.json wires the node with every input it declares; run through the
    stand-in (links to the loader become its MODEL and CLIP), it samples and bends."""
    from ckptbend.companion import dynamic_part, example_workflow
    from ckptbend.recipe import load_recipe

    recipe = load_recipe(pathlib.Path(__file__).resolve().parent.parent / "recipes" / "sag-and-bending.toml")
    workflow = example_workflow(recipe, {"file": "sd1-sag.safetensors", "architecture": "sd1", "kind": "single-file"})
    json.dumps(workflow)
    assert workflow["1"]["inputs"]["ckpt_name"] == "sd1-sag.safetensors"
    for node in workflow.values():
        for value in node["inputs"].values():
            if isinstance(value, list):
                assert value[0] in workflow, value
    node = workflow["2"]
    (node_id, cls), = comfy_host.node_class_mappings(dynamic_part(recipe), recipe.name, recipe.sha256)[0].items()
    assert node["class_type"] == node_id
    assert set(node["inputs"]) == set(cls.INPUT_TYPES()["required"])
    assert "sunset" in node["inputs"]["bending_prompt"] and workflow["6"]["inputs"]["model"] == ["2", 0]

    loader = {"MODEL": cs.ModelPatcher(model), "CLIP": clip}
    links = {0: loader["MODEL"], 1: loader["CLIP"]}
    values = {k: links[v[1]] if isinstance(v, list) else v for k, v in node["inputs"].items()}
    m, model_2 = getattr(cls(), cls.FUNCTION)(**values)           # model_2: not wired
    assert model_2 is None
    cond, uncond = contexts()
    noise = latent()
    out = cs.sample(m, noise, cond, uncond, steps=2)
    assert torch.isfinite(out).all()
    assert not torch.equal(out, cs.sample(cs.ModelPatcher(model), noise, cond, uncond, steps=2))
