"""The attention backend the user chose in diffusers (set_attention_backend) serves ckptbend's bent calls too: a bent
call is the host's own attention, dispatch_attention_fn with that backend, plus the exact correction of the bent
columns. Shown with diffusers' flex backend, which runs on the CPU, on a text cross-attention family (Wan) and a
joint-attention family (Flux)."""

import pytest
import torch
import torch.nn.functional as F
from diffusers.models.attention_dispatch import _AttentionBackendRegistry

from _pipelines import wan_pipeline
from _pipelines_joint import flux_pipeline
from ckptbend.runtime import diffusers_host as dh

ENTRY = {"token": "sunset", "mode": "translate", "translate_x": -0.5, "translate_y": 0.25}
pytestmark = pytest.mark.usefixtures("one_thread_no_grad")


def run(pipe, prompt):
    g = torch.Generator().manual_seed(0)
    if type(pipe).__name__ == "WanPipeline":
        return pipe(prompt=prompt, height=64, width=64, num_frames=5, num_inference_steps=2, max_sequence_length=16,
                    output_type="latent", generator=g).frames
    return pipe(prompt, height=64, width=96, num_inference_steps=2, max_sequence_length=16, guidance_scale=1.0,
                output_type="latent", generator=g).images


@pytest.mark.parametrize("family", ["wan", "flux"])
def test_bent_calls_attend_with_the_backend_the_user_chose(family, tmp_path, monkeypatch):
    """set_attention_backend, even after apply(), reaches the processors ckptbend wrapped and serves the bent calls as
    the host's own: no attention inside the transformer falls back to PyTorch's SDPA, and the bent run equals the same
    run on the default backend (whatever computed the host's output, the correction is exact)."""
    pipe = wan_pipeline() if family == "wan" else flux_pipeline(tmp_path)
    model = pipe.transformer
    plain = run(pipe, "a romantic kiss at sunset")
    inside, sdpa_calls, sdpa = [], [], F.scaled_dot_product_attention
    monkeypatch.setattr(F, "scaled_dot_product_attention",
                        lambda *a, **k: sdpa_calls.append(bool(inside)) or sdpa(*a, **k))
    model.register_forward_pre_hook(lambda *_: inside.append(1))
    model.register_forward_hook(lambda *_: inside.clear())          # returns None: the output stays
    active = _AttentionBackendRegistry.get_active_backend()[0]
    session = dh.apply(pipe, {"bending": [ENTRY]})
    try:
        native = run(pipe, "a romantic kiss at {sunset}")
        assert any(sdpa_calls)                               # the default backend is PyTorch's SDPA
        model.set_attention_backend("flex")
        wrapped = [m.processor for m in model.modules()
                   if isinstance(getattr(m, "processor", None), dh.processor.Processor)]
        assert wrapped and all(p.original._attention_backend == "flex" for p in wrapped)
        sdpa_calls.clear()
        flex = run(pipe, "a romantic kiss at {sunset}")
    finally:
        dh.remove(pipe)
        model.reset_attention_backend()
        _AttentionBackendRegistry.set_active_backend(active)
    assert session.token_indices and not any(sdpa_calls)
    torch.testing.assert_close(flex, native, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(flex, plain, atol=1e-4)        # it bends
