"""Tiny real diffusers pipelines for the joint-attention DiTs (random seeded weights, tokenizers written
here, nothing downloaded); their transformers are the stand-in host's (comfy_standin_joint), so both
hosts run the same weights."""

from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline
from transformers import CLIPTextModel

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
