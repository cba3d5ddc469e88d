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
  projected q/k/v (output before to_out), else plain attention, then to_out, then output patches.
  extra_options: everything in transformer_options but the patches, plus n_heads, dim_head,
  attn_precision, block, block_index, transformer_index (global SpatialTransformer counter),
  activations_shape (the SpatialTransformer's input shape), original_shape, cond_or_uncond, sigmas,
  sample_sigmas, uuids, callbacks, wrappers.
- calc_cond_batch / sampling_function / cfg_function / sample: k-diffusion Euler with CFG. Chunks
  are batched in ComfyUI's order (the last conditioning first: [uncond, cond]) and marked by their
  position in the conds list, so SAG's calc_cond_batch(model, [uncond], …) re-run is marked [0],
  as in ComfyUI. `EPSModel.max_chunks = 1` runs each chunk in its own call (ComfyUI does so when
  memory is short). Post-CFG functions get the doc's args.
- install_comfy(): a fake `comfy` package with `comfy.samplers.calc_cond_batch` in sys.modules.
- CLIP: tokenize(text) → {"l": [[(id, 1.0), …77]]}: BOS, up to 75 tokens, EOS, EOS padding, per
  chunk (ComfyUI's emphasis syntax is not parsed; the node strips its marks before tokenising).

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


def _plain_attention(q, k, v, heads):
    """ComfyUI's attention_pytorch: scaled_dot_product_attention over heads."""
    b, _, inner = q.shape
    d = inner // heads
    q, k, v = (t.view(b, -1, heads, d).transpose(1, 2) for t in (q, k, v))
    out = F.scaled_dot_product_attention(q, k, v)
    return out.transpose(1, 2).reshape(b, -1, heads * d)


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
        out = f(q, k, v, extra) if f is not None else _plain_attention(q, k, v, attn.heads)
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
        options = dict(transformer_options)
        options["original_shape"] = list(x.shape)
        s = sigma.view(-1, 1, 1, 1).to(x.dtype)
        eps = self.unet(x / (s ** 2 + 1).sqrt(), self.timestep(sigma), encoder_hidden_states=c_crossattn,
                        cross_attention_kwargs={"transformer_options": options}).sample
        return x - eps * s


class ModelPatcher:
    """ComfyUI's ModelPatcher, the parts of the doc's table."""

    def __init__(self, model: EPSModel):
        self.model = model
        self.model_options = {"transformer_options": {}}

    def clone(self):
        n = ModelPatcher(self.model)
        n.model_options = copy.deepcopy(self.model_options)
        return n

    def set_model_sampler_post_cfg_function(self, post_cfg_function, disable_cfg1_optimization=False):
        self.model_options["sampler_post_cfg_function"] = (
            self.model_options.get("sampler_post_cfg_function", []) + [post_cfg_function])
        if disable_cfg1_optimization:
            self.model_options["disable_cfg1_optimization"] = True

    def set_model_patch(self, patch, name):
        patches = self.model_options["transformer_options"].setdefault("patches", {})
        patches[name] = patches.get(name, []) + [patch]

    def set_model_patch_replace(self, patch, name, block_name, number, transformer_index=None):
        replace = self.model_options["transformer_options"].setdefault("patches_replace", {})
        block = (block_name, number) if transformer_index is None else (block_name, number, transformer_index)
        replace.setdefault(name, {})[block] = patch

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

def cond(context: torch.Tensor) -> list[dict]:
    """A conditioning as the sampler holds it: one entry with its cross-attention context."""
    return [{"c_crossattn": context}]


def calc_cond_batch(model, conds, x_in, timestep, model_options):
    """Denoised predictions [one per conds entry, None where the entry is None]."""
    to_run = [(i, c) for i, entries in enumerate(conds) if entries is not None for c in entries]
    to_run.reverse()                                   # ComfyUI batches the last conditioning first
    out = [None] * len(conds)
    b = x_in.shape[0]
    while to_run:
        batch, to_run = to_run[:model.max_chunks], to_run[model.max_chunks:]
        options = dict(model_options.get("transformer_options", {}))
        options["cond_or_uncond"] = [i for i, _ in batch]
        options["uuids"] = [uuid.uuid4() for _ in batch]
        options["sigmas"] = timestep
        options.setdefault("callbacks", {})
        options.setdefault("wrappers", {})
        context = torch.cat([c["c_crossattn"].expand(b, -1, -1) for _, c in batch])
        result = model.apply_model(torch.cat([x_in] * len(batch)), torch.cat([timestep] * len(batch)),
                                   c_crossattn=context, transformer_options=options)
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
    """Euler sampling with CFG (k-diffusion's sample_euler); positive/negative are contexts [1, T, C].
    on_step(i, x, denoised) sees every step."""
    model = patcher.model
    sigmas = model.schedule(steps)
    model_options = dict(patcher.model_options)
    model_options["transformer_options"] = {**model_options.get("transformer_options", {}), "sample_sigmas": sigmas}
    x = noise * sigmas[0]
    with torch.no_grad():
        for i in range(steps):
            s = sigmas[i] * x.new_ones(x.shape[0])
            denoised = sampling_function(model, x, s, cond(negative), cond(positive), cfg, model_options)
            if on_step is not None:
                on_step(i, x, denoised)
            x = x + (x - denoised) / sigmas[i] * (sigmas[i + 1] - sigmas[i])
    return x


def install_comfy(monkeypatch) -> types.ModuleType:
    """Register the fake `comfy` package (comfy.samplers.calc_cond_batch) for the test's duration."""
    comfy = types.ModuleType("comfy")
    samplers = types.ModuleType("comfy.samplers")
    samplers.calc_cond_batch = calc_cond_batch
    comfy.samplers = samplers
    monkeypatch.setitem(sys.modules, "comfy", comfy)
    monkeypatch.setitem(sys.modules, "comfy.samplers", samplers)
    return comfy


# --- CLIP --------------------------------------------------------------------------------------

WORDS = ("a", "romantic", "kiss", "at", "photo", "of", "dog", ("sun", "set"))


def write_tokenizer(folder) -> None:
    """vocab.json / merges.txt of a tiny CLIP BPE: single letters, and each word as one token by
    merges letter by letter (("sun", "set") becomes two sub-tokens)."""
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    merges = []
    for c in "abcdefghijklmnopqrstuvwxyz":
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


class CLIP:
    """ComfyUI's CLIP object, only tokenize(): SD 1.x's "l" tokenizer format."""

    def __init__(self, folder):
        from transformers import CLIPTokenizer

        self.tokenizer = CLIPTokenizer.from_pretrained(str(folder))
        self.bos, self.eos = self.tokenizer.bos_token_id, self.tokenizer.eos_token_id

    def tokenize(self, text: str) -> dict:
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        chunks = [ids[i:i + 75] for i in range(0, len(ids), 75)] or [[]]
        return {"l": [[(self.bos, 1.0)] + [(t, 1.0) for t in c] + [(self.eos, 1.0)] * (76 - len(c))
                      for c in chunks]}
