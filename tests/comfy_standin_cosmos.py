"""The stand-in ComfyUI host (comfy_standin.py) for Cosmos Predict2: a tiny seeded model whose loop is ComfyUI
0.3.64's comfy/ldm/cosmos/predict2.py (MiniTrainDIT._forward, Block.forward, Attention, torch_attention_op), its
modulations reduced to one shift by the timestep since they never touch attention:

- The latent [B, C, T, H, W] gains the padding-mask channel (zeros), is cut into (1, 2, 2) patches and kept as
  [B, T, H, W, D]; each block flattens it to (t h w) raster tokens for its attentions.
- Every block: the self-attention (per-head RMS norms on q and k, RoPE on both), then the cross-attention to the
  T5 context (per-head norms, no RoPE, no mask). Each hands q, k, v [B, S, heads, d] to torch_attention_op, which
  calls comfy's optimized_attention(q, k, v, heads, skip_reshape=True, transformer_options=…) with [B, heads, S, d]
  and gets [B, S, heads·d]: no "dit" block replaces and no block_index in transformer_options.
"""

from __future__ import annotations

import torch
from torch import nn

import comfy_standin as cs
import comfy_standin_hidream as ch
import comfy_standin_joint as cj

WIDTH, HEADS, T5_WIDTH, CHANNELS = 16, 2, 12, 4


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.self_qkv, self.self_out = nn.Linear(WIDTH, 3 * WIDTH), nn.Linear(WIDTH, WIDTH)
        self.cross_q, self.cross_kv = nn.Linear(WIDTH, WIDTH), nn.Linear(T5_WIDTH, 2 * WIDTH)
        self.cross_out = nn.Linear(WIDTH, WIDTH)
        self.mlp = nn.Linear(WIDTH, WIDTH)


class CosmosModel(cj.JointFlowModel):
    def __init__(self, blocks: int = 2, seed: int = 53):
        super().__init__(None, shift=3.0)
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            self.patch = nn.Linear((CHANNELS + 1) * 4, WIDTH)
            self.time = nn.Linear(1, WIDTH)
            self.blocks = nn.ModuleList(Block() for _ in range(blocks))
            self.final = nn.Linear(WIDTH, CHANNELS * 4)
        dm = self.diffusion_model
        dm.blocks, dm.patch_spatial, dm.patch_temporal, dm.t_embedding_norm = self.blocks, 2, 1, nn.Identity()

    def _attention(self, layer, kind, q, k, v):
        """torch_attention_op: [B, S, heads, d] → comfy's attention with [B, heads, S, d] → [B, S, heads·d]."""
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        out = cs.BACKEND.optimized_attention(q, k, v, HEADS, skip_reshape=True, transformer_options=self.options)
        self._note(layer, kind, q, k, v, out, self.options)
        return out

    def _velocity(self, x, sigma, context):
        b, _, t, h, w = x.shape
        x = torch.cat([x, torch.zeros(b, 1, t, h, w)], 1)
        gh, gw = h // 2, w // 2
        tokens = self.patch(x.view(b, CHANNELS + 1, t, gh, 2, gw, 2).permute(0, 2, 3, 5, 1, 4, 6).reshape(
            b, t, gh, gw, -1))
        tokens = tokens + self.time(sigma.view(b, 1, 1, 1, 1).to(x.dtype))
        grid = torch.stack(torch.meshgrid(torch.arange(t), torch.arange(gh), torch.arange(gw), indexing="ij"), -1)
        positions = torch.stack([grid[..., 0] * 3 + grid[..., 1], grid[..., 2]], -1).view(-1, 2).float()

        def heads(y):
            return ch.rms(y.unflatten(-1, (HEADS, -1)))

        for i, block in enumerate(self.blocks):
            flat = tokens.flatten(1, 3)
            q, k, v = block.self_qkv(flat).chunk(3, -1)
            q, k = (ch.rope(t_, positions, HEADS).unflatten(-1, (HEADS, -1)) for t_ in (heads(q).flatten(2),
                                                                                     heads(k).flatten(2)))
            flat = flat + block.self_out(self._attention(i, "self", q, k, v.unflatten(-1, (HEADS, -1))))
            k, v = block.cross_kv(context).chunk(2, -1)
            flat = flat + block.cross_out(self._attention(i, "cross", heads(block.cross_q(flat)), heads(k),
                                                          v.unflatten(-1, (HEADS, -1))))
            tokens = (flat + block.mlp(flat)).view(tokens.shape)
        out = self.final(tokens).view(b, t, gh, gw, CHANNELS, 2, 2).permute(0, 4, 1, 2, 5, 3, 6)
        return out.reshape(b, CHANNELS, t, h, w)
