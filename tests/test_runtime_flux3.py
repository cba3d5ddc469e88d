"""Attention Bending on Flux.3 in the diffusers host: diffusers' own Flux3Transformer2DModel (tiny, seeded) run by
diffusers' own modular blocks (Flux3TextEncoderStep, then Flux3CoreDenoiseStep with its ClassifierFreeGuidance
guider: conditional and unconditional predictions in separate calls), the prompt through Qwen3-VL's chat template
(a stand-in tokenizer and a stand-in text encoder: Qwen3-VL does not run here), padded to 80 tokens like the
negative's.

The reference is the model's processors with their attention call replaced by an explicit softmax whose image-query
× text-key block is bent by bending.bend_probs at the joint single blocks of the conditional calls, rows
renormalised over all keys: the bent pipeline equals it. The per-mode blocks (text alone, image alone) are left
alone; the negative call, strength 0 and calls outside the step window are bit-identical."""

import types

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, Flux3Transformer2DModel
from diffusers.guiders import ClassifierFreeGuidance
from diffusers.modular_pipelines import SequentialPipelineBlocks
from diffusers.modular_pipelines.flux3.before_denoise import Flux3TextRoPEInputsStep, _prepare_image_ids
from diffusers.modular_pipelines.flux3.encoders import Flux3TextEncoderStep
from diffusers.modular_pipelines.flux3.modular_blocks_flux3 import Flux3CoreDenoiseStep
from diffusers.models.transformers import transformer_flux3 as tf

import comfy_standin_joint as cj
from ckptbend.runtime import bending
from ckptbend.runtime import diffusers_host as dh
from ckptbend.synth.flux3 import CONFIGS

H, W, TEXT = 4, 6, 80                    # token grid (64 × 96 pixels), the text window (one pad multiple)
PROMPT = "a romantic kiss at {sunset}"
ENTRY = {"token": "sunset", "mode": "translate", "translate_x": 0.5}
QWEN3_VL_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m.role }}\n{% if m.content is string %}{{ m.content }}"
                     "{% else %}{% for c in m.content %}{{ c.text }}{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
                     "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")   # Qwen3-VL's, abridged

pytestmark = pytest.mark.usefixtures("one_thread_no_grad")


class TextEncoder(torch.nn.Module):
    """Stands in for Qwen3-VL: 33 hidden states, each a scaled embedding of the tokens (3 channels; 8 stacked = the
    tiny model's joint_attention_dim 24)."""

    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(200000, 3)

    dtype, device = torch.float32, torch.device("cpu")

    def forward(self, input_ids, **kwargs):
        x = self.embed(input_ids)
        return types.SimpleNamespace(hidden_states=[x * (1 + k / 8) for k in range(33)])


class Processor:
    """Qwen3-VL's processor as the text encoder step uses it: its chat template and its tokenizer (the real one
    needs Qwen3-VL's image and video processors)."""

    def __init__(self):
        import comfy_standin_qwen as cq

        self.tokenizer = cq.qwen_tokenizer()
        self.tokenizer.chat_template = QWEN3_VL_TEMPLATE

    def apply_chat_template(self, *args, **kwargs):
        return self.tokenizer.apply_chat_template(*args, **kwargs)

    def decode(self, *args, **kwargs):
        return self.tokenizer.decode(*args, **kwargs)


@pytest.fixture(scope="module")
def flux3():
    model = cj.seeded_transformer(Flux3Transformer2DModel, CONFIGS["flux3_klein_base"], 53)
    with torch.random.fork_rng():
        torch.manual_seed(3)
        encoder = TextEncoder().eval()
    blocks = SequentialPipelineBlocks.from_blocks_dict({"text_encoder": Flux3TextEncoderStep(),
                                                        "denoise": Flux3CoreDenoiseStep()})
    pipe = blocks.init_pipeline()
    pipe.update_components(transformer=model, scheduler=FlowMatchEulerDiscreteScheduler(), text_encoder=encoder,
                           tokenizer=Processor(), guider=ClassifierFreeGuidance(guidance_scale=3.5))
    return model, pipe


def generate(pipe, prompt=PROMPT, dynamic=None):
    if dynamic is not None:
        dh.apply(pipe, dynamic)
    try:
        return pipe(prompt=prompt, negative_prompt="a red car", height=16 * H, width=16 * W, num_inference_steps=2,
                    generator=torch.Generator().manual_seed(1), output="latents")
    finally:
        dh.remove(pipe)


def explicit_bent(entry, columns, model):
    """diffusers' attention call ([b, L, heads, d]) replaced by softmax(q·kᵀ·d^−½) in float32; at the joint single
    blocks (TEXT + H·W tokens) of step 1's conditional call (the guider runs it first in each step: model call 2)
    the image × text block bent and the image rows renormalised."""
    spec = bending.BendSpec.from_dict({**entry, "renormalize": "none"})
    calls = []
    model.register_forward_pre_hook(lambda *_: calls.append(len(calls)))

    def attend(query, key, value, attn_mask=None, **kwargs):
        q, k, v = (t.transpose(1, 2).float() for t in (query, key, value))
        probs = torch.softmax(q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5, dim=-1)
        if q.shape[2] == TEXT + H * W and calls[-1] == 2:
            probs = probs.clone()
            probs[:, :, TEXT:, :TEXT] = bending.bend_probs(probs[0, :, TEXT:, :TEXT].contiguous(), columns, (H, W),
                                                           [spec])[None]
            probs[:, :, TEXT:] /= probs[:, :, TEXT:].sum(-1, keepdim=True)
        return (probs @ v).transpose(1, 2).to(query.dtype)

    return attend


def test_the_bent_pipeline_is_the_explicit_bent_softmax(flux3, monkeypatch):
    model, pipe = flux3
    plain = generate(pipe, PROMPT.replace("{", "").replace("}", ""))
    bent = generate(pipe, dynamic={"bending": [{**ENTRY, "apply_to_timesteps": [1, 1]}]})
    columns = dh.flux3.flux3_columns(types.SimpleNamespace(entries=[bending.as_spec(ENTRY)]), pipe.tokenizer,
                                     "a romantic kiss at sunset", 8192)
    pieces = pipe.tokenizer.tokenizer.convert_ids_to_tokens(pipe.tokenizer.tokenizer(
        "<|im_start|>user\na romantic kiss at sunset<|im_end|>\n<|im_start|>assistant\n")["input_ids"])
    assert [pieces[j] for j in columns["sunset"]] == ["Ġsun", "set"] and columns["sunset"][0] == 7
    monkeypatch.setattr(tf, "dispatch_attention_fn", explicit_bent(ENTRY, columns, model))
    expected = generate(pipe, PROMPT.replace("{", "").replace("}", ""))
    torch.testing.assert_close(bent, expected, rtol=1e-4, atol=1e-5)
    assert (bent - plain).abs().max() > 1e-3
    dh.apply(pipe, {"bending": [ENTRY]})
    dh.remove(pipe)
    assert "_get_qwen3_vl_prompt_embeds" not in vars(pipe._blocks.sub_blocks["text_encoder"])   # unwrapped


def model_call(flux3, step=0, dynamic=None, text=None, prompt=None):
    """One call as Flux3LoopDenoiser makes it (t / 1000, the pipeline's own image and text ids)."""
    model, pipe = flux3
    g = torch.Generator().manual_seed(4)
    latents = torch.randn(1, H * W, 8, generator=g)
    text = torch.randn(1, TEXT, 24, generator=g) if text is None else text
    scheduler = FlowMatchEulerDiscreteScheduler()
    scheduler.set_timesteps(2)
    host = types.SimpleNamespace(transformer=model, scheduler=scheduler)
    if dynamic is not None:
        session = dh.apply(host, dynamic)
        session.token_indices, session.prompt_embeds = {"sunset": [7, 8]}, prompt
    try:
        time = scheduler.timesteps[step:step + 1] / 1000
        return model(hidden_states=latents, encoder_hidden_states=text, timestep=time,
                     img_ids=_prepare_image_ids(H, W, 0.5), txt_ids=Flux3TextRoPEInputsStep._prepare_text_ids(text),
                     return_dict=False)[0]
    finally:
        dh.remove(host)


def test_the_negative_call_strength_zero_and_outside_the_window_are_bit_identical(flux3):
    prompt, negative = (torch.randn(1, TEXT, 24, generator=torch.Generator().manual_seed(s)) for s in (5, 6))
    plain = model_call(flux3, 1, text=negative)
    assert torch.equal(model_call(flux3, 1, {"bending": [ENTRY]}, text=negative, prompt=prompt), plain)
    plain = model_call(flux3, 1, text=prompt)
    assert torch.equal(model_call(flux3, 1, {"bending": [{**ENTRY, "strength": 0.0}]}, prompt, prompt), plain)
    assert torch.equal(model_call(flux3, 1, {"bending": [{**ENTRY, "apply_to_timesteps": [0, 0]}]}, prompt, prompt),
                       plain)
    assert not torch.equal(model_call(flux3, 1, {"bending": [{**ENTRY, "apply_to_timesteps": [1, 1]}]}, prompt,
                                      prompt), plain)


def test_only_the_joint_single_blocks_are_bent(flux3):
    """The per-mode blocks attend within one mode (txt_mode_blocks: text alone; mode_blocks: image, references)."""
    model, _ = flux3
    sites = dh.processor.sites_of(model)
    assert [s.name for s in sites] == ["single_transformer_blocks.0.attn", "single_transformer_blocks.1.attn"]
    assert [s.layer for s in sites] == [0, 1]


def test_with_a_reference_image_on_the_flow_map_model(monkeypatch):
    """The step-distilled model (flow map: target_timestep) with a reference image: the joint sequence is [text;
    image; reference], the reference's tokens are keys too; every bent call equals the explicit bent softmax. Phase 1
    records the maps on the image grid and leaves the output bit-identical."""
    model = cj.seeded_transformer(Flux3Transformer2DModel, CONFIGS["flux3_klein"], 59)
    g = torch.Generator().manual_seed(8)
    text, latents, reference = torch.randn(1, 12, 24, generator=g), torch.randn(1, H * W, 8, generator=g), \
        torch.randn(1, 6, 8, generator=g)
    scheduler = FlowMatchEulerDiscreteScheduler()
    scheduler.set_timesteps(2)
    host = types.SimpleNamespace(transformer=model, scheduler=scheduler)
    columns = {"sunset": [7, 8]}

    def call(dynamic=None, phase=2):
        session = None
        if dynamic is not None:
            session = dh.apply(host, dynamic, phase=phase)
            session.token_indices, session.prompt_embeds = columns, text
        try:
            return model(hidden_states=latents, encoder_hidden_states=text, timestep=scheduler.timesteps[:1] / 1000,
                         target_timestep=scheduler.timesteps[1:2] / 1000, img_ids=_prepare_image_ids(H, W, 0.5),
                         txt_ids=Flux3TextRoPEInputsStep._prepare_text_ids(text), image_cond_hidden_states=reference,
                         image_cond_ids=_prepare_image_ids(2, 3, 0.5, l_coord=-1), return_dict=False)[0], session
        finally:
            dh.remove(host)

    plain = call()[0]
    bent = call({"bending": [ENTRY]})[0]
    looked, session = call({"bending": [ENTRY]}, phase=1)
    assert torch.equal(looked, plain)
    assert [(m["layer"], m["step"], tuple(m["bent"].shape)) for m in session.maps] == [(0, 0, (H, W)), (1, 0, (H, W))]
    spec = bending.BendSpec.from_dict({**ENTRY, "renormalize": "none"})

    def attend(query, key, value, attn_mask=None, **kwargs):
        q, k, v = (t.transpose(1, 2).float() for t in (query, key, value))
        probs = torch.softmax(q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5, dim=-1)
        if q.shape[2] == 12 + H * W + 6:
            image = slice(12, 12 + H * W)
            probs = probs.clone()
            probs[0, :, image, :12] = bending.bend_probs(probs[0, :, image, :12].contiguous(), columns, (H, W), [spec])
            probs[0, :, image] /= probs[0, :, image].sum(-1, keepdim=True)
        return (probs @ v).transpose(1, 2).to(query.dtype)

    monkeypatch.setattr(tf, "dispatch_attention_fn", attend)
    torch.testing.assert_close(bent, call()[0], rtol=1e-4, atol=1e-5)
    assert (bent - plain).abs().max() > 1e-3


def test_a_word_the_prompt_upsampler_dropped_is_refused_naming_the_step(flux3):
    """Flux3AutoBlocks rewrite the prompt (prompt_upsampler) before the text encoder step: a word missing from what
    the encoder gets is refused in one line that names the step to pop. Without an upsampler, the plain refusal."""
    from diffusers.modular_pipelines import Flux3AutoBlocks

    model, plain = flux3
    auto = Flux3AutoBlocks().init_pipeline()
    auto.update_components(transformer=model, scheduler=FlowMatchEulerDiscreteScheduler())
    for pipe, hint in ((auto, True), (plain, False)):
        dh.apply(pipe, {"bending": [ENTRY]})
        try:
            encode = pipe._blocks.sub_blocks["text_encoder"]._get_qwen3_vl_prompt_embeds
            with pytest.raises(ValueError, match="Token not found: 'sunset'") as refused:
                encode(text_encoder=TextEncoder(), tokenizer=Processor(), prompt="a red car at dusk")
        finally:
            dh.remove(pipe)
        assert ("blocks.sub_blocks.pop('prompt_upsampler')" in str(refused.value)) == hint
        assert "\n" not in str(refused.value)


def test_the_prompt_upsampler_gets_the_prompt_without_its_marks(flux3):
    """diffusers' Flux3Text2ImagePromptUpsampleStep, with a real (tiny, seeded, greedy) Qwen3.5 upsampler, rewrites the
    prompt before the text encoder step: with bending it gets the prompt an unbent run gives it, the marks stripped
    (the braces would be tokens it reads), and the words are looked for in its caption: here a random model's words,
    without "sunset", so the refusal quotes the very caption the unmarked prompt gives."""
    from diffusers.modular_pipelines.flux3.prompt_upsampler import Flux3Text2ImagePromptUpsampleStep, upsample_prompt
    from transformers import Qwen3_5Config, Qwen3_5ForConditionalGeneration

    model, _ = flux3
    processor = Processor()
    ids = sorted(processor.tokenizer.get_vocab().values())
    text = dict(vocab_size=ids[-1] + 1, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=2, num_key_value_heads=1, head_dim=16, linear_num_value_heads=2,
                linear_num_key_heads=1, linear_key_head_dim=8, linear_value_head_dim=8,
                layer_types=["linear_attention", "full_attention"])
    vision = dict(depth=1, hidden_size=16, intermediate_size=32, num_heads=2, out_hidden_size=32)
    with torch.random.fork_rng():
        torch.manual_seed(5)
        upsampler = Qwen3_5ForConditionalGeneration(Qwen3_5Config(text_config=text, vision_config=vision)).eval()
        unused = torch.ones(ids[-1] + 1, dtype=torch.bool)
        unused[ids] = False
        upsampler.lm_head.weight[unused] = 0       # greedy picks among the stand-in tokenizer's ids (Qwen's special
                                                    # tokens sit at 151643…, the few others below 500)
    unmarked = upsample_prompt(upsampler, processor, "a romantic kiss at sunset", max_new_tokens=8)
    seen = []                                    # the token ids of each prompt the upsampler reads (its prefill)
    upsampler.register_forward_pre_hook(lambda m, args, kwargs: seen.append(kwargs["input_ids"][0].tolist()),
                                        with_kwargs=True)
    upsample_prompt(upsampler, processor, "a romantic kiss at sunset", max_new_tokens=1)
    expected_ids = seen.pop()
    with torch.random.fork_rng():
        torch.manual_seed(3)
        encoder = TextEncoder().eval()
    blocks = SequentialPipelineBlocks.from_blocks_dict({"prompt_upsampler": Flux3Text2ImagePromptUpsampleStep(),
                                                        "text_encoder": Flux3TextEncoderStep(),
                                                        "denoise": Flux3CoreDenoiseStep()})
    pipe = blocks.init_pipeline()
    pipe.update_components(transformer=model, scheduler=FlowMatchEulerDiscreteScheduler(), text_encoder=encoder,
                           tokenizer=processor, guider=ClassifierFreeGuidance(guidance_scale=3.5),
                           prompt_upsampler=upsampler, prompt_upsampler_processor=processor)
    dh.apply(pipe, {"bending": [ENTRY]})
    try:
        with pytest.raises(ValueError, match="Token not found: 'sunset'") as refused:
            pipe(prompt=PROMPT, max_new_tokens=8, height=16 * H, width=16 * W, num_inference_steps=1,
                 generator=torch.Generator().manual_seed(1), output="latents")
    finally:
        dh.remove(pipe)
    assert seen[0] == expected_ids               # the upsampler read the prompt without its marks
    assert repr(unmarked) in str(refused.value) and "\n" not in str(refused.value)
