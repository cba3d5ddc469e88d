"""Attention Bending on LongCat-Image and Ovis-Image in the diffusers host: diffusers' own
LongCatImageTransformer2DModel and OvisImageTransformer2DModel (Flux.1's double and single blocks, their own
processors), tiny (synth/flux_relatives.py's configs) and seeded.

The reference is the model's own processors with their attention call (dispatch_attention_fn) replaced by an
explicit softmax whose image-query × text-key block is bent by bending.bend_probs, rows renormalised over all keys:
every bent call equals it. The negative call (both pipelines run CFG as two calls), strength 0 and calls outside the
step window are bit-identical. The words' columns are found with a Qwen2 tokenizer in each pipeline's own text
(the real pipeline objects' templates, quote splitting, dropped tokens)."""

import types

import pytest
import torch
from diffusers import (FlowMatchEulerDiscreteScheduler, LongCatImagePipeline, LongCatImageTransformer2DModel,
                       OvisImagePipeline, OvisImageTransformer2DModel)
from diffusers.models.transformers import transformer_longcat_image, transformer_ovis_image
from diffusers.pipelines.longcat_image.pipeline_longcat_image import prepare_pos_ids

import comfy_standin_joint as cj
from ckptbend.runtime import bending
from ckptbend.runtime import diffusers_host as dh
from ckptbend.synth.flux_relatives import CONFIGS

TEXT, H, W = 7, 4, 6
COLUMNS = {"sunset": [2, 3]}
ENTRY = {"token": "sunset", "mode": "translate", "translate_x": 0.5}
FAMILIES = {"longcat_image": (LongCatImageTransformer2DModel, transformer_longcat_image, 31),
            "ovis_image": (OvisImageTransformer2DModel, transformer_ovis_image, 37)}

pytestmark = pytest.mark.usefixtures("one_thread_no_grad")


def _ids(family):
    """The pipelines' position ids: LongCat's text (0, j, j) and image (1, 512 + row, 512 + column)
    (prepare_pos_ids, image rows counted from tokenizer_max_length); Ovis's text (0, j, j), image (0, row, column)."""
    if family == "longcat_image":
        return (prepare_pos_ids(0, "text", num_token=TEXT),
                prepare_pos_ids(1, "image", start=(512, 512), height=H, width=W))
    text = torch.zeros(TEXT, 3)
    text[:, 1] = text[:, 2] = torch.arange(TEXT)
    return text, OvisImagePipeline._prepare_latent_image_ids(1, H, W, "cpu", torch.float32)


@pytest.fixture(scope="module", params=list(FAMILIES))
def model(request):
    family = request.param
    cls, module, seed = FAMILIES[family]
    transformer = cj.seeded_transformer(cls, CONFIGS[family], seed)
    g = torch.Generator().manual_seed(seed)
    txt_ids, img_ids = _ids(family)
    inputs = dict(hidden_states=torch.randn(1, H * W, 8, generator=g), txt_ids=txt_ids, img_ids=img_ids)
    prompt, negative = (torch.randn(1, TEXT, 24, generator=g) for _ in range(2))
    scheduler = FlowMatchEulerDiscreteScheduler()
    scheduler.set_timesteps(2)
    return transformer, module, inputs, prompt, negative, types.SimpleNamespace(transformer=transformer,
                                                                                 scheduler=scheduler)


def sample(model, step=0, dynamic=None, negative=False):
    transformer, _, inputs, prompt, negative_text, pipe = model
    if dynamic is not None:
        session = dh.apply(pipe, dynamic)
        session.token_indices, session.prompt_embeds = COLUMNS, prompt
    try:
        return transformer(**inputs, encoder_hidden_states=negative_text if negative else prompt,
                           timestep=pipe.scheduler.timesteps[step:step + 1] / 1000, return_dict=False)[0]
    finally:
        dh.remove(pipe)


def explicit_bent(entry, columns=COLUMNS, text=TEXT, grid=(H, W), reference=0):
    """diffusers' attention call ([b, L, heads, d], no mask) replaced by softmax(q·kᵀ·d^−½) in float32, the image ×
    text block bent and the image rows renormalised (every call: double and single blocks see [text; image]; an
    edit's `reference` image tokens follow the target's, their rows left as they are)."""
    spec = bending.BendSpec.from_dict({**entry, "renormalize": "none"})
    n_image = grid[0] * grid[1]
    image = slice(text, text + n_image)

    def attend(query, key, value, attn_mask=None, **kwargs):
        assert attn_mask is None and query.shape[1] == text + n_image + reference
        q, k, v = (t.transpose(1, 2).float() for t in (query, key, value))
        probs = torch.softmax(q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5, dim=-1)
        block = probs[:, :, image, :text].reshape(-1, n_image, text)
        bent = bending.bend_probs(block, columns, grid, [spec]).view(probs[:, :, image, :text].shape)
        probs = probs.clone()
        probs[:, :, image, :text] = bent
        probs[:, :, image] /= probs[:, :, image].sum(-1, keepdim=True)
        return (probs @ v).transpose(1, 2).to(query.dtype)

    return attend


def test_every_bent_call_is_the_explicit_bent_softmax(model, monkeypatch):
    plain = sample(model)
    bent = sample(model, dynamic={"bending": [ENTRY]})
    monkeypatch.setattr(model[1], "dispatch_attention_fn", explicit_bent(ENTRY))
    torch.testing.assert_close(bent, sample(model), rtol=1e-4, atol=1e-5)
    assert (bent - plain).abs().max() > 1e-3                               # bending acts


def test_an_edits_reference_image_tokens_are_attended_but_not_bent(model, monkeypatch):
    """LongCatImageEditPipeline appends the reference image's latent tokens (its img_ids: modality 2, same grid) to
    the target's: the target's rows are bent, the reference's are the model's own (the grid: the first image's)."""
    transformer, module, inputs, prompt, _, pipe = model
    g = torch.Generator().manual_seed(5)
    txt_ids, img_ids = inputs["txt_ids"], inputs["img_ids"]
    reference_ids = img_ids.clone()
    reference_ids[:, 0] += 1
    edit = dict(hidden_states=torch.randn(1, 2 * H * W, 8, generator=g), txt_ids=txt_ids,
                img_ids=torch.cat([img_ids, reference_ids]), encoder_hidden_states=prompt,
                timestep=pipe.scheduler.timesteps[:1] / 1000, return_dict=False)
    session = dh.apply(pipe, {"bending": [ENTRY]})
    session.token_indices, session.prompt_embeds = COLUMNS, prompt
    try:
        bent = transformer(**edit)[0]
    finally:
        dh.remove(pipe)
    plain = transformer(**edit)[0]
    monkeypatch.setattr(module, "dispatch_attention_fn", explicit_bent(ENTRY, reference=H * W))
    torch.testing.assert_close(bent, transformer(**edit)[0], rtol=1e-4, atol=1e-5)
    assert (bent - plain).abs().max() > 1e-3


def test_the_negative_call_is_bit_identical(model):
    """Both pipelines run the negative prompt as a call of its own, after the prompt's: left alone."""
    assert torch.equal(sample(model, dynamic={"bending": [ENTRY]}, negative=True), sample(model, negative=True))


def test_strength_zero_and_outside_the_step_window_are_bit_identical(model):
    plain = sample(model, step=1)
    assert torch.equal(sample(model, 1, {"bending": [{**ENTRY, "strength": 0.0}]}), plain)
    assert torch.equal(sample(model, 1, {"bending": [{**ENTRY, "apply_to_timesteps": [0, 0]}]}), plain)
    assert not torch.equal(sample(model, 1, {"bending": [{**ENTRY, "apply_to_timesteps": [1, 1]}]}), plain)


def test_every_double_and_single_block_is_a_layer(model):
    transformer, _, _, _, _, pipe = model
    session = dh.apply(pipe, {"bending": [ENTRY]})
    try:
        assert [s.name for s in dh.processor.sites_of(transformer)] == [
            "transformer_blocks.0.attn", "transformer_blocks.1.attn",
            "single_transformer_blocks.0.attn", "single_transformer_blocks.1.attn"]
        assert session.joint in ("longcat", "ovis")
    finally:
        dh.remove(pipe)


# --- the words' columns --------------------------------------------------------------------------------------

QWEN3 = ("{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
         "{% if add_generation_prompt %}<|im_start|>assistant\n{% if enable_thinking is defined and "
         "enable_thinking is false %}<think>\n\n</think>\n\n{% endif %}{% endif %}")          # Qwen3's, abridged


def _session(pipe, joint, *words):
    return types.SimpleNamespace(pipe=pipe, joint=joint, entries=[bending.as_spec({**ENTRY, "token": w})
                                                                    for w in words])


@pytest.mark.parametrize("padding", ["right", "left"])
def test_longcat_words_are_the_prompts_tokens_quotes_split_into_characters(padding):
    """LongCatImagePipeline encodes the bare prompt (no special tokens; a part between quotes one character at a
    time), padded to 512, between a prefix and a suffix that its encoder output drops: column j is token j (after
    the padding when the tokenizer pads on the left). The first word is spelled bare, the others after a space."""
    import comfy_standin_qwen as cq

    tokenizer = cq.qwen_tokenizer()
    tokenizer.padding_side = padding
    pipe = LongCatImagePipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=None, text_encoder=None,
                                tokenizer=tokenizer, text_processor=None, transformer=None)
    session = _session(pipe, "longcat", "sunset", "a", "kiss")
    prompt = 'a romantic kiss at "sunset"'
    found = dh.prompts._locate(session, {"prompt": prompt})
    pieces = [tokenizer.convert_ids_to_tokens(tokenizer(p, add_special_tokens=False)["input_ids"])
              for p in ("a romantic kiss at ", *'"sunset"')]
    pieces = [p for part in pieces for p in part]
    pad = 512 - len(pieces) if padding == "left" else 0
    assert [pieces[j - pad] for j in found["sunset"]] == list("sunset")
    assert [pieces[j - pad] for j in found["a"]] == ["a"] and found["a"] == [pad]
    assert [pieces[j - pad] for j in found["kiss"]] == ["Ġkiss"]


@pytest.mark.parametrize("padding", ["right", "left"])
def test_ovis_words_follow_the_dropped_template_tokens(padding):
    """OvisImagePipeline: Qwen3's template of one user turn, its system prompt + the prompt, padded to
    max_sequence_length + 28, the first 28 tokens dropped: a word's column is its token's place less 28 (the system
    prompt's rest before it; a word of the system prompt is not the prompt's)."""
    import comfy_standin_qwen as cq

    tokenizer = cq.qwen_tokenizer()
    tokenizer.chat_template, tokenizer.padding_side = QWEN3, padding
    pipe = OvisImagePipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=None, text_encoder=None,
                             tokenizer=tokenizer, transformer=None)
    session = _session(pipe, "ovis", "sunset", "image")
    prompt = "image of a kiss at sunset"
    found = dh.prompts._locate(session, {"prompt": prompt, "max_sequence_length": 64})
    text = pipe._get_messages(prompt)[0]
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    pad = 64 + 28 - len(ids) if padding == "left" else 0
    pieces = tokenizer.convert_ids_to_tokens(ids)
    assert [pieces[28 + j - pad] for j in found["sunset"]] == ["Ġsun", "set"]
    assert [pieces[28 + j - pad] for j in found["image"]] == ["Ġimage"]
    assert pieces.index("Ġimage") < 28 + found["image"][0] - pad          # the system prompt's "image" is skipped
    padded = tokenizer(text, padding="max_length", max_length=64 + 28, add_special_tokens=False)["input_ids"][28:]
    assert [padded[j] for j in found["sunset"]] == tokenizer.convert_tokens_to_ids(["Ġsun", "set"])


# --- the pipelines end to end --------------------------------------------------------------------------------

def _pipeline(family):
    """The real pipeline: a tiny Qwen2.5-VL (LongCat) or Qwen3 (Ovis) text encoder with the tiny Qwen2 tokenizer, a
    one-level VAE (latents = pixels), the family's tiny transformer fed the encoder's 16 channels."""
    import comfy_standin_qwen as cq
    from diffusers import AutoencoderKL
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen3Config, Qwen3Model

    tokenizer = cq.qwen_tokenizer()
    text = dict(vocab_size=151646, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                num_key_value_heads=1)
    latent = 16 if family == "longcat_image" else 4           # LongCatImagePipeline: 16 latent channels, fixed
    cls, _, seed = FAMILIES[family]
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        vae = AutoencoderKL(block_out_channels=(32,), in_channels=3, out_channels=3, latent_channels=latent,
                            down_block_types=("DownEncoderBlock2D",), up_block_types=("UpDecoderBlock2D",),
                            norm_num_groups=32)
        if family == "longcat_image":
            encoder = Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(
                text_config={**text, "rope_scaling": {"type": "mrope", "mrope_section": [1, 1, 2]}},
                vision_config=dict(depth=1, hidden_size=16, intermediate_size=32, num_heads=2, out_hidden_size=16)))
            encoder.lm_head = torch.nn.Linear(16, 1, bias=False)   # its logits are never read: no 151,646-way head
        else:
            tokenizer.chat_template = QWEN3
            encoder = Qwen3Model(Qwen3Config(**text, head_dim=8))
    config = {**CONFIGS[family], "in_channels": 4 * latent, "joint_attention_dim": 16}
    if family == "ovis_image":
        config["out_channels"] = 4 * latent
    transformer = cj.seeded_transformer(cls, config, seed)
    parts = dict(scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae, text_encoder=encoder.eval(),
                 tokenizer=tokenizer, transformer=transformer)
    pipe = (LongCatImagePipeline(**parts, text_processor=None) if family == "longcat_image"
            else OvisImagePipeline(**parts))
    pipe.set_progress_bar_config(disable=True)
    return pipe


PROMPTS = {"longcat_image": 'a kiss at "{sunset}"', "ovis_image": "image of a kiss at {sunset}"}


def _run(pipe, family, dynamic=None, phase=2, **extra):
    """The pipeline's 2 steps with CFG (prompt's call, then the negative's), every transformer call's keywords and
    output recorded; the session (or None)."""
    calls = []
    hook = pipe.transformer.register_forward_hook(
        lambda m, args, kwargs, out: calls.append((dict(kwargs), out[0].clone())), with_kwargs=True)
    session = dh.apply(pipe, dynamic, phase=phase) if dynamic else None
    options = {"enable_prompt_rewrite": False, "enable_cfg_renorm": False} if family == "longcat_image" else {
        "max_sequence_length": 16}
    try:
        prompt = PROMPTS[family] if dynamic else dh.prompts.unmark(PROMPTS[family])    # the marks: bending's
        latents = pipe(prompt, height=8, width=12, num_inference_steps=2, guidance_scale=3.0,
                       generator=torch.Generator().manual_seed(0), output_type="latent", **{**options, **extra}).images
    finally:
        dh.remove(pipe)
        hook.remove()
    return latents, calls, session


@pytest.mark.parametrize("family", list(FAMILIES))
def test_the_pipeline_finds_the_word_and_bends_only_the_prompts_calls(family, monkeypatch):
    """End to end: the marked word's columns come from encode_prompt; the prompt's call at step 0 is the model with
    the explicit bent softmax at those columns, the grid read from img_ids (LongCat's count from 512); the negative
    prompt's call is bit-identical; phase 1 leaves the latents bit-identical and records maps."""
    pipe = _pipeline(family)
    plain, plain_calls, _ = _run(pipe, family)
    bent, calls, session = _run(pipe, family, {"bending": [ENTRY]})
    tokenizer = pipe.tokenizer
    if family == "longcat_image":                   # the quoted word, a character at a time, after "a kiss at "
        start = len(tokenizer("a kiss at ", add_special_tokens=False)["input_ids"]) + 1
        assert session.token_indices == {"sunset": list(range(start, start + 6))}
    else:
        ids = tokenizer(pipe._get_messages("image of a kiss at sunset")[0], add_special_tokens=False)["input_ids"]
        assert tokenizer.convert_ids_to_tokens([ids[28 + j] for j in session.token_indices["sunset"]]) == [
            "Ġsun", "set"]
    assert len(calls) == 4 and torch.equal(calls[1][1], plain_calls[1][1])        # step 0: the negative's call
    kwargs, out = calls[0]
    n_text = kwargs["encoder_hidden_states"].shape[1]
    monkeypatch.setattr(FAMILIES[family][1], "dispatch_attention_fn",
                        explicit_bent(ENTRY, session.token_indices, n_text, (4, 6)))
    torch.testing.assert_close(out, pipe.transformer(**kwargs)[0], rtol=1e-4, atol=1e-5)
    assert (out - plain_calls[0][1]).abs().max() > 1e-3 and not torch.equal(bent, plain)
    monkeypatch.undo()
    looked, _, session = _run(pipe, family, {"bending": [ENTRY]}, phase=1)
    assert torch.equal(looked, plain) and session.maps


def test_longcat_rewriter_gets_the_prompt_unmarked_and_the_words_are_found_in_what_it_writes():
    """LongCatImagePipeline rewrites the prompt with its text encoder by default (the rewriting model stood in by a
    function here: the tiny one writes noise): the rewriter gets the prompt less the marks, the words' columns are
    those of the rewritten prompt, and a word the rewrite dropped is refused naming enable_prompt_rewrite."""
    pipe = _pipeline("longcat_image")
    seen = []

    def rewrite(prompt, device):
        seen.append(prompt)
        return ["a photo of " + p.replace('"', "") for p in ([prompt] if isinstance(prompt, str) else prompt)]

    pipe.rewire_prompt = rewrite
    _, _, session = _run(pipe, "longcat_image", {"bending": [ENTRY]}, enable_prompt_rewrite=True)
    tokenizer = pipe.tokenizer
    ids = tokenizer("a photo of a kiss at sunset", add_special_tokens=False)["input_ids"]
    assert seen == ['a kiss at "sunset"'] and pipe.rewire_prompt is rewrite
    assert tokenizer.convert_ids_to_tokens([ids[j] for j in session.token_indices["sunset"]]) == ["Ġsun", "set"]
    pipe.rewire_prompt = lambda prompt, device: ["a photo of a cat"]
    with pytest.raises(ValueError, match="Token not found: 'sunset'.*enable_prompt_rewrite=False"):
        _run(pipe, "longcat_image", {"bending": [ENTRY]}, enable_prompt_rewrite=True)


def test_longcat_edit_words_follow_the_image_tokens_its_encoder_output_keeps():
    """LongCatImageEditPipeline crops its Qwen2.5-VL output from <|vision_start|>: the image's tokens come before the
    prompt's. The columns found equal the places of the word's tokens in the ids its text encoder is given, counted
    from the crop (the pipeline's own _encode_prompt, a tiny Qwen2.5-VL, a real Qwen2-VL image processor)."""
    import comfy_standin_qwen as cq
    import PIL.Image
    from diffusers import LongCatImageEditPipeline
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2VLImageProcessorPil

    tokenizer = cq.qwen_tokenizer()
    vision = ["<|vision_start|>", "<|vision_end|>", "<|image_pad|>"]
    tokenizer.add_tokens(vision, special_tokens=True)
    start, end, pad = tokenizer.convert_tokens_to_ids(vision)
    with torch.random.fork_rng():
        torch.manual_seed(41)
        encoder = Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(
            text_config=dict(vocab_size=max(tokenizer.get_vocab().values()) + 1, hidden_size=16, intermediate_size=32,
                             num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                             rope_scaling={"type": "mrope", "mrope_section": [1, 1, 2]}),
            vision_config=dict(depth=1, hidden_size=16, intermediate_size=32, num_heads=2, out_hidden_size=16),
            image_token_id=pad, vision_start_token_id=start, vision_end_token_id=end)).eval()
    # The pipeline uses only its text_processor's image_processor; a whole Qwen2VLProcessor would need a video
    # processor, hence torchvision, which is no dependency here (the PIL image backend gives the same grid).
    processor = type("ImageProcessorOnly", (), {"image_processor": Qwen2VLImageProcessorPil()})()
    pipe = LongCatImageEditPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=None, text_encoder=encoder,
                                    tokenizer=tokenizer, text_processor=processor, transformer=None)
    image = PIL.Image.new("RGB", (112, 84), (200, 80, 40))
    found = dh.prompts._locate(_session(pipe, "longcat", "sunset"), {"prompt": "a kiss at sunset", "image": image})
    given = []
    hook = encoder.register_forward_pre_hook(lambda m, a, kw: given.append(kw["input_ids"][0].tolist()),
                                             with_kwargs=True)
    try:
        embeds = pipe._encode_prompt(["a kiss at sunset"], image)
    finally:
        hook.remove()
    ids = given[0][given[0].index(start):]                  # what the encoder output keeps, from <|vision_start|>
    assert embeds.shape[1] == len(ids) - 5                  # less the assistant suffix
    assert ids.count(pad) > 1 and found["sunset"][0] > ids.index(end)
    assert tokenizer.convert_ids_to_tokens([ids[j] for j in found["sunset"]]) == ["Ġsun", "set"]
