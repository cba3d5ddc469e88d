"""Attention Bending on MiniMax H3 in the diffusers host: diffusers' own MiniMaxH3Transformer3DModel (the synth config:
2 blocks, 1 token-refiner block), tiny and seeded, on a packed sequence laid out by the modular pipeline's own
builders: [text (3 label tokens, then the 5 prompt tokens) | one keyframe's conditioning rows | target audio | target
video of 2 frames × 2 × 3 tokens], per-row timesteps from its own timestep plan.

The reference is the model's processors with diffusers' attention dispatch replaced by an explicit softmax whose
target-video-query × prompt-key block is bent by bending.bend_probs, rows renormalised over all keys: every bent call
equals it. The token refiner's calls (the text alone) are not bent; strength 0 and steps outside the window are
bit-identical; the words' columns are those of the pipeline's own presentation, found through apply()'s wrapper of
the modular pipeline's blocks; in the pipeline's own denoising loop a step window bends its step's call only."""

import types

import pytest
import torch
from diffusers import MiniMaxH3Blocks, MiniMaxH3Scheduler
from diffusers.modular_pipelines.minimax_h3.before_denoise import MiniMaxH3PrepareLayoutStep, MiniMaxH3SetTimestepsStep
from diffusers.modular_pipelines.minimax_h3.denoise import MiniMaxH3DenoiseStep
from diffusers.modular_pipelines.minimax_h3.encoders import MiniMaxH3Ref2VATextEncoderStep
from diffusers.modular_pipelines.modular_pipeline import ModularPipelineBlocks, SequentialPipelineBlocks
from diffusers.modular_pipelines.modular_pipeline_utils import InputParam
from diffusers.models.transformers import transformer_minimax_h3 as tm

import comfy_standin_joint as cj
import comfy_standin_qwen as cq
from ckptbend.runtime import bending
from ckptbend.runtime import diffusers_host as dh
from ckptbend.synth.minimax_h3 import CONFIGS

CONFIG = CONFIGS["minimax_h3"]
LABEL, PROMPT = 3, 5                     # text rows: a reference's label, then the prompt's tokens
FRAMES, H, W = 2, 2, 3                   # target video tokens; latent 4 × 6 under the (1, 2, 2) patch
N_TEXT, N_COND, N_AUDIO = LABEL + PROMPT, H * W, 3 * 2
TARGET = slice(N_TEXT + N_COND + N_AUDIO, N_TEXT + N_COND + N_AUDIO + FRAMES * H * W)
COLUMNS = {"sunset": [2, 3]}
ENTRY = {"token": "sunset", "mode": "translate", "translate_x": 0.5}

pytestmark = pytest.mark.usefixtures("one_thread_no_grad")


@pytest.fixture(scope="module")
def minimax():
    model = cj.seeded_transformer(tm.MiniMaxH3Transformer3DModel, CONFIG, 47)
    position_ids, tags, video, audio, text, n_cond, _ = MiniMaxH3PrepareLayoutStep.build_packed_sequence(
        torch.ones(N_TEXT, dtype=torch.long), FRAMES, 2 * H, 2 * W, 3, (1, 2, 2), 2, 2, 0, keyframe_anchors=("first",))
    assert n_cond == N_COND and int(video[-1]) == TARGET.stop - 1 and int(video[N_COND]) == TARGET.start
    scheduler = MiniMaxH3Scheduler()
    scheduler.set_timesteps(4)                        # 4 grid points: 3 model evaluations
    plans = [MiniMaxH3SetTimestepsStep.build_row_timesteps(video, audio, N_COND, 0, N_TEXT, float(t), float(t),
                                                            max(float(t), 0.999), 1.0) for t in scheduler.timesteps]
    g = torch.Generator().manual_seed(9)
    inputs = dict(hidden_states=torch.randn(1, len(video), 16, generator=g),
                  audio_hidden_states=torch.randn(1, len(audio), 6, generator=g),
                  encoder_hidden_states=torch.randn(1, N_TEXT, 20, generator=g), token_tags=tags,
                  position_ids=position_ids, video_indices=video, audio_indices=audio, text_indices=text)
    return model, inputs, plans, types.SimpleNamespace(transformer=model, scheduler=scheduler)


def run(minimax, step=0, dynamic=None):
    model, inputs, plans, pipe = minimax
    if dynamic is not None:
        session = dh.apply(pipe, dynamic)
        session.token_indices, session.n_prompt = COLUMNS, PROMPT
    try:
        pipe.scheduler._step_index = step                # as the pipeline's loop leaves it before step()
        timestep, indices = plans[step]
        return model(**inputs, timestep=timestep, timestep_indices=indices, return_dict=False)[0]
    finally:
        dh.remove(pipe)


def explicit_bent(entry, kinds):
    """diffusers' dispatch replaced: softmax(q·kᵀ·d^−½) with the target video × prompt block bent, each target row
    renormalised over all keys. kinds: the calls made (the refiner's see the 8 text rows alone)."""
    spec = bending.BendSpec.from_dict({**entry, "renormalize": "none"})
    prompt = slice(LABEL, N_TEXT)

    def attend(query, key, value, attn_mask=None, **kwargs):
        q, k, v = (t.transpose(1, 2).float() for t in (query, key, value))
        probs = torch.softmax(q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5, dim=-1)
        kinds.append("refiner" if k.shape[2] == N_TEXT else "block")
        if k.shape[2] > N_TEXT:
            probs = probs.clone()
            probs[0, :, TARGET, prompt] = bending.bend_probs(probs[0, :, TARGET, prompt].contiguous(), COLUMNS,
                                                             (H, W), [spec], frames=FRAMES)
            probs[0, :, TARGET] /= probs[0, :, TARGET].sum(-1, keepdim=True)
        return (probs @ v).transpose(1, 2).to(query.dtype)

    return attend


def test_every_bent_call_is_the_explicit_bent_softmax(minimax, monkeypatch):
    plain = run(minimax)
    bent = run(minimax, dynamic={"bending": [ENTRY]})
    kinds = []
    monkeypatch.setattr(tm, "dispatch_attention_fn", explicit_bent(ENTRY, kinds))
    torch.testing.assert_close(bent, run(minimax), rtol=1e-4, atol=1e-5)
    assert kinds == ["refiner", "block", "block"]
    assert (bent[:, N_COND:] - plain[:, N_COND:]).abs().max() > 1e-3          # the target video moves


def test_the_sites_are_the_blocks_not_the_token_refiner(minimax):
    assert [(s.name, s.layer) for s in dh.processor.sites_of(minimax[0])] == [
        ("transformer_blocks.0.attn", 0), ("transformer_blocks.1.attn", 1)]


def test_strength_zero_and_outside_the_step_window_are_bit_identical(minimax):
    plain = run(minimax, step=1)
    assert torch.equal(run(minimax, 1, {"bending": [{**ENTRY, "strength": 0.0}]}), plain)
    assert torch.equal(run(minimax, 1, {"bending": [{**ENTRY, "apply_to_timesteps": [0, 0]}]}), plain)
    assert not torch.equal(run(minimax, 1, {"bending": [{**ENTRY, "apply_to_timesteps": [1, 1]}]}), plain)


def test_the_call_reads_the_target_grid_and_the_prompt_keys(minimax):
    model, inputs, plans, pipe = minimax
    session = dh.apply(pipe, {"bending": [ENTRY]})
    session.token_indices, session.n_prompt = COLUMNS, PROMPT
    seen = []
    hook = model.register_forward_pre_hook(lambda *a: seen.append(session.call), with_kwargs=True)
    try:
        pipe.scheduler._step_index = 2
        model(**inputs, timestep=plans[2][0], timestep_indices=plans[2][1])
    finally:
        hook.remove()
        dh.remove(pipe)
    call = seen[0]
    assert (call.token_hw, call.frames, call.step, call.cond_rows) == ((H, W), FRAMES, 2, [0])
    assert call.spans == [(TARGET.start, LABEL, PROMPT)]


class Prompted(ModularPipelineBlocks):
    """A block that keeps the prompt it is given (the pipeline's text encoder step would tokenize it)."""
    seen: list = []

    @property
    def inputs(self):
        return [InputParam("prompt")]

    def __call__(self, components, state):
        Prompted.seen.append(self.get_block_state(state).prompt)
        return components, state


def test_the_word_columns_are_the_pipelines_own_presentation(minimax):
    """MiniMaxH3ModularPipeline's call runs its blocks with the marks stripped; the columns found index the prompt's
    tokens at the end of the pipeline's presentation (here after an audio reference's label)."""
    tokenizer = cq.qwen_tokenizer()
    pipe = MiniMaxH3Blocks().init_pipeline()
    pipe._blocks = Prompted()
    pipe.transformer, pipe.scheduler, pipe.tokenizer = minimax[0], minimax[3].scheduler, tokenizer
    session = dh.apply(pipe, {"bending": [ENTRY]})
    try:
        pipe(prompt="a romantic kiss at {sunset}")
        columns, n_prompt = session.token_indices["sunset"], session.n_prompt
    finally:
        dh.remove(pipe)
    assert Prompted.seen[-1] == "a romantic kiss at sunset" and isinstance(pipe._blocks, Prompted)
    ids, tags = MiniMaxH3Ref2VATextEncoderStep._build_presentation(
        tokenizer, "a romantic kiss at sunset", [types.SimpleNamespace(kind="audio", has_audio=True)], [], [], [])
    offset = len(ids) - n_prompt                           # the label's tokens come first
    assert offset > 0 and tags[offset:] == [1] * n_prompt
    assert tokenizer.convert_ids_to_tokens([ids[offset + j] for j in columns]) == ["Ġsun", "set"]


def test_a_word_beyond_the_prompt_is_refused(minimax):
    model, inputs, plans, pipe = minimax
    session = dh.apply(pipe, {"bending": [ENTRY]})
    session.token_indices, session.n_prompt = {"sunset": [5]}, PROMPT
    try:
        with pytest.raises(ValueError, match="beyond the 5 prompt tokens"):
            model(**inputs, timestep=plans[0][0], timestep_indices=plans[0][1])
    finally:
        dh.remove(pipe)


def test_phase_one_records_maps_and_leaves_the_output_bit_identical(minimax):
    model, inputs, plans, pipe = minimax
    session = dh.apply(pipe, {"bending": [ENTRY]}, phase=1)
    session.token_indices, session.n_prompt = COLUMNS, PROMPT
    try:
        pipe.scheduler._step_index = 0
        bent = model(**inputs, timestep=plans[0][0], timestep_indices=plans[0][1], return_dict=False)[0]
    finally:
        dh.remove(pipe)
    assert torch.equal(bent, run(minimax))
    assert [m["layer"] for m in session.maps] == [0, 1] and session.maps[0]["bent"].shape == (FRAMES, H, W)


def test_the_denoising_loop_bends_the_windows_step_at_the_words_columns(minimax, monkeypatch):
    """MiniMax H3's own denoising loop (MiniMaxH3DenoiseStep: the transformer, then both schedulers' step, 3 steps)
    behind a prompt block, in MiniMaxH3ModularPipeline: the marked prompt's words are found with its tokenizer, and
    an entry windowed to step 1 bends the second model call only, as the explicit bent softmax at those columns."""
    model, inputs, plans, _ = minimax
    blocks = SequentialPipelineBlocks.from_blocks_dict({"prompt": Prompted(), "denoise": MiniMaxH3DenoiseStep()})
    pipe = blocks.init_pipeline()
    pipe.set_progress_bar_config(disable=True)
    pipe.tokenizer = cq.qwen_tokenizer()
    fields = {k: inputs[k] for k in ("token_tags", "position_ids", "video_indices", "audio_indices", "text_indices")}

    def sample(prompt):
        video, audio = MiniMaxH3Scheduler(), MiniMaxH3Scheduler()
        video.set_timesteps(4)
        audio.set_timesteps(4)
        pipe.update_components(transformer=model, scheduler=video, audio_scheduler=audio)
        return pipe(prompt=prompt, timesteps=video.timesteps, latents=inputs["hidden_states"][0].clone(),
                    audio_latents=inputs["audio_hidden_states"][0].clone(),
                    prompt_embeds=inputs["encoder_hidden_states"], row_timestep_plan=plans,
                    denoiser_input_fields=fields, audio_timesteps=audio.timesteps, num_condition_video_rows=N_COND,
                    output="latents")

    plain = sample("a kiss at sunset")
    session = dh.apply(pipe, {"bending": [{**ENTRY, "apply_to_timesteps": [1, 1]}]})
    try:
        bent = sample("a kiss at {sunset}")
        columns = session.token_indices["sunset"]
    finally:
        dh.remove(pipe)
    assert columns == [3, 4] and session.n_prompt == PROMPT             # a Ġkiss Ġat Ġsun set
    calls = []
    hook = model.register_forward_pre_hook(lambda *a: calls.append(1), with_kwargs=True)
    real, bend = tm.dispatch_attention_fn, explicit_bent(ENTRY, [])
    monkeypatch.setattr(tm, "dispatch_attention_fn", lambda *a, **kw: (bend if len(calls) == 2 else real)(*a, **kw))
    monkeypatch.setitem(COLUMNS, "sunset", columns)
    try:
        torch.testing.assert_close(bent, sample("a kiss at sunset"), rtol=1e-4, atol=1e-5)
    finally:
        hook.remove()
    assert len(calls) == 3 and (bent - plain).abs().max() > 1e-4
