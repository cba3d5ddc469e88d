"""Attention Bending on LTX-2 in the diffusers host: diffusers' own LTX2VideoTransformer3DModel (a video and an audio
stream, each with self-attention, a text cross-attention and audio↔video cross-attentions; gated attention on),
tiny and seeded, with LTX2Pipeline's CFG batch [uncond; cond].

Only the video stream's text cross-attention (attn2) is bent: its video queries against the word's text keys. The
audio stream's text cross-attention (audio_attn2) has no image grid to transform a map on and is left as the model
computes it, as are the audio↔video attentions; the audio prediction still changes, through the bent video tokens
the video-to-audio attention reads. The reference is the model's processors with their attention call replaced by an
explicit softmax whose video × text block (conditional item only) is bent by bending.bend_probs, rows renormalised."""

import types

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, LTX2VideoTransformer3DModel
from diffusers.models.transformers import transformer_ltx2

import comfy_standin_joint as cj
from ckptbend.runtime import bending
from ckptbend.runtime import diffusers_host as dh

CONFIG = dict(in_channels=8, out_channels=8, num_attention_heads=2, attention_head_dim=8, cross_attention_dim=16,
              audio_in_channels=8, audio_out_channels=8, audio_num_attention_heads=2, audio_attention_head_dim=8,
              audio_cross_attention_dim=16, num_layers=2, caption_channels=16, gated_attn=True)
F_, H, W, AUDIO, TEXT = 2, 2, 3, 5, 8
N_VIDEO = F_ * H * W
COLUMNS = {"sunset": [2, 3]}
ENTRY = {"token": "sunset", "mode": "translate", "translate_x": 0.5}

pytestmark = pytest.mark.usefixtures("one_thread_no_grad")


@pytest.fixture(scope="module")
def ltx2():
    model = cj.seeded_transformer(LTX2VideoTransformer3DModel, CONFIG, 43)
    g = torch.Generator().manual_seed(8)
    text = torch.randn(2, TEXT, 16, generator=g)
    inputs = dict(hidden_states=torch.randn(1, N_VIDEO, 8, generator=g).expand(2, -1, -1),
                  audio_hidden_states=torch.randn(1, AUDIO, 8, generator=g).expand(2, -1, -1),
                  encoder_hidden_states=text, audio_encoder_hidden_states=text,
                  encoder_attention_mask=torch.zeros(2, TEXT), audio_encoder_attention_mask=torch.zeros(2, TEXT),
                  num_frames=F_, height=H, width=W, audio_num_frames=AUDIO, return_dict=False)
    scheduler = FlowMatchEulerDiscreteScheduler()
    scheduler.set_timesteps(2)
    return model, inputs, types.SimpleNamespace(transformer=model, scheduler=scheduler)


def sample(ltx2, step=0, dynamic=None):
    """(video, audio) predictions of the CFG batch [uncond; cond] at the step."""
    model, inputs, pipe = ltx2
    if dynamic is not None:
        session = dh.apply(pipe, dynamic)
        session.token_indices, session.prompt_embeds = COLUMNS, inputs["encoder_hidden_states"][1:]
    try:
        return model(**inputs, timestep=pipe.scheduler.timesteps[step:step + 1].expand(2))
    finally:
        dh.remove(pipe)


def explicit_bent(entry):
    spec = bending.BendSpec.from_dict({**entry, "renormalize": "none"})

    def attend(query, key, value, attn_mask=None, **kwargs):
        q, k, v = (t.transpose(1, 2).float() for t in (query, key, value))
        logits = q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5
        probs = torch.softmax(logits if attn_mask is None else logits + attn_mask.float(), dim=-1)
        if q.shape[2] == N_VIDEO and k.shape[2] == TEXT:          # the video stream's text cross-attention
            probs = probs.clone()
            probs[1] = bending.bend_probs(probs[1].contiguous(), COLUMNS, (H, W), [spec], frames=F_)
            probs[1] /= probs[1].sum(-1, keepdim=True)
        return (probs @ v).transpose(1, 2).to(query.dtype)

    return attend


def test_every_bent_call_is_the_explicit_bent_softmax(ltx2, monkeypatch):
    plain_video, plain_audio = sample(ltx2)
    video, audio = sample(ltx2, dynamic={"bending": [ENTRY]})
    monkeypatch.setattr(transformer_ltx2, "dispatch_attention_fn", explicit_bent(ENTRY))
    expected_video, expected_audio = sample(ltx2)
    torch.testing.assert_close(video, expected_video, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(audio, expected_audio, rtol=1e-4, atol=1e-5)
    assert (video[1] - plain_video[1]).abs().max() > 1e-3                      # the conditional video bends
    assert torch.equal(video[0], plain_video[0]) and torch.equal(audio[0], plain_audio[0])   # the negative not
    assert (audio[1] - plain_audio[1]).abs().max() > 0                         # the audio follows the video


def test_strength_zero_and_outside_the_step_window_are_bit_identical(ltx2):
    plain = sample(ltx2, step=1)
    for entry in ({**ENTRY, "strength": 0.0}, {**ENTRY, "apply_to_timesteps": [0, 0]}):
        assert all(torch.equal(a, b) for a, b in zip(sample(ltx2, 1, {"bending": [entry]}), plain))


def test_words_count_from_the_first_valid_token():
    """LTX2Pipeline left-pads the stripped prompt; the text connector moves the valid tokens to the front (its
    learnable registers fill the rest), so a word's columns count from the prompt's first token. Without registers
    the offset would differ per prompt: refused in one line."""
    import comfy_standin_qwen as cq

    tokenizer = cq.qwen_tokenizer()
    connectors = types.SimpleNamespace(video_connector=types.SimpleNamespace(learnable_registers=torch.zeros(1)))
    pipe = types.SimpleNamespace(tokenizer=tokenizer, connectors=connectors)
    session = types.SimpleNamespace(pipe=pipe, joint=None, single=None, family=None,
                                    entries=[bending.as_spec(ENTRY)])
    found = dh.prompts._locate(session, {"prompt": "  a romantic kiss at sunset "})
    pieces = tokenizer.convert_ids_to_tokens(tokenizer("a romantic kiss at sunset")["input_ids"])
    assert [pieces[j] for j in found["sunset"]] == ["Ġsun", "set"]
    connectors.video_connector.learnable_registers = None
    with pytest.raises(ValueError, match="learnable registers"):
        dh.prompts._locate(session, {"prompt": "a romantic kiss at sunset"})
