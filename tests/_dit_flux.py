"""Shared by the Flux / Chroma / HunyuanVideo tests: diffusers' own single-file converters (with their
hard-coded width 3072 replaced by the file's width, so tiny files convert), strict loading, run-time
hooks (the reference a bake must equal) and forward inputs."""

import inspect

import torch
from diffusers.loaders import single_file_utils as sfu
from safetensors.torch import load_file

from ckptbend.synth import flux as synth_flux
from ckptbend.synth.flux_names import comfy_hunyuan_name, hunyuan_to_original
from _helpers import load_strict


def _patched(fn, old, new):
    """diffusers' converter, its own source, with one hard-coded constant replaced."""
    src = inspect.getsource(fn)
    assert src.count(old) == 1, (fn.__name__, old)
    namespace = dict(fn.__globals__)
    exec(compile(src.replace(old, new), f"<{fn.__name__} at file width>", "exec"), namespace)
    return namespace[fn.__name__]


_WIDTH = "checkpoint['img_in.weight'].shape[0]"
CONVERTERS = {
    "flux_dev": _patched(sfu.convert_flux_transformer_checkpoint_to_diffusers, "inner_dim = 3072", f"inner_dim = {_WIDTH}"),
    "chroma": _patched(sfu.convert_chroma_transformer_checkpoint_to_diffusers, "inner_dim = 3072", f"inner_dim = {_WIDTH}"),
    "hunyuan_video": _patched(sfu.convert_hunyuan_video_transformer_to_diffusers, "hidden_size = 3072",
                              "hidden_size = next(v.shape[0] for k, v in state_dict.items() "
                              "if k.endswith('x_embedder.proj.bias'))"),
}
CONVERTERS["flux_schnell"] = CONVERTERS["flux_dev"]
MODEL_PREFIX = {"single": "", "scaled_fp8": "", "comfy": "model.diffusion_model."}
_MODELS = {}


def model(arch, seed=0):
    """The tiny diffusers transformer synth writes for (arch, seed), float64, cached."""
    if (arch, seed) not in _MODELS:
        _MODELS[arch, seed] = synth_flux.build_transformer(arch, "tiny", seed).double()
    return _MODELS[arch, seed]


def empty(arch):
    return synth_flux.build_transformer(arch, "tiny", 99).double()


def dequantise(state):
    """ComfyUI scaled fp8 → plain tensors: weight × scale_weight; markers and activation scales dropped."""
    out = {}
    for k, v in state.items():
        if k == "scaled_fp8" or k.endswith((".scale_weight", ".scale_input")):
            continue
        scale = state.get(k.removesuffix("weight") + "scale_weight") if k.endswith(".weight") else None
        out[k] = v.double() * scale.double() if scale is not None else v.double()
    return out


def original_names(arch, layout, state):
    """The transformer's tensors of a file in the original names diffusers' converter reads."""
    if arch == "hunyuan_video" and layout == "comfy":
        # ComfyUI's Flux-style names, back to Tencent's through the renaming synth applies
        tencent = hunyuan_to_original(model(arch).state_dict())
        back = {comfy_hunyuan_name(k): k for k in tencent}
        assert len(back) == len(tencent), "the ComfyUI renaming must be one-to-one"
        return {back[k.removeprefix("model.model.")]: v for k, v in state.items() if k.startswith("model.model.")}
    prefix = MODEL_PREFIX[layout]
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)
            and not k.startswith(("text_encoders.", "vae.", "cond_stage_model.", "first_stage_model."))}


def load_transformer(arch, path, layout):
    """A baked or synthesised file → a strict-loaded float64 diffusers transformer, through diffusers' converter."""
    state = {k: v.double() if v.is_floating_point() else v for k, v in load_file(path).items()} \
        if layout != "scaled_fp8" else dequantise(load_file(path))
    if layout == "transformer_diffusers":
        converted = state
    else:
        converted = CONVERTERS[arch](original_names(arch, layout, state))
    return load_strict(empty(arch), converted)


def inputs(arch, seed=123):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    t = torch.tensor([0.37], dtype=torch.float64)
    if arch == "hunyuan_video":
        return dict(hidden_states=r(1, 4, 2, 4, 4), timestep=t, encoder_hidden_states=r(1, 5, 24),
                    encoder_attention_mask=torch.ones(1, 5, dtype=torch.long), pooled_projections=r(1, 20),
                    guidance=torch.tensor([3.5], dtype=torch.float64), return_dict=False)
    img_ids = torch.stack(torch.meshgrid(torch.zeros(1), torch.arange(2.), torch.arange(4.), indexing="ij"), -1)
    kwargs = dict(hidden_states=r(1, 8, 16), encoder_hidden_states=r(1, 5, 24), timestep=t,
                  img_ids=img_ids.reshape(-1, 3).double(), txt_ids=torch.zeros(5, 3, dtype=torch.float64),
                  return_dict=False)
    if arch != "chroma":
        kwargs["pooled_projections"] = r(1, 20)
    if arch in ("flux_dev", "hunyuan_video"):
        kwargs["guidance"] = torch.tensor([3.5], dtype=torch.float64)
    return kwargs


def forward(m, arch):
    with torch.no_grad():
        return m(**inputs(arch))[0]


# Where a q/k/v/out factor acts at run time in diffusers' Flux-style attention: q and k after their
# qk-norm, v the value projection, out the attention output (double blocks: the output projection;
# single blocks: the attention module's own output, before the fused proj_out).
HOOKS = {
    ("double", "image"): {"q": "attn.norm_q", "k": "attn.norm_k", "v": "attn.to_v", "out": "attn.to_out.0"},
    ("double", "text"): {"q": "attn.norm_added_q", "k": "attn.norm_added_k", "v": "attn.add_v_proj",
                         "out": "attn.to_add_out"},
    ("single", None): {"q": "attn.norm_q", "k": "attn.norm_k", "v": "attn.to_v", "out": "attn"},
}


def hooked(m, factors, blocks=None, stream=None):
    """Register the run-time multiply for `factors` ({q|k|v|out: f}) on the chosen blocks (labels D00/S01;
    None: all) and stream (None: both streams and the single blocks). Returns the hook handles."""
    handles = []
    for group, attr in (("double", "transformer_blocks"), ("single", "single_transformer_blocks")):
        for i, block in enumerate(getattr(m, attr)):
            label = f"{'D' if group == 'double' else 'S'}{i:02d}"
            if blocks is not None and label not in blocks:
                continue
            for s in (("image", "text") if group == "double" else (None,)):
                if stream is not None and s != stream:
                    continue
                for proj, f in factors.items():
                    module = block.get_submodule(HOOKS[group, s][proj])
                    handles.append(module.register_forward_hook(
                        lambda mod, args, out, f=f: tuple(o * f for o in out) if isinstance(out, tuple) else out * f))
    assert handles, "the reference must hook something, or the comparison proves nothing"
    return handles


def reference(arch, factors, blocks=None, stream=None, seed=0):
    m = model(arch, seed)
    handles = hooked(m, factors, blocks, stream)
    try:
        return forward(m, arch)
    finally:
        for h in handles:
            h.remove()
