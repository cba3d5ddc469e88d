"""The stand-in ComfyUI host (comfy_standin.py) for HiDream: a tiny seeded model whose loop is ComfyUI 0.3.64's
comfy/ldm/hidream/model.py (HiDreamImageTransformer2DModel._forward), its feed-forwards (MoE in ComfyUI) reduced
to one linear layer each since they never touch attention:

- The latent [B, C, H, W] is padded up to the patch (2) and cut into patches, raster order; no image masks.
- The text: the T5 context (c_crossattn) and the extra cond encoder_hidden_states_llama3 [B, layers, L, width],
  each Llama layer of llama_layers projected by its own linear layer, T5 by the last. The double-stream blocks
  attend over [image; text] with text = [T5; Llama's last projected layer; Llama's layer for the block], and keep
  only the first two parts of the text stream after each block; the single-stream blocks run on [image; T5;
  Llama's last layer] with the block's Llama layer appended, cut back after each.
- Every attention: q, k RMS-normed over the whole width, RoPE on the image positions (text positions 0), then
  comfy's optimized_attention(q, k, v, heads, transformer_options=…) with [B, L, heads·d], as ComfyUI's
  HiDream `attention` calls it: no "dit" block replaces and no block_index in transformer_options.
- HiDreamCLIP: ComfyUI's HiDream CLIP object, tokenize() → {"t5xxl": T5 tokens padded to T5_TOKENS, "llama":
  <|begin_of_text|>, the prompt's byte-level BPE tokens, <|eot_id|> padding up to LLAMA_TOKENS}.
"""

from __future__ import annotations

import torch
from torch import nn

import comfy_standin as cs
import comfy_standin_joint as cj
import comfy_standin_qwen as cq
from _pipelines import t5_like_tokenizer

WIDTH, HEADS, T5_WIDTH, LLAMA_WIDTH, CHANNELS = 16, 2, 12, 10, 4
T5_TOKENS, LLAMA_TOKENS, BOS, EOT = 8, 9, 128000, 128009


def rms(x):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5)


def rope(x, positions, heads):
    """Rotate each head's pairs by angles of the tokens' (row, col) positions ([L, 2]; text at 0: unturned)."""
    b, n, inner = x.shape
    d = inner // heads
    freqs = 1.0 / (10.0 ** (torch.arange(d // 2) / (d // 2)))
    angle = positions[:, :1] * freqs + positions[:, 1:] * freqs.flip(0)
    cos, sin = angle.cos()[:, None], angle.sin()[:, None]
    pairs = x.view(b, n, heads, d // 2, 2)
    turned = torch.stack([pairs[..., 0] * cos - pairs[..., 1] * sin, pairs[..., 0] * sin + pairs[..., 1] * cos], -1)
    return turned.view(b, n, inner)


class Block(nn.Module):
    def __init__(self, double: bool):
        super().__init__()
        self.qkv = nn.Linear(WIDTH, 3 * WIDTH)
        self.out, self.ff = nn.Linear(WIDTH, WIDTH), nn.Linear(WIDTH, WIDTH)
        if double:
            self.qkv_t, self.out_t, self.ff_t = nn.Linear(WIDTH, 3 * WIDTH), nn.Linear(WIDTH, WIDTH), nn.Linear(
                WIDTH, WIDTH)
        self.double = double


class HiDreamModel(cj.JointFlowModel):
    def __init__(self, layers=(2, 2), seed: int = 51):
        super().__init__(None, shift=3.0)
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            self.patch = nn.Linear(CHANNELS * 4, WIDTH)
            self.time = nn.Linear(1, WIDTH)
            self.double = nn.ModuleList(Block(True) for _ in range(layers[0]))
            self.single = nn.ModuleList(Block(False) for _ in range(layers[1]))
            self.llama_layers = list(range(sum(layers)))
            self.llama_proj = nn.ModuleList(nn.Linear(LLAMA_WIDTH, WIDTH) for _ in self.llama_layers)
            self.t5_proj = nn.Linear(T5_WIDTH, WIDTH)
            self.final = nn.Linear(WIDTH, CHANNELS * 4)
        dm = self.diffusion_model
        dm.double_stream_blocks, dm.single_stream_blocks, dm.patch_size = self.double, self.single, 2

    def _attend(self, layer, q, k, v, positions):
        q, k = (rope(rms(t), positions, HEADS) for t in (q, k))
        out = cs.BACKEND.optimized_attention(q, k, v, HEADS, transformer_options=self.options)
        self._note(layer, "joint", q, k, v, out, self.options)
        return out

    def _velocity(self, x, sigma, context, encoder_hidden_states_llama3):
        b, _, h, w = x.shape
        x = nn.functional.pad(x, (0, -w % 2, 0, -h % 2))
        gh, gw = x.shape[2] // 2, x.shape[3] // 2
        img = self.patch(x.view(b, CHANNELS, gh, 2, gw, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, gh * gw, -1))
        img = img + self.time(sigma.view(b, 1, 1).to(x.dtype))
        llama = encoder_hidden_states_llama3.movedim(1, 0)
        texts = [proj(llama[k]) for proj, k in zip(self.llama_proj, self.llama_layers)] + [self.t5_proj(context)]
        n_img = gh * gw
        image_pos = torch.stack(torch.meshgrid(torch.arange(gh), torch.arange(gw), indexing="ij"), -1).view(-1, 2)

        def positions(n_text):
            return torch.cat([image_pos.float(), torch.zeros(n_text, 2)])

        initial = torch.cat([texts[-1], texts[-2]], 1)
        for i, block in enumerate(self.double):
            text = torch.cat([initial, texts[i]], 1)
            q, k, v = block.qkv(img).chunk(3, -1)
            qt, kt, vt = block.qkv_t(text).chunk(3, -1)
            out = self._attend(i, torch.cat([q, qt], 1), torch.cat([k, kt], 1), torch.cat([v, vt], 1),
                               positions(text.shape[1]))
            img = img + block.out(out[:, :n_img])
            text = text + block.out_t(out[:, n_img:])
            img, text = img + block.ff(img), text + block.ff_t(text)
            initial = text[:, :initial.shape[1]]
        hidden = torch.cat([img, initial], 1)
        kept = hidden.shape[1]
        for j, block in enumerate(self.single):
            i = len(self.double) + j
            hidden = torch.cat([hidden, texts[i]], 1)
            q, k, v = block.qkv(hidden).chunk(3, -1)
            hidden = hidden + block.out(self._attend(i, q, k, v, positions(hidden.shape[1] - n_img)))
            hidden = (hidden + block.ff(hidden))[:, :kept]
        out = self.final(hidden[:, :n_img]).view(b, gh, gw, CHANNELS, 2, 2).permute(0, 3, 1, 4, 2, 5)
        return out.reshape(b, CHANNELS, 2 * gh, 2 * gw)[:, :, :h, :w]


class HiDreamCLIP:
    """ComfyUI's HiDream CLIP object, only tokenize() (module docstring); the Llama tokens from a byte-level BPE
    (Qwen-Image's stand-in vocabulary: words bare and after a space, "sunset" two pieces)."""

    def __init__(self):
        self.t5 = cs.T5CLIP(t5_like_tokenizer(), key="t5xxl", min_length=T5_TOKENS)
        self.bpe = cq.qwen_tokenizer()

    def tokenize(self, text: str) -> dict:
        ids = [(BOS, 1.0)] + [(t, w) for segment, w in cs.emphasis_segments(text)
                              for t in self.bpe(segment)["input_ids"]]
        return {"t5xxl": [self.t5.tokenize(text)["t5xxl"][0][:T5_TOKENS]],
                "llama": [ids + [(EOT, 1.0)] * max(0, LLAMA_TOKENS - len(ids))]}
