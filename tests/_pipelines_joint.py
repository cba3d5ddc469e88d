"""Tiny real diffusers pipelines for the joint-attention DiTs (random seeded weights, tokenizers written
here, nothing downloaded); their transformers are the stand-in host's (comfy_standin_joint), so both
hosts run the same weights."""

import torch
from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, StableDiffusion3Pipeline
from transformers import CLIPTextModel, CLIPTextModelWithProjection, T5Config, T5EncoderModel

import comfy_standin_joint as cj
import comfy_standin_qwen as cq
from _pipelines import clip_text_config, t5_encoder, t5_like_tokenizer, tiny_vae, write_clip_tokenizer


def flux_pipeline(tmp_path, seed: int = 11):
    """FluxPipeline: CLIP-L (pooled vector only) and T5 (the joint attention's text) encoders."""
    clip_tokenizer = write_clip_tokenizer(tmp_path / "clip")
    t5_tokenizer = t5_like_tokenizer()
    with torch.random.fork_rng():            # seeded encoders: the same prompt embeddings in every run
        torch.manual_seed(seed)
        pipe = FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=tiny_vae(),
                            text_encoder=CLIPTextModel(clip_text_config(clip_tokenizer)).eval(),
                            tokenizer=clip_tokenizer, text_encoder_2=t5_encoder(t5_tokenizer), tokenizer_2=t5_tokenizer,
                            transformer=cj.tiny_flux(seed))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def sd3_pipeline(tmp_path, seed: int = 13):
    """StableDiffusion3Pipeline: CLIP-L and CLIP-G (77 tokens, as ComfyUI's, widths 32 + 32 zero-padded
    to T5's 64), then T5 tokens; the CLIP tokenizer's folder is tmp_path / "clip" (the stand-in's CLIP
    reads the same one)."""
    clip_tokenizer = write_clip_tokenizer(tmp_path / "clip", max_length=77)
    t5_tokenizer = t5_like_tokenizer()
    with torch.random.fork_rng():            # seeded encoders: the same prompt embeddings in every run
        torch.manual_seed(seed)
        t5 = T5EncoderModel(T5Config(vocab_size=len(t5_tokenizer), d_model=64, d_kv=16, d_ff=37, num_layers=2,
                                     num_heads=4, relative_attention_num_buckets=8)).eval()
        encoders = [CLIPTextModelWithProjection(clip_text_config(clip_tokenizer)).eval() for _ in range(2)]
        pipe = StableDiffusion3Pipeline(
            scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=tiny_vae(), text_encoder=encoders[0],
            tokenizer=clip_tokenizer, text_encoder_2=encoders[1], tokenizer_2=clip_tokenizer, text_encoder_3=t5,
            tokenizer_3=t5_tokenizer, transformer=cj.tiny_sd3(seed))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def qwen_pipeline(seed: int = 17):
    """QwenImagePipeline: a tiny Qwen2.5-VL text encoder (32 wide, Qwen2.5's vocabulary size so its special ids
    exist) with comfy_standin_qwen's tokenizer, a tiny Qwen-Image VAE, and the stand-in host's transformer."""
    from diffusers import AutoencoderKLQwenImage, QwenImagePipeline
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    text = dict(vocab_size=cq.VOCAB_SIZE, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                rope_scaling={"type": "mrope", "mrope_section": [1, 1, 2]})
    vision = dict(depth=1, hidden_size=16, intermediate_size=16, num_heads=2, out_hidden_size=32,
                  fullatt_block_indexes=[0])
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        encoder = Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(
            text_config=text, vision_config=vision, vocab_size=cq.VOCAB_SIZE, hidden_size=32)).eval()
        vae = AutoencoderKLQwenImage(base_dim=4, z_dim=4, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                                     temperal_downsample=[False, True, True])
    pipe = QwenImagePipeline(scheduler=FlowMatchEulerDiscreteScheduler(shift=1.15), vae=vae, text_encoder=encoder,
                             tokenizer=cq.qwen_tokenizer(), transformer=cq.tiny_qwen(seed))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def chroma_pipeline(seed: int = 19):
    """ChromaPipeline: T5 only (its tokens are the joint attention's text); the pipeline pads the prompt and
    masks all padding but the first pad token."""
    from diffusers import ChromaPipeline

    t5_tokenizer = t5_like_tokenizer()
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        pipe = ChromaPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=tiny_vae(),
                              text_encoder=t5_encoder(t5_tokenizer), tokenizer=t5_tokenizer,
                              transformer=cj.tiny_chroma(seed))
    pipe.set_progress_bar_config(disable=True)
    return pipe
