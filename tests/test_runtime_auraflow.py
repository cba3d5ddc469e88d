"""Attention Bending on AuraFlow in the diffusers host: diffusers' own AuraFlowTransformer2DModel (joint MMDiT blocks,
then single blocks over [registers; text; image]), tiny and seeded.

The reference is the model's own processors (AuraFlowAttnProcessor2_0) with PyTorch's attention call replaced by an
explicit softmax whose image-query × text-key block is bent by bending.bend_probs and whose rows are renormalised
over all keys: every bent call equals it. The model puts its learned register tokens before the T5 tokens, so a
word's column j is key REGISTERS + j. A call outside the step window, at strength 0, and the negative item of the
CFG batch are bit-identical to the plain model."""

import types

import pytest
import torch
import torch.nn.functional as F
from diffusers import AuraFlowTransformer2DModel, FlowMatchEulerDiscreteScheduler

from ckptbend.runtime import bending
from ckptbend.runtime import diffusers_host as dh

CONFIG = dict(sample_size=8, patch_size=2, in_channels=4, num_mmdit_layers=2, num_single_dit_layers=2,
              attention_head_dim=8, num_attention_heads=2, joint_attention_dim=16, caption_projection_dim=16,
              out_channels=4, pos_embed_max_size=64)
TEXT, H, W = 6, 4, 6                       # T5 tokens, image token grid (latent 8 × 12, patch 2)
REGISTERS = 8                              # AuraFlow's register tokens, before the text
COLUMNS = {"sunset": [2, 3]}
ENTRY = {"token": "sunset", "mode": "translate", "translate_x": 0.5}

pytestmark = pytest.mark.usefixtures("one_thread_no_grad")


@pytest.fixture(scope="module")
def auraflow():
    with torch.random.fork_rng():
        torch.manual_seed(29)
        model = AuraFlowTransformer2DModel(**CONFIG).eval()
        for name, p in model.named_parameters():       # larger gates: the attention's output shows
            if "norm1" in name:                         # (q, k pass weightless LayerNorms: left as drawn)
                p.data *= 8
    g = torch.Generator().manual_seed(2)
    inputs = dict(hidden_states=torch.randn(1, 4, 2 * H, 2 * W, generator=g),
                  encoder_hidden_states=torch.randn(1, TEXT, 16, generator=g))
    scheduler = FlowMatchEulerDiscreteScheduler()
    scheduler.set_timesteps(2)
    return model, inputs, types.SimpleNamespace(transformer=model, scheduler=scheduler)


def sample(auraflow, step=0, dynamic=None, inputs=None, prompt=None):
    model, given, pipe = auraflow
    inputs = inputs or given
    if dynamic is not None:
        session = dh.apply(pipe, dynamic)
        session.token_indices = COLUMNS
        session.prompt_embeds = prompt
    try:
        t = pipe.scheduler.timesteps[step:step + 1] / 1000             # the pipeline's t / 1000
        return model(**inputs, timestep=t.expand(inputs["hidden_states"].shape[0]), return_dict=False)[0]
    finally:
        dh.remove(pipe)


def explicit_bent(entry, plain_sdpa):
    """PyTorch's attention replaced: softmax(q·kᵀ·scale) with the image × text block bent, rows renormalised."""
    spec = bending.BendSpec.from_dict({**entry, "renormalize": "none"})
    text = slice(REGISTERS, REGISTERS + TEXT)
    first = REGISTERS + TEXT                            # image queries and keys follow [registers; text]

    def attend(q, k, v, attn_mask=None, dropout_p=0.0, scale=None, is_causal=False, **kwargs):
        assert attn_mask is None and not is_causal
        if q.shape[2] != first + H * W:                  # not a model attention: leave it alone
            return plain_sdpa(q, k, v, attn_mask=attn_mask, scale=scale)
        probs = torch.softmax(q.float() @ k.float().transpose(-1, -2) * scale, dim=-1)
        block = probs[:, :, first:, text].reshape(-1, H * W, TEXT)
        bent = bending.bend_probs(block, COLUMNS, (H, W), [spec]).view(probs[:, :, first:, text].shape)
        probs = probs.clone()
        probs[:, :, first:, text] = bent
        probs[:, :, first:] /= probs[:, :, first:].sum(-1, keepdim=True)
        return (probs @ v.float()).to(q.dtype)

    return attend


def test_every_bent_call_is_the_explicit_bent_softmax(auraflow, monkeypatch):
    plain = sample(auraflow)
    bent = sample(auraflow, dynamic={"bending": [ENTRY]})
    model, inputs, pipe = auraflow
    monkeypatch.setattr(F, "scaled_dot_product_attention", explicit_bent(ENTRY, F.scaled_dot_product_attention))
    expected = model(**inputs, timestep=pipe.scheduler.timesteps[:1] / 1000, return_dict=False)[0]
    torch.testing.assert_close(bent, expected, rtol=1e-4, atol=1e-5)
    assert (bent - plain).abs().max() > 1e-3                               # bending acts


def test_strength_zero_and_outside_the_step_window_are_bit_identical(auraflow):
    plain = sample(auraflow, step=1)
    assert torch.equal(sample(auraflow, step=1, dynamic={"bending": [{**ENTRY, "strength": 0.0}]}), plain)
    assert torch.equal(sample(auraflow, step=1, dynamic={"bending": [{**ENTRY, "apply_to_timesteps": [0, 0]}]}),
                       plain)
    assert not torch.equal(sample(auraflow, step=1, dynamic={"bending": [{**ENTRY, "apply_to_timesteps": [1, 1]}]}),
                           plain)


def test_the_negative_item_of_the_cfg_batch_is_bit_identical(auraflow):
    """AuraFlowPipeline batches CFG as [negative; prompt]: only the prompt's item is bent."""
    model, inputs, pipe = auraflow
    negative = torch.randn(1, TEXT, 16, generator=torch.Generator().manual_seed(3))
    prompt = inputs["encoder_hidden_states"]
    batch = dict(hidden_states=inputs["hidden_states"].repeat(2, 1, 1, 1),
                 encoder_hidden_states=torch.cat([negative, prompt]))
    plain = sample(auraflow, inputs=batch)
    bent = sample(auraflow, dynamic={"bending": [ENTRY]}, inputs=batch, prompt=prompt)
    assert torch.equal(bent[0], plain[0])
    torch.testing.assert_close(bent[1:], sample(auraflow, dynamic={"bending": [ENTRY]}), rtol=1e-5, atol=1e-6)
    assert (bent[1] - plain[1]).abs().max() > 1e-3


def test_words_are_found_in_the_t5_tokens():
    """AuraFlowPipeline encodes the prompt with its T5 tokenizer (pipe.tokenizer), no BOS: the word's column is its
    T5 token's position (the transformer adds the registers before them)."""
    from _pipelines import t5_sentencepiece_tokenizer

    pipe = types.SimpleNamespace(tokenizer=t5_sentencepiece_tokenizer())
    session = types.SimpleNamespace(pipe=pipe, joint="auraflow", single=None, family=None,
                                    entries=[bending.as_spec(ENTRY)])
    # ▁a ▁kiss ▁at ▁sunset </s>
    assert dh.prompts._locate(session, {"prompt": "a kiss at sunset"}) == {"sunset": [3]}


def test_the_pipeline_finds_the_word_and_bends_only_the_prompts_item():
    """AuraFlowPipeline end to end (T5 encoder, CFG batch [negative; prompt], 2 steps): the marked word's T5 column
    is found through encode_prompt; phase 1 leaves the latents bit-identical, phase 2 changes them."""
    from diffusers import AuraFlowPipeline
    from _pipelines import t5_encoder, t5_sentencepiece_tokenizer, tiny_vae

    tokenizer = t5_sentencepiece_tokenizer()
    with torch.random.fork_rng():
        torch.manual_seed(31)
        transformer = AuraFlowTransformer2DModel(**{**CONFIG, "joint_attention_dim": 32}).eval()
        for name, p in transformer.named_parameters():
            if "norm1" in name:
                p.data *= 8
        pipe = AuraFlowPipeline(tokenizer=tokenizer, text_encoder=t5_encoder(tokenizer), vae=tiny_vae(),
                                transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler())
    pipe.set_progress_bar_config(disable=True)

    def run(prompt, **apply):
        session = dh.apply(pipe, {"bending": [ENTRY]}, **apply) if apply else None
        try:
            latents = pipe(prompt, height=2 * H, width=2 * W, num_inference_steps=2, guidance_scale=4.0,
                           max_sequence_length=16, output_type="latent", generator=torch.Generator().manual_seed(4))
            return latents.images, session and session.token_indices
        finally:
            dh.remove(pipe)

    plain, _ = run("a kiss at sunset")
    visualised, found = run("a kiss at {sunset}", phase=1)
    bent, _ = run("a kiss at {sunset}", phase=2)
    assert found == {"sunset": [3]}
    assert torch.equal(visualised, plain)
    assert (bent - plain).abs().max() > 1e-3
