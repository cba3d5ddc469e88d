"""The stand-in ComfyUI host (comfy_standin.py) for Kandinsky 5: a real tiny diffusers Kandinsky5Transformer3DModel run
the way ComfyUI's comfy/ldm/kandinsky5/model.py runs it (not in ComfyUI 0.3.64, the newest runnable here; read in the
newest ComfyUI source, not run):

- KandinskyModel: ComfyUI's BaseModel (flow matching, CONST; timestep 1000·σ). The latent [B, C, F, H, W] is moved
  channels-last and patched (1, 2, 2); the visual tokens are flattened in raster order (ComfyUI has no fractal
  order). The text is the Qwen2.5-VL context through the text blocks (their attention outside any block replace),
  then every visual block runs behind patches_replace["dit"][("double_block", i)] with {"x", "context",
  "time_embed", "freqs", "transformer_options"}. `.diffusion_model` has ComfyUI's face: `visual_transformer_blocks`,
  `text_transformer_blocks`, `patch_size`.
- KandinskyHookedAttention: the attention's q, k, v (per-head RMS norms; RoPE on self-attention only) handed to
  comfy's optimized_attention(q, k, v, heads, skip_reshape=True, transformer_options=…) with [B, heads, L, d]: in a
  visual block, call 0 is the self-attention and call 1 the visual→text cross-attention.
"""

from __future__ import annotations

import torch
from torch import nn

import comfy_standin as cs
import comfy_standin_joint as cj

POOLED = 20


def tiny_kandinsky5(seed: int = 43):
    from diffusers.models.transformers.transformer_kandinsky import Kandinsky5Transformer3DModel
    from ckptbend.synth import kandinsky5 as K

    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = Kandinsky5Transformer3DModel(**K.CONFIGS["kandinsky5"])
        for name, p in model.named_parameters():
            if name.endswith(("query_norm.weight", "key_norm.weight")):
                p.data.uniform_(1.0, 1.5)
            elif "modulation" in name:         # zero-initialised: every block's gate would be 0
                p.data.normal_(0.0, 0.2)
    return model.eval()


class KandinskyHookedAttention:
    def __init__(self, model: "KandinskyModel", layer: int | None, kind: str):
        self.model, self.layer, self.kind = model, layer, kind

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, rotary_emb=None, sparse_params=None):
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states

        def heads(x, proj, norm=None):
            y = proj(x).unflatten(-1, (attn.num_heads, -1))
            return y if norm is None else norm(y.float()).type_as(y)

        q, k = heads(hidden_states, attn.to_query, attn.query_norm), heads(context, attn.to_key, attn.key_norm)
        v = heads(context, attn.to_value)
        if rotary_emb is not None:
            q, k = (((rotary_emb * t.unflatten(-1, (-1, 1, 2)).float()).sum(-1)).flatten(-2).type_as(t) for t in (q, k))
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        options = self.model.block_options if self.layer is not None else self.model.options
        out = cs.BACKEND.optimized_attention(q, k, v, attn.num_heads, skip_reshape=True, transformer_options=options)
        if self.layer is not None:
            self.model._note(self.layer, self.kind, q, k, v, out, options)
        return attn.out_layer(out)


class KandinskyModel(cj.JointFlowModel):
    def __init__(self, transformer, shift: float = 5.0):
        super().__init__(transformer, shift)
        dm = self.diffusion_model
        dm.visual_transformer_blocks = transformer.visual_transformer_blocks
        dm.text_transformer_blocks = transformer.text_transformer_blocks
        dm.patch_size = tuple(transformer.config.patch_size)
        for block in transformer.text_transformer_blocks:
            block.self_attention.set_processor(KandinskyHookedAttention(self, None, "text"))
        for i, block in enumerate(transformer.visual_transformer_blocks):
            block.self_attention.set_processor(KandinskyHookedAttention(self, i, "self"))
            block.cross_attention.set_processor(KandinskyHookedAttention(self, i, "cross"))

    def _velocity(self, x, sigma, context):
        tf, b = self.transformer, x.shape[0]
        time = tf.time_embeddings(sigma * 1000) + tf.pooled_text_embeddings(torch.zeros(b, POOLED))
        text = tf.text_embeddings(context)
        text_rope = tf.text_rope_embeddings(torch.arange(context.shape[1])).unsqueeze(0)
        for block in tf.text_transformer_blocks:
            text = block(text, time, text_rope)
        visual = tf.visual_embeddings(x.movedim(1, -1))
        shape = visual.shape[:-1]
        rope = tf.visual_rope_embeddings(shape, [torch.arange(n) for n in shape[1:]], (1.0, 1.0, 1.0))
        visual, rope = visual.flatten(1, 3), rope.flatten(1, 3)
        for i, block in enumerate(tf.visual_transformer_blocks):
            def original(args, block=block):
                self.block_options = args["transformer_options"]
                return {"x": block(args["x"], args["context"], args["time_embed"], args["freqs"], None)}

            args = {"x": visual, "context": text, "time_embed": time, "freqs": rope,
                    "transformer_options": self.options}
            visual = self._run_block(("double_block", i), args, original)["x"]
        out = tf.out_layer(visual.reshape(*shape, -1), text, time)
        return out.movedim(-1, 1)
