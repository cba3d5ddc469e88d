"""The stand-in ComfyUI host (comfy_standin.py) for Flux.2: a real tiny diffusers Flux2Transformer2DModel run the
way ComfyUI runs Flux.2 (comfy/ldm/flux: Flux's double and single blocks with shared "global" modulations, the
diffusion model marked by `double_stream_modulation_img`). ComfyUI 0.3.64, the newest runnable here, has no Flux.2;
this follows Flux.1's path in that ComfyUI (shared/docs on ComfyUI's DiT hooks) and the newer source's
`double_stream_modulation_*` attributes, read, not run:

- Flux2Model: FluxModel's BaseModel (comfy_standin_joint) around Flux2Transformer2DModel: blocks behind
  patches_replace["dit"][("double_block", i)] ({"img", "txt", "vec", "pe", "attn_mask", "transformer_options"})
  and ("single_block", i) (the joint [text; image] tokens as "img").
- Double blocks: comfy_standin_joint.FluxHookedAttention (Flux's joint attention; Flux.2's has no biases).
- Flux2SingleHookedAttention: the single blocks' fused projection split into q, k, v and the MLP input, per-head
  norms, RoPE, comfy's optimized_attention(q, k, v, heads, skip_reshape=True, mask=…, transformer_options=…), then
  the output projected with the MLP branch.
- The text is the Mistral 3 (Flux.2) or Qwen3 (Klein) tokens of ComfyUI's chat template, all of them, [text; image].
"""

from __future__ import annotations

import torch

import comfy_standin as cs
import comfy_standin_joint as cj

CONFIG = dict(in_channels=8, num_layers=2, num_single_layers=2, attention_head_dim=8, num_attention_heads=2,
              joint_attention_dim=16, timestep_guidance_channels=16, axes_dims_rope=(2, 2, 2, 2))
LATENT_CHANNELS = 2                              # in_channels = channels × 2 × 2
MISTRAL_TEMPLATE = ("[SYSTEM_PROMPT]You are an AI that reasons about image descriptions.[/SYSTEM_PROMPT]"
                    "[INST]{}[/INST]")           # ComfyUI's Flux2Tokenizer form (its system prompt abridged)


def tiny_flux2(seed: int = 23):
    from diffusers import Flux2Transformer2DModel

    return cj.seeded_transformer(Flux2Transformer2DModel, CONFIG, seed)


class Flux2SingleHookedAttention:
    def __init__(self, model: "Flux2Model", layer: int):
        self.model, self.layer = model, layer

    def __call__(self, attn, hidden_states, attention_mask=None, image_rotary_emb=None):
        from diffusers.models.embeddings import apply_rotary_emb

        fused = attn.to_qkv_mlp_proj(hidden_states)
        qkv, mlp = fused.split([3 * attn.inner_dim, fused.shape[-1] - 3 * attn.inner_dim], dim=-1)
        q, k, v = (t.unflatten(-1, (-1, attn.head_dim)) for t in qkv.chunk(3, dim=-1))
        q = apply_rotary_emb(attn.norm_q(q), image_rotary_emb, sequence_dim=1)
        k = apply_rotary_emb(attn.norm_k(k), image_rotary_emb, sequence_dim=1)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        options = self.model.block_options
        out = cs.BACKEND.optimized_attention(q, k, v, attn.heads, skip_reshape=True, mask=self.model.block_mask,
                                             transformer_options=options)
        self.model._note(self.layer, "joint", q, k, v, out, options)
        return attn.to_out(torch.cat([out, attn.mlp_act_fn(mlp)], dim=-1))


class Flux2Model(cj.JointFlowModel):
    def __init__(self, transformer, shift: float = 3.0):
        super().__init__(transformer, shift)
        dm = self.diffusion_model
        dm.double_blocks, dm.single_blocks = transformer.transformer_blocks, transformer.single_transformer_blocks
        dm.double_stream_modulation_img = transformer.double_stream_modulation_img
        n = len(transformer.transformer_blocks)
        for i, block in enumerate(transformer.transformer_blocks):
            block.attn.set_processor(cj.FluxHookedAttention(self, i))
            block.forward = self._double_block(block.forward, i)
        for i, block in enumerate(transformer.single_transformer_blocks):
            block.attn.set_processor(Flux2SingleHookedAttention(self, n + i))
            block.forward = self._single_block(block.forward, i)

    def _double_block(self, inner, index):
        def forward(hidden_states, encoder_hidden_states, temb_mod_img, temb_mod_txt, image_rotary_emb=None,
                    joint_attention_kwargs=None):
            def original(args):
                self.block_options, self.block_mask = args["transformer_options"], args["attn_mask"]
                txt, img = inner(args["img"], args["txt"], *args["vec"], args["pe"])
                return {"img": img, "txt": txt}

            args = {"img": hidden_states, "txt": encoder_hidden_states, "vec": (temb_mod_img, temb_mod_txt),
                    "pe": image_rotary_emb, "attn_mask": None, "transformer_options": self.options}
            out = self._run_block(("double_block", index), args, original)
            return out["txt"], out["img"]

        return forward

    def _single_block(self, inner, index):
        def forward(hidden_states, encoder_hidden_states=None, temb_mod=None, image_rotary_emb=None,
                    joint_attention_kwargs=None, **kwargs):
            def original(args):
                self.block_options, self.block_mask = args["transformer_options"], args["attn_mask"]
                return {"img": inner(args["img"], None, args["vec"], args["pe"])}

            args = {"img": hidden_states, "vec": temb_mod, "pe": image_rotary_emb, "attn_mask": None,
                    "transformer_options": self.options}
            return self._run_block(("single_block", index), args, original)["img"]

        return forward

    def _velocity(self, x, sigma, context):
        b, _, h, w = x.shape
        ids = torch.zeros(h // 2 * (w // 2), 4)
        ids[:, 1], ids[:, 2] = torch.arange(h // 2).repeat_interleave(w // 2), torch.arange(w // 2).repeat(h // 2)
        text_ids = torch.zeros(context.shape[1], 4)
        text_ids[:, 3] = torch.arange(context.shape[1])
        v = self.transformer(hidden_states=cj.pack(x), encoder_hidden_states=context, timestep=sigma, img_ids=ids,
                             txt_ids=text_ids, guidance=torch.full((b,), 3.5)).sample
        return cj.unpack(v, h, w)


class MistralCLIP:
    """ComfyUI's Flux.2 CLIP object, only tokenize(): Mistral 3's chat template, a start token, weights disabled,
    no padding for one prompt (a byte-level BPE tokenizer stands in for Tekken)."""

    key = "mistral3_24b"

    def __init__(self):
        import comfy_standin_qwen as cq

        self.tokenizer = cq.qwen_tokenizer()

    def tokenize(self, text):
        ids = [1] + self.tokenizer(MISTRAL_TEMPLATE.format(text))["input_ids"]
        return {self.key: [[(i, 1.0) for i in ids]]}
