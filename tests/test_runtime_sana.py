"""Attention Bending on Sana in the diffusers host: diffusers' own SanaTransformer2DModel (linear self-attention attn1,
text cross-attention attn2 through the generic path, cross.py), tiny and seeded, run through SanaPipeline (Gemma 2
after its "complex human instruction", select_index, the padding masked, CFG batched [negative; prompt]),
SanaPAGPipeline ([negative; prompt; prompt with perturbed attention]) and SanaSprintPipeline (SCM angles).

The reference is the model's own processors with PyTorch's attention call replaced, for the text keys, by an explicit
softmax (the mask added) whose prompt items are bent by bending.bend_probs: every bent call equals it. Strength 0
and steps outside the window are bit-identical; so is the negative prediction."""

import diffusers
import pytest
import torch
import torch.nn.functional as F

from _cross_families import (ENTRY, GRID, INSTRUCTION, SANA_TEXT, check_token_order, check_window_and_negative,
                             explicit_bent, gemma_like_tokenizer, pipe_run, transformers_gemma2, with_session)
from ckptbend.synth import sana as synth_sana

pytestmark = pytest.mark.usefixtures("one_thread_no_grad")


@pytest.fixture(scope="module")
def sana():
    """SanaPipeline: a Gemma 2 without layers (each position's output is its token's own: the columns can be read
    back), the tiny Sana transformer, Sana's DPM-Solver flow scheduler, no VAE (latents out)."""
    tokenizer = gemma_like_tokenizer()
    with torch.random.fork_rng():
        torch.manual_seed(11)
        encoder = transformers_gemma2(len(tokenizer))
        model = diffusers.SanaTransformer2DModel(**synth_sana.CONFIGS["sana"]).eval()
    scheduler = diffusers.DPMSolverMultistepScheduler(use_flow_sigmas=True, flow_shift=3.0,
                                                      prediction_type="flow_prediction")
    pipe = diffusers.SanaPipeline(tokenizer=tokenizer, text_encoder=encoder, vae=None, transformer=model,
                                  scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def sana_word_columns(pipe, word, prompt, instruction):
    """The columns of the prompt as the pipeline encodes it for the model that hold the word's pieces (lower-cased,
    after a space), read back from the embeddings (the encoder has no layers)."""
    embeds = pipe.encode_prompt(prompt, do_classifier_free_guidance=False, max_sequence_length=SANA_TEXT,
                                complex_human_instruction=instruction)[0][0]
    pieces = pipe.tokenizer(" " + word.lower(), add_special_tokens=False)["input_ids"]
    alone = pipe.text_encoder(torch.tensor([pieces]))[0][0]
    return [j for j in range(embeds.shape[0]) if any(torch.equal(embeds[j], a) for a in alone)]


@pytest.mark.parametrize("instruction", [INSTRUCTION, None])
def test_sana_word_columns_follow_the_pipelines_instruction_and_select_index(sana, instruction):
    """With the instruction (SanaPipeline's default) or without (encode_prompt's), lower-cased; "a" is the prompt's
    (column 0 is <bos>), not the instruction's; "cat", a word of the instruction only, is not found."""
    prompt = "A Romantic kiss at SUNSET"
    found = []
    with_session(sana, {"bending": [{**ENTRY, "token": "Sunset"}, {**ENTRY, "token": "a"}]}, lambda: found.append(
        sana.encode_prompt(prompt, max_sequence_length=SANA_TEXT, complex_human_instruction=instruction,
                           do_classifier_free_guidance=False) and sana._ckptbend_session.token_indices))
    assert found[0]["Sunset"] == sana_word_columns(sana, "sunset", prompt, instruction) == [5, 6]
    assert found[0]["a"] == [1]
    with pytest.raises(ValueError, match="not found"):
        with_session(sana, {"bending": [{**ENTRY, "token": "cat"}]}, lambda: sana.encode_prompt(
            "a red sunset", max_sequence_length=SANA_TEXT, complex_human_instruction=instruction))


def test_sana_every_bent_call_is_the_explicit_bent_softmax(sana, monkeypatch):
    plain = pipe_run(sana)
    bent = pipe_run(sana, {"bending": [ENTRY]})
    monkeypatch.setattr(F, "scaled_dot_product_attention", explicit_bent(
        F.scaled_dot_product_attention, SANA_TEXT, {"sunset": [5, 6]}, GRID, None, [1]))
    torch.testing.assert_close(bent, pipe_run(sana), rtol=1e-4, atol=1e-5)
    assert (bent - plain).abs().max() > 1e-3


def test_sana_pag_bends_the_prompts_two_items_and_keeps_the_negative(sana, monkeypatch):
    """SanaPAGPipeline batches [negative; prompt; prompt with perturbed self-attention]: both prompt items are bent,
    as the explicit bent softmax on them gives; the negative's prediction is bit-identical (at step 0: the latents
    differ after it; its text has tokens at the word's columns, so bending it would show)."""
    pag = diffusers.SanaPAGPipeline(**sana.components, pag_applied_layers=["transformer_blocks.0"])
    pag.set_progress_bar_config(disable=True)
    plain_calls, bent_calls = [], []
    pipe_run(pag, outputs=plain_calls)
    bent = pipe_run(pag, {"bending": [ENTRY]}, outputs=bent_calls)
    assert len(bent_calls[0]) == 3 and torch.equal(bent_calls[0][0], plain_calls[0][0])     # step 0's negative
    assert (bent_calls[0][1:] - plain_calls[0][1:]).abs().amax(dim=(1, 2, 3)).min() > 1e-3
    monkeypatch.setattr(F, "scaled_dot_product_attention", explicit_bent(
        F.scaled_dot_product_attention, SANA_TEXT, {"sunset": [5, 6]}, (4, 8), None, [1, 2]))   # 32 × 64 / 8
    torch.testing.assert_close(bent, pipe_run(pag), rtol=1e-4, atol=1e-5)


def test_sana_sprint_step_window_follows_its_scm_angles(sana):
    """SanaSprintPipeline (no CFG; guidance embedded) passes the model sin(a) / (cos(a) + sin(a)) of the SCM
    scheduler's angle a: a window on step 1 leaves step 0's call bit-identical and bends step 1's; one past the run,
    nothing. The transformer has Sprint's guidance embedding and q/k RMS norms across heads."""
    with torch.random.fork_rng():
        torch.manual_seed(29)
        model = diffusers.SanaTransformer2DModel(**synth_sana.CONFIGS["sana"], guidance_embeds=True,
                                                 qk_norm="rms_norm_across_heads").eval()
    sprint = diffusers.SanaSprintPipeline(tokenizer=sana.tokenizer, text_encoder=sana.text_encoder, vae=None,
                                          transformer=model, scheduler=diffusers.SCMScheduler())
    sprint.set_progress_bar_config(disable=True)
    plain_calls, bent_calls = [], []
    plain = pipe_run(sprint, outputs=plain_calls)
    assert torch.equal(pipe_run(sprint, {"bending": [{**ENTRY, "apply_to_timesteps": [2, 5]}]}), plain)
    pipe_run(sprint, {"bending": [{**ENTRY, "apply_to_timesteps": [1, 1]}]}, outputs=bent_calls)
    assert len(bent_calls) == 2 and torch.equal(bent_calls[0], plain_calls[0])
    assert (bent_calls[1] - plain_calls[1]).abs().max() > 1e-3


def test_sana_strength_zero_the_step_window_and_the_negative_prediction(sana):
    check_window_and_negative(sana, two_calls=False)


def test_sana_the_sessions_grid_is_the_models_token_order(sana):
    check_token_order(sana, "sana")
