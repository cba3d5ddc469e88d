"""Attention Bending on Cosmos Predict2 in the diffusers host: diffusers' own CosmosTransformer3DModel (text
cross-attention attn2, per-head q/k RMS norms), tiny and seeded, reached by the generic cross-attention path (cross.py)
as Wan's is. The reference is the model's own processors with diffusers' attention call replaced, for the text
cross-attention, by an explicit softmax bent by bending.bend_probs (2 frames): every bent call equals it; strength 0
is bit-identical. The real Cosmos2TextToImagePipeline (tiny T5, its Karras-σ scheduler, σ/(σ+1) passed as the
timestep in the transformer's dtype) bends in the step window's steps only, the negative call never."""

import types

import pytest
import torch
from diffusers import Cosmos2TextToImagePipeline, CosmosTransformer3DModel, FlowMatchEulerDiscreteScheduler
from diffusers.models.transformers import transformer_cosmos

from _pipelines import t5_encoder, t5_like_tokenizer

from ckptbend.runtime import bending
from ckptbend.runtime import diffusers_host as dh
from ckptbend.runtime.diffusers_host import cosmos as dh_cosmos

CONFIG = dict(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=24, num_layers=2,
              text_embed_dim=16, adaln_lora_dim=8, max_size=(4, 16, 16), patch_size=(1, 2, 2),
              concat_padding_mask=False)     # its padding-mask resize needs torchvision
TEXT, FRAMES, H, W = 6, 2, 4, 6
COLUMNS = {"sunset": [2, 3]}
ENTRY = {"token": "sunset", "mode": "translate", "translate_x": 0.5}

pytestmark = pytest.mark.usefixtures("one_thread_no_grad")


@pytest.fixture(scope="module")
def cosmos():
    with torch.random.fork_rng():
        torch.manual_seed(3)
        model = CosmosTransformer3DModel(**CONFIG).eval()
        for name, p in model.named_parameters():        # larger gates: the attention's output shows
            if "norm" in name and "linear" in name:
                p.data *= 4
    g = torch.Generator().manual_seed(1)
    inputs = dict(hidden_states=torch.randn(1, 4, FRAMES, 2 * H, 2 * W, generator=g),
                  encoder_hidden_states=torch.randn(1, TEXT, 16, generator=g))
    scheduler = FlowMatchEulerDiscreteScheduler()
    scheduler.set_timesteps(2)
    return model, inputs, types.SimpleNamespace(transformer=model, scheduler=scheduler)


def sample(cosmos, dynamic=None):
    model, inputs, pipe = cosmos
    if dynamic is not None:
        session = dh.apply(pipe, dynamic)
        session.token_indices = COLUMNS
    try:
        return model(**inputs, timestep=pipe.scheduler.timesteps[:1], return_dict=False)[0]
    finally:
        dh.remove(pipe)


def explicit_bent(entry, dispatch, text=TEXT, frames=FRAMES, columns=COLUMNS):
    spec = bending.BendSpec.from_dict(entry)           # the entry's own renormalisation (cross-attention)

    def attend(query, key, value, attn_mask=None, **kwargs):
        if key.shape[1] != text:                          # the self-attentions: as the model does
            return dispatch(query, key, value, attn_mask=attn_mask, **kwargs)
        q, k, v = (t.transpose(1, 2).float() for t in (query, key, value))      # [b, heads, L, d]
        probs = torch.softmax(q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5, dim=-1)
        bent = bending.bend_probs(probs.reshape(-1, *probs.shape[2:]), columns, (H, W), [spec], frames=frames)
        return (bent.view(probs.shape) @ v).transpose(1, 2).to(query.dtype)

    return attend


def test_every_bent_call_is_the_explicit_bent_softmax(cosmos, monkeypatch):
    plain = sample(cosmos)
    bent = sample(cosmos, dynamic={"bending": [ENTRY]})
    model, inputs, pipe = cosmos
    monkeypatch.setattr(transformer_cosmos, "dispatch_attention_fn",
                        explicit_bent(ENTRY, transformer_cosmos.dispatch_attention_fn))
    expected = model(**inputs, timestep=pipe.scheduler.timesteps[:1], return_dict=False)[0]
    torch.testing.assert_close(bent, expected, rtol=1e-4, atol=1e-5)
    assert (bent - plain).abs().max() > 1e-3


def test_strength_zero_is_bit_identical(cosmos):
    assert torch.equal(sample(cosmos, dynamic={"bending": [{**ENTRY, "strength": 0.0}]}), sample(cosmos))


# --- the real Cosmos2TextToImagePipeline: σ/(σ+1) timesteps mapped to the scheduler's steps ------------------------

class Guardrail:
    """Stands in for the optional cosmos_guardrail package the pipeline insists on (never consulted on latents)."""
    def to(self, *args):
        return self

    def check_text_safety(self, prompt):
        return True


@pytest.fixture(scope="module")
def cosmos_pipe():
    tokenizer = t5_like_tokenizer()
    with torch.random.fork_rng():
        torch.manual_seed(3)
        model = CosmosTransformer3DModel(**{**CONFIG, "text_embed_dim": 32}).eval()
        for name, p in model.named_parameters():
            if "norm" in name and "linear" in name:
                p.data *= 4
        encoder = t5_encoder(tokenizer)
    pipe = Cosmos2TextToImagePipeline(text_encoder=encoder, tokenizer=tokenizer, transformer=model, vae=None,
                                      scheduler=FlowMatchEulerDiscreteScheduler(use_karras_sigmas=True),
                                      safety_checker=Guardrail())
    pipe.set_progress_bar_config(disable=True)
    return pipe


def run(pipe, dynamic=None, before=None, after=None):
    """Three steps of 64×96 pixels (one 4×6-token frame), CFG as two model calls; the session, or None. before(),
    after(output): hooks on the model, after the session's (they see the call's description)."""
    session = dh.apply(pipe, dynamic, record_maps=True) if dynamic is not None else None
    hooks = [pipe.transformer.register_forward_pre_hook(lambda *a: before())] if before else []
    hooks += [pipe.transformer.register_forward_hook(lambda m, a, out: after(out[0]))] if after else []
    try:
        out = pipe("a cat at {sunset}" if dynamic else "a cat at sunset", negative_prompt="a red sky",
                   num_inference_steps=3, height=64, width=96, max_sequence_length=16, output_type="latent",
                   generator=torch.Generator().manual_seed(0)).images
    finally:
        [h.remove() for h in hooks]
        dh.remove(pipe)
    return out, session


def test_the_pipelines_timesteps_name_the_schedulers_steps(cosmos_pipe):
    """The pipeline's own formula, in float32 and in bfloat16 (where σ_max's neighbours round alike), stepped by
    the real scheduler: each call's position is its step, also with Video2World's given frame at t_conditioning;
    a plain scheduler.timesteps value maps to nothing, nor does another pipeline's call."""
    scheduler = cosmos_pipe.scheduler
    for dtype in (torch.float32, torch.bfloat16):
        scheduler.set_timesteps(sigmas=torch.linspace(0, 1, 6, dtype=torch.float64))
        scheduler.sigmas[-1] = scheduler.sigmas[-2]               # the pipeline's final_sigmas_type "sigma_min"
        latents = torch.zeros(1, 4)
        for i, t in enumerate(scheduler.timesteps):
            sigma = scheduler.sigmas[i]
            current = sigma / (sigma + 1)
            assert dh_cosmos.position(cosmos_pipe, current.expand(2).to(dtype)) == i
            frames = torch.stack([torch.tensor(1e-4 / (1 + 1e-4)), current]).view(1, 1, 2, 1, 1)   # Video2World
            assert dh_cosmos.position(cosmos_pipe, frames.to(dtype)) == i
            latents = scheduler.step(latents, t, latents, return_dict=False)[0]
    assert dh_cosmos.position(cosmos_pipe, scheduler.timesteps[:1]) is None
    assert dh_cosmos.position(types.SimpleNamespace(scheduler=scheduler), torch.tensor([0.5])) is None


def test_the_step_window_bends_its_steps_only_and_never_the_negative(cosmos_pipe, monkeypatch):
    """apply_to_timesteps [1, 1]: the model calls see steps 0, 0, 1, 1, 2, 2 (prompt, negative), maps are recorded at
    step 1 only, and the output equals the pipeline whose attention is the explicit bent softmax at step 1's
    conditional call (the third model call) and the model's own elsewhere; step 1's negative call and a window outside
    every step: bit-identical."""
    plain, _ = run(cosmos_pipe)
    windowed = {"bending": [{**ENTRY, "apply_to_timesteps": [1, 1]}]}
    seen = []
    bent, session = run(cosmos_pipe, windowed, lambda: seen.append((cosmos_pipe._ckptbend_session.call.step,
                                                                    cosmos_pipe._ckptbend_session.call.cond_rows)))
    assert seen == [(0, [0]), (0, []), (1, [0]), (1, []), (2, [0]), (2, [])]
    assert [(m["step"], m["layer"]) for m in session.maps] == [(1, 0), (1, 1)]
    assert session.token_indices == {"sunset": [3]}
    outside, _ = run(cosmos_pipe, {"bending": [{**ENTRY, "apply_to_timesteps": [3, 3]}]})
    assert torch.equal(outside, plain) and not torch.equal(bent, plain)
    outputs = {}                     # step 1's negative call (the fourth) sees the same inputs in both runs
    for name, dynamic in (("plain", None), ("bent", windowed)):
        found = outputs.setdefault(name, [])
        run(cosmos_pipe, dynamic, after=found.append)
    assert torch.equal(outputs["plain"][3], outputs["bent"][3])
    assert not torch.equal(outputs["plain"][2], outputs["bent"][2])

    calls = []
    dispatch = transformer_cosmos.dispatch_attention_fn
    bend = explicit_bent(ENTRY, dispatch, text=16, frames=1, columns={"sunset": [3]})   # 16 T5 keys, one frame
    monkeypatch.setattr(transformer_cosmos, "dispatch_attention_fn",
                        lambda *a, **k: (bend if len(calls) == 3 else dispatch)(*a, **k))
    expected, _ = run(cosmos_pipe, before=lambda: calls.append(1))
    torch.testing.assert_close(bent, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", ["Cosmos2_5_PredictBasePipeline", "Cosmos2_5_TransferPipeline"])
def test_cosmos_predict2_5_pipelines_are_refused_in_one_line(cosmos, name):
    """Predict2.5 (the same transformer class) encodes a Qwen2.5-VL chat conversation: refused at apply()."""
    import diffusers

    pipe = object.__new__(getattr(diffusers, name))
    vars(pipe).update(transformer=cosmos[0], scheduler=cosmos[2].scheduler)
    with pytest.raises(ValueError, match="does not reach Cosmos Predict2.5") as refused:
        dh.apply(pipe, {"bending": [ENTRY]})
    assert "\n" not in str(refused.value)
