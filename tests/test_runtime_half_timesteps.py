"""The step window in half precision: FluxPipeline (like Qwen-Image, Chroma, Flux.2) passes the transformer its
timestep cast to the latents' dtype and divided by 1000, so in bf16 it is the scheduler's timestep rounded to
bf16's 8 bits: no exact match in scheduler.timesteps. The real pipeline run in bf16 bends (and records) exactly
the steps of the window, as in float32."""

import pytest
import torch

from _pipelines_joint import flux_pipeline
from ckptbend.runtime import diffusers_host as dh

PROMPT = "a romantic kiss at {sunset}"
ENTRY = {"token": "sunset", "mode": "translate", "translate_x": 0.5, "apply_to_timesteps": [1, 2],
         "renormalize": "none"}

pytestmark = pytest.mark.usefixtures("one_thread_no_grad")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_window_holds_its_steps_in_the_pipelines_dtype(tmp_path, dtype):
    pipe = flux_pipeline(tmp_path).to(dtype)
    passed = []
    pipe.transformer.register_forward_pre_hook(lambda m, a, kw: passed.append(kw["timestep"].dtype), with_kwargs=True)
    session = dh.apply(pipe, {"bending": [ENTRY]}, phase=1)
    try:
        pipe(PROMPT, num_inference_steps=5, height=64, width=96, max_sequence_length=16, guidance_scale=1.0,
             output_type="latent", generator=torch.Generator().manual_seed(0))
    finally:
        dh.remove(pipe)
    assert set(passed) == {dtype}                          # the pipeline passed its timesteps in this dtype
    assert sorted({r["step"] for r in session.maps}) == [1, 2]
