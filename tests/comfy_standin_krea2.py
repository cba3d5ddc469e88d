"""The stand-in ComfyUI host (comfy_standin.py) for Krea 2: a real tiny diffusers Krea2Transformer2DModel run the way
the newest readable ComfyUI source's comfy/ldm/krea2/model.py (commit 08381b1a9d03) runs its SingleStreamDiT (ComfyUI
0.3.64, the newest runnable here, has no Krea 2; this follows the source as read, not a run):

- Krea2Model: ComfyUI's BaseModel (flow matching, CONST: denoised = x − σ·v). The latent [B, C, H, W] is cut into 2×2
  patches, row-major, channels (c, ph, pw). The context is [B, seq, layers·dim] (the text encoder's stacked layers,
  flattened), unpacked to [B, seq, layers, dim]. `.diffusion_model` has ComfyUI's face: `blocks`, `txtfusion`,
  `patch` = 2. Its loop registers no "dit" replace and writes no block_index: every block gets the call's
  transformer_options as they are.
- Krea2HookedAttention: every attention of the model (the text-fusion blocks' too: ComfyUI hands them the same
  transformer_options) as ComfyUI's Attention.forward computes it: q, k, v, per-head (1 + w) RMS norms, RoPE, the
  key/value heads repeated to the query heads, then comfy's optimized_attention_masked(q, k, v, heads, mask=None,
  skip_reshape=True, transformer_options=…) on [B, heads, L, d] → [B, L, heads·d], the sigmoid gate, the output
  projection. ComfyUI passes no mask to the text fusion nor to the blocks. The main blocks' joint [text; image]
  calls are recorded with their block index (the model's own count, which ComfyUI does not pass).
- Krea2CLIP: ComfyUI's Krea2Tokenizer (Qwen-Image's system template, no weights) with the tiny Qwen2 BPE of
  comfy_standin_qwen; its encoder keeps the tokens from the second <|im_start|> past "user\\n", as Qwen-Image's.
"""

from __future__ import annotations

import torch

import comfy_standin as cs
import comfy_standin_joint as cj
import comfy_standin_qwen as cq

CONFIG = dict(in_channels=16, num_layers=2, attention_head_dim=16, num_attention_heads=2, num_key_value_heads=1,
              intermediate_size=32, timestep_embed_dim=16, text_hidden_dim=16, num_text_layers=3,
              text_num_attention_heads=2, text_num_key_value_heads=2, text_intermediate_size=32,
              num_layerwise_text_blocks=1, num_refiner_text_blocks=1, axes_dims_rope=(4, 6, 6))
TEXT_LAYERS, TEXT_DIM = 3, 16


def tiny_krea2(seed: int = 41):
    """A tiny Krea2Transformer2DModel with seeded random weights; its q/k norms' zero-centred weights w act as (1 + w),
    so they are drawn from [0.5, 2): the scales seeded_transformer gives other families."""
    from diffusers import Krea2Transformer2DModel

    model = cj.seeded_transformer(Krea2Transformer2DModel, CONFIG, seed)
    for name, p in model.named_parameters():
        if name.endswith(("norm_q.weight", "norm_k.weight")):
            p.data.sub_(1.0)
    return model


class Krea2HookedAttention:
    def __init__(self, model: "Krea2Model", layer):
        self.model, self.layer = model, layer          # layer: the main block's index, None in the text fusion

    def __call__(self, attn, hidden_states, attention_mask=None, image_rotary_emb=None):
        from diffusers.models.transformers.transformer_krea2 import apply_rotary_emb

        q = attn.norm_q(attn.to_q(hidden_states).unflatten(-1, (attn.num_heads, attn.head_dim)))
        k = attn.norm_k(attn.to_k(hidden_states).unflatten(-1, (attn.num_kv_heads, attn.head_dim)))
        v = attn.to_v(hidden_states).unflatten(-1, (attn.num_kv_heads, attn.head_dim))
        if image_rotary_emb is not None:
            q, k = (apply_rotary_emb(t, image_rotary_emb, sequence_dim=1) for t in (q, k))
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))                     # [B, heads, L, d]
        groups = attn.num_heads // attn.num_kv_heads
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
        options = self.model.options
        out = cs.BACKEND.optimized_attention_masked(q, k, v, attn.num_heads, mask=None, skip_reshape=True,
                                                    transformer_options=options)
        self.model._note(self.layer, "joint" if self.layer is not None else "text", q, k, v, out, options)
        return attn.to_out[0](out * torch.sigmoid(attn.to_gate(hidden_states)))


class Krea2Model(cj.JointFlowModel):
    def __init__(self, transformer, shift: float = 3.0):
        super().__init__(transformer, shift)
        dm = self.diffusion_model
        dm.blocks, dm.txtfusion, dm.patch = transformer.transformer_blocks, transformer.text_fusion, 2
        fusion = transformer.text_fusion
        for block in [*fusion.layerwise_blocks, *fusion.refiner_blocks]:
            block.attn.set_processor(Krea2HookedAttention(self, None))
        for i, block in enumerate(transformer.transformer_blocks):
            block.attn.set_processor(Krea2HookedAttention(self, i))

    def _note(self, layer, kind, q, k, v, out, options):
        if kind == "joint":
            super()._note(layer, kind, q, k, v, out, options)
        else:
            self.log.append((layer, kind, tuple(q.shape), tuple(k.shape)))

    def _velocity(self, x, sigma, context):
        b, _, h, w = x.shape
        text = context.view(b, context.shape[1], TEXT_LAYERS, TEXT_DIM)
        ids = torch.cat([torch.zeros(context.shape[1], 3), cj.image_ids(h // 2, w // 2)])
        v = self.transformer(cj.pack(x), text, sigma, ids).sample
        return cj.unpack(v, h, w)


class Krea2CLIP:
    key = "qwen3vl_4b"

    def __init__(self):
        self.tokenizer = cq.qwen_tokenizer()

    def tokenize(self, text):
        return {self.key: [[(i, 1.0) for i in self.tokenizer(cq.TEMPLATE.format(text))["input_ids"]]]}
