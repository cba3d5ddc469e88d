"""Attention Bending on Motif-Video in the diffusers host: diffusers' own MotifVideoTransformer3DModel (one dual and
two single blocks, the last a decoder block that attends to the video alone; every encoder block with its optional
text cross-attention), tiny and seeded, image-to-video (4 image-embedding tokens before the text).

The reference is the model's processors with diffusers' attention dispatch replaced by an explicit softmax whose
video-query × valid-prompt-key block is bent by bending.bend_probs, rows renormalised over all keys: in the joint
attentions ([video; image; text], the text keys after the image tokens) and in the cross-attentions (the text keys
alone). Every bent call equals it; the decoder block, the negative call, strength 0 and steps outside the window are
bit-identical; the words' columns are those of the pipeline's own tokenisation. End to end, MotifVideoPipeline (tiny
T5Gemma 2 encoder, left padding, its guider's CFG as two calls) bends its prompt's calls at the columns it found."""

import types

import pytest
import torch
from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, MotifVideoPipeline
from diffusers.guiders import ClassifierFreeGuidance
from diffusers.models.transformers import transformer_motif_video as tm
from tokenizers import Tokenizer, models, normalizers, processors
from transformers import PreTrainedTokenizerFast, T5Gemma2Encoder, T5Gemma2EncoderConfig

import comfy_standin_joint as cj
from ckptbend.runtime import bending
from ckptbend.runtime import diffusers_host as dh

CONFIG = dict(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=16, num_layers=1,
              num_single_layers=2, num_decoder_layers=1, mlp_ratio=2.0, text_embed_dim=24, image_embed_dim=8,
              rope_axes_dim=(4, 6, 6), enable_text_cross_attention_dual=True, enable_text_cross_attention_single=True)
F_, H, W = 2, 3, 4                               # 24 video tokens
N_VIDEO, N_IMAGE, TEXT = F_ * H * W, 4, 6
VALID, LEFT = [5, 4], [0, 2]                     # valid prompt tokens per item; item 1 left-padded (Gemma's side)
COLUMNS = {"sunset": [2, 3]}
ENTRY = {"token": "sunset", "mode": "translate", "translate_x": 0.5}

pytestmark = pytest.mark.usefixtures("one_thread_no_grad")


@pytest.fixture(scope="module")
def motif():
    model = cj.seeded_transformer(tm.MotifVideoTransformer3DModel, CONFIG, 43)
    g = torch.Generator().manual_seed(8)
    inputs = dict(hidden_states=torch.randn(2, 4, F_, 2 * H, 2 * W, generator=g),
                  encoder_hidden_states=torch.randn(2, TEXT, 24, generator=g),
                  encoder_attention_mask=torch.tensor([[0] * p + [1] * n + [0] * (TEXT - n - p)
                                                       for n, p in zip(VALID, LEFT)]),
                  image_embeds=torch.randn(2, N_IMAGE, 8, generator=g))
    scheduler = FlowMatchEulerDiscreteScheduler()
    scheduler.set_timesteps(2)
    return model, inputs, types.SimpleNamespace(transformer=model, scheduler=scheduler)


def run(motif, rows, step=0, dynamic=None, prompt=None):
    model, inputs, pipe = motif
    if dynamic is not None:
        session = dh.apply(pipe, dynamic)
        session.token_indices, session.prompt_embeds = COLUMNS, prompt
    try:
        one = {k: v[rows] for k, v in inputs.items()}
        t = pipe.scheduler.timesteps[step:step + 1].expand(len(rows))
        return model(**one, timestep=t, return_dict=False)[0]
    finally:
        dh.remove(pipe)


def explicit_bent(entry, valid, seen):
    """diffusers' dispatch replaced: softmax(q·kᵀ·d^−½ + mask) with the video × prompt block bent per item
    (valid[i] = (prompt tokens, left padding)), each video row renormalised over all keys. seen: the calls' kinds."""
    spec = bending.BendSpec.from_dict({**entry, "renormalize": "none"})

    def attend(query, key, value, attn_mask=None, **kwargs):
        q, k, v = (t.transpose(1, 2).float() for t in (query, key, value))
        logits = q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5
        if attn_mask is not None:
            logits = logits.masked_fill(~attn_mask, float("-inf"))
        probs = torch.softmax(logits, dim=-1)
        n_keys = k.shape[2]
        first = {N_VIDEO + N_IMAGE + TEXT: N_VIDEO + N_IMAGE, TEXT: 0}.get(n_keys)     # joint | cross
        seen.append({N_VIDEO + N_IMAGE + TEXT: "joint", TEXT: "cross", 2 * N_VIDEO: "decoder"}[n_keys])
        if first is not None:
            probs = probs.clone()
            for r, (n, pad) in enumerate(valid):
                text = slice(first + pad, first + pad + n)
                probs[r, :, :N_VIDEO, text] = bending.bend_probs(probs[r, :, :N_VIDEO, text].contiguous(), COLUMNS,
                                                                 (H, W), [spec], frames=F_)
                probs[r, :, :N_VIDEO] /= probs[r, :, :N_VIDEO].sum(-1, keepdim=True)
        return (probs @ v).transpose(1, 2).to(query.dtype)

    return attend


def test_the_sites_are_every_text_attention_a_block_its_layer(motif):
    model = motif[0]
    sites = [(s.name, s.layer) for s in dh.processor.sites_of(model)]
    assert sites == [("transformer_blocks.0.attn", 0), ("transformer_blocks.0.cross_attn", 0),
                     ("single_transformer_blocks.0.attn", 1), ("single_transformer_blocks.0.cross_attn", 1)]


@pytest.mark.parametrize("row", [0, 1])
def test_every_bent_call_is_the_explicit_bent_softmax(motif, monkeypatch, row):
    """One item per call, as the pipeline's guider calls it; the words' keys sit after the 4 image tokens and, in
    item 1, after its 2 left pads."""
    plain = run(motif, [row])
    bent = run(motif, [row], dynamic={"bending": [ENTRY]})
    seen = []
    monkeypatch.setattr(tm, "dispatch_attention_fn", explicit_bent(ENTRY, [(VALID[row], LEFT[row])], seen))
    torch.testing.assert_close(bent, run(motif, [row]), rtol=1e-4, atol=1e-5)
    assert seen == ["joint", "cross", "joint", "cross", "decoder"]
    assert (bent - plain).abs().max() > 1e-3                                # bending acts


def test_a_layer_bends_both_attentions_of_its_block_only(motif, monkeypatch):
    entry = {**ENTRY, "apply_to_layers": [1]}
    plain, bent = run(motif, [0]), run(motif, [0], dynamic={"bending": [entry]})
    real = tm.dispatch_attention_fn
    bend = explicit_bent(ENTRY, [(VALID[0], LEFT[0])], [])
    calls = []

    def attend(query, key, value, attn_mask=None, **kwargs):       # calls 3 and 4: single block 0's
        calls.append(1)
        use = bend if len(calls) in (3, 4) else real
        return use(query, key, value, attn_mask=attn_mask, **kwargs)

    monkeypatch.setattr(tm, "dispatch_attention_fn", attend)
    torch.testing.assert_close(bent, run(motif, [0]), rtol=1e-4, atol=1e-5)
    assert (bent - plain).abs().max() > 1e-4                                # the single block's bending acts


def test_strength_zero_and_outside_the_step_window_are_bit_identical(motif):
    plain = run(motif, [0], step=1)
    assert torch.equal(run(motif, [0], 1, {"bending": [{**ENTRY, "strength": 0.0}]}), plain)
    assert torch.equal(run(motif, [0], 1, {"bending": [{**ENTRY, "apply_to_timesteps": [0, 0]}]}), plain)
    assert not torch.equal(run(motif, [0], 1, {"bending": [{**ENTRY, "apply_to_timesteps": [1, 1]}]}), plain)


def test_the_negative_call_is_bit_identical(motif):
    """The guider's unconditional call carries other embeddings than the encoded prompt's: not bent."""
    model, inputs, pipe = motif
    prompt = inputs["encoder_hidden_states"][:1]
    assert torch.equal(run(motif, [1], dynamic={"bending": [ENTRY]}, prompt=prompt), run(motif, [1]))
    assert not torch.equal(run(motif, [0], dynamic={"bending": [ENTRY]}, prompt=prompt), run(motif, [0]))


def test_a_word_among_the_padding_is_refused(motif):
    model, inputs, pipe = motif
    session = dh.apply(pipe, {"bending": [ENTRY]})
    session.token_indices = {"sunset": [3, 4]}
    try:
        with pytest.raises(ValueError, match="beyond the 4 prompt tokens"):
            model(**{k: v[1:] for k, v in inputs.items()}, timestep=pipe.scheduler.timesteps[:1])
    finally:
        dh.remove(pipe)


def gemma_like_tokenizer():
    """Gemma's SentencePiece conventions offline: spaces become "▁" with no dummy prefix (the prompt's first word is
    bare), <bos> first, right padding; "sunset" after a space is two pieces."""
    pieces = [("<pad>", 0.0), ("<eos>", 0.0), ("<bos>", 0.0), ("<unk>", 0.0),
              *((w, -1.0) for w in ("a", "▁kiss", "▁at", "▁sun", "set", "▁lake", "sunset")),
              *((c, -10.0) for c in "▁abcdefghijklmnopqrstuvwxyz,.")]
    backend = Tokenizer(models.Unigram(pieces, unk_id=3))
    backend.normalizer = normalizers.Replace(" ", "▁")
    backend.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 2)])
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", bos_token="<bos>",
                                   eos_token="<eos>", unk_token="<unk>", model_max_length=512)


def test_the_word_columns_are_the_pipelines_own_tokens():
    """MotifVideoPipeline._get_prompt_embeds' tokens (a stand-in encoder returns the ids as embeddings), against the
    columns apply()'s encode_prompt wrapper finds for the marked prompt."""
    tokenizer = gemma_like_tokenizer()

    def encoder(input_ids, attention_mask):
        return (input_ids[..., None].float(),)

    host = types.SimpleNamespace(_execution_device=torch.device("cpu"))
    encoder.dtype = torch.float32
    ids, mask = MotifVideoPipeline._get_prompt_embeds(host, encoder, tokenizer, "a kiss at sunset", 12)
    ids = ids[0, :, 0].long().tolist()
    model = cj.seeded_transformer(tm.MotifVideoTransformer3DModel, CONFIG, 43)
    seen = {}

    def encode_prompt(prompt, negative_prompt=None, max_sequence_length=512):
        seen["prompt"] = prompt
        return torch.zeros(1, 12, 24), None, mask, None

    pipe = types.SimpleNamespace(transformer=model, scheduler=FlowMatchEulerDiscreteScheduler(), tokenizer=tokenizer,
                                 encode_prompt=encode_prompt)
    session = dh.apply(pipe, {"bending": [ENTRY]})
    try:
        pipe.encode_prompt("a kiss at {sunset}", max_sequence_length=12)
        columns = session.token_indices["sunset"]
    finally:
        dh.remove(pipe)
    assert seen["prompt"] == "a kiss at sunset"
    assert tokenizer.convert_ids_to_tokens([ids[j] for j in columns]) == ["▁sun", "set"]
    assert ids[0] == tokenizer.bos_token_id and columns == [4, 5] and int(mask.sum()) == 6


def test_phase_one_records_maps_and_leaves_the_output_bit_identical(motif):
    """Phase 1: the processors' own computation reproduced exactly; a map per word, site and step."""
    model, inputs, pipe = motif
    session = dh.apply(pipe, {"bending": [ENTRY]}, phase=1)
    session.token_indices = COLUMNS
    try:
        bent = model(**{k: v[:1] for k, v in inputs.items()}, timestep=pipe.scheduler.timesteps[:1],
                     return_dict=False)[0]
    finally:
        dh.remove(pipe)
    assert torch.equal(bent, run(motif, [0]))
    assert [m["layer"] for m in session.maps] == [0, 0, 1, 1] and session.maps[0]["bent"].shape == (F_, H, W)


def tiny_pipeline():
    """MotifVideoPipeline with tiny seeded parts: a T5Gemma 2 encoder (1 layer) behind the Gemma-like tokenizer padding
    on the left as Gemma's does, a Wan VAE (only its config is read for latents), CFG by its guider (two calls)."""
    tokenizer = gemma_like_tokenizer()
    tokenizer.padding_side = "left"
    text = dict(vocab_size=64, hidden_size=24, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                num_key_value_heads=1, head_dim=8, max_position_embeddings=64, sliding_window=16, dropout_rate=0.0,
                layer_types=["full_attention"], pad_token_id=0, bos_token_id=2, eos_token_id=1)
    vision = dict(hidden_size=16, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2, image_size=28,
                  patch_size=14)
    with torch.random.fork_rng():
        torch.manual_seed(3)
        encoder = T5Gemma2Encoder(T5Gemma2EncoderConfig(text_config=text, vision_config=vision, mm_tokens_per_image=4,
                                                        boi_token_index=60, eoi_token_index=61,
                                                        image_token_index=62)).eval()
        vae = AutoencoderKLWan(base_dim=8, z_dim=4, dim_mult=[1, 1, 1, 1], num_res_blocks=1, latents_mean=[0.0] * 4,
                               latents_std=[1.0] * 4).eval()
    config = {**CONFIG, "in_channels": 9, "image_embed_dim": None}        # [latents; condition; mask] channels
    transformer = cj.seeded_transformer(tm.MotifVideoTransformer3DModel, config, 43)
    pipe = MotifVideoPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae, text_encoder=encoder,
                              tokenizer=tokenizer, transformer=transformer, guider=ClassifierFreeGuidance(5.0))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_the_pipeline_bends_the_prompts_call_at_the_encoded_columns(monkeypatch):
    """MotifVideoPipeline end to end (2 steps, CFG as two calls, prompts left-padded to 8 tokens): the words are found
    in the marked prompt through its encode_prompt; the prompt's calls equal the explicit bent softmax at those
    columns (counted from the first valid token), the negative prompt's calls are the model's own."""
    pipe = tiny_pipeline()
    prompt, negative = "a kiss at {sunset}", "a lake"
    run_args = dict(negative_prompt=negative, num_frames=5, height=2 * 8 * H, width=2 * 8 * W, num_inference_steps=2,
                    max_sequence_length=8, output_type="latent")

    def sample(text):
        return pipe(text, generator=torch.Generator().manual_seed(0), **run_args).frames

    plain = sample("a kiss at sunset")
    session = dh.apply(pipe, {"bending": [ENTRY]})
    try:
        bent = sample(prompt)
        columns = session.token_indices["sunset"]
    finally:
        dh.remove(pipe)
    ids = pipe.tokenizer("a kiss at sunset")["input_ids"]             # <bos> a ▁kiss ▁at ▁sun set
    assert columns == [4, 5] and pipe.tokenizer.convert_ids_to_tokens([ids[j] for j in columns]) == ["▁sun", "set"]
    cond = pipe.encode_prompt("a kiss at sunset", max_sequence_length=8, device="cpu")[0]
    spec = bending.BendSpec.from_dict({**ENTRY, "renormalize": "none"})
    state = {}
    pipe.transformer.register_forward_pre_hook(
        lambda m, a, kw: state.update(cond=torch.equal(kw["encoder_hidden_states"], cond)), with_kwargs=True)

    def attend(query, key, value, attn_mask=None, **kwargs):
        q, k, v = (t.transpose(1, 2).float() for t in (query, key, value))
        logits = q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5
        if attn_mask is not None:                           # None: the decoder block (the video alone)
            logits = logits.masked_fill(~attn_mask, float("-inf"))
        probs = torch.softmax(logits, dim=-1)
        if state["cond"] and attn_mask is not None:         # the prompt's keys: the valid ones, after the padding
            first = k.shape[2] - 8
            valid = torch.nonzero(attn_mask[0, 0, 0, first:]).flatten()
            text = slice(first + int(valid[0]), first + int(valid[-1]) + 1)
            probs = probs.clone()
            probs[0, :, :N_VIDEO, text] = bending.bend_probs(probs[0, :, :N_VIDEO, text].contiguous(),
                                                             {"sunset": [4, 5]}, (H, W), [spec], frames=F_)
            probs[0, :, :N_VIDEO] /= probs[0, :, :N_VIDEO].sum(-1, keepdim=True)
        return (probs @ v).transpose(1, 2).to(query.dtype)

    monkeypatch.setattr(tm, "dispatch_attention_fn", attend)
    torch.testing.assert_close(bent, sample("a kiss at sunset"), rtol=1e-4, atol=1e-5)
    assert (bent - plain).abs().max() > 1e-3
