"""Attention Bending on Wan VACE in the diffusers host: diffusers' own WanVACETransformer3DModel, tiny. Its main
blocks' text cross-attentions are bent as Wan's (layers 0 … N−1, as the ComfyUI node counts them); its VACE control
blocks keep their own processors (unbent in both hosts, which run them in different orders), and the control hints
still reach the bent main blocks."""

import types

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, WanVACETransformer3DModel

from _pipelines import WAN_CONFIG
from ckptbend.runtime import diffusers_host as dh

ENTRY = {"token": "sunset", "mode": "translate", "translate_x": 0.5}

pytestmark = pytest.mark.usefixtures("one_thread_no_grad")


@pytest.fixture(scope="module")
def vace():
    with torch.random.fork_rng():
        torch.manual_seed(9)
        model = WanVACETransformer3DModel(**{**WAN_CONFIG, "vace_layers": [0], "vace_in_channels": 8}).eval()
    scheduler = FlowMatchEulerDiscreteScheduler()
    scheduler.set_timesteps(2)
    g = torch.Generator().manual_seed(10)
    inputs = dict(hidden_states=torch.randn(1, 16, 2, 4, 6, generator=g), encoder_hidden_states=torch.randn(
        1, 12, WAN_CONFIG["text_dim"], generator=g), control_hidden_states=torch.randn(1, 8, 2, 4, 6, generator=g))
    return model, inputs, types.SimpleNamespace(transformer=model, scheduler=scheduler)


def test_main_blocks_bend_and_vace_blocks_keep_their_processors(vace):
    model, inputs, pipe = vace
    t = pipe.scheduler.timesteps[:1]
    plain = model(**inputs, timestep=t).sample
    before = [b.attn2.processor for b in model.vace_blocks]
    session = dh.apply(pipe, {"bending": [ENTRY]})
    session.token_indices = {"sunset": [2, 3]}
    try:
        sites = dh.processor.sites_of(model)
        assert [s.name for s in sites if s.cross] == [f"blocks.{i}.attn2" for i in range(len(model.blocks))]
        assert [s.layer for s in sites if s.cross] == list(range(len(model.blocks)))
        assert [b.attn2.processor for b in model.vace_blocks] == before
        bent = model(**inputs, timestep=t).sample
    finally:
        dh.remove(pipe)
    assert (bent - plain).abs().max() > 1e-4
    session = dh.apply(pipe, {"bending": [{**ENTRY, "apply_to_layers": [99]}]})
    session.token_indices = {"sunset": [2, 3]}
    try:
        assert torch.equal(model(**inputs, timestep=t).sample, plain)          # no main block in the list
    finally:
        dh.remove(pipe)
