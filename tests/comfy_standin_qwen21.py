"""The stand-in ComfyUI host (comfy_standin.py) for Qwen-Image 2.x: a real tiny diffusers QwenImage21Transformer2DModel
run the way the newest ComfyUI source's comfy/ldm/qwen_image21/model.py runs it (ComfyUI 0.3.64, the newest runnable
here, has no Qwen-Image 2.x; this follows the source as read, not a run):

- Qwen21Model: ComfyUI's BaseModel (flow matching, CONST: denoised = x − σ·v; the model's time input is σ). The
  latent [B, C, H, W] is not patched: its H·W tokens follow the text, [text; target image]. `.diffusion_model` has
  ComfyUI's face: `transformer_blocks`, `txt_in`, `modulation`. Before each block its loop writes
  transformer_options["block_index"] = i and ["block_type"] = "single" (no "dit" replace is registered by the node:
  one would switch off ComfyUI's prefix cache).
- Qwen21HookedAttention: q, k, v, per-head RMS norms and RoPE as diffusers forms them, then ComfyUI's
  block_causal_attention: one comfy optimized_attention(q, k, v, heads, mask=…, transformer_options=…) call per
  segment with [B, L, heads·d] inputs: the text's queries against the text keys under a causal (lower-triangular)
  mask, then the target image's queries against every key, no mask (ComfyUI passes no text mask). ComfyUI's prefix
  cache makes the second call from step 2 on with the same shapes (the cached text keys first), so it is not run.
- Qwen21CLIP: the Qwen3-VL tokenizer's text-to-image template (system turn, user turn, assistant), no weights; the
  encoder keeps the tokens from the second <|im_start|>.
"""

from __future__ import annotations

import torch

import comfy_standin as cs
import comfy_standin_joint as cj
import comfy_standin_qwen as cq

CONFIG = dict(patch_size=1, in_channels=8, out_channels=8, num_layers=2, attention_head_dim=16,
              num_attention_heads=2, context_in_dim=16, axes_dims_rope=(4, 6, 6))
TEMPLATE = ("<|im_start|>system\nDescribe the image.<|im_end|>\n<|im_start|>user\n{}<|im_end|>\n"
            "<|im_start|>assistant\n")


def tiny_qwen21(seed: int = 37):
    from diffusers.models.transformers.transformer_qwenimage21 import QwenImage21Transformer2DModel

    return cj.seeded_transformer(QwenImage21Transformer2DModel, CONFIG, seed)


def _rope(x, freqs):
    pairs = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))
    return torch.view_as_real(pairs * freqs.unsqueeze(1)).flatten(3).type_as(x)


class Qwen21HookedAttention:
    def __init__(self, model: "Qwen21Model"):
        self.model = model

    def __call__(self, attn, hidden_states, attention_mask=None, rotary_emb=None, segments=None, **kwargs):
        d = attn.inner_dim // attn.heads
        q, k, v = (p(hidden_states).unflatten(-1, (-1, d)) for p in (attn.to_q, attn.to_k, attn.to_v))
        q, k = _rope(attn.norm_q(q).to(v.dtype), rotary_emb), _rope(attn.norm_k(k).to(v.dtype), rotary_emb)
        q, k, v = q.flatten(2), k.flatten(2), v.flatten(2)
        prefix = segments[-1][1]
        options, outs = self.model.options, []
        for start, end, _ in segments:                                    # the text: causal
            causal = torch.ones(end - start, end, dtype=torch.bool).tril(start)
            outs.append(cs.BACKEND.optimized_attention(q[:, start:end], k[:, :end], v[:, :end], attn.heads, mask=causal,
                                                       transformer_options=options))
        out = cs.BACKEND.optimized_attention(q[:, prefix:], k, v, attn.heads, transformer_options=options)
        self.model._note(options["block_index"], "joint", q[:, prefix:], k, v, out, options)
        return attn.to_out[1](attn.to_out[0](torch.cat(outs + [out], 1)))


class Qwen21Model(cj.JointFlowModel):
    def __init__(self, transformer, shift: float = 3.0):
        super().__init__(transformer, shift)
        dm = self.diffusion_model
        for name in ("transformer_blocks", "txt_in", "modulation"):
            setattr(dm, name, getattr(transformer, name))
        for i, block in enumerate(transformer.transformer_blocks):
            block.attn.set_processor(Qwen21HookedAttention(self))
            block.forward = self._block(block.forward, i)

    def _block(self, inner, index):
        def forward(*args, **kwargs):
            self.options["block_type"], self.options["block_index"] = "single", index
            return inner(*args, **kwargs)

        return forward

    def _velocity(self, x, sigma, context):
        b, c, h, w = x.shape
        n_text = context.shape[1]
        img_mask = torch.tensor([[False] * n_text + [True] * (h * w // 4)]).expand(b, -1)
        v = self.transformer(hidden_states=x.flatten(2).transpose(1, 2), encoder_hidden_states=context,
                             timestep=sigma, img_shapes=[[(1, h, w)]] * b, img_mask=img_mask).sample
        return v[:, -h * w:].transpose(1, 2).reshape(b, c, h, w)         # the output spans the text too


class Qwen21CLIP:
    key = "qwen3vl_8b"

    def __init__(self):
        self.tokenizer = cq.qwen_tokenizer()

    def tokenize(self, text):
        return {self.key: [[(i, 1.0) for i in self.tokenizer(TEMPLATE.format(text))["input_ids"]]]}
