"""The stand-in ComfyUI host (comfy_standin.py) for Z-Image: a real tiny diffusers ZImageTransformer2DModel run the
way the newest ComfyUI source's comfy/ldm/lumina/model.py (NextDiT) runs it. ComfyUI 0.3.64, the newest runnable
here, has no Z-Image; this follows the source as read, not a run:

- ZImageModel: ComfyUI's BaseModel for Z-Image (flow matching, CONST: denoised = x − σ·v; the model's time input is
  1 − σ, scaled by 1000). `.diffusion_model` has NextDiT's face: `layers`, `context_refiner`, `noise_refiner`,
  `cap_embedder`, `patch_size` = 2, `pad_tokens_multiple` = 32.
- The token order is ComfyUI's, not diffusers': [text; image]. The text (cap_embedder of the context) is padded with
  cap_pad_token to a multiple of 32, the 2×2 patches (row-major) with x_pad_token; RoPE ids: text (1 + i, 0, 0),
  image (text length + 1, row, col). The refiners run first (noise_refiner on the image, context_refiner on the
  text), then the main `layers` over the joint tokens: before each, transformer_options["block_index"] = i and
  ["block_type"] = "double" are written (ComfyUI's loop has no "dit" block replace); no mask.
- NextDiTHookedAttention: q, k, v, per-head RMS norms, RoPE, then comfy's optimized_attention_masked(q, k, v,
  heads, None, skip_reshape=True, transformer_options=…) with [B, heads, L, d] (ComfyUI hands
  AttentionTensorContainers that its wrap_attn unwraps before an override without container_function is called)
  → [B, L, heads·d], then out.
  Every attention call, refiners included, carries transformer_options.
"""

from __future__ import annotations

import torch

import comfy_standin as cs
import comfy_standin_joint as cj

ZIMAGE_CONFIG = dict(all_patch_size=(2,), all_f_patch_size=(1,), in_channels=4, dim=32, n_layers=2,
                     n_refiner_layers=1, n_heads=2, n_kv_heads=2, cap_feat_dim=16, axes_dims=[4, 6, 6],
                     axes_lens=[128, 16, 16])
LATENT_CHANNELS, MULTIPLE = 4, 32


def tiny_zimage(seed: int = 29):
    from diffusers import ZImageTransformer2DModel

    return cj.seeded_transformer(ZImageTransformer2DModel, ZIMAGE_CONFIG, seed)


def _rope(x, freqs):
    pairs = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))
    return torch.view_as_real(pairs * freqs.unsqueeze(2)).flatten(3).type_as(x)


class NextDiTHookedAttention:
    def __init__(self, model: "ZImageModel", layer: str):
        self.model, self.layer = model, layer

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, freqs_cis=None):
        q, k, v = (p(hidden_states).unflatten(-1, (attn.heads, -1)) for p in (attn.to_q, attn.to_k, attn.to_v))
        q, k = _rope(attn.norm_q(q), freqs_cis), _rope(attn.norm_k(k), freqs_cis)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        options = self.model.options
        out = cs.BACKEND.optimized_attention_masked(q, k, v, attn.heads, None, skip_reshape=True,
                                                    transformer_options=options)
        self.model._note(self.model.main if self.layer == "layers" else self.layer, "joint", q, k, v, out, options)
        return attn.to_out[0](out)


def _padded(tokens, pad_token, multiple):
    if not multiple:                                  # Lumina 2: no padding
        return tokens
    extra = (-tokens.shape[1]) % multiple
    return torch.cat([tokens, pad_token.to(tokens.dtype).expand(tokens.shape[0], extra, -1)], 1)


class ZImageModel(cj.JointFlowModel):
    """ComfyUI's BaseModel for Z-Image around a diffusers ZImageTransformer2DModel (module docstring); with
    multiple=None, Lumina 2's NextDiT as ComfyUI runs it (the same loop, no padding: pad_tokens_multiple None);
    block_index=False: ComfyUI 0.3.64's loop, which writes neither block_index nor block_type."""

    def __init__(self, transformer, shift: float = 3.0, multiple: int | None = MULTIPLE, block_index: bool = True):
        super().__init__(transformer, shift)
        self.block_index, self.main = block_index, None
        dm = self.diffusion_model
        for name in ("layers", "context_refiner", "noise_refiner", "cap_embedder"):
            setattr(dm, name, getattr(transformer, name))
        dm.pad_tokens_multiple = self.multiple = multiple      # None: Lumina 2's NextDiT (no padding)
        for name in ("layers", "context_refiner", "noise_refiner"):
            for block in getattr(transformer, name):
                block.attention.set_processor(NextDiTHookedAttention(self, name))

    def _velocity(self, x, sigma, context):
        tf, options = self.transformer, self.options
        b, c, h, w = x.shape
        rows, cols = h // 2, w // 2
        adaln = tf.t_embedder((1 - sigma) * tf.t_scale)
        text = _padded(tf.cap_embedder(context), tf.cap_pad_token, self.multiple)
        n_text = text.shape[1]
        image = x.view(b, c, rows, 2, cols, 2).permute(0, 2, 4, 3, 5, 1).reshape(b, rows * cols, 4 * c)
        image = _padded(tf.all_x_embedder["2-1"](image), tf.x_pad_token, self.multiple)
        ids = torch.zeros(n_text + image.shape[1], 3, dtype=torch.long)
        ids[:n_text, 0] = torch.arange(n_text) + 1
        ids[n_text:n_text + rows * cols] = torch.stack([torch.full((rows * cols,), n_text + 1),
                                                        torch.arange(rows).repeat_interleave(cols),
                                                        torch.arange(cols).repeat(rows)], 1)
        freqs = tf.rope_embedder(ids)[None].expand(b, -1, -1)
        for layer in tf.noise_refiner:
            image = layer(image, None, freqs[:, n_text:], adaln)
        for layer in tf.context_refiner:
            text = layer(text, None, freqs[:, :n_text])
        joint = torch.cat([text, image], 1)
        if self.block_index:
            options["total_blocks"] = len(tf.layers)
            options["block_type"] = "double"
        for i, layer in enumerate(tf.layers):
            self.main = i
            if self.block_index:
                options["block_index"] = i
            joint = layer(joint, None, freqs, adaln)
        out = tf.all_final_layer["2-1"](joint, c=adaln)[:, n_text:n_text + rows * cols]
        out = out.view(b, rows, cols, 2, 2, c).permute(0, 5, 1, 3, 2, 4).reshape(b, c, h, w)
        return -out
