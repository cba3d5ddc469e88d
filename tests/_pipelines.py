"""Tiny real diffusers pipelines shared by test modules: real classes, random seeded weights, a CLIP
tokenizer written here (nothing is downloaded)."""

import json

import torch
from diffusers import (AutoencoderKL, AutoencoderKLWan, DDIMScheduler, FlowMatchEulerDiscreteScheduler,
                       StableDiffusionPipeline, UNet2DConditionModel, WanImageToVideoPipeline, WanPipeline,
                       WanTransformer3DModel)
from transformers import (CLIPTextConfig, CLIPTextModel, CLIPTokenizer, PreTrainedTokenizerFast, T5Config,
                          T5EncoderModel)

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


# --- T5 and Wan 2.1 -------------------------------------------------------------------------------

WAN_CONFIG = dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=16, out_channels=16,
                  text_dim=32, freq_dim=256, ffn_dim=32, num_layers=2, cross_attn_norm=True,
                  qk_norm="rms_norm_across_heads", rope_max_seq_len=32)


def t5_like_tokenizer():
    """A word-level `tokenizers` tokenizer ending in </s>, in PreTrainedTokenizerFast (T5's conventions:
    no BOS, pad 0); the pipelines only call it."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, **{w: i + 3 for i, w in enumerate(WORDS)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="</s>",
                                   unk_token="<unk>", model_max_length=16)


def t5_sentencepiece_tokenizer():
    """T5's SentencePiece conventions offline (a Unigram model behind a Metaspace pre-tokenizer, </s> at the
    end): a word at the start or after a space carries "▁" ("▁sunset", one piece), the same word right
    after punctuation does not and splits ("s", "un", "set"), as T5's and UMT5's real tokenizers do."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    words = ["▁a", "▁kiss", "▁sunset", "▁at", "▁dusk", "▁over", "▁lake"]
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), *((w, -1.0) for w in words), ("un", -5.0), ("set", -5.0),
              *((c, -10.0) for c in "▁abcdefghijklmnopqrstuvwxyz,.\"()")]
    backend = Tokenizer(models.Unigram(pieces, unk_id=2))
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    backend.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="</s>",
                                   unk_token="<unk>", model_max_length=32)


def t5_encoder(tokenizer):
    return T5EncoderModel(T5Config(vocab_size=len(tokenizer), d_model=32, d_kv=8, d_ff=37, num_layers=2,
                                   num_heads=4, relative_attention_num_buckets=8)).eval()


def wan_pipeline(seed: int = 5, tokenizer=None):
    """Wan 2.1 (the original Attention Bending's model): video latents of 2 frames × 8×8, patch 1×2×2,
    q/k RMS norms across heads, CFG as two model calls. tokenizer: T5-style, word-level by default."""
    tokenizer = tokenizer or t5_like_tokenizer()
    torch.manual_seed(seed)
    transformer = WanTransformer3DModel(**WAN_CONFIG).eval()
    vae = AutoencoderKLWan(base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                           temperal_downsample=[False, True, True])
    pipe = WanPipeline(tokenizer=tokenizer, text_encoder=t5_encoder(tokenizer), vae=vae, transformer=transformer,
                       scheduler=FlowMatchEulerDiscreteScheduler(shift=7.0))
    pipe.set_progress_bar_config(disable=True)
    return pipe




def wan22_ti2v_pipeline(seed: int = 5):
    """Wan 2.2 TI2V-5B's image-to-video mode: diffusers' WanImageToVideoPipeline with expand_timesteps
    (no CLIP image encoder; the first latent frame is the encoded image, and the model gets a timestep per
    token, 0 for the first frame's tokens and t for the rest)."""
    base = wan_pipeline(seed)
    pipe = WanImageToVideoPipeline(**{k: v for k, v in base.components.items() if k != "transformer_2"},
                                   image_encoder=None, image_processor=None, expand_timesteps=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def wan22_i2v_pipeline(seeds=(5, 7), boundary_ratio=0.9):
    """Wan 2.2 I2V A14B's layout: WanImageToVideoPipeline with two experts whose input is the noisy latents,
    a 4-channel frame mask and the encoded image (16 + 4 + 16 = 36 channels), no CLIP image encoder
    (0.9: A14B I2V's boundary ratio)."""
    experts = []
    for seed in seeds:
        torch.manual_seed(seed)
        experts.append(WanTransformer3DModel(**{**WAN_CONFIG, "in_channels": 36}).eval())
    base = wan_pipeline(seeds[0])
    parts = {k: v for k, v in base.components.items() if k not in ("transformer", "transformer_2")}
    pipe = WanImageToVideoPipeline(**parts, transformer=experts[0], transformer_2=experts[1], image_encoder=None,
                                   image_processor=None, boundary_ratio=boundary_ratio)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def wan22_pipeline(seeds=(5, 7), boundary_ratio=0.875):
    """Wan 2.2 T2V A14B's layout: wan_pipeline with a second expert of the same config, `transformer`
    (high noise) for timesteps ≥ boundary_ratio · 1000 and `transformer_2` (low noise) below (0.875:
    A14B T2V's ratio; at shift 7, 4 steps run 1000, 934 high and 781, 47 low)."""
    base = wan_pipeline(seeds[0])
    torch.manual_seed(seeds[1])
    low = WanTransformer3DModel(**WAN_CONFIG).eval()
    pipe = WanPipeline(**{**base.components, "transformer_2": low}, boundary_ratio=boundary_ratio)
    pipe.set_progress_bar_config(disable=True)
    return pipe
