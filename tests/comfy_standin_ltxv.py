"""The stand-in ComfyUI host (comfy_standin.py) for LTX-Video: a tiny seeded model whose loop is ComfyUI 0.3.64's
comfy/ldm/lightricks/model.py (LTXVModel._forward, BasicTransformerBlock, CrossAttention), its modulations reduced
to one shift by the timestep since they never touch attention:

- The latent [B, C, F, H, W] is patchified with patch 1 (SymmetricPatchifier(1)): one token per latent voxel,
  (f h w) raster order.
- An integer text mask (the T5 encoder's attention_mask cond) becomes the additive (mask − 1)·finfo.max of shape
  [B, 1, 1, L]; a floating one is passed as it is.
- Every block runs behind patches_replace["dit"][("double_block", i)] with {"img", "txt", "attention_mask", "vec",
  "pe", "transformer_options"}: attn1, self-attention (q, k RMS-normed over the whole width, RoPE), then attn2 to
  the T5 context (normed, no RoPE), each through comfy's optimized_attention(q, k, v, heads, attn_precision=…,
  transformer_options=…), or optimized_attention_masked(q, k, v, heads, mask, …) where a mask is given.
"""

from __future__ import annotations

import torch
from torch import nn

import comfy_standin as cs
import comfy_standin_hidream as ch
import comfy_standin_joint as cj

WIDTH, HEADS, T5_WIDTH, CHANNELS = 16, 2, 12, 8


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.qkv1, self.out1 = nn.Linear(WIDTH, 3 * WIDTH), nn.Linear(WIDTH, WIDTH)
        self.q2, self.kv2, self.out2 = nn.Linear(WIDTH, WIDTH), nn.Linear(T5_WIDTH, 2 * WIDTH), nn.Linear(WIDTH, WIDTH)
        self.ff = nn.Linear(WIDTH, WIDTH)


class LTXVModel(cj.JointFlowModel):
    def __init__(self, blocks: int = 2, seed: int = 57):
        super().__init__(None, shift=2.37)
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            self.patch = nn.Linear(CHANNELS, WIDTH)
            self.time = nn.Linear(1, WIDTH)
            self.blocks = nn.ModuleList(Block() for _ in range(blocks))
            self.final = nn.Linear(WIDTH, CHANNELS)
        dm = self.diffusion_model
        dm.transformer_blocks, dm.patchifier = self.blocks, nn.Module()
        dm.patchifier.patch_size = (1, 1, 1)

    def _attention(self, layer, kind, q, k, v, mask):
        options = self.block_options
        if mask is None:
            out = cs.BACKEND.optimized_attention(q, k, v, HEADS, attn_precision=None, transformer_options=options)
        else:
            out = cs.BACKEND.optimized_attention_masked(q, k, v, HEADS, mask, attn_precision=None,
                                                        transformer_options=options)
        self.block_mask = mask
        self._note(layer, kind, q, k, v, out, options)
        return out

    def _block(self, i, block, x, context, mask, vec, positions):
        q, k, v = block.qkv1(ch.rms(x) + vec).chunk(3, -1)
        q, k = (ch.rope(ch.rms(t), positions, HEADS) for t in (q, k))
        x = x + block.out1(self._attention(i, "self", q, k, v, None))
        k, v = block.kv2(context).chunk(2, -1)
        x = x + block.out2(self._attention(i, "cross", ch.rms(block.q2(x)), ch.rms(k), v, mask))
        return x + block.ff(ch.rms(x))

    def _velocity(self, x, sigma, context, attention_mask=None):
        b, c, f, h, w = x.shape
        tokens = self.patch(x.flatten(2).transpose(1, 2))
        vec = self.time(sigma.view(b, 1, 1).to(x.dtype))
        if attention_mask is not None and not torch.is_floating_point(attention_mask):
            attention_mask = (attention_mask - 1).to(x.dtype).reshape(b, 1, -1, attention_mask.shape[-1]) * \
                torch.finfo(x.dtype).max
        grid = torch.stack(torch.meshgrid(torch.arange(f), torch.arange(h), torch.arange(w), indexing="ij"), -1)
        positions = torch.stack([grid[..., 0] * 3 + grid[..., 1], grid[..., 2]], -1).view(-1, 2).float()
        for i, block in enumerate(self.blocks):
            def original(args, i=i, block=block):
                self.block_options = args["transformer_options"]
                return {"img": self._block(i, block, args["img"], args["txt"], args["attention_mask"], args["vec"],
                                           args["pe"])}

            args = {"img": tokens, "txt": context, "attention_mask": attention_mask, "vec": vec, "pe": positions,
                    "transformer_options": self.options}
            tokens = self._run_block(("double_block", i), args, original)["img"]
        return self.final(tokens).transpose(1, 2).reshape(b, c, f, h, w)
