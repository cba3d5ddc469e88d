"""apply / remove, and the Session: what apply() installed on a pipeline, and the description of each model call."""

from __future__ import annotations

import functools
from typing import Mapping

import torch

from .. import bending, sag, slothful
from .calls import (Call, alpha_cumprod_at, model_input, packed_grid, patch_size_of, scheduler_position, step_near,
                    step_of)
from .families import FAMILIES, family_of
from .joint import JOINT_MODELS
from . import anima, cosmos, flux3, ltx_video, minimax_h3, qwen_layered, sana, skyreels, svd, wan_animate2
from .single import SINGLE_MODELS
from .processor import Processor, sites_of
from .prompts import wrap_encode_prompt
from .longcat_ovis import wrap_rewrite
from .unet import before_mid, sag_correction

SESSION_ATTR = "_ckptbend_session"
DYNAMIC_KEYS = ("sag", "slothful", "slothful_simple", "bending")   # slothful_simple: informational only
# Families whose text attention is not reached, and why (one line each; the others get the generic refusal).
NOT_REACHED: dict[str, str] = {}
BENDABLE = ("UNets (SD 1.x/2.x, SDXL), PixArt, Wan 2.1/2.2, Flux.1, Flux.2, Chroma, SD3/SD3.5, Qwen-Image, "
            "Qwen-Image 2.x, Z-Image, Lumina 2, ERNIE-Image, Krea 2, HunyuanVideo 1.0 and 1.5, HiDream, Kandinsky 5, "
            "AuraFlow, Mochi, LongCat-Image, Ovis-Image, Ideogram 4, Flux.3, Motif-Video, MiniMax H3, Sana, LTX-Video, "
            "SkyReels V2, ChronoEdit, Cosmos Predict2, Wan Animate 2 and LTX-2's video stream")


# --- the API ---------------------------------------------------------------------------------------

def apply(pipe, dynamic: Mapping, *, phase: int = 2, record_maps: bool | None = None) -> "Session":
    """Patch `pipe` with the recipe's sampling-time part; returns the Session (also pipe._ckptbend_session).

    phase 2: bending changes the output; phase 1: bent maps are computed and recorded, the output is
    bit-identical to no bending (SAG and Slothful, if the recipe has them, still act). record_maps (default:
    phase == 1) records maps at every bent call.
    """
    if getattr(pipe, SESSION_ATTR, None) is not None:
        raise ValueError("ckptbend is already applied; call remove first")
    if phase not in (1, 2):
        raise ValueError(f"phase must be 1 (visualise only) or 2 (bend), got {phase!r}")
    models = denoisers(pipe)
    sag_params, slothful_params, entries = parse_dynamic(dynamic)
    svd.check(models, sag_params, slothful_params, entries)      # SVD: refused in one line
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

def parse_dynamic(dynamic: Mapping):
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


def denoisers(pipe) -> list:
    """The models apply() wires: the UNet, else the transformer and, when present, transformer_2 (Wan 2.2
    A14B: high-noise and low-noise experts; either may be absent), each model once."""
    unet = getattr(pipe, "unet", None)
    names = ("transformer", "transformer_2", "transformer_ref")        # MiniMax H3's ref2va partition: transformer_ref
    found = [unet] if unet is not None else [getattr(pipe, n, None) for n in names]
    models = list({id(m): m for m in found if m is not None}.values())
    if not models:
        raise ValueError(f"{type(pipe).__name__} has neither a unet nor a transformer")
    return models


def _set_processor(module, processor):
    """Attention's set_processor, or the attribute itself (MochiAttention has no setter)."""
    if hasattr(module, "set_processor"):
        module.set_processor(processor)
    else:
        module.processor = processor


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
        self.call: Call | None = None
        self.joint = JOINT_MODELS.get(type(self.models[0]).__name__)     # None: cross-attention models
        self.single = SINGLE_MODELS.get(type(self.models[0]).__name__)   # Z-Image, Lumina 2: single-stream
        self.family = getattr(family_of(self.models[0]), "name", None)     # a row of families.FAMILIES, or None
        self.anima = type(pipe).__name__ in anima.ANIMA_PIPELINES     # a modular pipeline: its text steps wrapped
        self.prompt_encoded = False     # encode_prompt ran since the last model call: the next is the negative's
        self._undo: list = []
        self._in_sag_call = False
        self._warned_no_cfg = False

    # installing -------------------------------------------------------------------------------

    def _install(self):
        if self.entries and type(self.pipe).__name__ in cosmos.UNREACHED_PIPELINES:   # Cosmos Predict2.5
            raise ValueError(cosmos.UNREACHED_PIPELINES[type(self.pipe).__name__])
        for model in self.models:
            self._install_model(model)
        if self.sag:                          # a UNet: the only model
            self._undo.append(self.models[0].mid_block.register_forward_pre_hook(
                functools.partial(before_mid, self), with_kwargs=True).remove)
        if hasattr(self.pipe, "encode_prompt"):
            wrap_encode_prompt(self)
        elif self.family == "flux3":          # a modular pipeline: its text encoder step is wrapped
            flux3.wrap_text_encoder(self)
        elif self.anima:
            anima.wrap_text_steps(self)
        if self.joint == "longcat" and self.entries and hasattr(self.pipe, "rewire_prompt"):
            wrap_rewrite(self)
        if self.family == "minimax_h3":       # a modular pipeline: its blocks find the words
            minimax_h3.wrap_blocks(self)
        if self.family == "wan_animate2":     # a modular pipeline: its blocks find the words
            wan_animate2.wrap_blocks(self)

    def _install_model(self, model):
        """One model's processors and its pre / post hooks (every model shares this session's state)."""
        sites = sites_of(model)
        if self.entries and not any(site.cross or site.joint for site in sites):
            why = NOT_REACHED.get(type(model).__name__, f"it bends {BENDABLE}")
            raise ValueError(f"Attention Bending does not reach the text attention of a {type(model).__name__} "
                             f"({why}); the recipe's [[bending]] would do nothing")
        for site in sites:
            original = site.module.processor
            _set_processor(site.module, Processor(self, site, original))
            self._undo.append(lambda m=site.module, p=original: _set_processor(m, p))
        hooks = [model.register_forward_pre_hook(self._before_model, with_kwargs=True),
                 model.register_forward_hook(self._after_model, with_kwargs=True)]
        self._undo += [h.remove for h in hooks]

    def _uninstall(self):
        while self._undo:
            self._undo.pop()()
        self.call = None

    def _before_model(self, module, args, kwargs):
        self.prompt_encoded = False           # the next encode_prompt is a new run's prompt
        if self._in_sag_call:                 # SAG's extra call keeps this step's description
            return None
        family = family_of(module)
        if family is not None and family.describe is not None:     # a family that reads its call its own way
            self.call = family.describe(self, module, args, kwargs)
            return None
        x = model_input(args, kwargs)
        t = args[1] if len(args) > 1 else kwargs.get("timestep", kwargs.get("timesteps"))     # HiDream: timesteps
        if self.entries:                      # calls whose grid or step is not one: refused
            ltx_video.check(module, x, kwargs)
            skyreels.check(module, self.entries, kwargs, t)
        cosmos2 = cosmos.position(self.pipe, t)      # None but in a Cosmos Predict2 pipeline
        # Wan 2.2 TI2V's image mode passes a timestep per token, 0 on the given image's frame: the noised
        # tokens' t is the largest (every other model passes one t for the whole call).
        t_dtype = torch.as_tensor(t).dtype
        t = float(torch.as_tensor(t).flatten().max())
        text = args[2] if len(args) > 2 else kwargs.get("encoder_hidden_states")
        cfg, cond_rows = self._layout(x.shape[0], text)
        scheduler = self.pipe.scheduler
        position = scheduler_position(scheduler, t) if cosmos2 is None else cosmos2
        if position is None and t <= 1:       # Flux-style models take the scheduler's timestep / 1000
            position = scheduler_position(scheduler, t * 1000)
        if position is None and t_dtype in (torch.bfloat16, torch.float16):   # Flux, Qwen-Image... in bf16
            position = step_near(scheduler, t * 1000 if t <= 1 else t, t_dtype)     # pass t rounded to it
        if position is None and self.family == "sana":    # Sana Sprint: its SCM angle, encoded
            position = sana.sprint_position(scheduler, t)
        frame_patch, row_patch, column_patch = patch_size_of(module)
        height, width = x.shape[-2:]
        token_hw = (height // row_patch, width // column_patch)
        packed = packed_grid(kwargs) if x.ndim == 3 else None
        if packed is not None:
            height, width = token_hw = packed
        frames = x.shape[2] // frame_patch if x.ndim == 5 else qwen_layered.frames(kwargs)   # Layered: its frames
        if x.ndim == 3 and kwargs.get("num_frames") and kwargs.get("height") and kwargs.get("width"):   # LTX-2
            height, width = kwargs["height"], kwargs["width"]
            token_hw = (height // row_patch, width // column_patch)
            frames = kwargs["num_frames"] // getattr(module.config, "patch_size_t", 1)
        self.call = Call(
            latent_hw=(height, width), token_hw=token_hw,
            frames=frames, cfg=cfg, cond_rows=cond_rows,
            step=step_of(scheduler, position),
            alpha_cumprod=alpha_cumprod_at(scheduler, t, position) if self.sag or self.slothful else None,
            n_text=text.shape[1] if torch.is_tensor(text) and text.ndim == 3 else None)
        if family is not None and family.refine is not None and (self.entries or family.refine_always):
            family.refine(self.call, module, x, kwargs)
        return None

    def _layout(self, batch: int, text) -> tuple[bool, list[int]]:
        """(batched CFG?, the conditional rows) of a model call."""
        flag = getattr(self.pipe, "do_classifier_free_guidance", None)   # a property during a pipeline call
        prompt = self.prompt_embeds
        n = None if prompt is None else prompt.shape[0]
        if n and getattr(self.pipe, "do_perturbed_attention_guidance", None) is True and batch == (
                3 if flag else 2) * n:           # PAG pipelines: [negative;] prompt, prompt with perturbed attention
            return False, list(range(batch - 2 * n, batch))
        if batch % 2 == 0 and (batch == 2 * n if n is not None else flag is True):
            return True, list(range(batch // 2, batch))
        # CFG in two calls (WanPipeline; FluxPipeline's true CFG, which has no do_classifier_free_guidance)
        # pipelines whose CFG runs two calls, no flag
        separate = self.joint or self.anima or self.family is not None and FAMILIES[self.family].separate_cfg
        if (flag is True or flag is None and separate) and batch == n and torch.is_tensor(text):
            same = text is prompt or (text.shape == prompt.shape and torch.equal(text, prompt.to(text)))
            return False, list(range(batch)) if same else []
        return False, list(range(batch))

    def _after_model(self, module, args, kwargs, output):
        if self._in_sag_call:
            return None
        try:
            return sag_correction(self, module, args, kwargs, output) if self.sag and self.call is not None else None
        finally:
            self.call = None                  # the processors only act inside a model call
