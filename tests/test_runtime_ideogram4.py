"""Attention Bending on Ideogram 4 in the diffusers host: diffusers' own Ideogram4Transformer2DModel (one packed
sequence per item, [left padding; text; image], a block-diagonal segment mask, MRoPE), tiny and seeded, its layout
built by Ideogram4Pipeline._prepare_ids itself for two prompts of different lengths (so the text sits at a different
offset in each item), and the model time reversed (1 − t / 1000) as the pipeline passes it.

The reference is the model's processors with their attention call replaced by an explicit softmax whose image-query ×
text-key block (each item's own text columns) is bent by bending.bend_probs, rows renormalised over all keys: every
bent call equals it. The unconditional pass (image tokens only, no text), strength 0 and calls outside the step window
are bit-identical; the words' columns count from the chat template's first token. Ideogram4Pipeline itself (a tiny
Qwen3-VL text model, both transformers, its reversed schedule) bends only its conditional transformer's calls, at the
step the window names."""

import types

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, Ideogram4Pipeline
from diffusers.models.transformers import transformer_ideogram4 as ti

import comfy_standin_joint as cj
from ckptbend.runtime import bending
from ckptbend.runtime import diffusers_host as dh
from ckptbend.synth.ideogram4 import CONFIGS

H, W, MAX_TEXT = 4, 6, 8
LENGTHS = (5, 7)                              # the two prompts' text tokens: left-padded to MAX_TEXT
COLUMNS = {"sunset": [2, 3]}
ENTRY = {"token": "sunset", "mode": "translate", "translate_x": 0.5}

pytestmark = pytest.mark.usefixtures("one_thread_no_grad")


@pytest.fixture(scope="module")
def ideogram4():
    model = cj.seeded_transformer(ti.Ideogram4Transformer2DModel, CONFIGS["ideogram4"], 47)
    g = torch.Generator().manual_seed(5)
    positions, segments, indicator = Ideogram4Pipeline._prepare_ids(list(LENGTHS), H, W, MAX_TEXT, "cpu")
    features = torch.randn(2, MAX_TEXT + H * W, 24, generator=g) * (indicator == ti.LLM_TOKEN_INDICATOR)[..., None]
    latents = torch.randn(2, H * W, 8, generator=g)
    conditional = dict(hidden_states=torch.cat([torch.zeros(2, MAX_TEXT, 8), latents], 1),
                       encoder_hidden_states=features, position_ids=positions, segment_ids=segments,
                       indicator=indicator)
    unconditional = dict(hidden_states=latents, encoder_hidden_states=torch.zeros(2, H * W, 24),
                         position_ids=positions[:, MAX_TEXT:], segment_ids=segments[:, MAX_TEXT:],
                         indicator=indicator[:, MAX_TEXT:])
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    scheduler.set_timesteps(2)
    pipe = types.SimpleNamespace(transformer=model, scheduler=scheduler)
    return model, conditional, unconditional, pipe


def sample(ideogram4, step=0, dynamic=None, negative=False):
    model, conditional, unconditional, pipe = ideogram4
    if dynamic is not None:
        session = dh.apply(pipe, dynamic)
        session.token_indices = COLUMNS
    t = 1.0 - pipe.scheduler.timesteps[step] / 1000            # Ideogram4Pipeline's model time
    try:
        return model(**(unconditional if negative else conditional), timestep=t.expand(2), return_dict=False)[0]
    finally:
        dh.remove(pipe)


def explicit_bent(entry):
    """diffusers' attention call ([b, L, heads, d], a boolean mask) replaced by softmax(q·kᵀ·d^−½ + mask) in float32;
    each item's image × own-text block bent and its image rows renormalised."""
    spec = bending.BendSpec.from_dict({**entry, "renormalize": "none"})

    def attend(query, key, value, attn_mask=None, **kwargs):
        q, k, v = (t.transpose(1, 2).float() for t in (query, key, value))
        probs = torch.softmax((q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5).masked_fill(~attn_mask, -torch.inf), -1)
        probs = probs.clone()
        for b, n in enumerate(LENGTHS):
            image, text = slice(MAX_TEXT, None), slice(MAX_TEXT - n, MAX_TEXT)
            probs[b, :, image, text] = bending.bend_probs(probs[b, :, image, text].contiguous(), COLUMNS, (H, W),
                                                          [spec])
            probs[b, :, image] /= probs[b, :, image].sum(-1, keepdim=True)
        return (probs @ v).transpose(1, 2).to(query.dtype)

    return attend


def test_every_bent_call_is_the_explicit_bent_softmax(ideogram4, monkeypatch):
    plain = sample(ideogram4)
    bent = sample(ideogram4, dynamic={"bending": [ENTRY]})
    monkeypatch.setattr(ti, "dispatch_attention_fn", explicit_bent(ENTRY))
    expected = sample(ideogram4)
    torch.testing.assert_close(bent, expected, rtol=1e-4, atol=1e-5)
    for b in range(2):                                          # both prompts' items bent, at their own offsets
        assert (bent[b, MAX_TEXT:] - plain[b, MAX_TEXT:]).abs().max() > 1e-3


def test_the_unconditional_pass_is_bit_identical(ideogram4):
    """The pipeline's negative: image tokens only (no text), from unconditional_transformer; bit-identical even when
    that is the bent model itself."""
    plain = sample(ideogram4, negative=True)
    assert torch.equal(sample(ideogram4, dynamic={"bending": [ENTRY]}, negative=True), plain)


def test_strength_zero_and_outside_the_step_window_are_bit_identical(ideogram4):
    """The model time 1 − t / 1000 maps back to the scheduler's step: step 1 is outside [0, 0] and inside [1, 1]."""
    plain = sample(ideogram4, step=1)
    assert torch.equal(sample(ideogram4, 1, {"bending": [{**ENTRY, "strength": 0.0}]}), plain)
    assert torch.equal(sample(ideogram4, 1, {"bending": [{**ENTRY, "apply_to_timesteps": [0, 0]}]}), plain)
    assert not torch.equal(sample(ideogram4, 1, {"bending": [{**ENTRY, "apply_to_timesteps": [1, 1]}]}), plain)


def test_the_step_comes_from_the_schedulers_step_index_at_bf16_precision():
    """In bf16 the late model times are too coarse for a timestep match: the scheduler's step_index decides."""
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    scheduler.set_timesteps(sigmas=[1.0, 0.02, 0.015, 0.01])
    scheduler._step_index = 2
    time = (1.0 - scheduler.timesteps[2] / 1000).to(torch.bfloat16)
    assert dh.ideogram4.step_at(scheduler, time) == 2
    scheduler._step_index = None                                # a call outside a run: the nearest timestep
    assert dh.ideogram4.step_at(scheduler, 1.0 - scheduler.timesteps[3:4] / 1000) == 3


QWEN3_VL_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m.role }}\n{% if m.content is string %}{{ m.content }}"
                     "{% else %}{% for c in m.content %}{{ c.text }}{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
                     "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")   # Qwen3-VL's, abridged


def test_words_are_found_in_the_chat_template_from_its_first_token():
    """Ideogram4Pipeline.encode_prompt: the user turn (one text part), the generation prompt, no special tokens
    added; every token is the model's text, column 0 the template's <|im_start|>. The first word is spelled bare."""
    import comfy_standin_qwen as cq

    tokenizer = cq.qwen_tokenizer()
    tokenizer.chat_template = QWEN3_VL_TEMPLATE
    session = types.SimpleNamespace(pipe=types.SimpleNamespace(tokenizer=tokenizer), family="ideogram4", joint=None,
                                    entries=[bending.as_spec({**ENTRY, "token": w})
                                                          for w in ("sunset", "a", "user")])
    prompt = "a romantic kiss at sunset"
    with pytest.raises(ValueError, match="Token not found: 'user'"):     # the template's word is not the prompt's
        dh.prompts._locate(session, {"prompt": prompt})
    session.entries = session.entries[:2]
    found = dh.prompts._locate(session, {"prompt": [prompt, prompt]})
    pieces = tokenizer.convert_ids_to_tokens(tokenizer("<|im_start|>user\n" + prompt + "<|im_end|>\n<|im_start|>"
                                                       "assistant\n", add_special_tokens=False)["input_ids"])
    assert [pieces[j] for j in found["sunset"]] == ["Ġsun", "set"]
    assert found["a"] == [3] and pieces[3] == "a"


def test_a_word_beyond_the_items_text_is_refused(ideogram4):
    model, conditional, _, pipe = ideogram4
    session = dh.apply(pipe, {"bending": [ENTRY]})
    session.token_indices = {"sunset": [5]}                     # the first item has 5 text tokens
    try:
        with pytest.raises(ValueError, match="beyond the 5 text tokens"):
            model(**conditional, timestep=torch.tensor([0.5, 0.5]), return_dict=False)
    finally:
        dh.remove(pipe)


def ideogram4_pipeline(prompt_enhancer_head=None):
    """Ideogram4Pipeline itself, tiny: a 36-layer Qwen3-VL text model (16 wide), its chat template through the
    stand-in tokenizer, the conditional and the unconditional transformer."""
    import comfy_standin_qwen as cq
    from diffusers import AutoencoderKLFlux2
    from transformers import Qwen3VLConfig, Qwen3VLModel

    tokenizer = cq.qwen_tokenizer()
    tokenizer.chat_template = QWEN3_VL_TEMPLATE
    rope = {"rope_type": "default", "mrope_section": [2, 1, 1], "mrope_interleaved": True}
    config = Qwen3VLConfig(text_config=dict(vocab_size=151700, hidden_size=16, intermediate_size=32,
                                            num_hidden_layers=36, num_attention_heads=2, num_key_value_heads=1,
                                            head_dim=8, rope_scaling=rope),
                           vision_config=dict(depth=1, hidden_size=16, intermediate_size=32, num_heads=2,
                                              out_hidden_size=16, deepstack_visual_indexes=[]))
    with torch.random.fork_rng():
        torch.manual_seed(61)
        encoder = Qwen3VLModel(config).eval()
        vae = AutoencoderKLFlux2(block_out_channels=(8,), down_block_types=("DownEncoderBlock2D",),
                                 up_block_types=("UpDecoderBlock2D",), latent_channels=2, norm_num_groups=4,
                                 layers_per_block=1)
    tiny = {**CONFIGS["ideogram4"], "llm_features_dim": 13 * 16}          # 13 tapped Qwen3-VL layers
    pipe = Ideogram4Pipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae, text_encoder=encoder,
                             tokenizer=tokenizer, transformer=cj.seeded_transformer(ti.Ideogram4Transformer2DModel,
                                                                                    tiny, 67),
                             unconditional_transformer=cj.seeded_transformer(ti.Ideogram4Transformer2DModel, tiny, 71),
                             prompt_enhancer_head=prompt_enhancer_head)
    return pipe


def test_the_bent_pipeline_is_the_explicit_bent_softmax(monkeypatch):
    """Ideogram4Pipeline (ideogram4_pipeline), two steps of its reversed schedule. Only the conditional transformer's
    calls are bent (its words at the prompt's own left-pad offset); the result equals the plain pipeline with the
    explicit bent softmax at those calls."""
    pipe = ideogram4_pipeline()
    tokenizer = pipe.tokenizer
    prompt = "a romantic kiss at sunset"

    def generate(text, dynamic=None):
        if dynamic is not None:
            dh.apply(pipe, dynamic)
        try:
            return pipe(text, height=2 * H, width=2 * W, num_inference_steps=2, guidance_scale=3.0,
                        guidance_schedule=None, max_sequence_length=16, output_type="latent",
                        generator=torch.Generator().manual_seed(2)).images
        finally:
            dh.remove(pipe)

    plain = generate(prompt)
    bent = generate("a romantic kiss at {sunset}", {"bending": [{**ENTRY, "apply_to_timesteps": [1, 1]}]})
    template = tokenizer.apply_chat_template([{"role": "user", "content": [{"type": "text", "text": prompt}]}],
                                             add_generation_prompt=True, tokenize=False)
    n = len(tokenizer(template, add_special_tokens=False)["input_ids"])   # its text, left-padded to 16
    spec = bending.BendSpec.from_dict({**ENTRY, "renormalize": "none"})
    calls = []
    pipe.transformer.register_forward_pre_hook(lambda *_: calls.append("conditional"))
    pipe.unconditional_transformer.register_forward_pre_hook(lambda *_: calls.append("unconditional"))

    def attend(query, key, value, attn_mask=None, **kwargs):
        q, k, v = (t.transpose(1, 2).float() for t in (query, key, value))
        probs = torch.softmax((q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5).masked_fill(~attn_mask, -torch.inf), -1)
        if calls == ["conditional", "unconditional", "conditional"]:          # step 1's conditional call
            image, text = slice(16, None), slice(16 - n, 16)
            probs = probs.clone()
            probs[0, :, image, text] = bending.bend_probs(probs[0, :, image, text].contiguous(), {"sunset": [7, 8]},
                                                          (H, W), [spec])
            probs[0, :, image] /= probs[0, :, image].sum(-1, keepdim=True)
        return (probs @ v).transpose(1, 2).to(query.dtype)

    monkeypatch.setattr(ti, "dispatch_attention_fn", attend)
    expected = generate(prompt)
    torch.testing.assert_close(bent, expected, rtol=1e-4, atol=1e-5)
    assert (bent - plain).abs().max() > 1e-4


def test_the_prompt_upsampler_gets_the_prompt_without_its_marks():
    """prompt_upsampling=True: Ideogram4Pipeline.upsample_prompt (its Qwen3-VL text model made generative by a real,
    tiny prompt_enhancer_head) rewrites the prompt before encode_prompt. With bending it reads the prompt an unbent run
    gives it, the marks stripped, and the words are looked for in what it writes (here a random model's words: the
    refusal names the word)."""
    from diffusers import Ideogram4PromptEnhancerHead

    with torch.random.fork_rng():
        torch.manual_seed(73)
        pipe = ideogram4_pipeline(Ideogram4PromptEnhancerHead(hidden_size=16, vocab_size=151700).eval())
    seen = []                                    # the token ids of each text the Qwen3-VL body reads, in order
    pipe.text_encoder.register_forward_pre_hook(lambda m, args, kwargs: seen.append(kwargs["input_ids"][0].tolist()),
                                                with_kwargs=True)
    pipe.upsample_prompt("a romantic kiss at sunset", height=2 * H, width=2 * W, max_new_tokens=1)
    expected = seen[0]
    seen.clear()
    dh.apply(pipe, {"bending": [ENTRY]})
    try:
        with pytest.raises(ValueError, match="Token not found: 'sunset'"):
            pipe("a romantic kiss at {sunset}", height=2 * H, width=2 * W, num_inference_steps=1, guidance_scale=3.0,
                 guidance_schedule=None, max_sequence_length=16, output_type="latent", prompt_upsampling=True,
                 generator=torch.Generator().manual_seed(2))
    finally:
        dh.remove(pipe)
    assert seen[0] == expected                   # the upsampler's prefill: the prompt without its marks
