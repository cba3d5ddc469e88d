"""The stand-in ComfyUI host (comfy_standin.py) for HunyuanVideo 1.5: a real tiny diffusers
HunyuanVideo15Transformer3DModel run the way ComfyUI's comfy/ldm/hunyuan_video/model.py runs it. ComfyUI 0.3.64, the
newest runnable here, has no HunyuanVideo 1.5, and the source index holds no Comfy-Org copy of that file: this
follows a copy of it kept in another public repository (its forward_orig with the ByT5 and meanflow branches), read,
not run:

- HunyuanModel: ComfyUI's BaseModel (flow matching, CONST: denoised = x − σ·v; timestep 1000·σ). The latent
  [B, C, F, H, W] (patch 1) gives the video tokens; the text is txt_in (the token refiner) of the Qwen2.5-VL prompt
  tokens, then byt5_in of the ByT5 glyph tokens appended: txt = [prompt; glyphs]. `.diffusion_model` has ComfyUI's
  face: `double_blocks`, `single_blocks` (none in 1.5), `txt_in.individual_token_refiner`, `byt5_in`, `patch_size`.
  Each block runs behind patches_replace["dit"][("double_block", i)] with {"img", "txt", "vec", "pe",
  "attention_mask", "modulation_dims_img", "modulation_dims_txt", "transformer_options"}.
- HunyuanHookedAttention: Flux's double block with flipped_img_txt: q, k, v of both streams, per-head RMS norms,
  joint [image; text], RoPE (the text's ids are 0, so only the image turns), then comfy's optimized_attention(q, k,
  v, heads, skip_reshape=True, mask=attention_mask, transformer_options=…) with [B, heads, L, d]. The mask is
  [1, 1, L] (0, or −max on padded prompt keys) when the conditioning has a text mask.
"""

from __future__ import annotations

import torch
from torch import nn

import comfy_standin as cs
import comfy_standin_joint as cj

CONFIG = dict(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=16, num_layers=2,
              num_refiner_layers=1, text_embed_dim=16, text_embed_2_dim=8, image_embed_dim=8, rope_axes_dim=(4, 6, 6))


def tiny_hunyuan15(seed: int = 41):
    from diffusers.models.transformers.transformer_hunyuan_video15 import HunyuanVideo15Transformer3DModel

    return cj.seeded_transformer(HunyuanVideo15Transformer3DModel, CONFIG, seed)


class HunyuanHookedAttention:
    def __init__(self, model: "HunyuanModel", layer: int):
        self.model, self.layer = model, layer

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None):
        from diffusers.models.embeddings import apply_rotary_emb

        def heads(x, proj, norm=None):
            y = proj(x).unflatten(2, (attn.heads, -1))
            return y if norm is None else norm(y)

        q = apply_rotary_emb(heads(hidden_states, attn.to_q, attn.norm_q), image_rotary_emb, sequence_dim=1)
        k = apply_rotary_emb(heads(hidden_states, attn.to_k, attn.norm_k), image_rotary_emb, sequence_dim=1)
        c = encoder_hidden_states
        q = torch.cat([q, heads(c, attn.add_q_proj, attn.norm_added_q)], 1).transpose(1, 2)
        k = torch.cat([k, heads(c, attn.add_k_proj, attn.norm_added_k)], 1).transpose(1, 2)
        v = torch.cat([heads(hidden_states, attn.to_v), heads(c, attn.add_v_proj)], 1).transpose(1, 2)
        options = self.model.block_options
        out = cs.BACKEND.optimized_attention(q, k, v, attn.heads, skip_reshape=True, mask=self.model.block_mask,
                                             transformer_options=options)
        self.model._note(self.layer, "joint", q, k, v, out, options)
        n = hidden_states.shape[1]
        return attn.to_out[1](attn.to_out[0](out[:, :n])), attn.to_add_out(out[:, n:])


class HunyuanModel(cj.JointFlowModel):
    def __init__(self, transformer, shift: float = 7.0, glyphs: torch.Tensor | None = None):
        super().__init__(transformer, shift)
        self.glyphs = glyphs                      # the ByT5 tokens of the conditioning, [1, n, 8], or None
        dm = self.diffusion_model
        dm.double_blocks, dm.single_blocks = transformer.transformer_blocks, nn.ModuleList()
        dm.txt_in = nn.Module()
        dm.txt_in.individual_token_refiner = transformer.context_embedder.token_refiner
        dm.byt5_in, dm.patch_size = transformer.context_embedder_2, [1, 1, 1]
        for i, block in enumerate(transformer.transformer_blocks):
            block.attn.set_processor(HunyuanHookedAttention(self, i))

    def _velocity(self, x, sigma, context, attention_mask=None):
        tf, b = self.transformer, x.shape[0]
        t = sigma * 1000
        rotary = tf.rope(x)
        vec = tf.time_embed(t)
        img = tf.x_embedder(x)
        txt = tf.context_embedder(context, t, attention_mask)
        if self.glyphs is not None:
            txt = torch.cat([txt, tf.context_embedder_2(self.glyphs.expand(b, -1, -1))], 1)
        mask = None
        if attention_mask is not None:                 # the prompt's mask on the text keys, as forward_orig makes it
            mask = torch.zeros(1, 1, img.shape[1] + txt.shape[1])
            keep = torch.cat([attention_mask[:1].float(), torch.ones(1, txt.shape[1] - context.shape[1])], 1)
            mask[:, 0, img.shape[1]:] = (keep - 1) * torch.finfo(mask.dtype).max
        for i, block in enumerate(tf.transformer_blocks):
            def original(args, block=block):
                self.block_options, self.block_mask = args["transformer_options"], args["attention_mask"]
                img, txt = block(args["img"], args["txt"], args["vec"], None, args["pe"])
                return {"img": img, "txt": txt}

            args = {"img": img, "txt": txt, "vec": vec, "pe": rotary, "attention_mask": mask,
                    "modulation_dims_img": None, "modulation_dims_txt": None, "transformer_options": self.options}
            out = self._run_block(("double_block", i), args, original)
            img, txt = out["img"], out["txt"]
        img = tf.proj_out(tf.norm_out(img, vec))
        _, c, f, h, w = x.shape
        return img.view(b, f, h, w, c).permute(0, 4, 1, 2, 3)
