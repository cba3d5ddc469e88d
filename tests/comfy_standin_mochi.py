"""The stand-in ComfyUI host (comfy_standin.py) for Mochi: a real tiny diffusers MochiTransformer3DModel run the way
ComfyUI 0.3.64's comfy/ldm/genmo/joint_model/asymm_models_joint.py runs it (AsymmDiTJoint):

- MochiModel: ComfyUI's BaseModel for Mochi (flow matching, CONST). Its extra conds are the T5 attention_mask and
  num_tokens (model_base.GenmoMochi: the mask's sum, a CONDConstant, so ComfyUI batches a positive and a negative only
  when their num_tokens agree). Each block runs behind patches_replace["dit"][("double_block", i)] with {"img",
  "txt", "vec", "rope_cos", "rope_sin", "num_tokens", "transformer_options"}; `.diffusion_model` has AsymmDiTJoint's
  face: `blocks`, `t5_yproj`, `patch_size`.
- MochiHookedAttention: AsymmetricAttention.forward: per-head RMS qk norms, RoPE on the video q and k, then the joint
  [video; text[:num_tokens]] (every batch item cropped alike: no mask) handed to comfy's optimized_attention(q, k, v,
  heads, skip_reshape=True, transformer_options=…) with [B, heads, L, d] → [B, L, heads·d]; the text output is padded
  with zeros back to the full T5 length before its projection.
"""

from __future__ import annotations

import torch

import comfy_standin as cs
import comfy_standin_joint as cj

CONFIG = dict(patch_size=2, num_attention_heads=2, attention_head_dim=8, num_layers=2, pooled_projection_dim=16,
              in_channels=4, text_embed_dim=16, time_embed_dim=16, max_sequence_length=16)


def tiny_mochi(seed: int = 41):
    """A tiny MochiTransformer3DModel (2 blocks, 2 heads × 8) with seeded weights; larger gates, so the attention's
    output shows in the prediction."""
    from diffusers import MochiTransformer3DModel

    model = cj.seeded_transformer(MochiTransformer3DModel, CONFIG, seed)
    for name, p in model.named_parameters():
        if "norm1" in name:
            p.data *= 4
    return model


def _rotate(x, cos, sin):
    """Mochi's RoPE on interleaved pairs (x[2i], x[2i+1]), x [B, L, heads, d], cos / sin [L, heads, d/2]."""
    even, odd = x[..., 0::2].float(), x[..., 1::2].float()
    return torch.stack([even * cos - odd * sin, even * sin + odd * cos], -1).flatten(-2).to(x.dtype)


class MochiHookedAttention:
    def __init__(self, model: "MochiModel", layer: int):
        self.model, self.layer = model, layer

    def __call__(self, attn, hidden_states, encoder_hidden_states, attention_mask=None, image_rotary_emb=None):
        def heads(x, proj, norm=None):
            y = proj(x).unflatten(2, (attn.heads, -1))
            return y if norm is None else norm(y)

        q, k = heads(hidden_states, attn.to_q, attn.norm_q), heads(hidden_states, attn.to_k, attn.norm_k)
        v = heads(hidden_states, attn.to_v)
        q, k = _rotate(q, *image_rotary_emb), _rotate(k, *image_rotary_emb)
        crop, n_video, n_text = self.model.block_num_tokens, hidden_states.shape[1], encoder_hidden_states.shape[1]
        text = [heads(encoder_hidden_states, proj, norm)[:, :crop] for proj, norm in
                ((attn.add_q_proj, attn.norm_added_q), (attn.add_k_proj, attn.norm_added_k), (attn.add_v_proj, None))]
        q, k, v = (torch.cat([a, b], 1).transpose(1, 2) for a, b in zip((q, k, v), text))
        options = self.model.block_options
        out = cs.BACKEND.optimized_attention(q, k, v, attn.heads, skip_reshape=True, transformer_options=options)
        self.model._note(self.layer, "joint", q, k, v, out, options)
        video, words = out[:, :n_video], out[:, n_video:]
        padded = words.new_zeros(words.shape[0], n_text, words.shape[-1])
        padded[:, :words.shape[1]] = words
        video = attn.to_out[1](attn.to_out[0](video))
        return video, (attn.to_add_out(padded) if hasattr(attn, "to_add_out") else padded)


class MochiModel(cj.JointFlowModel):
    def __init__(self, transformer, shift: float = 6.0):
        super().__init__(transformer, shift)
        dm = self.diffusion_model
        dm.blocks, dm.t5_yproj = transformer.transformer_blocks, transformer.time_embed.caption_proj
        self.block_num_tokens = None
        for i, block in enumerate(transformer.transformer_blocks):
            block.attn1.processor = MochiHookedAttention(self, i)       # MochiAttention has no set_processor
            block.forward = self._block(block.forward, i)

    def _block(self, inner, index):
        def forward(hidden_states, encoder_hidden_states, temb, encoder_attention_mask, image_rotary_emb=None):
            def original(args):
                self.block_options, self.block_num_tokens = args["transformer_options"], args["num_tokens"]
                img, txt = inner(args["img"], args["txt"], args["vec"], None, (args["rope_cos"], args["rope_sin"]))
                return {"img": img, "txt": txt}

            args = {"img": hidden_states, "txt": encoder_hidden_states, "vec": temb, "rope_cos": image_rotary_emb[0],
                    "rope_sin": image_rotary_emb[1], "num_tokens": self.num_tokens, "transformer_options": self.options}
            out = self._run_block(("double_block", index), args, original)
            return out["img"], out["txt"]

        return forward

    def _velocity(self, x, sigma, context, attention_mask, num_tokens):
        assert bool((num_tokens == num_tokens[0]).all())        # CONDConstant: ComfyUI batches equal ones only
        self.num_tokens = int(num_tokens[0])
        try:
            return -self.transformer(x, context, (1 - sigma) * 1000, attention_mask).sample
        finally:
            self.num_tokens = None


def conditioning(context, valid: int) -> list[dict]:
    """A Mochi conditioning entry: the T5 context, its mask (the first `valid` tokens) and num_tokens as
    model_base.GenmoMochi.extra_conds derives it."""
    mask = (torch.arange(context.shape[1]) < valid).long()[None]
    return [{"c_crossattn": context, "attention_mask": mask, "num_tokens": torch.tensor([max(1, valid)])}]
