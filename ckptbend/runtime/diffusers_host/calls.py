"""One model call as the processors see it: its step index, ᾱ, token grid and batch layout."""

from __future__ import annotations

import dataclasses

import torch


@dataclasses.dataclass
class Call:
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
    spans: list | None = None                  # single-stream models, per item: (first image query, first text
                                               # key, text tokens)
    order: torch.Tensor | None = None          # Kandinsky 5's fractal order: the grid index of each visual token


def scheduler_position(scheduler, t: float) -> int | None:
    """This model call's index in scheduler.timesteps. The scheduler's own step_index when it keeps
    one (schedulers that repeat timesteps need it: Heun), PNDM's call counter, else the first match."""
    timesteps = getattr(scheduler, "timesteps", None)
    if timesteps is None:
        return None
    timesteps = torch.as_tensor(timesteps).detach().flatten().double().cpu()
    for index in (getattr(scheduler, "step_index", None), _pndm_counter(scheduler)):
        if index is not None and index < len(timesteps) and abs(float(timesteps[index]) - t) < 1e-3:
            return int(index)
    hits = ((timesteps - t).abs() < 1e-3).nonzero().flatten()
    return int(hits[0]) if len(hits) else None


def _pndm_counter(scheduler) -> int | None:
    """PNDM keeps no step_index; its `counter` counts the calls of step(), one per model call."""
    return getattr(scheduler, "counter", None) if hasattr(scheduler, "prk_timesteps") else None


def step_near(scheduler, t: float, dtype: torch.dtype) -> int | None:
    """The step (position in scheduler.timesteps) of a call at scheduler time t that the pipeline passed in `dtype`:
    the scheduler's step_index (0 before the first step) where its timestep is within dtype's precision of t (a bf16
    time cannot tell late timesteps apart), else the nearest timestep within it (Flux.3, Ideogram 4)."""
    timesteps = getattr(scheduler, "timesteps", None)
    if timesteps is None:
        return None
    timesteps = torch.as_tensor(timesteps).detach().flatten().double().cpu()
    tolerance = 4 * getattr(getattr(scheduler, "config", None), "num_train_timesteps", 1000) * torch.finfo(dtype).eps
    index = getattr(scheduler, "step_index", None)
    index = 0 if index is None else index
    if index < len(timesteps) and abs(float(timesteps[index]) - t) <= tolerance:
        return int(index)
    distance = (timesteps - t).abs()
    return int(distance.argmin()) if len(distance) and float(distance.min()) <= tolerance else None


def step_of(scheduler, position: int | None) -> int | None:
    """The denoising step (0 … num_inference_steps − 1) a model call at `position` in scheduler.timesteps
    belongs to: every evaluation that goes into step i gets i. Heun (order 2) evaluates twice per step;
    PNDM's Runge-Kutta warm-up four times per step for its first three steps, and its PLMS without them
    evaluates the first step twice (timesteps [t0, t1, t1, t2, …]: the second call at t1 redoes step 0
    with the average of both predictions). Other schedulers, multistep ones included (DPM++ 2M, UniPC,
    DEIS, LMS), evaluate once per step: the position itself."""
    if position is None:
        return None
    if hasattr(scheduler, "prk_timesteps"):                     # PNDM
        prk = 0 if scheduler.config.skip_prk_steps else len(scheduler.prk_timesteps)
        if position < prk:
            return position // 4
        return prk // 4 + position - prk - (1 if prk == 0 and position > 0 else 0)
    return position // getattr(scheduler, "order", 1)


def alpha_cumprod_at(scheduler, t: float, position: int | None) -> float:
    """ᾱ of this call: 1/(1+σ²) from the scheduler's sigma for it, else alphas_cumprod[t]."""
    sigmas = getattr(scheduler, "sigmas", None)
    if sigmas is not None and position is not None and position < len(sigmas):
        return 1.0 / (1.0 + float(sigmas[position]) ** 2)
    return float(scheduler.alphas_cumprod[int(round(t))])


def patch_size_of(model) -> tuple[int, int, int]:
    """(frames, rows, columns) of one image token: 1 for a UNet, (p, p) or (t, h, w) for a DiT."""
    size = getattr(model.config, "patch_size", None) or 1
    if not isinstance(size, (tuple, list)):
        return 1, size, size
    return (1, *size) if len(size) == 2 else tuple(size)


def packed_grid(kwargs) -> tuple[int, int] | None:
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
    main = ids[ids[:, 0] == ids[0, 0]]       # LongCat-Image's rows and columns count from 512
    return int(main[:, 1].max() - main[:, 1].min()) + 1, int(main[:, 2].max() - main[:, 2].min()) + 1


def first_rows(value, batch: int, keep: int):
    """value with every tensor of `batch` items cut to its first `keep` (nested dicts, lists, tuples)."""
    if torch.is_tensor(value):
        return value[:keep] if value.ndim and value.shape[0] == batch else value
    if isinstance(value, dict):
        return {k: first_rows(v, batch, keep) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(first_rows(v, batch, keep) for v in value)
    return value


def model_input(args, kwargs):
    return args[0] if args else kwargs.get("sample", kwargs.get("hidden_states"))


def prediction(output):
    return output[0] if isinstance(output, tuple) else output.sample
