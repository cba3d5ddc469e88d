"""Attention Bending on Anima in the diffusers host: diffusers' own AnimaModularPipeline end to end (its decode step
popped), tiny and seeded: a Qwen3 text encoder, the AnimaTextConditioner text adapter, a CosmosTransformer3DModel, the
guider's CFG as two model calls. The text keys are the adapter's output at the prompt's T5 token positions, so the
word's columns are its T5 tokens; the transformer's text cross-attention is bent by the generic path (as Cosmos's).

The reference is the pipeline with diffusers' attention call replaced, at step 1's conditional call only, by an
explicit softmax bent by bending.bend_probs: with a [1, 1] window the bent run equals it; step 1's negative call and a
window outside every step are bit-identical."""

import pytest
import torch
from diffusers import AnimaAutoBlocks, AnimaTextConditioner, CosmosTransformer3DModel, FlowMatchEulerDiscreteScheduler
from diffusers.models.transformers import transformer_cosmos
from transformers import Qwen3Config, Qwen3Model

import comfy_standin_qwen as cq
from _pipelines import t5_like_tokenizer
from ckptbend.runtime import diffusers_host as dh
from test_runtime_cosmos import CONFIG, ENTRY, explicit_bent

ADAPTER = dict(source_dim=24, target_dim=24, model_dim=32, num_layers=1, num_attention_heads=2, target_vocab_size=16)
PROMPT, NEGATIVE = "a cat at {sunset}", "a red sky"

pytestmark = pytest.mark.usefixtures("one_thread_no_grad")


@pytest.fixture(scope="module")
def anima():
    tokenizer = cq.qwen_tokenizer()
    blocks = AnimaAutoBlocks()
    blocks.sub_blocks.pop("decode")                     # latents out: no VAE
    pipe = blocks.init_pipeline()
    with torch.random.fork_rng():
        torch.manual_seed(3)
        encoder = Qwen3Model(Qwen3Config(vocab_size=max(tokenizer.get_vocab().values()) + 1, hidden_size=24,
                                         intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                                         num_key_value_heads=2, head_dim=8)).eval()
        adapter = AnimaTextConditioner(**ADAPTER).eval()
        model = CosmosTransformer3DModel(**{**CONFIG, "text_embed_dim": 24}).eval()
        for name, p in model.named_parameters():         # larger gates: the attention's output shows
            if "norm" in name and "linear" in name:
                p.data *= 4
    pipe.update_components(text_encoder=encoder, tokenizer=tokenizer, t5_tokenizer=t5_like_tokenizer(),
                           text_conditioner=adapter, transformer=model, scheduler=FlowMatchEulerDiscreteScheduler())
    pipe.set_progress_bar_config(disable=True)
    return pipe


def run(pipe, dynamic=None, before=None, after=None):
    """Two steps of 64×96 pixels (one 4×6-token frame); the latents and the session (or None). before(),
    after(output): hooks on the model, after the session's (they see the call's description)."""
    session = dh.apply(pipe, dynamic, record_maps=True) if dynamic is not None else None
    hooks = [pipe.transformer.register_forward_pre_hook(lambda *a: before())] if before else []
    hooks += [pipe.transformer.register_forward_hook(lambda m, a, out: after(out[0]))] if after else []
    try:
        out = pipe(prompt=PROMPT if dynamic else PROMPT.replace("{", "").replace("}", ""), negative_prompt=NEGATIVE,
                   num_inference_steps=2, height=64, width=96, generator=torch.Generator().manual_seed(0),
                   output="latents")
    finally:
        [h.remove() for h in hooks]
        dh.remove(pipe)
    return out, session


def test_the_step_window_bends_step_1_s_conditional_call_as_the_explicit_bent_softmax(anima, monkeypatch):
    plain, _ = run(anima)
    windowed = {"bending": [{**ENTRY, "apply_to_timesteps": [1, 1]}]}
    seen = []
    bent, session = run(anima, windowed, lambda: seen.append((anima._ckptbend_session.call.step,
                                                              anima._ckptbend_session.call.cond_rows,
                                                              anima._ckptbend_session.call.n_text)))
    assert [(step, rows) for step, rows, _ in seen] == [(0, [0]), (0, []), (1, [0]), (1, [])]
    assert session.token_indices == {"sunset": [3]}                    # T5: a cat at sunset </s>
    assert [(m["step"], m["layer"]) for m in session.maps] == [(1, 0), (1, 1)]
    outside, _ = run(anima, {"bending": [{**ENTRY, "apply_to_timesteps": [2, 3]}]})
    assert torch.equal(outside, plain) and not torch.equal(bent, plain)

    calls = []
    dispatch = transformer_cosmos.dispatch_attention_fn
    bend = explicit_bent(ENTRY, dispatch, text=seen[0][2], frames=1, columns={"sunset": [3]})
    monkeypatch.setattr(transformer_cosmos, "dispatch_attention_fn",
                        lambda *a, **k: (bend if len(calls) == 3 else dispatch)(*a, **k))
    expected, _ = run(anima, before=lambda: calls.append(1))
    torch.testing.assert_close(bent, expected, rtol=1e-4, atol=1e-5)


def test_the_negative_call_and_strength_zero_are_bit_identical(anima):
    plain, _ = run(anima)
    assert torch.equal(run(anima, {"bending": [{**ENTRY, "strength": 0.0}]})[0], plain)
    outputs = {}
    for name, dynamic in (("plain", None), ("bent", {"bending": [ENTRY]})):
        found = outputs.setdefault(name, [])
        run(anima, dynamic, after=found.append)
    assert torch.equal(outputs["plain"][1], outputs["bent"][1])         # step 0's negative: the same inputs
    assert not torch.equal(outputs["plain"][0], outputs["bent"][0])


def test_a_word_missing_from_the_t5_tokens_is_refused_before_denoising(anima):
    with pytest.raises(ValueError, match="not found"):
        run(anima, {"bending": [{**ENTRY, "token": "dusk"}]})
