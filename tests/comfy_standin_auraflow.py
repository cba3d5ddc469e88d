"""The stand-in ComfyUI host (comfy_standin.py) for AuraFlow: a real tiny diffusers AuraFlowTransformer2DModel run the
way ComfyUI 0.3.64's comfy/ldm/aura/mmdit.py runs it (MMDiT):

- AuraFlowModel: ComfyUI's BaseModel for AuraFlow (flow matching, CONST). The context is the Pile-T5 tokens behind the
  8 learned register tokens. Each double layer runs behind patches_replace["dit"][("double_block", i)] with {"img",
  "txt", "vec", "transformer_options"} ("txt": [registers; text]); each single layer behind ("single_block", i) with
  the joint [registers; text; image] tokens as "img". `.diffusion_model` has MMDiT's face: `double_layers`,
  `single_layers`, `register_tokens`, `patch_size`.
- AuraHookedAttention: DoubleAttention / SingleAttention.forward: per-head q/k layer norms, the joint [context;
  image] tokens (no RoPE, no mask) handed to comfy's optimized_attention(q, k, v, heads, skip_reshape=True,
  transformer_options=…) with [B, heads, L, d] → [B, L, heads·d].
"""

from __future__ import annotations

import torch

import comfy_standin as cs
import comfy_standin_joint as cj


def tiny_auraflow(seed: int = 47):
    """The tiny AuraFlowTransformer2DModel of ckptbend.synth.auraflow (2 double and 2 single layers, 2 heads × 16)
    with seeded weights."""
    from diffusers import AuraFlowTransformer2DModel
    from ckptbend.synth.auraflow import CONFIGS

    return cj.seeded_transformer(AuraFlowTransformer2DModel, CONFIGS["auraflow"], seed)


class AuraHookedAttention:
    def __init__(self, model: "AuraFlowModel", layer: int):
        self.model, self.layer = model, layer

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, *args, **kwargs):
        def heads(x, proj, norm=None):
            y = proj(x).unflatten(-1, (attn.heads, -1))
            return y if norm is None else norm(y)

        q, k = heads(hidden_states, attn.to_q, attn.norm_q), heads(hidden_states, attn.to_k, attn.norm_k)
        v = heads(hidden_states, attn.to_v)
        n_context = 0
        if encoder_hidden_states is not None:                      # a double layer: [context; image]
            c = encoder_hidden_states
            n_context = c.shape[1]
            q = torch.cat([heads(c, attn.add_q_proj, attn.norm_added_q), q], 1)
            k = torch.cat([heads(c, attn.add_k_proj, attn.norm_added_k), k], 1)
            v = torch.cat([heads(c, attn.add_v_proj), v], 1)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        options = self.model.block_options
        out = cs.BACKEND.optimized_attention(q, k, v, attn.heads, skip_reshape=True, transformer_options=options)
        self.model._note(self.layer, "joint", q, k, v, out, options)
        image = attn.to_out[1](attn.to_out[0](out[:, n_context:]))
        if encoder_hidden_states is None:
            return image
        return image, attn.to_add_out(out[:, :n_context])


class AuraFlowModel(cj.JointFlowModel):
    def __init__(self, transformer, shift: float = 1.73):
        super().__init__(transformer, shift)
        dm = self.diffusion_model
        dm.double_layers, dm.single_layers = transformer.joint_transformer_blocks, transformer.single_transformer_blocks
        dm.register_tokens = transformer.register_tokens
        n = len(dm.double_layers)
        for i, block in enumerate(dm.double_layers):
            block.attn.set_processor(AuraHookedAttention(self, i))
            block.forward = self._double(block.forward, i)
        for i, block in enumerate(dm.single_layers):
            block.attn.set_processor(AuraHookedAttention(self, n + i))
            block.forward = self._single(block.forward, i)

    def _double(self, inner, index):
        def forward(hidden_states, encoder_hidden_states, temb, attention_kwargs=None):
            def original(args):
                self.block_options = args["transformer_options"]
                txt, img = inner(args["img"], args["txt"], args["vec"])
                return {"txt": txt, "img": img}

            args = {"img": hidden_states, "txt": encoder_hidden_states, "vec": temb,
                    "transformer_options": self.options}
            out = self._run_block(("double_block", index), args, original)
            return out["txt"], out["img"]

        return forward

    def _single(self, inner, index):
        def forward(hidden_states, temb, attention_kwargs=None):
            def original(args):
                self.block_options = args["transformer_options"]
                return {"img": inner(args["img"], args["vec"])}

            args = {"img": hidden_states, "vec": temb, "transformer_options": self.options}
            return self._run_block(("single_block", index), args, original)["img"]

        return forward

    def _velocity(self, x, sigma, context):
        return self.transformer(x, context, sigma * 1000).sample
