"""Shared by tests/test_runtime_sana.py and tests/test_runtime_cross_families.py: the tiny pipelines' arguments, the
explicit bent softmax every bent call is compared with, and the checks every family runs (step window and negative
prediction, token order)."""

import contextlib
import inspect
import string
import types

import diffusers
import PIL.Image
import pytest
import torch

from ckptbend.runtime import bending
from ckptbend.runtime import diffusers_host as dh

ENTRY = {"token": "sunset", "mode": "translate", "translate_x": 0.5}
PROMPT = "a romantic kiss at {sunset}"
GRID, FRAMES = (4, 6), 2      # every call's token grid (Sana: 128 × 192 pixels / 32, no VAE); video: 2 latent frames
SANA_TEXT, T5_TEXT = 12, 8    # max_sequence_length: Sana's Gemma 2, LTX-Video's and SkyReels V2's T5
IMAGE = PIL.Image.new("RGB", (96, 64), (200, 120, 40))     # ChronoEdit's input image
INSTRUCTION = inspect.signature(diffusers.SanaPipeline.__call__).parameters[
    "complex_human_instruction"].default


# --- the reference -------------------------------------------------------------------------------

def explicit_bent(plain, n_text, columns, grid, frames, rows, heads_second=True, entry=ENTRY):
    """The attention call replaced where the keys are the n_text text tokens: softmax(q·kᵀ·d^−½ + mask), the
    batch items `rows` bent by bend_probs, times v. heads_second: torch's [b, heads, L, d] (else diffusers'
    dispatch layout [b, L, heads, d])."""
    spec = bending.BendSpec.from_dict(entry)

    def attend(query, key, value, attn_mask=None, *args, **kwargs):
        if key.shape[2 if heads_second else 1] != n_text:
            return plain(query, key, value, attn_mask, *args, **kwargs)
        q, k, v = (x if heads_second else x.transpose(1, 2) for x in (query, key, value))
        logits = q.float() @ k.float().transpose(-1, -2) * q.shape[-1] ** -0.5
        probs = torch.softmax(logits if attn_mask is None else logits + attn_mask.float(), dim=-1)
        part = probs[rows]
        probs[rows] = bending.bend_probs(part.reshape(-1, *part.shape[2:]), columns, grid, [spec],
                                         frames=frames).view(part.shape)
        out = (probs @ v.float()).to(q.dtype)
        return out if heads_second else out.transpose(1, 2)

    return attend


def with_session(pipe, dynamic, run, columns=None, prompt=None):
    """run() with bending applied (dynamic None: the plain pipeline); columns / prompt stand in for a pipeline's
    encode_prompt where the test calls the model itself."""
    if dynamic is not None:
        session = dh.apply(pipe, dynamic)
        if columns is not None:
            session.token_indices, session.prompt_embeds = columns, prompt
    try:
        return run()
    finally:
        dh.remove(pipe)


# negative prompts with tokens at the word's columns (not masked padding): bending them would show
SANA_NEGATIVE, T5_NEGATIVE = "a red sun at a red kiss", "a red sky on the beach at"
PIPE_ARGS = {"SanaPAGPipeline": dict(negative_prompt=SANA_NEGATIVE, height=32, width=64, max_sequence_length=SANA_TEXT,
                                      use_resolution_binning=False, pag_scale=2.0),
             "SanaSprintPipeline": dict(height=128, width=192, max_sequence_length=SANA_TEXT,
                                        use_resolution_binning=False),
             "SanaPipeline": dict(negative_prompt=SANA_NEGATIVE, height=128, width=192, max_sequence_length=SANA_TEXT,
                                   use_resolution_binning=False),
             "LTXPipeline": dict(negative_prompt=T5_NEGATIVE, num_frames=9, height=128, width=192,
                                 max_sequence_length=T5_TEXT),
             "SkyReelsV2Pipeline": dict(negative_prompt=T5_NEGATIVE, num_frames=5, height=64, width=96,
                                        max_sequence_length=T5_TEXT),
             "ChronoEditPipeline": dict(negative_prompt=T5_NEGATIVE, height=64, width=96, image=IMAGE)}


def pipe_run(pipe, dynamic=None, outputs=None):
    """The pipeline's latents for PROMPT (2 steps); outputs: each model call's prediction appended."""
    hook = pipe.transformer.register_forward_hook(
        lambda module, args, out: outputs.append(out[0].clone()) if outputs is not None else None)
    try:
        result = with_session(pipe, dynamic, lambda: pipe(
            prompt=PROMPT if dynamic else dh.prompts.unmark(PROMPT), num_inference_steps=2, output_type="latent",
            generator=torch.Generator().manual_seed(0), **PIPE_ARGS[type(pipe).__name__]))
        return result.images if hasattr(result, "images") else result.frames
    finally:
        hook.remove()


def check_window_and_negative(pipe, two_calls):
    """Strength 0 and a window past the run: bit-identical. A window on step 1: step 0 and the negative prediction
    bit-identical (Sana, LTX: the first item of each batched call; SkyReels, ChronoEdit: each step's second call)."""
    plain_calls, bent_calls = [], []
    plain = pipe_run(pipe, outputs=plain_calls)
    assert torch.equal(pipe_run(pipe, {"bending": [{**ENTRY, "strength": 0.0}]}), plain)
    assert torch.equal(pipe_run(pipe, {"bending": [{**ENTRY, "apply_to_timesteps": [2, 5]}]}), plain)
    pipe_run(pipe, {"bending": [{**ENTRY, "apply_to_timesteps": [1, 1]}]}, outputs=bent_calls)
    if two_calls:
        assert [torch.equal(b, p) for b, p in zip(bent_calls, plain_calls)] == [True, True, False, True]
    else:
        assert torch.equal(bent_calls[0], plain_calls[0]) and torch.equal(bent_calls[1][0], plain_calls[1][0])
        assert not torch.equal(bent_calls[1][1], plain_calls[1][1])


def check_token_order(pipe, family):
    """One latent voxel (frame 1, token row 2, token col 3) changed: the one token that changes where the tokens
    enter the first block is the session's grid position frame · rows · cols + row · cols + col."""
    model, g = pipe.transformer, torch.Generator().manual_seed(8)
    video, patch = family != "sana", 2 if family in ("skyreels", "chronoedit") else 1
    frame, row, col = (1 if video else 0), 2, 3
    latent = torch.randn(1, model.config.in_channels, *((2,) if video else ()), 4 * patch, 6 * patch, generator=g)
    changed = latent.clone()
    changed[(0, slice(None)) + ((frame,) if video else ()) + (row * patch, col * patch)] += 1.0
    width = model.config.get("caption_channels") or model.config.get("text_dim")
    text = torch.randn(1, 512 if family == "chronoedit" else 6, width, generator=g)
    extra = dict(num_frames=2, height=4, width=6, encoder_attention_mask=torch.ones(1, 6)) if family == "ltx" else {}
    if family == "chronoedit":
        extra = {"encoder_hidden_states_image": torch.randn(1, 3, 20, generator=g)}
    seen = []
    blocks = getattr(model, "transformer_blocks", None) or model.blocks
    hook = blocks[0].register_forward_pre_hook(lambda module, args, kwargs: seen.append(
        ((args[0] if args else kwargs["hidden_states"])[0].clone(), pipe._ckptbend_session.call)), with_kwargs=True)

    def run(x):
        x = diffusers.LTXPipeline._pack_latents(x) if family == "ltx" else x
        return model(hidden_states=x, encoder_hidden_states=text, timestep=torch.tensor([500.0]), return_dict=False,
                     **extra)

    try:
        for x in (latent, changed):
            with_session(pipe, {"bending": [{**ENTRY, "strength": 0.0}]}, lambda: run(x), {"sunset": [2]}, text)
    finally:
        hook.remove()
    (before, call), (after, _) = seen
    tokens = (before - after).abs().amax(-1).nonzero().flatten().tolist()
    rows, cols = call.token_hw
    assert (call.frames or 1) * rows * cols == before.shape[0] and (rows, cols) == (4, 6)
    assert tokens == [(frame * rows + row) * cols + col]


def gemma_like_tokenizer():
    """Gemma's SentencePiece conventions offline: spaces become "▁" (no pre-tokenizer, no dummy prefix), <bos>
    first, so a prompt's first word is bare ("a") and one after a space is not ("▁a"); "sunset" is "▁sun" "set".
    The instruction's words are pieces too (its last line ends in a space: "▁" alone)."""
    from tokenizers import Tokenizer, models, normalizers, processors
    from transformers import PreTrainedTokenizerFast

    words = {w for line in INSTRUCTION for w in line.split(" ") if w} | {"a", "romantic", "kiss", "at", "sun", "red"}
    chars = sorted(set("".join(INSTRUCTION) + string.ascii_letters + string.punctuation + "\n") - {" "}) + ["▁"]
    pieces = [(t, 0.0) for t in ("<pad>", "<eos>", "<bos>", "<unk>")] + [(c, -10.0) for c in chars]
    pieces += [("▁" + w, -1.0) for w in sorted(words)] + [(w, -1.5) for w in sorted(words) if w not in chars]
    pieces += [("set", -1.5)]
    backend = Tokenizer(models.Unigram(pieces, unk_id=3))
    backend.normalizer = normalizers.Replace(" ", "▁")
    backend.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 2)])
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="<eos>", bos_token="<bos>",
                                   unk_token="<unk>")


def transformers_gemma2(vocab):
    from transformers import Gemma2Config, Gemma2Model

    return Gemma2Model(Gemma2Config(vocab_size=vocab, hidden_size=24, intermediate_size=32, num_hidden_layers=0,
                                    num_attention_heads=2, num_key_value_heads=1, head_dim=12, pad_token_id=0)).eval()


@contextlib.contextmanager
def without_ftfy(module):
    """The Wan-derived pipelines call the optional ftfy unchecked: the text as it is (WanPipeline without ftfy)."""
    with pytest.MonkeyPatch.context() as mp:
        if not hasattr(module, "ftfy"):
            mp.setattr(module, "ftfy", types.SimpleNamespace(fix_text=lambda text: text), raising=False)
        yield


def wan_vae():
    return diffusers.AutoencoderKLWan(base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                                      temperal_downsample=[False, True, True])
