"""Tiny real diffusers pipelines shared by test modules: real classes, random seeded weights, a CLIP
tokenizer written here (nothing is downloaded)."""

import json

import torch
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

WORDS = ["a", "photo", "of", "romantic", "kiss", "at", "sunset", "cat", "on", "the", "beach", "red", "sky"]
SIZE = 16                        # pixels = latent size (VAE scale factor 1)


def write_clip_tokenizer(folder, max_length=16):
    """A CLIP BPE tokenizer: single letters, and merges that make each of WORDS one token (each word's
    merges grow it from the left; longer words first, so that "at" cannot split "cat")."""
    vocab, merges = {}, []

    def add(token):
        vocab.setdefault(token, len(vocab))

    for token in ("<|startoftext|>", "<|endoftext|>"):
        add(token)
    for c in "abcdefghijklmnopqrstuvwxyz":
        add(c)
        add(c + "</w>")
    for word in sorted(WORDS, key=len, reverse=True):
        parts = list(word[:-1]) + [word[-1] + "</w>"]
        merged = parts[0]
        for part in parts[1:]:
            if f"{merged} {part}" not in merges:
                merges.append(f"{merged} {part}")
            merged += part
            add(merged)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    tokenizer = CLIPTokenizer.from_pretrained(str(folder), model_max_length=max_length)
    assert all(tokenizer.tokenize(w) == [w + "</w>"] for w in WORDS)
    return tokenizer


def clip_text_config(tokenizer, **extra):
    return CLIPTextConfig(bos_token_id=0, eos_token_id=1, pad_token_id=1, hidden_size=32, intermediate_size=37,
                          num_attention_heads=4, num_hidden_layers=2, vocab_size=len(tokenizer),
                          max_position_embeddings=tokenizer.model_max_length, projection_dim=32, **extra)


def tiny_vae():
    return AutoencoderKL(block_out_channels=(32,), in_channels=3, out_channels=3, latent_channels=4,
                         down_block_types=("DownEncoderBlock2D",), up_block_types=("UpDecoderBlock2D",),
                         norm_num_groups=32, sample_size=SIZE)


SCHEDULER_CONFIG = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1,
                        timestep_spacing="leading")


def sd_pipeline(clip_tokenizer):
    """SD 1.x-like: 8 heads everywhere (Slothful's SD 1.x rule), attention at both levels (middle 8×8)."""
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=SIZE, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=8, norm_num_groups=32).eval()
    text_encoder = CLIPTextModel(clip_text_config(clip_tokenizer)).eval()
    scheduler = DDIMScheduler(clip_sample=False, set_alpha_to_one=False, **SCHEDULER_CONFIG)
    pipe = StableDiffusionPipeline(vae=tiny_vae(), text_encoder=text_encoder, tokenizer=clip_tokenizer, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe
