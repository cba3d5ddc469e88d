"""A stand-in ComfyUI host for tests: the protocol of shared/docs/comfyui-hooks.md around real weights.

ComfyUI cannot be installed here, so this module plays its part, written from the doc (and, where
the doc is silent, from what ComfyUI does), not from ckptbend's node:

- ModelPatcher: clone() deep-copies model_options (as ComfyUI does; patch functions are shared,
  the dicts and lists holding them are not) and the set_model_* calls of the doc's table.
- EPSModel (ComfyUI's BaseModel with ModelSamplingDiscrete, EPS): a seeded diffusers
  UNet2DConditionModel fed x/sqrt(σ²+1) at the discrete timestep nearest to σ; denoised = x − σ·eps.
  `.diffusion_model` is the UNet seen in ComfyUI's layout (input_blocks / middle_block /
  output_blocks holding the same modules), so a node can find the attention sites the way it
  would in ComfyUI.
- HookedAttention: every diffusers attention runs as ComfyUI's BasicTransformerBlock runs it:
  attn1/attn2_patch on the normalised hidden states (and context) before projection, then a
  replace function keyed (block_name, number, index), falling back to (block_name, number), on the
  projected q/k/v (output before to_out), else the selected backend (BACKEND.optimized_attention,
  attention_chunked by default, which differs from sdpa in the last bits as ComfyUI's CPU
  sub-quadratic attention does), then to_out, then output patches.
  extra_options: everything in transformer_options but the patches, plus n_heads, dim_head,
  attn_precision, block, block_index, transformer_index (global SpatialTransformer counter),
  activations_shape (the SpatialTransformer's input shape), original_shape, cond_or_uncond, sigmas,
  sample_sigmas, uuids, callbacks, wrappers.
- calc_cond_batch / sampling_function / cfg_function / sample: k-diffusion Euler with CFG. Chunks
  are batched in ComfyUI's order (the last conditioning first: [uncond, cond]) and marked by their
  position in the conds list, so SAG's calc_cond_batch(model, [uncond], …) re-run is marked [0],
  as in ComfyUI. `EPSModel.max_chunks = 1` runs each chunk in its own call (ComfyUI does so when
  memory is short). Post-CFG functions get the doc's args.
- install_comfy(): a fake `comfy` package in sys.modules: `comfy.samplers.calc_cond_batch` and
  `comfy.ldm.modules.attention` (the selected backend, with the optimized_attention_override hook).
- CLIP: tokenize(text) → {"l": [[(id, weight), …77]]}: BOS, up to 75 tokens, EOS, EOS padding, per
  chunk, with ComfyUI's emphasis syntax ("(word:1.2)", "((word))", "\\(" escapes; emphasis_segments).

Block numbering (ComfyUI's UNetModel layout for a diffusers config): input_blocks[0] is conv_in;
each down level adds one input block per resnet (with its SpatialTransformer when the level has
attention) and, except the last level, one for the downsampler; middle is 0; each up level adds
layers_per_block + 1 output blocks (the upsampler belongs to the level's last). For the tiny
SD1.x-like UNet below (4 levels, 2 layers, attention on the first three) that is SD 1.x's:
input 1, 2, 4, 5, 7, 8; middle 0; output 3–11; transformer_index 0–15.
"""

from __future__ import annotations

import copy
import json
import math
import sys
import types
import uuid

import torch
import torch.nn.functional as F
from torch import nn

UNET_CONFIG = {
    "sample_size": 16, "in_channels": 4, "out_channels": 4, "layers_per_block": 2, "norm_num_groups": 4,
    "block_out_channels": (16, 32, 32, 32),
    "down_block_types": ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    "up_block_types": ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    "cross_attention_dim": 32, "attention_head_dim": 8,     # diffusers' name for 8 heads, as SD 1.x
}
CONTEXT_DIM = 32


def tiny_unet(seed: int = 0):
    from diffusers import UNet2DConditionModel

    with torch.random.fork_rng():
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(**UNET_CONFIG)
        # Default-initialised q/k give near-uniform attention; larger logits give the maps
        # structure (a SAG mask that is neither empty nor full, bending that shows).
        for name, p in unet.named_parameters():
            if name.endswith(("to_q.weight", "to_k.weight")):
                p.data.mul_(4)
    return unet.eval()


# --- ComfyUI's layout of the UNet ---------------------------------------------------------------

class Site:
    """Where one transformer block sits in ComfyUI's numbering."""

    def __init__(self, block_name: str, number: int, index: int, transformer_index: int):
        self.block = (block_name, number)
        self.index = index
        self.transformer_index = transformer_index


def comfy_layout(unet) -> tuple[nn.Module, list[tuple[Site, nn.Module]]]:
    """(diffusion_model in ComfyUI's layout, [(site, diffusers BasicTransformerBlock)] in forward order)."""
    view = nn.Module()
    view.input_blocks, view.output_blocks = nn.ModuleList([nn.ModuleList([unet.conv_in])]), nn.ModuleList()
    sites = []
    counter = 0

    def add(block: nn.ModuleList, name: str, number: int, transformer):
        nonlocal counter
        block.append(transformer)
        for index, tb in enumerate(transformer.transformer_blocks):
            sites.append((Site(name, number, index, counter), tb))
        counter += 1

    for down in unet.down_blocks:
        for j, resnet in enumerate(down.resnets):
            block = nn.ModuleList([resnet])
            if getattr(down, "attentions", None):
                add(block, "input", len(view.input_blocks), down.attentions[j])
            view.input_blocks.append(block)
        if down.downsamplers:
            view.input_blocks.append(nn.ModuleList(down.downsamplers))
    mid = unet.mid_block
    view.middle_block = nn.ModuleList([mid.resnets[0]])
    add(view.middle_block, "middle", 0, mid.attentions[0])
    view.middle_block.append(mid.resnets[1])
    for up in unet.up_blocks:
        for j, resnet in enumerate(up.resnets):
            block = nn.ModuleList([resnet])
            if getattr(up, "attentions", None):
                add(block, "output", len(view.output_blocks), up.attentions[j])
            if j == len(up.resnets) - 1 and up.upsamplers:
                block.extend(up.upsamplers)
            view.output_blocks.append(block)
    return view, sites


def _per_head_mask(mask):
    """ComfyUI's backends take a mask [q, k], [b, q, k] or [b, heads, q, k]: the first two gain the missing
    batch and head dimensions (attention_pytorch's unsqueezes)."""
    if mask is not None and mask.ndim == 2:
        mask = mask[None]
    return mask[:, None] if mask is not None and mask.ndim == 3 else mask


def _heads_first(q, k, v, heads):
    """As ComfyUI's backends: each of q, k, v viewed as [b, -1, heads, d] with d from q, so a v given as
    [b, n, heads, d] (SD3's) reads as one given as [b, n, heads·d]; → [b, heads, n, d]."""
    b, _, inner = q.shape
    return (t.view(b, -1, heads, inner // heads).transpose(1, 2) for t in (q, k, v))


def attention_sdpa(q, k, v, heads, mask=None, attn_precision=None, skip_reshape=False, skip_output_reshape=False,
                   **kwargs):
    """ComfyUI's attention_pytorch: scaled_dot_product_attention over heads (a float mask is added to
    the logits, a boolean one keeps True keys)."""
    if not skip_reshape:
        q, k, v = _heads_first(q, k, v, heads)
    mask = _per_head_mask(mask)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    return out if skip_output_reshape else out.transpose(1, 2).flatten(2)


def attention_chunked(q, k, v, heads, mask=None, attn_precision=None, skip_reshape=False,
                      skip_output_reshape=False, key_chunk=5, **kwargs):
    """A backend that, like ComfyUI's sub-quadratic attention on CPU, computes the same function in a
    different order (keys in chunks of 5, an online softmax), so its results differ from
    scaled_dot_product_attention in the last bits: a node that bypasses the selected backend shows.
    Upcasts to float32 when attn_precision asks for it; the output is in q's dtype."""
    dtype = q.dtype
    if not skip_reshape:
        q, k, v = _heads_first(q, k, v, heads)
    if attn_precision == torch.float32:
        q, k, v = q.float(), k.float(), v.float()
    q = q * q.shape[-1] ** -0.5
    mask = _per_head_mask(mask)
    if mask is not None and mask.dtype == torch.bool:
        mask = torch.zeros(mask.shape, dtype=q.dtype).masked_fill_(~mask, float("-inf"))
    peak = total = acc = None
    for i in range(0, k.shape[2], key_chunk):
        s = q @ k[:, :, i:i + key_chunk].transpose(-1, -2)
        if mask is not None:
            s = s + mask[..., i:i + key_chunk]
        m = s.amax(-1, keepdim=True) if peak is None else torch.maximum(peak, s.amax(-1, keepdim=True))
        e = torch.exp(s - m)
        if peak is None:
            total, acc = e.sum(-1, keepdim=True), e @ v[:, :, i:i + key_chunk]
        else:
            fix = torch.exp(peak - m)
            total, acc = total * fix + e.sum(-1, keepdim=True), acc * fix + e @ v[:, :, i:i + key_chunk]
        peak = m
    out = (acc / total).to(dtype)
    return out if skip_output_reshape else out.transpose(1, 2).flatten(2)


class Backend:
    """comfy.ldm.modules.attention as a node sees it: optimized_attention (and _masked) is the backend
    the user selected (attention_chunked unless a test sets another), behind ComfyUI ≥ 0.3.60's
    wrap_attn: a call whose keyword transformer_options holds "optimized_attention_override" goes to
    override(func, *args, **kwargs, _inside_attn_wrapper=True) instead."""

    def __init__(self, func=attention_chunked, override_mechanism: bool = True):
        self.func = func
        self.wrap_attn = self._wrapped if override_mechanism else None

    def _wrapped(self, *args, **kwargs):
        options = kwargs.get("transformer_options")
        if "_inside_attn_wrapper" not in kwargs and options is not None and "optimized_attention_override" in options:
            return options["optimized_attention_override"](self.func, *args, **kwargs, _inside_attn_wrapper=True)
        kwargs.pop("_inside_attn_wrapper", None)
        kwargs.pop("transformer_options", None)
        return self.func(*args, **kwargs)

    def optimized_attention(self, q, k, v, heads, *args, **kwargs):
        if self.wrap_attn is None and "transformer_options" in kwargs:
            kwargs.pop("transformer_options")
        return self._wrapped(q, k, v, heads, *args, **kwargs)

    def optimized_attention_masked(self, q, k, v, heads, mask=None, *args, **kwargs):
        return self.optimized_attention(q, k, v, heads, mask, *args, **kwargs)


BACKEND = Backend()


class HookedAttention:
    """diffusers attention processor running one attn1/attn2 as ComfyUI's BasicTransformerBlock does."""

    def __init__(self, kind: str, site: Site, model: "EPSModel"):
        self.kind, self.site, self.model = kind, site, model

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None,
                 transformer_options=None):
        to = transformer_options or {}
        patches = to.get("patches", {})
        replace = to.get("patches_replace", {}).get(self.kind, {})
        extra = {k: v for k, v in to.items() if k not in ("patches", "patches_replace")}
        extra.update(n_heads=attn.heads, dim_head=attn.inner_dim // attn.heads,
                     attn_precision=self.model.attn_precision, block=self.site.block,
                     block_index=self.site.index, transformer_index=self.site.transformer_index)
        self.model.log.append((self.kind, self.site.block, self.site.index))
        q_in = hidden_states
        k_in = v_in = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        for p in patches.get(self.kind + "_patch", []):
            q_in, k_in, v_in = p(q_in, k_in, v_in, extra)
        q, k, v = attn.to_q(q_in), attn.to_k(k_in), attn.to_v(v_in)
        key = self.site.block + (self.site.index,)
        f = replace.get(key, replace.get(self.site.block))
        if f is not None:
            out = f(q, k, v, extra)
        else:
            out = BACKEND.optimized_attention(q, k, v, attn.heads, attn_precision=self.model.attn_precision,
                                              transformer_options=to)
        out = attn.to_out[1](attn.to_out[0](out))
        for p in patches.get(self.kind + "_output_patch", []):
            out = p(out, extra)
        return out


def _record_activations_shape(module, args, kwargs):
    """SpatialTransformer sets transformer_options["activations_shape"] to its input's shape."""
    hidden = args[0] if args else kwargs["hidden_states"]
    options = (kwargs.get("cross_attention_kwargs") or {}).get("transformer_options")
    if options is not None:
        options["activations_shape"] = list(hidden.shape)


# --- the model: ModelSamplingDiscrete + EPS around the UNet ------------------------------------

class EPSModel:
    """ComfyUI's BaseModel for an eps-prediction SD 1.x model."""

    def __init__(self, unet, attn_precision=None):
        self.unet = unet
        self.attn_precision = attn_precision
        self.max_chunks = 8
        self.log = []                                         # (kind, block, index) per attention call
        self.diffusion_model, self.sites = comfy_layout(unet)
        for site, tb in self.sites:
            tb.attn1.set_processor(HookedAttention("attn1", site, self))
            tb.attn2.set_processor(HookedAttention("attn2", site, self))
        for transformer in {id(m): m for m in unet.modules() if hasattr(m, "transformer_blocks")}.values():
            transformer.register_forward_pre_hook(_record_activations_shape, with_kwargs=True)
        betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2
        alphas_cumprod = torch.cumprod(1 - betas, 0)
        self.sigmas = ((1 - alphas_cumprod) / alphas_cumprod).sqrt().float()
        self.log_sigmas = self.sigmas.log()

    def timestep(self, sigma):
        """ModelSamplingDiscrete.timestep: the discrete timestep whose log-sigma is nearest."""
        return (sigma.log()[None] - self.log_sigmas[:, None]).abs().argmin(0).view(sigma.shape)

    def schedule(self, steps: int) -> torch.Tensor:
        """Sigmas at evenly spaced discrete timesteps from 999 to 0, then 0 ("normal"-like)."""
        t = torch.linspace(999, 0, steps).round().long()
        return torch.cat([self.sigmas[t], torch.zeros(1)])

    def apply_model(self, x, sigma, c_crossattn, transformer_options):
        return apply_model(self, x, sigma, c_crossattn, transformer_options)

    def _apply_model(self, x, sigma, c_crossattn, transformer_options):
        options = dict(transformer_options)
        options["original_shape"] = list(x.shape)
        s = sigma.view(-1, 1, 1, 1).to(x.dtype)
        eps = self.unet(x / (s ** 2 + 1).sqrt(), self.timestep(sigma), encoder_hidden_states=c_crossattn,
                        cross_attention_kwargs={"transformer_options": options}).sample
        return x - eps * s


APPLY_MODEL = "apply_model"          # comfy.patcher_extension.WrappersMP.APPLY_MODEL


class Executor:
    """What a wrapper gets as its first argument: call it to run the rest; class_obj is the BaseModel."""

    def __init__(self, run, class_obj):
        self.run, self.class_obj = run, class_obj

    def __call__(self, *args, **kwargs):
        return self.run(*args, **kwargs)


def apply_model(model, x, sigma, c_crossattn, transformer_options, **extra_conds):
    """BaseModel.apply_model: the APPLY_MODEL wrappers of transformer_options["wrappers"], outermost
    first, each called as w(executor, x, t, c_concat, c_crossattn, control, transformer_options,
    **extra_conds), around model._apply_model (which gets the extra conds, e.g. attention_mask)."""
    wrappers = [w for fs in transformer_options.get("wrappers", {}).get(APPLY_MODEL, {}).values() for w in fs]

    def run(i, x, t, c_concat, c_crossattn, control, transformer_options, **kwargs):
        if i == len(wrappers):
            return model._apply_model(x, t, c_crossattn, transformer_options, **kwargs)
        executor = Executor(lambda *a, **k: run(i + 1, *a, **k), model)
        return wrappers[i](executor, x, t, c_concat, c_crossattn, control, transformer_options, **kwargs)

    return run(0, x, sigma, None, c_crossattn, None, transformer_options, **extra_conds)


class ModelPatcher:
    """ComfyUI's ModelPatcher, the parts of the doc's table."""

    def __init__(self, model):
        self.model = model
        self.model_options = {"transformer_options": {}}
        self.wrappers = {}                  # {wrapper type: {key: [functions]}}, outside model_options

    def clone(self):
        n = ModelPatcher(self.model)
        n.model_options = copy.deepcopy(self.model_options)
        n.wrappers = {t: {k: list(fs) for k, fs in keyed.items()} for t, keyed in self.wrappers.items()}
        return n

    def add_wrapper_with_key(self, wrapper_type: str, key: str, wrapper):
        self.wrappers.setdefault(wrapper_type, {}).setdefault(key, []).append(wrapper)

    def sampling_options(self, sample_sigmas=None) -> dict:
        """model_options as ComfyUI's sampler passes them: transformer_options gets the schedule and
        a copy of the patcher's wrappers."""
        options = dict(self.model_options)
        wrappers = {t: {k: list(fs) for k, fs in keyed.items()} for t, keyed in self.wrappers.items()}
        options["transformer_options"] = {**options.get("transformer_options", {}), "sample_sigmas": sample_sigmas,
                                          "wrappers": wrappers}
        return options

    def set_model_sampler_post_cfg_function(self, post_cfg_function, disable_cfg1_optimization=False):
        self.model_options["sampler_post_cfg_function"] = (
            self.model_options.get("sampler_post_cfg_function", []) + [post_cfg_function])
        if disable_cfg1_optimization:
            self.model_options["disable_cfg1_optimization"] = True

    def set_model_patch(self, patch, name):
        patches = self.model_options["transformer_options"].setdefault("patches", {})
        patches[name] = patches.get(name, []) + [patch]

    def set_model_patch_replace(self, patch, name, block_name, number, transformer_index=None):
        # As comfy.model_patcher.set_model_options_patch_replace: transformer_options, its patches_replace
        # and that name's table are copied and the copy put in place, so a node holding the old
        # transformer_options dict writes to one the sampler never sees.
        options = dict(self.model_options["transformer_options"])
        options["patches_replace"] = dict(options.get("patches_replace", {}))
        options["patches_replace"][name] = dict(options["patches_replace"].get(name, {}))
        block = (block_name, number) if transformer_index is None else (block_name, number, transformer_index)
        options["patches_replace"][name][block] = patch
        self.model_options["transformer_options"] = options

    def set_model_attn1_patch(self, patch):
        self.set_model_patch(patch, "attn1_patch")

    def set_model_attn2_patch(self, patch):
        self.set_model_patch(patch, "attn2_patch")

    def set_model_attn1_replace(self, patch, block_name, number, transformer_index=None):
        self.set_model_patch_replace(patch, "attn1", block_name, number, transformer_index)

    def set_model_attn2_replace(self, patch, block_name, number, transformer_index=None):
        self.set_model_patch_replace(patch, "attn2", block_name, number, transformer_index)

    def set_model_attn1_output_patch(self, patch):
        self.set_model_patch(patch, "attn1_output_patch")

    def set_model_attn2_output_patch(self, patch):
        self.set_model_patch(patch, "attn2_output_patch")


# --- comfy.samplers --------------------------------------------------------------------------------

def cond(context) -> list[dict]:
    """A conditioning as the sampler holds it: one entry with its cross-attention context (a context
    tensor), or the entries given (dicts: "c_crossattn" and extra conds such as "attention_mask")."""
    return context if isinstance(context, list) else [{"c_crossattn": context}]


def _can_concat(a: dict, b: dict) -> bool:
    """ComfyUI batches two conditioning entries into one model call only if they have the same conds, each
    of the same shape apart from the context's length (CONDCrossAttn pads contexts; tests use one length)."""
    return a.keys() == b.keys() and all(a[k].shape == b[k].shape for k in a if k != "c_crossattn") and \
        all(torch.equal(a[k], b[k]) for k in CONSTANT_CONDS if k in a)


CONSTANT_CONDS = ("num_tokens",)      # CONDConstant (Mochi's): entries batch only when their values are equal


def calc_cond_batch(model, conds, x_in, timestep, model_options):
    """Denoised predictions [one per conds entry, None where the entry is None]."""
    to_run = [(i, c) for i, entries in enumerate(conds) if entries is not None for c in entries]
    to_run.reverse()                                   # ComfyUI batches the last conditioning first
    out = [None] * len(conds)
    b = x_in.shape[0]
    while to_run:
        first = to_run[0][1]
        batch = [e for e in to_run if _can_concat(first, e[1])][:model.max_chunks]
        to_run = [e for e in to_run if all(e is not b for b in batch)]
        options = dict(model_options.get("transformer_options", {}))
        options["cond_or_uncond"] = [i for i, _ in batch]
        options["uuids"] = [uuid.uuid4() for _ in batch]
        options["sigmas"] = timestep
        options.setdefault("callbacks", {})
        options.setdefault("wrappers", {})
        context = torch.cat([c["c_crossattn"].expand(b, -1, -1) for _, c in batch])
        extra = {k: torch.cat([c[k].expand(b, *c[k].shape[1:]) for _, c in batch]) for k in first if k != "c_crossattn"}
        result = model.apply_model(torch.cat([x_in] * len(batch)), torch.cat([timestep] * len(batch)),
                                   c_crossattn=context, transformer_options=options, **extra)
        for (i, _), chunk in zip(batch, result.chunk(len(batch))):
            out[i] = chunk
    return out


def cfg_function(model, cond_pred, uncond_pred, cond_scale, x, timestep, model_options, cond=None, uncond=None):
    cfg_result = uncond_pred + (cond_pred - uncond_pred) * cond_scale
    for fn in model_options.get("sampler_post_cfg_function", []):
        args = {"denoised": cfg_result, "cond": cond, "uncond": uncond, "cond_scale": cond_scale, "model": model,
                "uncond_denoised": uncond_pred, "cond_denoised": cond_pred, "sigma": timestep,
                "model_options": model_options, "input": x}
        cfg_result = fn(args)
    return cfg_result


def sampling_function(model, x, timestep, uncond, cond_, cond_scale, model_options):
    if math.isclose(cond_scale, 1.0) and not model_options.get("disable_cfg1_optimization", False):
        uncond = None
    cond_pred, uncond_pred = calc_cond_batch(model, [cond_, uncond], x, timestep, model_options)
    if uncond is None:
        uncond_pred = cond_pred
    return cfg_function(model, cond_pred, uncond_pred, cond_scale, x, timestep, model_options, cond_, uncond)


def sample(patcher: ModelPatcher, noise, positive, negative, cfg: float = 5.0, steps: int = 4,
           on_step=None) -> torch.Tensor:
    """Euler sampling with CFG (k-diffusion's sample_euler); positive/negative are contexts [1, T, C] or
    conditionings (cond()).
    on_step(i, x, denoised) sees every step."""
    model = patcher.model
    sigmas = model.schedule(steps)
    model_options = patcher.sampling_options(sigmas)
    x = noise * sigmas[0]
    with torch.no_grad():
        for i in range(steps):
            s = sigmas[i] * x.new_ones(x.shape[0])
            denoised = sampling_function(model, x, s, cond(negative), cond(positive), cfg, model_options)
            if on_step is not None:
                on_step(i, x, denoised)
            x = x + (x - denoised) / sigmas[i] * (sigmas[i + 1] - sigmas[i])
    return x


def install_comfy(monkeypatch, backend: Backend | None = None) -> types.ModuleType:
    """Register the fake `comfy` package for the test's duration: comfy.samplers.calc_cond_batch and
    comfy.ldm.modules.attention (optimized_attention, optimized_attention_masked, and wrap_attn when
    the backend has the override mechanism); backend replaces the module-level BACKEND."""
    if backend is not None:
        monkeypatch.setattr(sys.modules[__name__], "BACKEND", backend)
    names = ("comfy", "comfy.samplers", "comfy.ldm", "comfy.ldm.modules", "comfy.ldm.modules.attention",
             "comfy.patcher_extension")
    modules = {name: types.ModuleType(name) for name in names}
    for name, module in modules.items():
        if "." in name:
            parent, child = name.rsplit(".", 1)
            setattr(modules[parent], child, module)
        monkeypatch.setitem(sys.modules, name, module)
    modules["comfy.samplers"].calc_cond_batch = calc_cond_batch
    modules["comfy.patcher_extension"].WrappersMP = types.SimpleNamespace(APPLY_MODEL=APPLY_MODEL)
    attention = modules["comfy.ldm.modules.attention"]
    attention.optimized_attention = BACKEND.optimized_attention
    attention.optimized_attention_masked = BACKEND.optimized_attention_masked
    if BACKEND.wrap_attn is not None:
        attention.wrap_attn = BACKEND.wrap_attn
    return modules["comfy"]


# --- Wan 2.1: a DiT as ComfyUI runs it ---------------------------------------------------------------

def tiny_wan(seed: int = 5):
    """The tiny Wan 2.1 transformer of tests/_pipelines.py (same weights for the same seed)."""
    from _pipelines import wan_pipeline

    return wan_pipeline(seed).transformer


WAN_I2V = dict(image_dim=20, added_kv_proj_dim=24)     # CLIP-image features → the blocks' width (2 × 12)
CLIP_IMAGE_TOKENS = 257                                   # ComfyUI's clip_vision_output tokens for Wan I2V
WAN_TEXT_TOKENS = 512                                     # UMT5 padding; diffusers' I2V split assumes it


def tiny_wan_i2v(seed: int = 6):
    """A tiny Wan 2.1 I2V transformer: tests/_pipelines.py's config plus image_dim / added_kv_proj_dim
    (add_k_proj, add_v_proj, norm_added_k in each text cross-attention). Its context is [257 image; 512 text]."""
    from diffusers import WanTransformer3DModel
    from _pipelines import WAN_CONFIG

    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return WanTransformer3DModel(**WAN_CONFIG, **WAN_I2V).eval()


def _rotate(x, heads, rotary_emb):
    """RoPE as diffusers' Wan applies it: each head's interleaved pairs (x[2i], x[2i+1]) turned by the
    angle whose cosine / sine the rotary embedding holds at 2i / 2i+1; x [b, L, heads·d]."""
    cos, sin = rotary_emb
    xh = x.unflatten(-1, (heads, -1))
    even, odd = xh[..., 0::2], xh[..., 1::2]
    c, s = cos[..., 0::2], sin[..., 1::2]
    return torch.stack((even * c - odd * s, even * s + odd * c), dim=-1).flatten(-2).type_as(x).flatten(-2)


class WanHookedAttention:
    """diffusers' WanAttention run as ComfyUI's Wan attention runs it: q, k RMS-normed across heads (RoPE
    applied on self-attention), [b, L, heads·d], then comfy's optimized_attention(q, k, v, heads=…,
    transformer_options=…) with the block's transformer_options, then the output projection. I2V
    (WanI2VCrossAttention): the context is [image; text]; first a call to the CLIP-image keys
    (add_k_proj, norm_added_k, add_v_proj), then the text call, summed text + image."""

    def __init__(self, model: "FlowModel"):
        self.model = model

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None):
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        image = None
        if encoder_hidden_states is not None and attn.add_k_proj is not None:
            image, context = context[:, :-WAN_TEXT_TOKENS], context[:, -WAN_TEXT_TOKENS:]
        q, k, v = attn.norm_q(attn.to_q(hidden_states)), attn.norm_k(attn.to_k(context)), attn.to_v(context)
        if encoder_hidden_states is None and rotary_emb is not None:
            q, k = _rotate(q, attn.heads, rotary_emb), _rotate(k, attn.heads, rotary_emb)
        options = self.model.block_options
        image_out = None
        if image is not None:
            k_img, v_img = attn.norm_added_k(attn.add_k_proj(image)), attn.add_v_proj(image)
            self.model.log.append(("image", q.shape, k_img.shape))
            image_out = BACKEND.optimized_attention(q, k_img, v_img, heads=attn.heads, transformer_options=options)
        self.model.log.append(("self" if encoder_hidden_states is None else "cross", q.shape, k.shape))
        out = BACKEND.optimized_attention(q, k, v, heads=attn.heads, transformer_options=options)
        if image_out is not None:
            out = out + image_out
        return attn.to_out[1](attn.to_out[0](out))


class FlowModel:
    """ComfyUI's BaseModel for Wan 2.1 (ModelSamplingDiscreteFlow with shift, CONST prediction): the
    input is not scaled, the timestep is 1000·σ, denoised = x − σ·v. `.diffusion_model` has WanModel's
    face: `blocks` (each with `cross_attn`), `patch_size`. Each block runs behind ComfyUI's DiT loop
    hook: a patches_replace["dit"][("double_block", i)] function gets {"img", "txt", "vec", "pe",
    "transformer_options"} and {"original_block": f} and returns {"img": …}; the attention calls of the
    block see the transformer_options that reached f. I2V: clip_fea [1, 257, image_dim], the CLIP-vision
    output that ComfyUI's WanImageToVideo puts on both conditionings, goes with every item (the image
    latent ComfyUI concatenates to x is left out: it does not touch attention)."""

    def __init__(self, transformer, shift: float = 7.0, clip_fea=None):
        self.transformer, self.shift, self.clip_fea = transformer, shift, clip_fea
        self.attn_precision = None
        self.max_chunks = 8
        self.log = []
        self.options = self.block_options = None
        self.diffusion_model = nn.Module()
        self.diffusion_model.patch_size = tuple(transformer.config.patch_size)
        self.diffusion_model.blocks = transformer.blocks
        for i, block in enumerate(transformer.blocks):
            block.cross_attn = block.attn2
            if block.attn2.add_k_proj is not None:
                block.attn2.k_img = block.attn2.add_k_proj        # WanI2VCrossAttention's name
            block.attn1.set_processor(WanHookedAttention(self))
            block.attn2.set_processor(WanHookedAttention(self))
            block.forward = self._dit_block(block.forward, i)

    def _dit_block(self, inner, index):
        def forward(hidden_states, encoder_hidden_states, temb, rotary_emb):
            options = self.options
            replace = options.get("patches_replace", {}).get("dit", {}).get(("double_block", index))

            def original(args):
                self.block_options = args["transformer_options"]
                return {"img": inner(args["img"], args["txt"], args["vec"], args["pe"])}

            args = {"img": hidden_states, "txt": encoder_hidden_states, "vec": temb, "pe": rotary_emb,
                    "transformer_options": options}
            return (original(args) if replace is None else replace(args, {"original_block": original}))["img"]

        return forward

    def schedule(self, steps: int) -> torch.Tensor:
        t = torch.linspace(1, 0, steps + 1)[:-1]
        return torch.cat([self.shift * t / (1 + (self.shift - 1) * t), torch.zeros(1)])

    def apply_model(self, x, sigma, c_crossattn, transformer_options):
        return apply_model(self, x, sigma, c_crossattn, transformer_options)

    def _apply_model(self, x, sigma, c_crossattn, transformer_options):
        self.options = dict(transformer_options)
        try:
            image = None if self.clip_fea is None else self.clip_fea.expand(x.shape[0], -1, -1)
            v = self.transformer(x, sigma * 1000, encoder_hidden_states=c_crossattn,
                                 encoder_hidden_states_image=image).sample
        finally:
            self.options = self.block_options = None
        return x - v * sigma.view(-1, *[1] * (x.ndim - 1)).to(x.dtype)


def sample_advanced(patcher: ModelPatcher, x, positive, negative, sigmas, cfg: float = 5.0) -> torch.Tensor:
    """KSamplerAdvanced over its slice of a schedule (start_at_step / end_at_step, no noise added, leftover
    noise returned): Euler from x along `sigmas`, which the model sees as sample_sigmas, as ComfyUI
    passes the sliced schedule (comfy.samplers.KSampler.sample). Wan 2.2 A14B runs one per expert."""
    model = patcher.model
    model_options = patcher.sampling_options(sigmas)
    with torch.no_grad():
        for i in range(len(sigmas) - 1):
            s = sigmas[i] * x.new_ones(x.shape[0])
            denoised = sampling_function(model, x, s, cond(negative), cond(positive), cfg, model_options)
            x = x + (x - denoised) / sigmas[i] * (sigmas[i + 1] - sigmas[i])
    return x


class T5CLIP:
    """ComfyUI's CLIP object for a T5-family encoder (Wan's UMT5: key "umt5xxl"), only tokenize(): no start
    token, the weighted segments' tokens, the end token, padding with 0 up to min_length; no chunks."""

    def __init__(self, tokenizer, key: str = "umt5xxl", min_length: int = 16):
        self.tokenizer, self.key, self.min_length = tokenizer, key, min_length

    def tokenize(self, text: str) -> dict:
        tokens = [(t, w) for segment, w in emphasis_segments(text)
                  for t in self.tokenizer(segment, add_special_tokens=False)["input_ids"]]
        tokens.append((self.tokenizer.eos_token_id, 1.0))
        return {self.key: [tokens + [(0, 1.0)] * max(0, self.min_length - len(tokens))]}


# --- CLIP ----------------------------------------------------------------------------------------

WORDS = ("a", "romantic", "kiss", "at", "photo", "of", "dog", "lake", "red", "car", "on", "road", ("sun", "set"))
PUNCTUATION = "()[]{}:,.\\0123456789"


def write_tokenizer(folder) -> None:
    """vocab.json / merges.txt of a tiny CLIP BPE: single letters, punctuation and digits, and each word
    as one token by merges letter by letter (("sun", "set") becomes two sub-tokens)."""
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    merges = []
    for c in "abcdefghijklmnopqrstuvwxyz" + PUNCTUATION:
        vocab.setdefault(c, len(vocab))
        vocab.setdefault(c + "</w>", len(vocab))
    for word in WORDS:
        pieces = (word,) if isinstance(word, str) else word
        for j, piece in enumerate(pieces):
            symbols = list(piece)
            if j == len(pieces) - 1:
                symbols[-1] += "</w>"
            current = symbols[0]
            for s in symbols[1:]:
                merges.append(f"{current} {s}")
                current += s
                vocab.setdefault(current, len(vocab))
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    (folder / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 77}))


# ComfyUI's prompt weighting, as it behaves (written here, checked against ComfyUI's parser on sample prompts):
# "(text)" multiplies the weight by 1.1 per level, "(text:1.3)" sets it (the last colon followed by a
# number), "\(" and "\)" are literal parentheses, an unclosed "(" starts a literal segment. Every weighted
# segment is tokenised on its own; a segment shorter than 8 tokens that would cross a 77-token chunk
# moves whole into the next chunk, a longer one is split. Not modelled: "embedding:" names and
# other unbalanced parentheses (ComfyUI keeps a mismatched group literal; here a balanced inner group still weighs).
_OPEN, _CLOSE = "\ue000", "\ue001"          # escaped parentheses while parsing


def emphasis_segments(text: str, weight: float = 1.0) -> list[tuple[str, float]]:
    """[(text, weight)] of a prompt, escapes resolved."""
    text = text.replace("\\(", _OPEN).replace("\\)", _CLOSE)
    out, plain, i = [], "", 0
    while i < len(text):
        if text[i] == "(":
            depth, j = 0, i
            while j < len(text):
                depth += {"(": 1, ")": -1}.get(text[j], 0)
                if depth == 0:
                    break
                j += 1
            if j < len(text):                        # a balanced group text[i..j]
                out.append((plain, weight))
                plain, inner, w = "", text[i + 1:j], weight * 1.1
                colon = inner.rfind(":")
                if colon > 0:
                    try:
                        w, inner = float(inner[colon + 1:]), inner[:colon]
                    except ValueError:
                        pass
                out += emphasis_segments(inner, w)
                i = j + 1
                continue
            out.append((plain, weight))              # unclosed: literal, a segment of its own
            plain = ""
        plain += text[i]
        i += 1
    out.append((plain, weight))
    return [(t.replace(_OPEN, "(").replace(_CLOSE, ")"), w) for t, w in out if t]


class CLIP:
    """ComfyUI's CLIP object, only tokenize(): SD 1.x's "l" tokenizer, with ComfyUI's emphasis syntax."""

    def __init__(self, folder, max_word_length: int = 8):
        from transformers import CLIPTokenizer

        self.tokenizer = CLIPTokenizer.from_pretrained(str(folder))
        self.bos, self.eos = self.tokenizer.bos_token_id, self.tokenizer.eos_token_id
        self.max_word_length = max_word_length

    def tokenize(self, text: str) -> dict:
        """{"l": [[(id, weight), …77], …]}: per chunk BOS, up to 75 tokens, EOS, EOS padding."""
        chunks, chunk = [], [(self.bos, 1.0)]
        for segment, weight in emphasis_segments(text):
            group = [(t, weight) for t in self.tokenizer(segment, add_special_tokens=False)["input_ids"]]
            while group:
                room = 76 - len(chunk)
                if len(group) <= room:
                    chunk += group
                    break
                if len(group) >= self.max_word_length:        # split a long segment
                    chunk, group = chunk + group[:room], group[room:]
                chunks.append(chunk + [(self.eos, 1.0)] * (77 - len(chunk)))
                chunk = [(self.bos, 1.0)]
        chunks.append(chunk + [(self.eos, 1.0)] * (77 - len(chunk)))
        return {"l": chunks}
