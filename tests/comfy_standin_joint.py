"""The stand-in ComfyUI host (comfy_standin.py) for joint-attention DiTs: real tiny diffusers transformers
run the way ComfyUI runs Flux.1 (and, below, SD3.5), per shared/docs/comfyui-dit-hooks.md.

- FluxModel: ComfyUI's BaseModel for Flux (flow matching, CONST: the model input is x itself, the timestep
  σ, denoised = x − σ·v; no pooled vector, as ComfyUI's y=None gives zeros). `.diffusion_model` has Flux's
  face: `double_blocks`, `single_blocks`, `patch_size` = 2. The latent [B, C, H, W] is cut into 2×2
  patches in row-major (rows, cols) order, channels (c, ph, pw) as ComfyUI's process_img.
  Each block runs behind ComfyUI's DiT loop hook: patches_replace["dit"][("double_block", i)] gets
  {"img", "txt", "vec", "pe", "attn_mask", "transformer_options"}, ("single_block", i) gets the joint
  [text; image] tokens as "img" and no "txt"; both get {"original_block": f} and return f's dict.
- FluxHookedAttention: FluxAttention computed as flux.math.attention does it: per-head q/k RMS norms,
  [text; image] joint tokens, RoPE applied, then comfy's optimized_attention(q, k, v, heads,
  skip_reshape=True, mask=attn_mask, transformer_options=…) with [B, heads, L, d] inputs → [B, L, heads·d].
  attn_mask is the block's (forward_orig hands every block the call's `attention_mask` cond, cast to the
  model's dtype: [B, L, L] added to the joint logits, e.g. StyleModelApply's attn_bias for Redux); None
  when the conditioning has none.
  With `record` set (a list), every call appends {"layer", "q", "k", "v", "out", "cond_or_uncond"}.
- FluxCLIP: Flux's CLIP object, tokenize() → {"l": CLIP-L tokens, "t5xxl": T5 tokens}.
- ChromaModel: the same around a diffusers ChromaTransformer2DModel (ComfyUI's Chroma differs from Flux in
  modulation only; its single blocks' joint tokens are diffusers' Chroma single blocks' input as they are).
"""

from __future__ import annotations

import torch
from torch import nn

import comfy_standin as cs

FLUX_CONFIG = dict(patch_size=1, in_channels=16, num_layers=2, num_single_layers=2, attention_head_dim=16,
                   num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=(4, 6, 6),
                   guidance_embeds=False)
LATENT_CHANNELS = 4          # FLUX_CONFIG in_channels = channels × 2 × 2


def seeded_transformer(model_class, config: dict, seed: int):
    """A diffusers transformer with seeded random weights (same seed, same weights). Its q/k RMSNorm weights
    are drawn from [1.5, 3): the default 1 gives near-uniform attention, larger ones give the maps structure."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = model_class(**config)
        for name, p in model.named_parameters():
            if name.endswith(("norm_q.weight", "norm_k.weight", "norm_added_q.weight", "norm_added_k.weight")):
                p.data.uniform_(1.5, 3.0)
    return model.eval()


def tiny_flux(seed: int = 11):
    """A tiny FluxTransformer2DModel with seeded random weights."""
    from diffusers import FluxTransformer2DModel

    return seeded_transformer(FluxTransformer2DModel, FLUX_CONFIG, seed)


def pack(x: torch.Tensor) -> torch.Tensor:
    """[B, C, H, W] → [B, (H/2)·(W/2), C·2·2]: 2×2 patches, row-major, channels (c, ph, pw)."""
    b, c, h, w = x.shape
    return x.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), c * 4)


def unpack(tokens: torch.Tensor, h: int, w: int) -> torch.Tensor:
    b, _, c4 = tokens.shape
    c = c4 // 4
    return tokens.view(b, h // 2, w // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, c, h, w)


def image_ids(h: int, w: int) -> torch.Tensor:
    """Flux's image position ids (0, row, col) of an (h, w) token grid."""
    ids = torch.zeros(h, w, 3)
    ids[..., 1] = torch.arange(h)[:, None]
    ids[..., 2] = torch.arange(w)[None, :]
    return ids.reshape(h * w, 3)


class FluxHookedAttention:
    """diffusers' FluxAttention run as ComfyUI's flux.math.attention runs it (module docstring)."""

    def __init__(self, model: "FluxModel", layer: int):
        self.model, self.layer = model, layer

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None):
        from diffusers.models.embeddings import apply_rotary_emb

        def heads(x, proj, norm):
            return norm(proj(x).unflatten(-1, (attn.heads, -1)))              # [B, L, heads, d]

        q, k, v = (heads(hidden_states, attn.to_q, attn.norm_q), heads(hidden_states, attn.to_k, attn.norm_k),
                   heads(hidden_states, attn.to_v, nn.Identity()))
        n_text = 0
        if encoder_hidden_states is not None:                                # double block: [text; image]
            n_text = encoder_hidden_states.shape[1]
            q = torch.cat([heads(encoder_hidden_states, attn.add_q_proj, attn.norm_added_q), q], 1)
            k = torch.cat([heads(encoder_hidden_states, attn.add_k_proj, attn.norm_added_k), k], 1)
            v = torch.cat([heads(encoder_hidden_states, attn.add_v_proj, nn.Identity()), v], 1)
        q, k = (apply_rotary_emb(t, image_rotary_emb, sequence_dim=1) for t in (q, k))
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))                     # [B, heads, L, d]
        options = self.model.block_options
        out = cs.BACKEND.optimized_attention(q, k, v, attn.heads, skip_reshape=True, mask=self.model.block_mask,
                                             transformer_options=options)
        self.model._note(self.layer, "joint", q, k, v, out, options)
        if encoder_hidden_states is None:                                    # single block: no projection
            return out
        text, image = out[:, :n_text], out[:, n_text:]
        return attn.to_out[1](attn.to_out[0](image)), attn.to_add_out(text)


class JointFlowModel:
    """What the Flux and SD3 stand-ins share: ComfyUI's flow-matching BaseModel (shifted schedule, CONST
    prediction) and the DiT loop's block-replace hook."""

    def __init__(self, transformer, shift: float = 3.0):
        self.transformer, self.shift = transformer, shift
        self.attn_precision = None
        self.max_chunks = 8
        self.log, self.record = [], None
        self.options = self.block_options = None
        self.call_mask = self.block_mask = None     # Flux / Chroma: the call's attention_mask, a block's attn_mask
        self.diffusion_model = nn.Module()
        self.diffusion_model.patch_size = 2

    def _run_block(self, key, args, original):
        replace = self.options.get("patches_replace", {}).get("dit", {}).get(key)
        return original(args) if replace is None else replace(args, {"original_block": original})

    def schedule(self, steps: int) -> torch.Tensor:
        t = torch.linspace(1, 0, steps + 1)[:-1]
        return torch.cat([self.shift * t / (1 + (self.shift - 1) * t), torch.zeros(1)])

    def apply_model(self, x, sigma, c_crossattn, transformer_options, **extra_conds):
        return cs.apply_model(self, x, sigma, c_crossattn, transformer_options, **extra_conds)

    def _apply_model(self, x, sigma, c_crossattn, transformer_options, **extra_conds):
        self.options = dict(transformer_options)
        # BaseModel._apply_model casts the extra conds (Flux's attention_mask) to the model's dtype
        extra_conds = {k: c.to(x.dtype) if c.is_floating_point() else c for k, c in extra_conds.items()}
        try:
            v = self._velocity(x, sigma, c_crossattn, **extra_conds)
        finally:
            self.options = self.block_options = self.call_mask = self.block_mask = None
        return x - v * sigma.view(-1, *[1] * (x.ndim - 1)).to(x.dtype)     # 4-D, or Qwen's 5-D

    def _note(self, layer, kind, q, k, v, out, options):
        self.log.append((layer, kind, tuple(q.shape), tuple(k.shape)))
        if self.record is not None:
            self.record.append({"layer": layer, "kind": kind, "q": q, "k": k, "v": v, "out": out,
                                "cond_or_uncond": options.get("cond_or_uncond"), "mask": self.block_mask})


class FluxModel(JointFlowModel):
    """ComfyUI's BaseModel for Flux around a diffusers FluxTransformer2DModel (module docstring)."""

    def __init__(self, transformer, shift: float = 3.0):
        super().__init__(transformer, shift)
        self.diffusion_model.double_blocks = transformer.transformer_blocks
        self.diffusion_model.single_blocks = transformer.single_transformer_blocks
        n = len(transformer.transformer_blocks)
        for i, block in enumerate(transformer.transformer_blocks):
            block.attn.set_processor(FluxHookedAttention(self, i))
            block.forward = self._double_block(block.forward, i)
        for i, block in enumerate(transformer.single_transformer_blocks):
            block.attn.set_processor(FluxHookedAttention(self, n + i))
            block.forward = self._single_block(block.forward, i)

    def _double_block(self, inner, index):
        def forward(hidden_states, encoder_hidden_states, temb, image_rotary_emb=None, joint_attention_kwargs=None,
                    attention_mask=None):                                  # Chroma's blocks take a mask
            def original(args):
                self.block_options, self.block_mask = args["transformer_options"], args["attn_mask"]
                txt, img = inner(args["img"], args["txt"], args["vec"], args["pe"])
                return {"img": img, "txt": txt}

            args = {"img": hidden_states, "txt": encoder_hidden_states, "vec": temb, "pe": image_rotary_emb,
                    "attn_mask": self.call_mask, "transformer_options": self.options}
            out = self._run_block(("double_block", index), args, original)
            return out["txt"], out["img"]

        return forward

    def _single_block(self, inner, index):
        def forward(hidden_states, encoder_hidden_states, temb, image_rotary_emb=None, joint_attention_kwargs=None):
            n_text = encoder_hidden_states.shape[1]

            def original(args):
                self.block_options, self.block_mask = args["transformer_options"], args["attn_mask"]
                joint = args["img"]
                txt, img = inner(joint[:, n_text:], joint[:, :n_text], args["vec"], args["pe"])
                return {"img": torch.cat([txt, img], 1)}

            # ComfyUI's single blocks see the joint [text; image] tokens as "img".
            args = {"img": torch.cat([encoder_hidden_states, hidden_states], 1), "vec": temb,
                    "pe": image_rotary_emb, "attn_mask": self.call_mask, "transformer_options": self.options}
            joint = self._run_block(("single_block", index), args, original)["img"]
            return joint[:, :n_text], joint[:, n_text:]

        return forward

    def _velocity(self, x, sigma, context, attention_mask=None):
        self.call_mask = attention_mask        # forward_orig's attn_mask: every block gets it
        b, _, h, w = x.shape
        v = self.transformer(pack(x), context, x.new_zeros(b, self.transformer.config.pooled_projection_dim), sigma,
                             image_ids(h // 2, w // 2), x.new_zeros(context.shape[1], 3)).sample
        return unpack(v, h, w)


CHROMA_CONFIG = dict(patch_size=1, in_channels=16, num_layers=2, num_single_layers=2, attention_head_dim=16,
                     num_attention_heads=2, joint_attention_dim=32, axes_dims_rope=(4, 6, 6),
                     approximator_num_channels=8, approximator_hidden_dim=32, approximator_layers=1)


def tiny_chroma(seed: int = 19):
    """A tiny ChromaTransformer2DModel (Flux's attention, Chroma's pruned modulation) with seeded random
    weights."""
    from diffusers import ChromaTransformer2DModel

    return seeded_transformer(ChromaTransformer2DModel, CHROMA_CONFIG, seed)


class ChromaModel(FluxModel):
    """ComfyUI's BaseModel for Chroma (model_base.Chroma is Flux's, its diffusion model comfy.ldm.chroma's: the
    same double / single blocks and flux.math.attention, only the modulation differs) around a diffusers
    ChromaTransformer2DModel, whose single blocks take the joint [text; image] tokens as ComfyUI's do. ComfyUI's
    Chroma T5 tokenizer does not pad, so no attention mask reaches the blocks."""

    def _single_block(self, inner, index):
        def forward(hidden_states, temb, image_rotary_emb=None, attention_mask=None, joint_attention_kwargs=None):
            def original(args):
                self.block_options, self.block_mask = args["transformer_options"], args["attn_mask"]
                return {"img": inner(args["img"], args["vec"], args["pe"])}

            args = {"img": hidden_states, "vec": temb, "pe": image_rotary_emb, "attn_mask": self.call_mask,
                    "transformer_options": self.options}
            return self._run_block(("single_block", index), args, original)["img"]

        return forward

    def _velocity(self, x, sigma, context, attention_mask=None):
        self.call_mask = attention_mask
        return chroma_velocity(self.transformer, x, sigma, context)


def chroma_velocity(transformer, x, sigma, context, mask=None):
    b, _, h, w = x.shape
    v = transformer(hidden_states=pack(x), encoder_hidden_states=context, timestep=sigma, img_ids=image_ids(h // 2, w // 2),
                    txt_ids=x.new_zeros(context.shape[1], 3), attention_mask=mask).sample
    return unpack(v, h, w)


def diffusers_flux_prediction(transformer, x, sigma, context):
    """x − σ·v from diffusers' own forward of a (non-hooked) FluxTransformer2DModel."""
    b, _, h, w = x.shape
    v = transformer(pack(x), context, x.new_zeros(b, transformer.config.pooled_projection_dim), sigma,
                    image_ids(h // 2, w // 2), x.new_zeros(context.shape[1], 3)).sample
    return x - unpack(v, h, w) * sigma.view(-1, 1, 1, 1)


class FluxCLIP:
    """Flux's CLIP object, only tokenize(): CLIP-L tokens under "l" (the pooled vector) and T5 tokens under
    "t5xxl" (the joint attention's text keys)."""

    def __init__(self, clip: cs.CLIP, t5: cs.T5CLIP):
        self.clip, self.t5 = clip, t5

    def tokenize(self, text: str) -> dict:
        return {**self.clip.tokenize(text), **self.t5.tokenize(text)}


# --- SD3.5 ---------------------------------------------------------------------------------------------

SD3_CONFIG = dict(sample_size=8, patch_size=2, in_channels=4, num_layers=3, attention_head_dim=8, num_attention_heads=4,
                  joint_attention_dim=64, caption_projection_dim=32, pooled_projection_dim=64, out_channels=4,
                  pos_embed_max_size=16, dual_attention_layers=(0,), qk_norm="rms_norm")


def tiny_sd3(seed: int = 13):
    """A tiny SD3.5-medium-like SD3Transformer2DModel (3 joint blocks, block 0 dual, RMS qk-norm; the last
    block's context stream pre-only) with seeded random weights."""
    from diffusers import SD3Transformer2DModel

    return seeded_transformer(SD3Transformer2DModel, SD3_CONFIG, seed)


class SD3HookedAttention:
    """diffusers' SD3 attention run as ComfyUI's MMDiT block_mixing runs it: per-head qk norms, q and k
    [B, L, heads·d] but v [B, L, heads, d] (MMDiT's split_qkv flattens only the normed q and k), the joint
    call over [context; image] (no RoPE, no mask), then comfy's optimized_attention(q, k, v, heads=…,
    transformer_options=…); a dual block's attn2 (image self-attention) is a second call."""

    def __init__(self, model: "SD3Model", layer: int):
        self.model, self.layer = model, layer

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, *args, **kwargs):
        def proj(x, linear, norm):
            y = linear(x).unflatten(-1, (attn.heads, -1))
            return (y if norm is None else norm(y)).flatten(-2)

        def per_head(x, linear):
            return linear(x).unflatten(-1, (attn.heads, -1))

        q, k, v = (proj(hidden_states, attn.to_q, attn.norm_q), proj(hidden_states, attn.to_k, attn.norm_k),
                   per_head(hidden_states, attn.to_v))
        n_ctx = 0
        if encoder_hidden_states is not None:
            c = encoder_hidden_states
            n_ctx = c.shape[1]
            q = torch.cat([proj(c, attn.add_q_proj, attn.norm_added_q), q], 1)
            k = torch.cat([proj(c, attn.add_k_proj, attn.norm_added_k), k], 1)
            v = torch.cat([per_head(c, attn.add_v_proj), v], 1)
        options = self.model.block_options
        out = cs.BACKEND.optimized_attention(q, k, v, heads=attn.heads, transformer_options=options)
        self.model._note(self.layer, "joint" if n_ctx else "self", q, k, v, out, options)
        image = attn.to_out[1](attn.to_out[0](out[:, n_ctx:]))
        if encoder_hidden_states is None:
            return image
        context = out[:, :n_ctx]
        return image, context if attn.context_pre_only else attn.to_add_out(context)


class SD3Model(JointFlowModel):
    """ComfyUI's BaseModel for SD3 (ModelSamplingDiscreteFlow: timestep 1000·σ) around a diffusers
    SD3Transformer2DModel; `.diffusion_model` has MMDiT's face: `joint_blocks`, `patch_size`. Each block runs
    behind patches_replace["dit"][("double_block", i)] with {"img", "txt", "vec", "transformer_options"}."""

    def __init__(self, transformer, shift: float = 3.0):
        super().__init__(transformer, shift)
        self.diffusion_model.joint_blocks = transformer.transformer_blocks
        for i, block in enumerate(transformer.transformer_blocks):
            block.attn.set_processor(SD3HookedAttention(self, i))
            if getattr(block, "attn2", None) is not None:
                block.attn2.set_processor(SD3HookedAttention(self, i))
            block.forward = self._joint_block(block.forward, i)

    def _joint_block(self, inner, index):
        def forward(hidden_states, encoder_hidden_states, temb, joint_attention_kwargs=None):
            def original(args):
                self.block_options = args["transformer_options"]
                txt, img = inner(args["img"], args["txt"], args["vec"])
                return {"img": img, "txt": txt}

            args = {"img": hidden_states, "txt": encoder_hidden_states, "vec": temb,
                    "transformer_options": self.options}
            out = self._run_block(("double_block", index), args, original)
            return out["txt"], out["img"]

        return forward

    def _velocity(self, x, sigma, context):
        pooled = x.new_zeros(x.shape[0], self.transformer.config.pooled_projection_dim)
        return self.transformer(x, context, pooled, sigma * 1000).sample


class SD3CLIP:
    """SD3's CLIP object, only tokenize(): CLIP-L and CLIP-G tokens ("l", "g": the same positions, 77 per
    chunk) and T5 tokens ("t5xxl"), whose embeddings follow the CLIP ones in the model's context."""

    def __init__(self, clip: cs.CLIP, t5: cs.T5CLIP):
        self.clip, self.t5 = clip, t5

    def tokenize(self, text: str) -> dict:
        clip = self.clip.tokenize(text)["l"]
        return {"l": clip, "g": clip, **self.t5.tokenize(text)}
