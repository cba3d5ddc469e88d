"""Attention Bending on the cross-attention families the generic path (cross.py, attn2) reaches: LTX-Video 1.0,
SkyReels V2 and ChronoEdit (Sana: tests/test_runtime_sana.py), with diffusers' own classes, tiny and seeded.

LTX-Video runs through LTXPipeline (packed [b, frames·rows·cols, c] latents, T5 with its mask, CFG batched
[negative; prompt]). SkyReels V2 and ChronoEdit (Wan blocks) run through SkyReelsV2Pipeline and ChronoEditPipeline: the
prompt's and the negative's predictions in two calls (ChronoEdit: CLIP image tokens before its 512 text tokens).

The reference is each model's own processors with the attention call replaced, for the text keys, by an explicit
softmax (the mask added) whose prompt item is bent by bending.bend_probs on the (frames, rows, cols) grid: every bent
call equals it. Strength 0 and steps outside the window are bit-identical; so is the negative prediction."""

import types

import diffusers
import pytest
import torch
from diffusers.models.transformers import transformer_chronoedit, transformer_ltx, transformer_skyreels_v2

from _cross_families import (ENTRY, FRAMES, GRID, T5_TEXT, check_token_order, check_window_and_negative,
                             explicit_bent, pipe_run, wan_vae, with_session, without_ftfy)
from _pipelines import WAN_CONFIG, t5_encoder, t5_like_tokenizer
from ckptbend.synth import wan as synth_wan

pytestmark = pytest.mark.usefixtures("one_thread_no_grad")


# --- LTX-Video 1.0: LTXPipeline, T5 ----------------------------------------------------------------


@pytest.fixture(scope="module")
def ltx():
    tokenizer = t5_like_tokenizer()
    with torch.random.fork_rng():
        torch.manual_seed(13)
        encoder = t5_encoder(tokenizer)
        model = diffusers.LTXVideoTransformer3DModel(**{**synth_wan.ARCHES["ltx_video"][1],
                                                        "caption_channels": 32}).eval()
    pipe = diffusers.LTXPipeline(scheduler=diffusers.FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True),
                                 vae=None, text_encoder=encoder, tokenizer=tokenizer, transformer=model)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_ltx_every_bent_call_is_the_explicit_bent_softmax(ltx, monkeypatch):
    plain = pipe_run(ltx)
    bent = pipe_run(ltx, {"bending": [ENTRY]})
    monkeypatch.setattr(transformer_ltx, "dispatch_attention_fn", explicit_bent(
        transformer_ltx.dispatch_attention_fn, T5_TEXT, {"sunset": [4]}, GRID, FRAMES, [1], False))
    torch.testing.assert_close(bent, pipe_run(ltx), rtol=1e-4, atol=1e-5)
    assert (bent - plain).abs().max() > 1e-3


# --- SkyReels V2 (SkyReelsV2Pipeline) and ChronoEdit: Wan blocks, CFG in two calls ------------------------------


@pytest.fixture(scope="module")
def skyreels():
    """SkyReelsV2Pipeline (text to video): T5, UniPC with flow sigmas as SkyReels V2 ships it, no fps input."""
    from diffusers.pipelines.skyreels_v2 import pipeline_skyreels_v2

    tokenizer = t5_like_tokenizer()
    with torch.random.fork_rng():
        torch.manual_seed(17)
        model = diffusers.SkyReelsV2Transformer3DModel(**WAN_CONFIG).eval()
        encoder = t5_encoder(tokenizer)
    scheduler = diffusers.UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True,
                                                  flow_shift=8.0)
    pipe = diffusers.SkyReelsV2Pipeline(tokenizer=tokenizer, text_encoder=encoder, transformer=model, vae=wan_vae(),
                                        scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    with without_ftfy(pipeline_skyreels_v2):
        yield pipe


@pytest.fixture(scope="module")
def chronoedit():
    """ChronoEditPipeline: T5 (512 tokens, the image keys' split), a CLIP vision encoder, Wan's VAE encoding the
    image into the condition (16 + 4 + 16 input channels), 5 frames."""
    from diffusers.pipelines.chronoedit import pipeline_chronoedit
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel

    tokenizer = t5_like_tokenizer()
    with torch.random.fork_rng():
        torch.manual_seed(19)
        model = diffusers.ChronoEditTransformer3DModel(**{**WAN_CONFIG, "in_channels": 36, "image_dim": 20,
                                                          "added_kv_proj_dim": 24}).eval()
        encoder = t5_encoder(tokenizer)
        image_encoder = CLIPVisionModel(CLIPVisionConfig(hidden_size=20, intermediate_size=24, num_hidden_layers=2,
                                                         num_attention_heads=2, image_size=32, patch_size=16)).eval()
    pipe = diffusers.ChronoEditPipeline(
        tokenizer=tokenizer, text_encoder=encoder, image_encoder=image_encoder, transformer=model, vae=wan_vae(),
        image_processor=CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}),
        scheduler=diffusers.FlowMatchEulerDiscreteScheduler(shift=5.0))
    pipe.set_progress_bar_config(disable=True)
    with without_ftfy(pipeline_chronoedit):
        yield pipe


@pytest.mark.parametrize("family", ["skyreels", "chronoedit"])
def test_wan_derived_every_bent_call_is_the_explicit_bent_softmax(family, request, monkeypatch):
    """CFG in two calls: the reference bends the first of each step's two, the prompt's (ChronoEdit: 512 text keys
    after the CLIP image's, which are attended apart)."""
    pipe = request.getfixturevalue(family)
    plain = pipe_run(pipe)
    bent = pipe_run(pipe, {"bending": [ENTRY]})
    module = transformer_skyreels_v2 if family == "skyreels" else transformer_chronoedit
    calls, original = [], module.dispatch_attention_fn
    n_text = T5_TEXT if family == "skyreels" else 512
    explicit = explicit_bent(original, n_text, {"sunset": [4]}, GRID, FRAMES, [0], False)

    def attend(query, key, value, *args, **kwargs):
        return (explicit if len(calls) % 2 == 0 else original)(query, key, value, *args, **kwargs)

    hook = pipe.transformer.register_forward_hook(lambda module, args, out: calls.append(1))
    monkeypatch.setattr(module, "dispatch_attention_fn", attend)
    try:
        expected = pipe_run(pipe)
    finally:
        hook.remove()
    torch.testing.assert_close(bent, expected, rtol=1e-4, atol=1e-5)
    assert (bent - plain).abs().max() > 1e-3


# --- the calls refused --------------------------------------------------------------------------------------

def test_ltx_a_call_without_its_grid_is_refused(ltx):
    """LTXConditionPipeline calls the model with video_coords and no num_frames / height / width, its conditioning
    tokens appended (here 2 to a 2 × 4 × 6 grid): no grid to place a word's map on, named or not."""
    g = torch.Generator().manual_seed(4)
    call = dict(hidden_states=torch.randn(1, 50, 8, generator=g), encoder_attention_mask=torch.ones(1, 4),
                encoder_hidden_states=torch.randn(1, 4, 32, generator=g), timestep=torch.tensor([500.0]))
    for grid in (dict(video_coords=torch.rand(1, 3, 50)), dict(num_frames=2, height=4, width=6)):
        with pytest.raises(ValueError, match="gives no num_frames / height / width matching its tokens"):
            with_session(ltx, {"bending": [ENTRY]}, lambda: ltx.transformer(**call, **grid), {"sunset": [2]}, None)


@pytest.fixture(scope="module")
def forcing():
    """SkyReels V2's diffusion-forcing model (fps embedding): a call with a timestep per latent frame."""
    config = synth_wan.ARCHES["skyreels_v2"][1]
    with torch.random.fork_rng():
        torch.manual_seed(23)
        model = diffusers.SkyReelsV2Transformer3DModel(**config).eval()
    g = torch.Generator().manual_seed(6)
    inputs = dict(hidden_states=torch.randn(1, 4, FRAMES, 8, 12, generator=g), fps=[1],
                  encoder_hidden_states=torch.randn(1, 5, config["text_dim"], generator=g),
                  enable_diffusion_forcing=True)
    scheduler = diffusers.FlowMatchEulerDiscreteScheduler(shift=5.0)
    scheduler.set_timesteps(2)
    return types.SimpleNamespace(transformer=model, scheduler=scheduler), inputs


def forcing_run(forcing, timestep, dynamic=None):
    pipe, inputs = forcing
    return with_session(pipe, dynamic, lambda: pipe.transformer(**inputs, timestep=timestep, return_dict=False)[0],
                        {"sunset": [2, 3]}, None)


def test_skyreels_diffusion_forcing_bends_and_refuses_a_step_window_over_mixed_steps(forcing, monkeypatch):
    steps = forcing[0].scheduler.timesteps
    mixed = steps[None]                                  # frame 0 at step 0, frame 1 at step 1
    with pytest.raises(ValueError, match="different steps"):
        forcing_run(forcing, mixed, {"bending": [{**ENTRY, "apply_to_timesteps": [0, 1]}]})
    same = torch.stack([steps[1], steps[1]])[None]
    plain = forcing_run(forcing, same)
    assert torch.equal(forcing_run(forcing, same, {"bending": [{**ENTRY, "apply_to_timesteps": [0, 0]}]}), plain)
    bent = forcing_run(forcing, mixed, {"bending": [ENTRY]})          # no window: every frame's queries bent
    unbent = forcing_run(forcing, mixed, {"bending": [{**ENTRY, "strength": 0.0}]})
    monkeypatch.setattr(transformer_skyreels_v2, "dispatch_attention_fn", explicit_bent(
        transformer_skyreels_v2.dispatch_attention_fn, 5, {"sunset": [2, 3]}, GRID, FRAMES, [0], False))
    expected = forcing_run(forcing, mixed)
    torch.testing.assert_close(bent, expected, rtol=1e-4, atol=1e-5)
    assert (bent - unbent).abs().max() > 1e-3


# --- each family: the step window, the negative prediction, the token grid -----------------------------------

@pytest.mark.parametrize("family", ["ltx", "skyreels", "chronoedit"])
def test_strength_zero_the_step_window_and_the_negative_prediction(family, request):
    check_window_and_negative(request.getfixturevalue(family), two_calls=family != "ltx")


@pytest.mark.parametrize("family", ["ltx", "skyreels", "chronoedit"])
def test_the_sessions_grid_is_the_models_token_order(family, request):
    check_token_order(request.getfixturevalue(family), family)
