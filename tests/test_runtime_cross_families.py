"""Attention Bending on the cross-attention families the generic path (cross.py, attn2) reaches: Sana, LTX-Video 1.0,
SkyReels V2 and ChronoEdit, with diffusers' own classes, tiny and seeded.

Sana and LTX-Video run through their pipelines (SanaPipeline: Gemma 2 after its "complex human instruction",
select_index, the padding masked; LTXPipeline: packed [b, frames·rows·cols, c] latents, T5 with its mask), CFG batched
[negative; prompt]. SkyReels V2 and ChronoEdit (Wan blocks) run through SkyReelsV2Pipeline and ChronoEditPipeline: the
prompt's and the negative's predictions in two calls (ChronoEdit: CLIP image tokens before its 512 text tokens).

The reference is each model's own processors with the attention call replaced, for the text keys, by an explicit
softmax (the mask added) whose prompt item is bent by bending.bend_probs on the (frames, rows, cols) grid: every bent
call equals it. Strength 0 and steps outside the window are bit-identical; so is the negative prediction."""

import contextlib
import inspect
import string
import types

import diffusers
import PIL.Image
import pytest
import torch
import torch.nn.functional as F
from diffusers.models.transformers import transformer_chronoedit, transformer_ltx, transformer_skyreels_v2

from _pipelines import WAN_CONFIG, t5_encoder, t5_like_tokenizer
from ckptbend.runtime import bending
from ckptbend.runtime import diffusers_host as dh
from ckptbend.synth import sana as synth_sana
from ckptbend.synth import wan as synth_wan

pytestmark = pytest.mark.usefixtures("one_thread_no_grad")
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


@pytest.mark.parametrize("family", ["sana", "ltx", "skyreels", "chronoedit"])
def test_strength_zero_the_step_window_and_the_negative_prediction(family, request):
    """Strength 0 and a window past the run: bit-identical. A window on step 1: step 0 and the negative prediction
    bit-identical (Sana, LTX: the first item of each batched call; SkyReels, ChronoEdit: each step's second call)."""
    pipe, plain_calls, bent_calls = request.getfixturevalue(family), [], []
    plain = pipe_run(pipe, outputs=plain_calls)
    assert torch.equal(pipe_run(pipe, {"bending": [{**ENTRY, "strength": 0.0}]}), plain)
    assert torch.equal(pipe_run(pipe, {"bending": [{**ENTRY, "apply_to_timesteps": [2, 5]}]}), plain)
    pipe_run(pipe, {"bending": [{**ENTRY, "apply_to_timesteps": [1, 1]}]}, outputs=bent_calls)
    if family in ("skyreels", "chronoedit"):
        assert [torch.equal(b, p) for b, p in zip(bent_calls, plain_calls)] == [True, True, False, True]
    else:
        assert torch.equal(bent_calls[0], plain_calls[0]) and torch.equal(bent_calls[1][0], plain_calls[1][0])
        assert not torch.equal(bent_calls[1][1], plain_calls[1][1])


# --- Sana: SanaPipeline, Gemma 2 -----------------------------------------------------------------


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


def transformers_gemma2(vocab):
    from transformers import Gemma2Config, Gemma2Model

    return Gemma2Model(Gemma2Config(vocab_size=vocab, hidden_size=24, intermediate_size=32, num_hidden_layers=0,
                                    num_attention_heads=2, num_key_value_heads=1, head_dim=12, pad_token_id=0)).eval()


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


# --- the token grid -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("family", ["sana", "ltx", "skyreels", "chronoedit"])
def test_the_sessions_grid_is_the_models_token_order(family, request):
    """One latent voxel (frame 1, token row 2, token col 3) changed: the one token that changes where the tokens
    enter the first block is the session's grid position frame · rows · cols + row · cols + col."""
    pipe = request.getfixturevalue(family)
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
