"""diffusers host: wire SAG, Slothful Attention and Attention Bending into a pipeline at sampling time.

Imports only the standard library, torch and the sibling runtime modules: this file is copied
verbatim into the companion folder, which a ComfyUI host imports without diffusers. diffusers'
objects are duck-typed: attention processors are callables
`(attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs)`,
attention modules are found by `named_modules()`. The math lives in sag.py, slothful.py and
bending.py; this file only wires it in.

    session = apply(pipe, {"sag": {...}, "slothful": {...}, "bending": [...]})
    latents = pipe(prompt="a romantic {kiss} at {sunset}", ...)
    session.maps      # recorded cross-attention maps (phase 1, or record_maps=True)
    remove(pipe)      # the pipeline exactly as it was

Wiring. Every attn1 / attn2 of the model's transformer blocks gets a processor that holds the
original processor object and calls it whenever it has nothing to do (output bit-identical). A
forward pre-hook on the model (pipe.unet or pipe.transformer; Wan 2.2 A14B's low-noise expert
pipe.transformer_2 is wired alike) describes each call: latent size, batch layout, scheduler step
and ᾱ. SAG adds a pre-hook on the UNet's mid_block (its real grid) and a forward hook on the UNet
(the correction). Bending wraps pipe.encode_prompt (an instance
attribute) to strip the prompt's "{word}" marks (bending.py; nothing else of the prompt is touched,
so compel-style weights stay the user's encoder's business) and find the words' token columns.

Conventions:
- Batch layout: diffusers' CFG batches are [uncond…, cond…]: a call whose batch is twice the last
  encoded prompt's (or, before any prompt, an even batch while pipe.do_classifier_free_guidance).
  WanPipeline runs CFG as two calls of the prompt's batch: a call is conditional when its
  encoder_hidden_states equal the encoded prompt's. Without CFG, SAG is skipped (one warning) and
  bending acts on every item.
- Step index (bending's apply_to_timesteps, map records): the position of this model call in
  scheduler.timesteps (the scheduler's own step_index when it keeps one, else the first matching
  timestep), divided by scheduler.order. Second-order schedulers (Heun: order 2, timesteps
  [t0, t1, t1, t2, t2, …]) call the model twice per step; both calls get that step's index.
  Wan 2.2 A14B's two experts share the pipeline's scheduler, so a step keeps its index whichever
  expert runs it (an apply_to_timesteps window counts the whole run); layers count within an expert.
- ᾱ of a call: from the scheduler's own sigma for it when the scheduler keeps one (Euler, DPM++,
  Heun: ᾱ = 1/(1+σ²), the value the scheduler itself turns the prediction into x0 with, Karras
  sigmas included), else scheduler.alphas_cumprod[t] (DDIM, DDPM). The UNet's input is variance-
  preserving in diffusers (scale_model_input makes it so). Slothful's sigma = sqrt((1−ᾱ)/ᾱ).
- SAG's extra UNet call runs with the uncond halves of every batched argument. SAG itself (no
  recording, no recursion) and bending (no conditional item) stay out of it; Slothful stays on,
  as in ComfyUI, whose extra call runs the patched model. SAG's map is the unreduced attention
  even where Slothful reduces that site (keep_middle false).
- Maps: a record is {"token", "layer", "step", "original", "bent"}; original/bent are float32 CPU
  maps [h, w] (video [frames, h, w]): the word's columns averaged over its sub-tokens, the heads and
  the conditional items. step is None for a model call outside the scheduler's timesteps.
- Prompt lists: each prompt is searched; the words must sit at the same columns in all of them
  (else ValueError). Words are located with pipe.tokenizer (SDXL's two CLIP tokenizers agree);
  marks are also removed from prompt_2, but the columns come from prompt.
- Recomputed attention (Slothful's reduced case, Bending) follows diffusers' AttnProcessor2_0 (and
  WanAttnProcessor) for a transformer block's attention: 3-D input, no spatial / group norm, softmax
  scale d^−½; image key/values only for Wan I2V's text cross-attention (its image attention is left
  as the processor computes it). Other attentions are left to their processor. Slothful leaves calls
  with an attention mask alone.
- Bending never forms the [S, T] probabilities: SDPA's output plus bending.bent_output's exact
  float32 correction of the bent columns, per chunk of queries, on the conditional rows
  (bent_attention); the maps come from those columns.
"""

from __future__ import annotations

import dataclasses
import inspect
import warnings
from typing import Mapping

import torch
import torch.nn.functional as F

from . import bending, sag, slothful

SESSION_ATTR = "_ckptbend_session"
DYNAMIC_KEYS = ("sag", "slothful", "slothful_simple", "bending")   # slothful_simple: informational only
BLOCK_KINDS = {"down_blocks": "input", "mid_block": "middle", "up_blocks": "output"}   # ComfyUI's names
EXECUTION_ORDER = {"down_blocks": 0, "mid_block": 1, "up_blocks": 2}   # named_modules() gives down, up, mid
SAG_SITE = "mid_block.attentions.0.transformer_blocks.0.attn1"
WAN_TEXT_LENGTH = 512          # diffusers' WanAttnProcessor: I2V's text is the context's last 512 tokens
# Joint-attention DiTs by class name: their "attn" modules attend over [text; image] (Flux, Qwen-Image) or
# [image; text] (SD3) tokens at once.
JOINT_MODELS = {"FluxTransformer2DModel": "flux", "ChromaTransformer2DModel": "flux", "SD3Transformer2DModel": "sd3",
                "QwenImageTransformer2DModel": "qwen"}


# --- the API ---------------------------------------------------------------------------------------

def apply(pipe, dynamic: Mapping, *, phase: int = 2, record_maps: bool | None = None) -> "Session":
    """Patch `pipe` with the recipe's sampling-time part; returns the Session (also pipe._ckptbend_session).

    phase 2: bending changes the output; phase 1: bent maps are computed and recorded, the output is
    bit-identical to no bending (SAG and Slothful, if the recipe has them, still act). record_maps (default: phase == 1) records maps at every bent call.
    """
    if getattr(pipe, SESSION_ATTR, None) is not None:
        raise ValueError("ckptbend is already applied; call remove first")
    if phase not in (1, 2):
        raise ValueError(f"phase must be 1 (visualise only) or 2 (bend), got {phase!r}")
    models = _denoisers(pipe)
    sag_params, slothful_params, entries = _parse(dynamic)
    if (sag_params or slothful_params) and not hasattr(models[0], "mid_block"):
        raise ValueError("SAG and Slothful Attention need a UNet; this pipeline's model is a "
                         f"{type(models[0]).__name__}")
    session = Session(pipe, models, sag_params, slothful_params, entries, phase,
                      phase == 1 if record_maps is None else bool(record_maps))
    try:
        session._install()
    except BaseException:
        session._uninstall()
        raise
    setattr(pipe, SESSION_ATTR, session)
    return session


def remove(pipe) -> None:
    """Undo apply(): the original processor objects, hooks and attributes; a no-op on an unpatched pipe."""
    session = getattr(pipe, SESSION_ATTR, None)
    if session is None:
        return
    session._uninstall()
    delattr(pipe, SESSION_ATTR)


# --- the recipe's dynamic part ---------------------------------------------------------------------

def _parse(dynamic: Mapping):
    """(SAG parameters or None, Slothful parameters or None, [BendSpec]); None / absent = off."""
    if not isinstance(dynamic, Mapping):
        raise ValueError(f"dynamic must be a mapping, got {type(dynamic).__name__}")
    unknown = sorted(set(dynamic) - set(DYNAMIC_KEYS))
    if unknown:
        raise ValueError(f"unknown dynamic technique(s): {', '.join(map(str, unknown))} "
                         f"(known: {', '.join(DYNAMIC_KEYS)})")
    for key in ("sag", "slothful"):
        if dynamic.get(key) is not None and not isinstance(dynamic[key], Mapping):
            raise ValueError(f"{key} must be a mapping of parameters, got {type(dynamic[key]).__name__}")
    sag_params = None
    if dynamic.get("sag") is not None:
        extra = sorted(set(dynamic["sag"]) - set(sag.SAG_DEFAULTS))
        if extra:
            raise ValueError(f"unknown SAG parameter(s): {', '.join(map(str, extra))}")
        sag_params = {**sag.SAG_DEFAULTS, **dynamic["sag"]}
        if sag_params["scale"] == 0:          # nothing to do: no recording, no extra call
            sag_params = None
    slothful_params = None
    if dynamic.get("slothful") is not None:
        slothful_params = slothful.resolve_params(dynamic["slothful"])
    entries = dynamic.get("bending") or []
    if not isinstance(entries, (list, tuple)):
        raise ValueError(f"bending must be a list of entries, got {type(entries).__name__}")
    specs = []
    for entry in entries:
        try:
            specs.append(bending.as_spec(entry))
        except TypeError as e:                # a missing field or a non-mapping
            raise ValueError(f"bad bending entry {entry!r}: {e}") from None
    return sag_params, slothful_params, specs


def _denoisers(pipe) -> list:
    """The models apply() wires: the UNet, else the transformer and, when present, transformer_2 (Wan 2.2
    A14B: high-noise and low-noise experts; either may be absent), each model once."""
    unet = getattr(pipe, "unet", None)
    found = [unet] if unet is not None else [getattr(pipe, n, None) for n in ("transformer", "transformer_2")]
    models = list({id(m): m for m in found if m is not None}.values())
    if not models:
        raise ValueError(f"{type(pipe).__name__} has neither a unet nor a transformer")
    return models


# --- one model call --------------------------------------------------------------------------------

@dataclasses.dataclass
class _Call:
    """What the processors need to know about the model call in progress."""
    latent_hw: tuple[int, int]          # the model input's (H, W)
    token_hw: tuple[int, int]           # its finest image-token grid: (H, W) / patch size
    frames: int | None                  # video latents [b, c, frames, H, W]
    cfg: bool                           # a batched [uncond…, cond…] call
    cond_rows: list[int]                # conditional batch items
    step: int | None
    alpha_cumprod: float | None         # only computed for SAG / Slothful
    mid_hw: tuple[int, int] | None = None      # SAG: the UNet's middle-block grid
    sag_probs: torch.Tensor | None = None      # SAG: unconditional probabilities at SAG_SITE
    sag_heads: int | None = None
    n_text: int | None = None                  # joint models: the text tokens (encoder_hidden_states)


def _position(scheduler, t: float) -> int | None:
    """This model call's index in scheduler.timesteps. The scheduler's own step_index when it keeps
    one and it matches t (schedulers that repeat timesteps, Heun, need it), else the first match."""
    timesteps = getattr(scheduler, "timesteps", None)
    if timesteps is None:
        return None
    timesteps = torch.as_tensor(timesteps).detach().flatten().double().cpu()
    index = getattr(scheduler, "step_index", None)
    if index is not None and index < len(timesteps) and abs(float(timesteps[index]) - t) < 1e-3:
        return int(index)
    hits = ((timesteps - t).abs() < 1e-3).nonzero().flatten()
    return int(hits[0]) if len(hits) else None


def _alpha_cumprod(scheduler, t: float, position: int | None) -> float:
    """ᾱ of this call: 1/(1+σ²) from the scheduler's sigma for it, else alphas_cumprod[t]."""
    sigmas = getattr(scheduler, "sigmas", None)
    if sigmas is not None and position is not None and position < len(sigmas):
        return 1.0 / (1.0 + float(sigmas[position]) ** 2)
    return float(scheduler.alphas_cumprod[int(round(t))])


def _patch_size(model) -> tuple[int, int, int]:
    """(frames, rows, columns) of one image token: 1 for a UNet, (p, p) or (t, h, w) for a DiT."""
    size = getattr(model.config, "patch_size", None) or 1
    if not isinstance(size, (tuple, list)):
        return 1, size, size
    return (1, *size) if len(size) == 2 else tuple(size)


def _packed_grid(kwargs) -> tuple[int, int] | None:
    """(rows, cols) of a packed [b, L, c] image input: Flux's from its position ids (index, row, col), the
    main image's, whose index is the first id's (Kontext reference images follow with another); Qwen-Image's
    from img_shapes, [[(frames, rows, cols), …reference images]] per item (or one list for all)."""
    shapes = kwargs.get("img_shapes")
    if shapes:
        shape = shapes[0][0] if isinstance(shapes[0], list) else shapes[0]
        return int(shape[1]), int(shape[2])
    ids = kwargs.get("img_ids")
    if ids is None:
        return None
    ids = ids[0] if ids.ndim == 3 else ids
    main = ids[ids[:, 0] == ids[0, 0]]
    return int(main[:, 1].max()) + 1, int(main[:, 2].max()) + 1


def _first_rows(value, batch: int, keep: int):
    """value with every tensor of `batch` items cut to its first `keep` (nested dicts, lists, tuples)."""
    if torch.is_tensor(value):
        return value[:keep] if value.ndim and value.shape[0] == batch else value
    if isinstance(value, dict):
        return {k: _first_rows(v, batch, keep) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_first_rows(v, batch, keep) for v in value)
    return value


def _model_input(args, kwargs):
    return args[0] if args else kwargs.get("sample", kwargs.get("hidden_states"))


def _prediction(output):
    return output[0] if isinstance(output, tuple) else output.sample


# --- explicit attention (diffusers' AttnProcessor2_0, with two seams) ---------------------------

def _plain(attn, hidden_states, image_kv: bool = False) -> bool:
    """A transformer block's attention: what attention() reproduces. image_kv: also Wan I2V's text
    cross-attention with its added image key/values (WanAttention: add_k_proj, norm_added_k)."""
    added = getattr(attn, "add_k_proj", None) is not None
    return (hidden_states.ndim == 3 and getattr(attn, "spatial_norm", None) is None
            and getattr(attn, "group_norm", None) is None and not getattr(attn, "fused_projections", False)
            and (not added or image_kv and hasattr(attn, "norm_added_k")))


def _qk_norm(norm, x, heads):
    """norm_q / norm_k: a norm sized for all heads (WanAttention) acts on [b, n, heads·d], one sized
    for a head (Attention) on each head."""
    if norm is None:
        return x
    size = tuple(getattr(norm, "normalized_shape", None) or getattr(norm, "dim", None) or ())
    if size and size[-1] == x.shape[-1]:
        return norm(x)
    return norm(x.unflatten(-1, (heads, -1))).flatten(-2)


def _sdpa(q, k, v, heads, bias=None):
    """scaled_dot_product_attention on [b, n, heads·d], as AttnProcessor2_0 calls it."""
    b = q.shape[0]
    q, k, v = (x.unflatten(-1, (heads, -1)).transpose(1, 2) for x in (q, k, v))
    if bias is not None:
        bias = bias.view(b, heads, -1, bias.shape[-1])
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=0.0, is_causal=False)
    return out.transpose(1, 2).flatten(2)


def attention(attn, hidden_states, k_in, v_in, attention_mask=None, attend=_sdpa, image=None):
    """AttnProcessor2_0 (WanAttnProcessor) for a transformer block's attention (_plain), with the
    key/value inputs given separately (Slothful passes reduced ones; the query keeps every token)
    and the core attend(q, k, v, heads, bias) -> [b, S, heads·d] replaceable (Bending). image: Wan
    I2V's CLIP-image tokens, attended through add_k_proj / add_v_proj and added to the text's result."""
    residual = hidden_states
    bias = None
    if attention_mask is not None:
        bias = attn.prepare_attention_mask(attention_mask, k_in.shape[1], hidden_states.shape[0])
    q = _qk_norm(getattr(attn, "norm_q", None), attn.to_q(hidden_states), attn.heads)
    k = _qk_norm(getattr(attn, "norm_k", None), attn.to_k(k_in), attn.heads)
    v = attn.to_v(v_in)
    out = attend(q, k, v, attn.heads, bias).to(q.dtype)
    if image is not None:
        k_img, v_img = attn.norm_added_k(attn.add_k_proj(image)), attn.add_v_proj(image)
        out = out + _sdpa(q, k_img, v_img, attn.heads).to(q.dtype)
    out = attn.to_out[1](attn.to_out[0](out))            # linear, dropout
    if getattr(attn, "residual_connection", False):
        out = out + residual
    return out / getattr(attn, "rescale_output_factor", 1.0)


def bent_attention(q, k, v, heads, bias, rows, apply=True, observe=None, **bend):
    """SDPA (the processor's own attention) for every batch item, plus bending.bent_output's exact
    float32 correction of the bent text columns on the consecutive batch rows `rows`: no [S, T]
    probability matrix. q [b, S, heads·d], k, v [b, T, heads·d]; bias: prepare_attention_mask's
    [b·heads, 1, T]; bend: bent_output's entries, token_indices, grid_hw, step_index, layer_index,
    frames. apply=False (phase 1): observe sees the columns, the output stays unbent."""
    out = _sdpa(q, k, v, heads, bias)
    if not rows:
        return out
    r = slice(rows[0], rows[-1] + 1)
    if list(range(q.shape[0])[r]) != list(rows):
        raise ValueError(f"bent rows must be consecutive, got {rows}")
    target = out if apply else out.clone()

    def per_head(x):
        return x[r].unflatten(-1, (heads, -1)).transpose(1, 2)

    if bias is not None:
        bias = bias.view(q.shape[0], heads, -1, bias.shape[-1])[r]
    bending.bent_output(per_head(target), per_head(q), per_head(k), per_head(v), bias=bias, observe=observe, **bend)
    return out


def _word_map(columns, heads, local, shape):
    """A word's map: its columns (local positions in bent_output's columns [rows·heads, S, n]) averaged
    over sub-tokens, heads and the bent rows."""
    return columns[..., local].mean(dim=(0, 2)).reshape(shape).float().cpu()


# --- the session -------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class _Site:
    name: str
    module: object
    cross: bool                 # attn2: text cross-attention
    block_kind: str | None      # UNet: "input" | "middle" | "output"
    layer: int | None           # cross-attention sites: position in the model's order
    joint: bool = False         # a joint attention over text and image tokens (its layer counts blocks)


def _sites(model) -> list[_Site]:
    """Every attn1 / attn2 of the model's transformer blocks, in execution order (UNet: down, mid, up);
    on a joint model (JOINT_MODELS) its blocks' joint attentions `attn` instead, in order (Flux: double
    then single blocks, as ComfyUI counts them; SD3.5's attn2 is image self-attention, left alone)."""
    if type(model).__name__ in JOINT_MODELS:
        found = [(n, m) for n, m in model.named_modules() if n.rsplit(".", 1)[-1] == "attn" and hasattr(m, "processor")]
        return [_Site(n, m, False, None, layer, joint=True) for layer, (n, m) in enumerate(found)]
    found = [(n, m) for n, m in model.named_modules()
             if n.rsplit(".", 1)[-1] in ("attn1", "attn2") and hasattr(m, "processor")]
    found.sort(key=lambda nm: EXECUTION_ORDER.get(nm[0].split(".")[0], 0))      # stable
    sites, layer = [], 0
    for name, module in found:
        cross = name.endswith("attn2")
        sites.append(_Site(name, module, cross, BLOCK_KINDS.get(name.split(".")[0]), layer if cross else None))
        layer += cross
    return sites


class Session:
    """What apply() installed on one pipeline, and what it records: `maps` (see the module docstring;
    records accumulate over pipeline calls, clear the list between runs if needed)."""

    def __init__(self, pipe, models, sag_params, slothful_params, entries, phase, record_maps):
        self.pipe, self.models = pipe, list(models)     # one model, or Wan 2.2's two experts
        self.sag, self.slothful, self.entries = sag_params, slothful_params, entries
        self.phase, self.record_maps = phase, record_maps
        self.maps: list[dict] = []
        self.token_indices: dict[str, list[int]] | None = None   # the last encoded prompt's word columns
        self.prompt_embeds: torch.Tensor | None = None           # the last encoded prompt (conditional)
        self.call: _Call | None = None
        self.joint = JOINT_MODELS.get(type(self.models[0]).__name__)     # None: cross-attention models
        self._undo: list = []
        self._in_sag_call = False
        self._warned_no_cfg = False

    # installing -------------------------------------------------------------------------------

    def _install(self):
        for model in self.models:
            self._install_model(model)
        if self.sag:                          # a UNet: the only model
            self._undo.append(self.models[0].mid_block.register_forward_pre_hook(
                self._before_mid, with_kwargs=True).remove)
        if hasattr(self.pipe, "encode_prompt"):
            self._wrap_encode_prompt()

    def _install_model(self, model):
        """One model's processors and its pre / post hooks (every model shares this session's state)."""
        for site in _sites(model):
            original = site.module.processor
            site.module.set_processor(_Processor(self, site, original))
            self._undo.append(lambda m=site.module, p=original: m.set_processor(p))
        hooks = [model.register_forward_pre_hook(self._before_model, with_kwargs=True),
                 model.register_forward_hook(self._after_model, with_kwargs=True)]
        self._undo += [h.remove for h in hooks]

    def _uninstall(self):
        while self._undo:
            self._undo.pop()()
        self.call = None

    def _wrap_encode_prompt(self):
        """pipe.encode_prompt as an instance attribute: with bending, strip the marks and locate the
        words first (errors come before any denoising); always, keep the conditional embeddings."""
        pipe = self.pipe
        had, before = "encode_prompt" in vars(pipe), vars(pipe).get("encode_prompt")
        inner = pipe.encode_prompt
        signature = inspect.signature(inner)

        def encode_prompt(*args, **kwargs):
            if self.entries:
                bound = signature.bind(*args, **kwargs)
                prompt = bound.arguments.get("prompt")
                if prompt is None:
                    raise ValueError("Attention Bending finds its words in the prompt: call the pipeline "
                                     "with prompt=..., not with prompt_embeds alone")
                for name in ("prompt", "prompt_2"):
                    if bound.arguments.get(name) is not None:
                        bound.arguments[name] = _unmark(bound.arguments[name])
                self.token_indices = self._locate(bound.arguments)
                args, kwargs = bound.args, bound.kwargs
            result = inner(*args, **kwargs)
            self.prompt_embeds = result[0]            # prompt_embeds first, in every diffusers pipeline
            return result

        pipe.encode_prompt = encode_prompt
        self._undo.append(lambda: setattr(pipe, "encode_prompt", before) if had else delattr(pipe, "encode_prompt"))

    def _locate(self, arguments) -> dict[str, list[int]]:
        """word → its token columns, the same in every prompt of a list (else ValueError), in the text
        the model attends to: pipe.tokenizer's encoding of prompt; on Flux the T5 tokens (tokenizer_2, of
        prompt_2 when given, as FluxPipeline encodes them); on SD3 the CLIP-L tokens (tokenizer: CLIP-G's
        share their places) and, where the word is among them, its T5 tokens (tokenizer_3, of prompt_3 when
        given), which follow the tokenizer_max_length CLIP tokens in the context."""
        pipe = self.pipe
        if self.joint == "flux":                       # Chroma: T5 is its only tokenizer
            t5 = getattr(pipe, "tokenizer_2", None) or pipe.tokenizer
            return self._columns(t5, arguments.get("prompt_2") or arguments["prompt"])
        if self.joint == "qwen":
            return self._qwen_columns(arguments["prompt"])
        found = self._columns(pipe.tokenizer, arguments["prompt"], arguments.get("clean_caption", False))
        if self.joint == "sd3" and getattr(pipe, "text_encoder_3", None) is not None:
            t5_prompt = arguments.get("prompt_3") or arguments["prompt"]
            for word in found:
                try:
                    more = self._columns(pipe.tokenizer_3, t5_prompt, words=[word])[word]
                except ValueError:
                    continue                   # the word is not among the T5 tokens
                found[word] = found[word] + [pipe.tokenizer_max_length + j for j in more]
        return found

    def _qwen_columns(self, prompt) -> dict[str, list[int]]:
        """QwenImagePipeline: the prompt in its chat template (prompt_template_encode), the first
        prompt_template_encode_start_idx tokens dropped (diffusers' rule; ComfyUI's template_end rule drops
        the same 34 with Qwen2.5's tokenizer), the template's tail after the prompt. A word is found spelled
        after a space or bare (byte-level BPE: the first word, one after "("), the earlier wins."""
        pipe = self.pipe
        template, drop = pipe.prompt_template_encode, pipe.prompt_template_encode_start_idx

        def kept(text):
            return pipe.tokenizer(template.format(text))["input_ids"][drop:]

        tail = len(kept(""))

        def spell(text):
            ids = kept(text)
            return ids[:len(ids) - tail]

        words = list(dict.fromkeys(e.token for e in self.entries))
        return _same_columns([bending.token_columns(words, kept(text), lambda w: bending.Alternatives(
            (spell(" " + w), spell(w)))) for text in ([prompt] if isinstance(prompt, str) else prompt)])

    def _columns(self, tokenizer, prompt, clean_caption=False, words=None) -> dict[str, list[int]]:
        # PixArt lower-cases (and may clean) prompts before tokenising: search what the encoder sees.
        prepare = getattr(self.pipe, "_text_preprocessing", None)

        def ids(text, special=True):
            if prepare is not None:
                text = prepare(text, clean_caption=clean_caption)[0]
            return tokenizer(text, add_special_tokens=special, truncation=True,
                             max_length=tokenizer.model_max_length)["input_ids"]

        def columns(text):          # T5 (Flux, SD3, Wan, PixArt): a word right after punctuation too
            prompt_ids = ids(text)
            return bending.token_columns(words, prompt_ids,
                                         bending.spelled_in(prompt_ids, lambda w: ids(w, special=False)))

        words = words or list(dict.fromkeys(e.token for e in self.entries))
        return _same_columns([columns(text) for text in ([prompt] if isinstance(prompt, str) else prompt)])

    # hooks --------------------------------------------------------------------------------------

    def _before_model(self, module, args, kwargs):
        if self._in_sag_call:                 # SAG's extra call keeps this step's description
            return None
        x = _model_input(args, kwargs)
        t = args[1] if len(args) > 1 else kwargs.get("timestep")
        # Wan 2.2 TI2V's image mode passes a timestep per token, 0 on the given image's frame: the noised
        # tokens' t is the largest (every other model passes one t for the whole call).
        t = float(torch.as_tensor(t).flatten().max())
        text = args[2] if len(args) > 2 else kwargs.get("encoder_hidden_states")
        cfg, cond_rows = self._layout(x.shape[0], text)
        scheduler = self.pipe.scheduler
        position = _position(scheduler, t)
        if position is None and t <= 1:       # Flux-style models take the scheduler's timestep / 1000
            position = _position(scheduler, t * 1000)
        frame_patch, row_patch, column_patch = _patch_size(module)
        height, width = x.shape[-2:]
        token_hw = (height // row_patch, width // column_patch)
        packed = _packed_grid(kwargs) if x.ndim == 3 else None
        if packed is not None:
            height, width = token_hw = packed
        self.call = _Call(
            latent_hw=(height, width), token_hw=token_hw,
            frames=x.shape[2] // frame_patch if x.ndim == 5 else None, cfg=cfg, cond_rows=cond_rows,
            step=None if position is None else position // getattr(scheduler, "order", 1),
            alpha_cumprod=_alpha_cumprod(scheduler, t, position) if self.sag or self.slothful else None,
            n_text=text.shape[1] if torch.is_tensor(text) and text.ndim == 3 else None)
        return None

    def _layout(self, batch: int, text) -> tuple[bool, list[int]]:
        """(batched CFG?, the conditional rows) of a model call."""
        flag = getattr(self.pipe, "do_classifier_free_guidance", None)   # a property during a pipeline call
        prompt = self.prompt_embeds
        n = None if prompt is None else prompt.shape[0]
        if batch % 2 == 0 and (batch == 2 * n if n is not None else flag is True):
            return True, list(range(batch // 2, batch))
        # CFG in two calls (WanPipeline; FluxPipeline's true CFG, which has no do_classifier_free_guidance)
        if (flag is True or flag is None and self.joint) and batch == n and torch.is_tensor(text):
            same = text is prompt or (text.shape == prompt.shape and torch.equal(text, prompt.to(text)))
            return False, list(range(batch)) if same else []
        return False, list(range(batch))

    def _before_mid(self, module, args, kwargs):
        if self.call is not None:
            self.call.mid_hw = tuple(_model_input(args, kwargs).shape[-2:])
        return None

    def _after_model(self, module, args, kwargs, output):
        if self._in_sag_call:
            return None
        try:
            return self._sag(module, args, kwargs, output) if self.sag and self.call is not None else None
        finally:
            self.call = None                  # the processors only act inside a model call

    def _sag(self, module, args, kwargs, output):
        """Add SAG's δ to both halves of the prediction (it lands on the CFG result for any guidance)."""
        call = self.call
        if not call.cfg:
            if not self._warned_no_cfg:
                warnings.warn("SAG needs classifier-free guidance (an unconditional half); skipped", stacklevel=2)
                self._warned_no_cfg = True
            return None
        if call.sag_probs is None:
            return None
        x, pred = _model_input(args, kwargs), _prediction(output)
        half = x.shape[0] // 2

        def uncond_pred_at(x_degraded):
            return self._uncond_call(module, args, kwargs, x_degraded, half)

        delta = sag.sag_prediction_delta(
            x[:half], pred[:half], call.sag_probs, call.sag_heads, uncond_pred_at, call.alpha_cumprod,
            self.sag["scale"], self.sag["blur_sigma"],
            getattr(self.pipe.scheduler.config, "prediction_type", "epsilon"), mid_hw=call.mid_hw)
        if delta is None:
            return None
        pred = pred + torch.cat([delta, delta]).to(pred.dtype)
        return (pred, *output[1:]) if isinstance(output, tuple) else dataclasses.replace(output, sample=pred)

    def _uncond_call(self, module, args, kwargs, x, half):
        """The model on x with the unconditional halves of every batched argument, SAG and bending off."""
        batch = 2 * half
        outer = self.call
        self.call = dataclasses.replace(outer, cfg=False, cond_rows=[])
        self._in_sag_call = True
        try:
            if args:
                out = module(x, *_first_rows(args[1:], batch, half), **_first_rows(kwargs, batch, half))
            else:
                out = module(**{**_first_rows(kwargs, batch, half), "sample": x})
        finally:
            self._in_sag_call = False
            self.call = outer
        return _prediction(out)

    # attention ------------------------------------------------------------------------------------

    def self_attention(self, site, attn, hidden_states, encoder_hidden_states, attention_mask, original):
        call = self.call
        if self.sag and site.name == SAG_SITE and call.cfg and not self._in_sag_call:
            half = hidden_states[: hidden_states.shape[0] // 2]     # the unconditional items
            q = _qk_norm(getattr(attn, "norm_q", None), attn.to_q(half), attn.heads)
            k = _qk_norm(getattr(attn, "norm_k", None), attn.to_k(half), attn.heads)
            call.sag_probs, call.sag_heads = bending.attention_probs(q, k, attn.heads), attn.heads
        if (self.slothful is None or encoder_hidden_states is not None or attention_mask is not None
                or not _plain(attn, hidden_states)):
            return original()
        k_in, v_in = slothful.slothful_kv(hidden_states, hidden_states, site.block_kind,
                                          slothful.sigma_from_alpha_cumprod(call.alpha_cumprod),
                                          attn.heads, call.latent_hw, self.slothful)
        if k_in is hidden_states and v_in is hidden_states:      # stride ≤ 1 here
            return original()
        return attention(attn, hidden_states, k_in, v_in)

    def cross_attention(self, site, attn, hidden_states, encoder_hidden_states, attention_mask, original):
        call = self.call
        active = [e for e in self.entries if e.strength != 0 and bending.entry_active(e, call.step, site.layer)]
        if (not active or not call.cond_rows or encoder_hidden_states is None
                or not _plain(attn, hidden_states, image_kv=True) or self.phase == 1 and not self.record_maps):
            return original()
        if self.token_indices is None:
            raise ValueError("Attention Bending has no token positions: run the pipeline with a prompt")
        context, image = encoder_hidden_states, None
        if getattr(attn, "add_k_proj", None) is not None:          # Wan I2V: [image; text]
            split = context.shape[1] - WAN_TEXT_LENGTH
            image, context = context[:, :split], context[:, split:]
        n_text = context.shape[1]
        for e in active:
            if max(bending.columns_for(e.token, self.token_indices, n_text)) >= n_text:
                raise ValueError(f"Token '{e.token}' lies beyond the {n_text} text tokens the model sees")
        if getattr(attn, "norm_cross", None):
            context = attn.norm_encoder_hidden_states(context)
        grid = bending.grid_for(hidden_states.shape[1], call.token_hw, call.frames)
        observe = self._recorder(site, active, attn.heads, grid, n_text) if self.record_maps else None

        def attend(q, k, v, heads, bias):
            return bent_attention(q, k, v, heads, bias, call.cond_rows, apply=self.phase == 2, observe=observe,
                                  entries=active, token_indices=self.token_indices, grid_hw=grid,
                                  step_index=call.step, layer_index=site.layer, frames=call.frames)

        out = attention(attn, hidden_states, context, context, attention_mask, attend, image)
        return out if self.phase == 2 else original()       # phase 1: the maps only

    def joint_attention(self, site, attn, given, original):
        """A joint attention where an entry acts: q, k, v as the model's processor forms them, PyTorch's
        attention, and for the conditional items the bent text columns' correction of the image-query
        rows (bending.bent_output: no [L, L] matrix; the text-query rows and the rest stay SDPA's)."""
        call = self.call
        active = [e for e in self.entries if e.strength != 0 and bending.entry_active(e, call.step, site.layer)]
        if not active or not call.cond_rows:
            return original()
        if self.token_indices is None:
            raise ValueError("Attention Bending has no token positions: run the pipeline with a prompt")
        hidden, context = given["hidden_states"], given.get("encoder_hidden_states")
        q, k, v, text = _joint_qkv(self.joint, attn, hidden, context, given.get("image_rotary_emb"), call.n_text)
        n_text = text.stop - text.start
        for e in active:
            if max(bending.columns_for(e.token, self.token_indices, n_text)) >= n_text:
                raise ValueError(f"Token '{e.token}' lies beyond the {n_text} text tokens the model sees")
        n_image = (call.frames or 1) * call.token_hw[0] * call.token_hw[1]
        first = 0 if self.joint == "sd3" else text.stop if context is not None else n_text
        mask = _joint_mask(given.get("attention_mask"), given.get("encoder_hidden_states_mask"), hidden.shape[1])
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        observe = self._recorder(site, active, attn.heads, call.token_hw, n_text) if self.record_maps else None
        bias = mask
        if mask is not None and mask.dtype == torch.bool:
            bias = torch.zeros(mask.shape, device=q.device).masked_fill(~mask, float("-inf"))
        bending.bend_rows(out if self.phase == 2 else out.clone(), q, k, v, call.cond_rows, entries=active,
                          token_indices=self.token_indices, grid_hw=call.token_hw, step_index=call.step,
                          layer_index=site.layer, frames=call.frames, text=text,
                          queries=slice(first, first + n_image), observe=observe, bias=bias)
        return _joint_output(self.joint, attn, out.to(q.dtype), hidden.shape[1], context)

    def _recorder(self, site, active, heads, grid, n_text):
        call = self.call
        shape = grid if call.frames is None else (call.frames, *grid)
        words = list(dict.fromkeys(e.token for e in active))
        keys = sorted({j for e in active for j in bending.columns_for(e.token, self.token_indices, n_text)})

        rows = any(e.renormalize == "row" for e in active)

        def observe(columns, bent):                  # bent_output's columns, in `keys` order
            if rows:                                 # as the output sees them: each row renormalised
                total = 1 - columns.sum(-1, keepdim=True) + bent.sum(-1, keepdim=True)
                bent = bent / torch.where(total > bending.EPS, total, torch.ones_like(total))
            for word in words:
                local = [keys.index(j) for j in bending.columns_for(word, self.token_indices, n_text)]
                self.maps.append({"token": word, "layer": site.layer, "step": call.step,
                                  "original": _word_map(columns, heads, local, shape),
                                  "bent": _word_map(bent, heads, local, shape)})
        return observe


def _heads(x, proj, norm, heads):
    """proj(x) split into heads, [b, n, heads, d], then the per-head norm if any."""
    x = proj(x).unflatten(-1, (heads, -1))
    return x if norm is None else norm(x)


def _joint_mask(mask, text_mask, n_image):
    """The mask the joint attention's processor hands SDPA, [b, 1, 1 or L, L]: `mask` as given (Chroma's
    blocks pass [b, 1, L, L], float 0/1 as its pipeline makes it, which SDPA adds to the logits: bent_output
    adds it alike; a 2-D one is widened as diffusers' dispatch does), or Qwen-Image's bool key mask
    (True = attend) from its text mask and the image tokens; None without either."""
    if mask is not None:
        return mask[:, None, None, :] if mask.ndim == 2 else mask
    if text_mask is None:
        return None
    keep = text_mask.bool()
    return torch.cat([keep, keep.new_ones(keep.shape[0], n_image)], 1)[:, None, None, :]


def _rope_complex(x, freqs):
    """Qwen-Image's RoPE on [b, n, heads, d]: each interleaved pair (x[2i], x[2i+1]) as a complex number
    times freqs [n, d/2] (complex), in float32 (diffusers' apply_rotary_emb_qwen, use_real=False)."""
    pairs = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))
    return torch.view_as_real(pairs * freqs[:, None, :].to(x.device)).flatten(3).type_as(x)


def _rope(x, rotary):
    """Flux's RoPE on [b, n, heads, d] (diffusers' apply_rotary_emb, real form): each interleaved pair
    (x[2i], x[2i+1]) turned by the angle whose cosine / sine rotary's [n, d] tables hold, in float32."""
    cos, sin = (t[None, :, None, :].to(x.device) for t in rotary)
    pairs = x.unflatten(-1, (-1, 2))
    turned = torch.stack([-pairs[..., 1], pairs[..., 0]], dim=-1).flatten(-2)
    return (x.float() * cos + turned.float() * sin).to(x.dtype)


def _joint_qkv(family, attn, hidden, context, rotary, n_text):
    """q, k, v [b, heads, L, d] of a joint attention as its diffusers processor forms them (Flux:
    FluxAttnProcessor, [text; image] then RoPE; SD3: JointAttnProcessor2_0, [image; text], no RoPE), and
    the text keys' slice of L. A Flux single block's hidden states are already [text; image] (n_text).
    Qwen-Image (QwenDoubleStreamAttnProcessor2_0): RoPE per stream (rotary = image, text complex
    frequencies), then [text; image]."""
    def stream(x, names):
        return [_heads(x, getattr(attn, p), getattr(attn, n, None) if n else None, attn.heads) for p, n in names]

    q, k, v = stream(hidden, (("to_q", "norm_q"), ("to_k", "norm_k"), ("to_v", None)))
    text = slice(0, n_text)
    if context is not None:
        cq, ck, cv = stream(context, (("add_q_proj", "norm_added_q"), ("add_k_proj", "norm_added_k"),
                                      ("add_v_proj", None)))
        if family == "qwen" and rotary is not None:
            image_freqs, text_freqs = rotary
            q, k = _rope_complex(q, image_freqs), _rope_complex(k, image_freqs)
            cq, ck = _rope_complex(cq, text_freqs), _rope_complex(ck, text_freqs)
            rotary = None
        if family == "sd3":
            q, k, v = (torch.cat(p, 1) for p in ((q, cq), (k, ck), (v, cv)))
            text = slice(hidden.shape[1], hidden.shape[1] + context.shape[1])
        else:
            q, k, v = (torch.cat(p, 1) for p in ((cq, q), (ck, k), (cv, v)))
            text = slice(0, context.shape[1])
    if rotary is not None:
        q, k = _rope(q, rotary), _rope(k, rotary)
    return (*(t.transpose(1, 2) for t in (q, k, v)), text)


def _joint_output(family, attn, out, n_hidden, context):
    """The processor's return from the joint attention output [b, heads, L, d]: the image part through
    to_out, the text part through to_add_out (unless the block is context_pre_only); a Flux single
    block returns the whole, unprojected."""
    out = out.transpose(1, 2).flatten(2)
    if context is None:
        return out
    if family == "sd3":
        image, text = out[:, :n_hidden], out[:, n_hidden:]
    else:
        text, image = out[:, :-n_hidden], out[:, -n_hidden:]
    image = attn.to_out[1](attn.to_out[0](image.contiguous()))
    if not getattr(attn, "context_pre_only", False):
        text = attn.to_add_out(text.contiguous())
    return image, text


def _same_columns(found: list) -> dict[str, list[int]]:
    """The one column map of a prompt list's prompts (else ValueError)."""
    if any(f != found[0] for f in found):
        raise ValueError("Attention Bending needs its words at the same token positions in every prompt "
                         f"of a batch; got {found}")
    return found[0]


def _unmark(prompt):
    """The prompt(s) without the "{word}" marks."""
    if isinstance(prompt, str):
        return bending.parse_marked_prompt(prompt)[0]
    return [bending.parse_marked_prompt(p)[0] for p in prompt]


class _Processor:
    """Stands in for one attention's processor and calls the original object when it has nothing to do.

    Transparent to the host: it takes the original's arguments as they come (Attention passes
    keywords, WanAttention positions), and diffusers' Attention.forward, which hands a processor only
    the cross_attention_kwargs that inspect.signature(processor.__call__) names, sees the original's
    signature (an instance attribute; calling the processor still runs the class's __call__).
    """

    def __init__(self, session: Session, site: _Site, original):
        self.session, self.site, self.original = session, site, original
        self.signature = inspect.signature(original)

        def shown(*args, **kwargs):
            return self(*args, **kwargs)

        shown.__signature__ = self.signature
        self.__call__ = shown

    def __call__(self, attn, hidden_states, *args, **kwargs):
        def original():
            return self.original(attn, hidden_states, *args, **kwargs)

        session = self.session
        if session.call is None:              # called outside a model forward
            return original()
        given = self.signature.bind(attn, hidden_states, *args, **kwargs).arguments
        if self.site.joint:
            return session.joint_attention(self.site, attn, given, original)
        run = session.cross_attention if self.site.cross else session.self_attention
        return run(self.site, attn, hidden_states, given.get("encoder_hidden_states"),
                   given.get("attention_mask"), original)
