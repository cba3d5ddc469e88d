"""Attention Bending on Wan Animate 2 in the diffusers host: diffusers' own WanAnimate2Transformer3DModel (2 blocks,
2 heads of 16, the prompt padded to text_len 16), tiny and seeded. One segment: the reference pass
(kv_cache_mode="extract", a driving video of 2 frames × 2 × 3 tokens, the reference prompt) fills the K/V cache; the
generation pass (kv_cache_mode="cached", 3 frames × 2 × 3 tokens: the reference slot, then the segment) attends to it
through the flex BlockMask (PyTorch's eager flex fallback on CPU; the mask is built uncompiled once, which changes
nothing it holds).

The reference is the model's processors with diffusers' attention dispatch replaced by an explicit softmax whose
generation-query × prompt-key block (each block's text cross-attention) is bent by bending.bend_probs: every bent call
equals it; the image keys' attention and the self-attentions keep the host's own. The reference pass (its cache and
output), the unconditional branch (is_uncondtion), strength 0 and steps outside the window are bit-identical."""

import types

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, WanAnimate2Transformer3DModel
from diffusers.models.transformers import transformer_wan_animate_2 as tm
from diffusers.modular_pipelines.modular_pipeline import ModularPipelineBlocks, SequentialPipelineBlocks
from diffusers.modular_pipelines.modular_pipeline_utils import InputParam, OutputParam
from diffusers.modular_pipelines.wan_animate_2 import denoise
from diffusers.modular_pipelines.wan_animate_2.encoders import WanAnimate2TextEncoderStep
from transformers import UMT5Config, UMT5EncoderModel

from _pipelines import t5_sentencepiece_tokenizer

from ckptbend.runtime import bending
from ckptbend.runtime import diffusers_host as dh

CONFIG = dict(in_dim=8, dim=32, ffn_dim=48, freq_dim=32, text_dim=24, out_dim=4, num_heads=2, num_layers=2,
              text_len=16)
FRAMES, H, W = 3, 2, 3                   # generation tokens (latent 4 × 6 under the (1, 2, 2) patch)
REF_FRAMES = FRAMES - 1                  # the driving video's latent frames
TEXT_LEN, CLIP = 16, 5                   # the model pads the prompt to text_len (512 in Wan's); CLIP tokens
COLUMNS = {"sunset": [2, 3]}
ENTRY = {"token": "sunset", "mode": "translate", "translate_x": 0.5}

pytestmark = pytest.mark.usefixtures("one_thread_no_grad")


@pytest.fixture(scope="module")
def animate():
    with torch.random.fork_rng():
        torch.manual_seed(41)
        model = WanAnimate2Transformer3DModel(**CONFIG).eval()
    with pytest.MonkeyPatch.context() as mp:            # compiling the mask takes 25 s of CPU: built eagerly
        real = tm.create_block_mask
        mp.setattr(tm, "create_block_mask", lambda *a, **k: real(*a, **{**k, "_compile": False}))
        model.block_masks[(2, H * W)] = model.create_mask(2, H * W, torch.device("cpu"))
    g = torch.Generator().manual_seed(3)

    def rand(*shape):
        return torch.randn(*shape, generator=g)

    common = dict(encoder_hidden_states_image=rand(1, CLIP, 1280))
    reference = dict(common, hidden_states=[rand(4, REF_FRAMES, 2 * H, 2 * W)], encoder_hidden_states=[rand(6, 24)],
                     condition_latents=[rand(4, REF_FRAMES, 2 * H, 2 * W)], kv_cache_mode="extract",
                     seq_len=REF_FRAMES * H * W, offset_grid_sizes=torch.tensor([[REF_FRAMES, H, W]]))
    generation = dict(common, hidden_states=[rand(4, FRAMES, 2 * H, 2 * W)], encoder_hidden_states=[rand(7, 24)],
                      condition_latents=[rand(4, FRAMES, 2 * H, 2 * W)], kv_cache_mode="cached",
                      seq_len=FRAMES * H * W, reference_grid_sizes=torch.tensor([[REF_FRAMES, H, W]]),
                      origin_len=4, origin_area=[32, 48])        # 4 // 4 + 1 = 2 frames of 32·48/256 = 6 tokens
    scheduler = FlowMatchEulerDiscreteScheduler(shift=5.0)
    scheduler.set_timesteps(3)
    return model, reference, generation, types.SimpleNamespace(transformer=model, scheduler=scheduler)


def segment(animate, step=0, dynamic=None, uncond=False, columns=COLUMNS, on_generation=None):
    """The reference pass, then one generation pass at `step`: (its output, the reference pass's output and
    cache)."""
    model, reference, generation, pipe = animate
    if dynamic is not None:
        session = dh.apply(pipe, dynamic)
        session.token_indices = columns
    try:
        cache = tm.WanAnimate2KVCache(len(model.blocks))
        t = pipe.scheduler.timesteps[step:step + 1]
        ref_out = model(**reference, kv_cache=cache, timestep=pipe.scheduler.timesteps[:1]).sample[0]
        if on_generation is not None:
            on_generation()
        out = model(**generation, kv_cache=cache, timestep=t, is_uncondtion=uncond).sample[0]
        return out, ref_out, [(c.key, c.value) for c in cache.layer_caches]
    finally:
        dh.remove(pipe)


def explicit_bent(entry, kinds, bend, columns=COLUMNS):
    """diffusers' dispatch replaced: softmax(q·kᵀ·d^−½), the text cross-attention's rows bent while bend["on"] (the
    generation pass, the step window's); the flex self-attention (BlockMask) goes to diffusers' own dispatch."""
    spec = bending.BendSpec.from_dict({k: v for k, v in entry.items() if k != "apply_to_timesteps"})
    real = tm.dispatch_attention_fn

    def attend(query, key, value, attn_mask=None, **kwargs):
        kind = "text" if key.shape[1] == TEXT_LEN else "image" if key.shape[1] == CLIP else "self"
        kinds.append(kind)
        if attn_mask is not None:
            return real(query, key, value, attn_mask=attn_mask, **kwargs)
        q, k, v = (t.transpose(1, 2).float() for t in (query, key, value))
        probs = torch.softmax(q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5, dim=-1)
        if kind == "text" and bend["on"]:
            probs = bending.bend_probs(probs[0], columns, (H, W), [spec], frames=FRAMES)[None]
        return (probs @ v).transpose(1, 2).to(query.dtype)

    return attend


def test_every_bent_call_is_the_explicit_bent_softmax(animate, monkeypatch):
    plain = segment(animate)[0]
    bent = segment(animate, dynamic={"bending": [ENTRY]})[0]
    kinds, bend = [], {"on": False}
    monkeypatch.setattr(tm, "dispatch_attention_fn", explicit_bent(ENTRY, kinds, bend))
    expected = segment(animate, on_generation=lambda: bend.update(on=True))[0]
    torch.testing.assert_close(bent, expected, rtol=1e-4, atol=1e-5)
    assert kinds == ["self", "text", "image"] * 4                         # 2 blocks × (reference, generation)
    assert (bent - plain).abs().max() > 1e-3                              # the generated video moves


def test_the_reference_pass_and_the_self_attentions_are_untouched(animate):
    """The reference pass attends to the reference prompt (prompt_ref), not the prompt: its output and the K/V cache
    it writes are bit-identical; the self-attentions keep their processors."""
    model = animate[0]
    before = [b.self_attn.processor for b in model.blocks]
    _, ref_plain, cache_plain = segment(animate)
    bent, ref_bent, cache_bent = segment(animate, dynamic={"bending": [{**ENTRY, "strength": 2.0}]})
    assert torch.equal(ref_bent, ref_plain)
    assert all(torch.equal(a, b) for pa, pb in zip(cache_plain, cache_bent) for a, b in zip(pa, pb))
    session = dh.apply(animate[3], {"bending": [ENTRY]})
    try:
        assert [(s.name, s.layer, s.cross) for s in dh.processor.sites_of(model)] == [
            ("blocks.0.cross_attn", 0, True), ("blocks.1.cross_attn", 1, True)]
        assert [b.self_attn.processor for b in model.blocks] == before
    finally:
        dh.remove(animate[3])
    assert session.call is None


def test_strength_zero_outside_the_window_and_the_unconditional_branch_are_bit_identical(animate):
    plain = segment(animate, step=1)[0]
    assert torch.equal(segment(animate, 1, {"bending": [{**ENTRY, "strength": 0.0}]})[0], plain)
    assert torch.equal(segment(animate, 1, {"bending": [{**ENTRY, "apply_to_timesteps": [0, 0]}]})[0], plain)
    assert torch.equal(segment(animate, 1, {"bending": [{**ENTRY, "apply_to_layers": [5]}]})[0], plain)
    assert not torch.equal(segment(animate, 1, {"bending": [{**ENTRY, "apply_to_timesteps": [1, 1]}]})[0], plain)
    negative = segment(animate, 1, uncond=True)[0]      # the guider's unconditional call (it skips block 9)
    assert torch.equal(segment(animate, 1, {"bending": [ENTRY]}, uncond=True)[0], negative)


def test_the_call_reads_the_generation_grid_step_and_branch(animate):
    model, reference, generation, pipe = animate
    session = dh.apply(pipe, {"bending": [ENTRY]})
    session.token_indices = COLUMNS
    seen = []
    hook = model.register_forward_pre_hook(lambda *a: seen.append(session.call), with_kwargs=True)
    try:
        cache = tm.WanAnimate2KVCache(len(model.blocks))
        model(**reference, kv_cache=cache, timestep=pipe.scheduler.timesteps[:1])
        for uncond in (False, True):
            model(**generation, kv_cache=cache, timestep=pipe.scheduler.timesteps[2:3], is_uncondtion=uncond)
    finally:
        hook.remove()
        dh.remove(pipe)
    # the pre-hook runs after the session's: the reference pass has no Call
    assert seen[0] is None
    assert [(c.token_hw, c.frames, c.step, c.cond_rows, c.n_text) for c in seen[1:]] == [
        ((H, W), FRAMES, 2, [0], TEXT_LEN), ((H, W), FRAMES, 2, [], TEXT_LEN)]


def test_a_word_beyond_the_text_is_refused(animate):
    with pytest.raises(ValueError, match="beyond the 16 text tokens"):
        segment(animate, dynamic={"bending": [ENTRY]}, columns={"sunset": [16]})


def test_phase_one_records_maps_and_leaves_the_output_bit_identical(animate):
    model, reference, generation, pipe = animate
    plain = segment(animate)[0]
    session = dh.apply(pipe, {"bending": [ENTRY]}, phase=1)
    session.token_indices = COLUMNS
    try:
        cache = tm.WanAnimate2KVCache(len(model.blocks))
        model(**reference, kv_cache=cache, timestep=pipe.scheduler.timesteps[:1])
        out = model(**generation, kv_cache=cache, timestep=pipe.scheduler.timesteps[:1]).sample[0]
    finally:
        dh.remove(pipe)
    assert torch.equal(out, plain)
    assert [m["layer"] for m in session.maps] == [0, 1] and session.maps[0]["bent"].shape == (FRAMES, H, W)


# --- the modular pipeline's own loop ---------------------------------------------------------------

class Segment(denoise.WanAnimate2SegmentLoopWrapper):
    """The pipeline's segment loop less its VAE steps (encode, previous frames, decode): scheduler reset, the
    reference pass, the guided denoising steps."""
    block_classes = [denoise.WanAnimate2SegmentSchedulerResetStep, denoise.WanAnimate2RefExtractStep,
                     denoise.WanAnimate2SegmentDenoiseInner]
    block_names = ["scheduler_reset", "ref_extract", "denoise_inner"]


class Clip(ModularPipelineBlocks):
    """The CLIP image features, tagged for the denoiser as the pipeline's CLIP encoder step tags them."""

    @property
    def inputs(self):
        return [InputParam("clip")]

    @property
    def intermediate_outputs(self):
        return [OutputParam("encoder_hidden_states_image", kwargs_type="denoiser_input_fields")]

    def __call__(self, components, state):
        block_state = self.get_block_state(state)
        block_state.encoder_hidden_states_image = block_state.clip
        self.set_block_state(state, block_state)
        return components, state


def test_the_pipelines_loop_bends_the_windows_conditional_calls_at_the_words_columns(animate, monkeypatch):
    """WanAnimate2TextEncoderStep (a tiny UMT5, T5's SentencePiece conventions) and the segment loop's own steps (2
    steps, the guider's CFG as two calls) in a modular pipeline: the marked prompt's word is found by Wan's rule at
    its T5 column, and an entry windowed to step 1 bends that step's conditional generation call only, as the
    explicit bent softmax at that column (the reference pass, step 0 and the unconditional calls unbent)."""
    model, reference, generation, _ = animate
    tokenizer = t5_sentencepiece_tokenizer()
    encoder = UMT5EncoderModel(UMT5Config(vocab_size=len(tokenizer), d_model=24, d_kv=8, d_ff=37, num_layers=1,
                                          num_heads=2, relative_attention_num_buckets=8)).eval()
    blocks = SequentialPipelineBlocks.from_blocks_dict({"text": WanAnimate2TextEncoderStep(), "clip": Clip(),
                                                        "segment": Segment()})
    pipe = blocks.init_pipeline()
    pipe.update_components(text_encoder=encoder, tokenizer=tokenizer, transformer=model,
                           scheduler=FlowMatchEulerDiscreteScheduler(shift=5.0))
    inputs = dict(max_sequence_length=TEXT_LEN, num_inference_steps=2, num_segments=1, segment_frame_length=4,
                  height=32, width=48, max_seq_len=FRAMES * H * W, max_seq_len_ref=REF_FRAMES * H * W,
                  grid_sizes_ref=reference["offset_grid_sizes"], clip=generation["encoder_hidden_states_image"],
                  condition_clip_context=reference["encoder_hidden_states_image"],
                  driving_video_latents=reference["hidden_states"][0][None],
                  driving_video_condition=reference["condition_latents"][0],
                  latents=generation["hidden_states"][0], reference_latents=generation["condition_latents"][0])
    entry = {**ENTRY, "apply_to_timesteps": [1, 1]}

    def sample(prompt):
        return pipe(prompt=prompt, kv_cache=tm.WanAnimate2KVCache(len(model.blocks)), **inputs, output="latents")

    plain = sample("a kiss at sunset")
    session = dh.apply(pipe, {"bending": [entry]})
    try:
        bent = sample("a kiss at {sunset}")
    finally:
        dh.remove(pipe)
    columns = session.token_indices
    ids = tokenizer("a kiss at sunset")["input_ids"]
    assert columns == {"sunset": [3]} and tokenizer.convert_ids_to_tokens(ids[3]) == "▁sunset"
    kinds, bend, calls = [], {"on": False}, []

    def note(module, args, kwargs):             # the call in progress: bent where the session bends
        calls.append(kwargs["kv_cache_mode"])
        bend["on"] = (kwargs["kv_cache_mode"] == "cached" and not kwargs["is_uncondtion"]
                      and float(kwargs["timestep"][0]) == float(pipe.scheduler.timesteps[1]))

    monkeypatch.setattr(tm, "dispatch_attention_fn", explicit_bent(entry, kinds, bend, columns))
    hook = model.register_forward_pre_hook(note, with_kwargs=True)
    try:
        expected = sample("a kiss at sunset")
    finally:
        hook.remove()
    assert calls == ["extract"] + ["cached"] * 4                           # 2 steps × (prompt, negative)
    torch.testing.assert_close(bent, expected, rtol=1e-4, atol=1e-5)
    assert (bent - plain).abs().max() > 1e-4
