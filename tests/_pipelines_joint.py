"""Tiny real diffusers pipelines for the joint-attention DiTs (random seeded weights, tokenizers written
here, nothing downloaded); their transformers are the stand-in host's (comfy_standin_joint), so both
hosts run the same weights."""

from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, StableDiffusion3Pipeline
from transformers import CLIPTextModel, CLIPTextModelWithProjection, T5Config, T5EncoderModel

import comfy_standin_joint as cj
from _pipelines import clip_text_config, t5_encoder, t5_like_tokenizer, tiny_vae, write_clip_tokenizer


def flux_pipeline(tmp_path, seed: int = 11):
    """FluxPipeline: CLIP-L (pooled vector only) and T5 (the joint attention's text) encoders."""
    clip_tokenizer = write_clip_tokenizer(tmp_path / "clip")
    t5_tokenizer = t5_like_tokenizer()
    pipe = FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=tiny_vae(),
                        text_encoder=CLIPTextModel(clip_text_config(clip_tokenizer)).eval(), tokenizer=clip_tokenizer,
                        text_encoder_2=t5_encoder(t5_tokenizer), tokenizer_2=t5_tokenizer,
                        transformer=cj.tiny_flux(seed))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def sd3_pipeline(tmp_path, seed: int = 13):
    """StableDiffusion3Pipeline: CLIP-L and CLIP-G (77 tokens, as ComfyUI's, widths 32 + 32 zero-padded
    to T5's 64), then T5 tokens; the CLIP tokenizer's folder is tmp_path / "clip" (the stand-in's CLIP
    reads the same one)."""
    clip_tokenizer = write_clip_tokenizer(tmp_path / "clip", max_length=77)
    t5_tokenizer = t5_like_tokenizer()
    t5 = T5EncoderModel(T5Config(vocab_size=len(t5_tokenizer), d_model=64, d_kv=16, d_ff=37, num_layers=2,
                                 num_heads=4, relative_attention_num_buckets=8)).eval()
    encoders = [CLIPTextModelWithProjection(clip_text_config(clip_tokenizer)).eval() for _ in range(2)]
    pipe = StableDiffusion3Pipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=tiny_vae(), text_encoder=encoders[0],
        tokenizer=clip_tokenizer, text_encoder_2=encoders[1], tokenizer_2=clip_tokenizer, text_encoder_3=t5,
        tokenizer_3=t5_tokenizer, transformer=cj.tiny_sd3(seed))
    pipe.set_progress_bar_config(disable=True)
    return pipe
