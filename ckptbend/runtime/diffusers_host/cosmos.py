"""Cosmos Predict2's pipelines (Cosmos2TextToImagePipeline, Cosmos2VideoToWorldPipeline): the timestep they pass
the model mapped back to the scheduler's step.

Their loop is over scheduler.sigmas (EDM-style σ, up to 80) and hands the model t = σ/(σ+1) in the transformer's
dtype, not scheduler.timesteps: the step is the position in scheduler.sigmas whose σ/(σ+1), rounded to that dtype,
is the value passed. In bfloat16 neighbouring steps near σ_max round alike: the scheduler's own step index (None
before the first step: 0) decides among them. Video2World passes one t per frame, the given frames a tiny
t_conditioning: any frame's value that names a step names this call's.

Cosmos Predict2.5's pipelines (the same transformer class) wrap the prompt in a Qwen2.5-VL chat conversation, whose
columns the generic T5 search would miss: refused in one line. (Anima: anima.py.)"""

from __future__ import annotations

import torch

COSMOS2_PIPELINES = ("Cosmos2TextToImagePipeline", "Cosmos2VideoToWorldPipeline")
_PREDICT25 = ("Attention Bending does not reach Cosmos Predict2.5 in diffusers yet: its prompt is a Qwen2.5-VL chat "
              "conversation whose word columns are not found yet (Cosmos Predict2's pipelines are bent)")
UNREACHED_PIPELINES = {"Cosmos2_5_PredictBasePipeline": _PREDICT25, "Cosmos2_5_TransferPipeline": _PREDICT25}


def position(pipe, timestep) -> int | None:
    """A Cosmos Predict2 pipeline's model call's index in scheduler.sigmas (= scheduler.timesteps); None in any
    other pipeline, or where no σ/(σ+1) matches (the generic mapping then applies)."""
    scheduler = getattr(pipe, "scheduler", None)
    sigmas = getattr(scheduler, "sigmas", None)
    if type(pipe).__name__ not in COSMOS2_PIPELINES or sigmas is None or timestep is None:
        return None
    timestep = torch.as_tensor(timestep)
    dtype = timestep.dtype if timestep.is_floating_point() else torch.float32
    sigmas = torch.as_tensor(sigmas).detach().cpu()           # in its own dtype, as the pipeline divides
    passed = timestep.detach().cpu().to(dtype).flatten().unique()
    forms = (sigmas / (sigmas + 1)).to(dtype)         # the pipeline's current_t, cast as it casts it
    hits = (forms[:, None] == passed[None, :]).any(1).nonzero().flatten().tolist()
    if not hits:
        return None
    own = getattr(scheduler, "step_index", None)
    own = 0 if own is None else own
    return own if own in hits else hits[0]
