"""Attention Bending on HunyuanVideo 1.0 in the diffusers host: diffusers' own HunyuanVideoPipeline end to end, tiny
and seeded (HunyuanVideoTransformer3DModel with 2 double and 2 single blocks, a 3-layer Llama, CLIP, the real
scheduler), its true CFG as two model calls. The Llama tokenizer is a byte-level BPE trained here on the template
(Llama 3's <|begin_of_text|> first and its header / <|eot_id|> tokens; nothing is downloaded).

The reference is the model's processors with their attention call replaced, at the conditional calls, by an explicit
softmax whose video-query × word-key block is bent by bending.bend_probs, rows renormalised over all keys: every bent
call equals it; strength 0, steps outside the window and the negative call are bit-identical. The word's columns are
checked against the ids the pipeline's Llama received, less its crop_start; image-to-video's against the real
HunyuanVideoImageToVideoPipeline._get_llama_prompt_embeds, whose stand-in text encoder returns each token's id."""

import types

import pytest
import torch
from diffusers import (FlowMatchEulerDiscreteScheduler, HunyuanVideoImageToVideoPipeline, HunyuanVideoPipeline,
                       HunyuanVideoTransformer3DModel)
from diffusers.models.transformers import transformer_hunyuan_video as th
from diffusers.pipelines.hunyuan_video import pipeline_hunyuan_video_image2video as i2v
from diffusers.pipelines.hunyuan_video.pipeline_hunyuan_video import DEFAULT_PROMPT_TEMPLATE
from transformers import CLIPTextModel, LlamaConfig, LlamaModel, PreTrainedTokenizerFast

import comfy_standin_joint as cj
from _pipelines import clip_text_config, write_clip_tokenizer
from ckptbend.runtime import bending
from ckptbend.runtime import diffusers_host as dh
from ckptbend.runtime.diffusers_host import hunyuan10

CONFIG = dict(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=16, num_layers=2,
              num_single_layers=2, num_refiner_layers=1, patch_size=2, patch_size_t=1, text_embed_dim=24,
              pooled_projection_dim=32, rope_axes_dim=(4, 6, 6))
F_, H, W = 2, 2, 3                      # 5 frames of 32×48 pixels: 2 latent frames of 4×6, patch 2
SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "<image>"]
ENTRY = {"token": "sunset", "mode": "translate", "translate_x": 0.5}
PROMPT, NEGATIVE = "a cat at {sunset} on the beach", "a red sky"

pytestmark = pytest.mark.usefixtures("one_thread_no_grad")


def llama_tokenizer():
    """Llama 3's conventions: byte-level BPE ("Ġ" before a word after a space), <|begin_of_text|> added first, the
    chat template's header tokens special; merges trained on the template, so it is cut into words as the real one."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=420, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator([DEFAULT_PROMPT_TEMPLATE["template"], i2v.DEFAULT_PROMPT_TEMPLATE["template"],
                                 "a cat at the beach, a red sky at sunset"], trainer)
    backend.post_processor = processors.TemplateProcessing(single="<|begin_of_text|> $A",
                                                           special_tokens=[("<|begin_of_text|>", 0)])
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<|begin_of_text|>", eos_token="<|eot_id|>",
                                   pad_token="<|end_of_text|>")


def crop_of(tokenizer, template):
    """The template's tokens before the prompt: what crop_start counts (95 with the real Llama 3 tokenizer)."""
    return len(tokenizer(template.split("{}")[0])["input_ids"])


@pytest.fixture(scope="module")
def hunyuan(tmp_path_factory):
    tokenizer = llama_tokenizer()
    clip_tokenizer = write_clip_tokenizer(tmp_path_factory.mktemp("clip"), max_length=77)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        llama = LlamaModel(LlamaConfig(vocab_size=len(tokenizer), hidden_size=24, intermediate_size=32,
                                       num_hidden_layers=3, num_attention_heads=2, num_key_value_heads=2,
                                       pad_token_id=1)).eval()
        clip = CLIPTextModel(clip_text_config(clip_tokenizer)).eval()
    transformer = cj.seeded_transformer(HunyuanVideoTransformer3DModel, CONFIG, 41)
    pipe = HunyuanVideoPipeline(text_encoder=llama, tokenizer=tokenizer, text_encoder_2=clip,
                                tokenizer_2=clip_tokenizer, transformer=transformer, vae=None,
                                scheduler=FlowMatchEulerDiscreteScheduler(shift=7.0))
    pipe.set_progress_bar_config(disable=True)
    template = {**DEFAULT_PROMPT_TEMPLATE, "crop_start": crop_of(tokenizer, DEFAULT_PROMPT_TEMPLATE["template"])}
    return pipe, template


def run(hunyuan, dynamic=None, before=None, after=None, template=None, phase=2):
    """Two steps, true CFG (prompt call, then the negative's); the latents and the session (or None). before(), after():
    hooks on the model, after the session's pre-hook (they see the call's description)."""
    pipe, default = hunyuan
    session = dh.apply(pipe, dynamic, phase=phase, record_maps=True) if dynamic is not None else None
    hooks = [pipe.transformer.register_forward_pre_hook(lambda *a: before())] if before else []
    hooks += [pipe.transformer.register_forward_hook(lambda m, a, out: after(out))] if after else []
    try:
        return pipe(PROMPT if dynamic else PROMPT.replace("{", "").replace("}", ""), negative_prompt=NEGATIVE,
                    true_cfg_scale=2.0, prompt_template=template or default, height=32, width=48, num_frames=5,
                    num_inference_steps=2, max_sequence_length=16, output_type="latent",
                    generator=torch.Generator().manual_seed(0)).frames, session
    finally:
        [h.remove() for h in hooks]
        dh.remove(pipe)


def explicit_bent(entry, columns, calls):
    """dispatch_attention_fn for the blocks' joint calls ([b, L, heads, d], a [b, 1, 1, L] key mask): at the conditional
    model calls (the first of each step), the video × word-key block bent, rows renormalised over all keys."""
    spec = bending.BendSpec.from_dict({**entry, "renormalize": "none"})
    n_video = F_ * H * W

    def attend(query, key, value, attn_mask=None, **kwargs):
        q, k, v = (t.transpose(1, 2).float() for t in (query, key, value))
        logits = (q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5).masked_fill(~attn_mask, float("-inf"))
        probs = torch.softmax(logits, dim=-1)
        if len(calls) % 2 == 1:                                   # the prompt's call, not the negative's
            n_text = int(attn_mask[0].sum()) - n_video
            block = probs[:, :, :n_video, n_video:n_video + n_text]
            probs = probs.clone()
            probs[:, :, :n_video, n_video:n_video + n_text] = bending.bend_probs(
                block.reshape(-1, n_video, n_text), columns, (H, W), [spec], frames=F_).view(block.shape)
            probs[:, :, :n_video] /= probs[:, :, :n_video].sum(-1, keepdim=True)
        return (probs @ v).transpose(1, 2).to(query.dtype)

    return attend


def test_every_bent_call_is_the_explicit_bent_softmax(hunyuan, monkeypatch):
    plain, _ = run(hunyuan)
    seen = []
    bent, session = run(hunyuan, {"bending": [ENTRY]}, before=lambda: seen.append(
        (hunyuan[0]._ckptbend_session.call.step, hunyuan[0]._ckptbend_session.call.cond_rows)))
    assert seen == [(0, [0]), (0, []), (1, [0]), (1, [])]
    assert sorted({m["layer"] for m in session.maps}) == [0, 1, 2, 3] and len(session.maps) == 8   # 2 double, 2 single
    calls = []
    monkeypatch.setattr(th, "dispatch_attention_fn", explicit_bent(ENTRY, session.token_indices, calls))
    expected, _ = run(hunyuan, before=lambda: calls.append(1))
    torch.testing.assert_close(bent, expected, rtol=1e-4, atol=1e-5)
    assert (bent - plain).abs().max() > 1e-3


def test_strength_zero_outside_the_window_phase_1_and_the_negative_call_are_bit_identical(hunyuan):
    plain, _ = run(hunyuan)
    assert torch.equal(run(hunyuan, {"bending": [{**ENTRY, "strength": 0.0}]})[0], plain)
    assert torch.equal(run(hunyuan, {"bending": [{**ENTRY, "apply_to_timesteps": [2, 3]}]})[0], plain)
    looked, session = run(hunyuan, {"bending": [ENTRY]}, phase=1)            # the maps only
    assert torch.equal(looked, plain) and len(session.maps) == 8
    outputs = {}
    for name, dynamic in (("plain", None), ("bent", {"bending": [ENTRY]})):
        found = outputs.setdefault(name, [])
        run(hunyuan, dynamic, after=lambda out: found.append(out[0]))
    assert torch.equal(outputs["plain"][1], outputs["bent"][1])         # step 0's negative: the same inputs
    assert not torch.equal(outputs["plain"][0], outputs["bent"][0])


@pytest.mark.parametrize("shift", [0, 3])
def test_words_are_found_in_the_llama_tokens_the_pipeline_keeps(hunyuan, shift):
    """The ids the pipeline's Llama received, less crop_start: the word's columns hold its pieces. shift: a template
    whose crop_start keeps 3 of the template's own tokens before the prompt (they shift the word's columns)."""
    pipe, template = hunyuan
    template = {**template, "crop_start": template["crop_start"] - shift}
    received = []
    hook = pipe.text_encoder.register_forward_pre_hook(lambda m, a, k: received.append(k["input_ids"][0]),
                                                      with_kwargs=True)
    try:
        _, session = run(hunyuan, {"bending": [{**ENTRY, "strength": 0.0}]}, template=template)
    finally:
        hook.remove()
    kept = received[0][template["crop_start"]:].tolist()
    columns = session.token_indices["sunset"]
    assert columns[0] > shift and pipe.tokenizer.decode([kept[j] for j in columns]).strip() == "sunset"
    before = pipe.tokenizer.decode(kept[:columns[0]])
    assert before == "a cat at" if shift == 0 else before.endswith("\n\na cat at") and len(before) > len("\n\na cat at")


def test_image_to_video_columns_follow_the_image_tokens(hunyuan):
    """HunyuanVideoImageToVideoPipeline: its own _get_llama_prompt_embeds (image tokens expanded, the prompt cropped
    around the assistant header) run with a text encoder that returns each token's id, so its output says which
    token sits at each column: the image's every-other token first, then the prompt; the word's columns hold it."""
    tokenizer = hunyuan[0].tokenizer
    base = i2v.DEFAULT_PROMPT_TEMPLATE
    template = {**base, "crop_start": crop_of(tokenizer, base["template"]), "image_emb_start": 5, "image_emb_end": 13,
                "image_emb_len": 8}
    image_token = tokenizer.convert_tokens_to_ids("<image>")

    class IdEncoder(torch.nn.Module):
        config = types.SimpleNamespace(image_token_index=image_token, pad_token_id=tokenizer.pad_token_id)

        def forward(self, input_ids, pixel_values=None, output_hidden_states=True, **kwargs):
            return types.SimpleNamespace(hidden_states=[input_ids.float()[..., None]] * 3)

    pipe = object.__new__(HunyuanVideoImageToVideoPipeline)
    vars(pipe).update(tokenizer=tokenizer, text_encoder=IdEncoder(),
                      image_processor=lambda image, return_tensors: types.SimpleNamespace(pixel_values=torch.zeros(1)))
    prompt = "a cat at sunset"
    embeds, mask = pipe._get_llama_prompt_embeds(None, prompt, template, device="cpu", dtype=torch.float32,
                                                 max_sequence_length=16)
    session = types.SimpleNamespace(pipe=pipe, entries=[bending.BendSpec.from_dict(ENTRY)])
    columns = hunyuan10.columns(session, {"prompt": prompt, "prompt_template": template, "max_sequence_length": 16})
    ids = embeds[0, :, 0].long().tolist()
    assert ids[:4] == [image_token] * 4                                     # 8 image tokens, every other one kept
    assert columns["sunset"][0] > 4 and tokenizer.decode([ids[j] for j in columns["sunset"]]).strip() == "sunset"
    assert tokenizer.decode(ids[4:columns["sunset"][0]]) == "a cat at"
