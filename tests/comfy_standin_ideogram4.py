"""The stand-in ComfyUI host (comfy_standin.py) for Ideogram 4: a real tiny diffusers Ideogram4Transformer2DModel run
the way the newest readable ComfyUI source's comfy/ldm/ideogram4/model.py (commit ca686606aed6) runs its
Ideogram4Transformer2DModel (ComfyUI 0.3.64, the newest runnable here, has no Ideogram 4; this follows the source as
read, not a run):

- Ideogram4Model: ComfyUI's BaseModel (flow matching, CONST: denoised = x − σ·v). The latent [B, C, gh, gw] is already
  2×2-packed: each of its gh·gw positions is one image token (C = 2·2·channels). The packed sequence is [text; image]:
  the text rows carry the context's Qwen3-VL features, the image rows the tokens, position ids (i, i, i) for text
  token i and (0, h, w) + 65536 for the image. `.diffusion_model` has ComfyUI's face: `layers`, `llm_cond_proj`,
  `embed_image_indicator`, `patch_size` = 2. Its loop registers no "dit" replace and writes no block_index: every
  block gets the call's transformer_options as they are.
- Ideogram4HookedAttention: each block's attention as ComfyUI's Ideogram4Attention computes it: q, k, v, per-head RMS
  norms, the multi-axis RoPE, then comfy's optimized_attention_masked(q, k, v, heads, attn_mask, skip_reshape=True,
  transformer_options=…) on [B, heads, L, d] → [B, L, heads·d], the output projection. attn_mask is None unless the
  conditioning has an attention_mask (`text_mask` here, 1 = token, 0 = padding): then ComfyUI's block-diagonal mask
  [B, 1, L, L] (padding attends to padding only) as additive floats (0 / −max). Calls are recorded with their block
  index (the model's own count, which ComfyUI does not pass).
- Ideogram4CLIP: ComfyUI's Ideogram4Tokenizer ("<|im_start|>user\\n{}<|im_end|>\\n<|im_start|>assistant\\n", weights
  disabled) with the tiny Qwen2 BPE of comfy_standin_qwen; its encoder keeps every token.
A call without a context runs ComfyUI's image-only sequence (no text tokens, no mask).
"""

from __future__ import annotations

import torch

import comfy_standin as cs
import comfy_standin_joint as cj
import comfy_standin_qwen as cq

CONFIG = dict(in_channels=16, num_layers=2, attention_head_dim=16, num_attention_heads=2, intermediate_size=32,
              adaln_dim=16, llm_features_dim=24, mrope_section=(4, 2, 2))
TEMPLATE = "<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n"
IMAGE_OFFSET = 65536


def tiny_ideogram4(seed: int = 43):
    from diffusers import Ideogram4Transformer2DModel

    return cj.seeded_transformer(Ideogram4Transformer2DModel, CONFIG, seed)


def _rotate_half(x):
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class Ideogram4HookedAttention:
    def __init__(self, model: "Ideogram4Model", layer: int):
        self.model, self.layer = model, layer

    def __call__(self, attn, hidden_states, attention_mask=None, image_rotary_emb=None):
        q = attn.norm_q(attn.to_q(hidden_states).unflatten(-1, (attn.num_heads, attn.head_dim)))
        k = attn.norm_k(attn.to_k(hidden_states).unflatten(-1, (attn.num_heads, attn.head_dim)))
        v = attn.to_v(hidden_states).unflatten(-1, (attn.num_heads, attn.head_dim))
        cos, sin = (t.unsqueeze(2) for t in image_rotary_emb)
        q, k = (t * cos + _rotate_half(t) * sin for t in (q, k))
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))                     # [B, heads, L, d]
        options = self.model.options
        out = cs.BACKEND.optimized_attention_masked(q, k, v, attn.num_heads, self.model.block_mask, skip_reshape=True,
                                                    transformer_options=options)
        self.model._note(self.layer, "joint", q, k, v, out, options)
        return attn.to_out[0](out)


class Ideogram4Model(cj.JointFlowModel):
    def __init__(self, transformer, shift: float = 3.0):
        super().__init__(transformer, shift)
        dm = self.diffusion_model
        dm.layers, dm.llm_cond_proj = transformer.layers, transformer.llm_cond_proj
        dm.embed_image_indicator = transformer.embed_image_indicator
        for i, block in enumerate(transformer.layers):
            block.attention.set_processor(Ideogram4HookedAttention(self, i))

    def _velocity(self, x, sigma, context, text_mask=None):
        b, c, gh, gw = x.shape
        if context is None:             # ComfyUI's image-only pass (no text context): [image] alone
            context = x.new_zeros(b, 0, CONFIG["llm_features_dim"])
        n_text, n_image = context.shape[1], gh * gw
        tokens = x.view(b, c // 4, 2, 2, gh, gw).permute(0, 4, 5, 2, 3, 1).reshape(b, n_image, c)
        image = torch.cat([x.new_zeros(b, n_text, c), tokens], 1)
        text = torch.cat([context, context.new_zeros(b, n_image, context.shape[2])], 1)
        rows, cols = torch.meshgrid(torch.arange(gh), torch.arange(gw), indexing="ij")
        ids = torch.cat([torch.arange(n_text)[:, None].expand(-1, 3),
                         torch.stack([torch.zeros_like(rows), rows, cols], -1).reshape(-1, 3) + IMAGE_OFFSET])
        segments = torch.ones(b, n_text + n_image, dtype=torch.long)
        indicator = torch.cat([torch.full((b, n_text), 3), torch.full((b, n_image), 2)], 1)
        if text_mask is not None:                       # ComfyUI: padding its own segment, marked as neither role
            pad = torch.cat([text_mask == 0, torch.zeros(b, n_image, dtype=torch.bool)], 1)
            segments[pad], indicator[pad] = -1, 0
            same = segments[:, :, None] == segments[:, None, :]
            self.block_mask = torch.zeros(same.shape, dtype=x.dtype).masked_fill_(~same, -torch.finfo(x.dtype).max)
            self.block_mask = self.block_mask[:, None]
        v = self.transformer(image, 1 - sigma, text, ids[None].expand(b, -1, -1), segments, indicator).sample
        v = v[:, n_text:].reshape(b, gh, gw, 2, 2, c // 4).permute(0, 5, 3, 4, 1, 2).reshape(b, c, gh, gw)
        return -v


class Ideogram4CLIP:
    key = "qwen3vl_8b"

    def __init__(self):
        self.tokenizer = cq.qwen_tokenizer()

    def tokenize(self, text):
        return {self.key: [[(i, 1.0) for i in self.tokenizer(TEMPLATE.format(text))["input_ids"]]]}
