"""The stand-in ComfyUI host for Anima, written from the newest readable ComfyUI source (comfy/ldm/anima/model.py at
482b9e30, comfy/text_encoders/anima.py at 4328fa89, model_base.Anima.extra_conds) on the Cosmos Predict2 stand-in
(comfy_standin_cosmos: Anima's diffusion model is MiniTrainDIT, its loop unchanged, plus an `llm_adapter`):

- AnimaCLIP.tokenize (AnimaTokenizer): {"qwen3_06b": the prompt's Qwen tokens (byte-level BPE, no start or end
  token, every weight 1.0; an empty prompt gives one <|endoftext|>), "t5xxl": its T5 tokens with their weights and
  the end token </s>, unpadded}.
- AnimaCLIP.encode (AnimaTEModel): Qwen3 0.6B's hidden states of the Qwen tokens (here a seeded embedding: the
  encoder's inside never reaches the DiT's attention) and, as extra conds, t5xxl_ids and t5xxl_weights.
- AnimaModel.extra_conds (under inference mode, as ComfyUI samples): the adapter maps the T5 ids, attending to the
  Qwen states, to one row per T5 token; the rows times the T5 weights, zero-padded to 512 rows, are c_crossattn.
  The blocks' cross-attention keys are these rows: key j is the prompt's T5 token j.
- Outside inference mode (training) extra_conds leaves the Qwen states as c_crossattn and passes t5xxl_ids and
  t5xxl_weights on; Anima.forward then runs the adapter inside the model call (AnimaModel._velocity).
- The adapter (LLMAdapter): T5 ids embedded by its own table, a block of self-attention (RoPE by T5 position),
  cross-attention to the Qwen states (RoPE by T5 position on the queries, by Qwen position on the keys) and an
  MLP, then a projection and an RMS norm. It calls torch's attention itself, never comfy's optimized_attention.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

import comfy_standin as cs
import comfy_standin_cosmos as cc
import comfy_standin_hidream as ch
import comfy_standin_qwen as cq
from _pipelines import t5_like_tokenizer

QWEN_WIDTH, QWEN_ROWS, PADDED = 8, 97, 512
QWEN_PAD = 151643                         # <|endoftext|>: Anima's Qwen tokenizer's padding
WIDTH, HEADS = cc.T5_WIDTH, 2             # the adapter's width is the DiT's context width


def _positions(n):
    return torch.stack([torch.arange(n, dtype=torch.float32), torch.zeros(n)], -1)


class LLMAdapter(nn.Module):
    def __init__(self, vocab: int):
        super().__init__()
        self.embed = nn.Embedding(vocab, WIDTH)
        self.self_qkv, self.self_out = nn.Linear(WIDTH, 3 * WIDTH, bias=False), nn.Linear(WIDTH, WIDTH, bias=False)
        self.cross_q, self.cross_kv = nn.Linear(WIDTH, WIDTH, bias=False), nn.Linear(QWEN_WIDTH, 2 * WIDTH, bias=False)
        self.cross_out = nn.Linear(WIDTH, WIDTH, bias=False)
        self.mlp = nn.Sequential(nn.Linear(WIDTH, 2 * WIDTH), nn.GELU(), nn.Linear(2 * WIDTH, WIDTH))
        self.out = nn.Linear(WIDTH, WIDTH)

    @staticmethod
    def _attend(q, k, v, q_at, k_at):
        """Per-head RMS norms on q and k, RoPE by the positions, torch's attention."""
        q, k = (ch.rope(ch.rms(t.unflatten(-1, (HEADS, -1))).flatten(2), at, HEADS) for t, at in ((q, q_at), (k, k_at)))
        q, k, v = (t.unflatten(-1, (HEADS, -1)).transpose(1, 2) for t in (q, k, v))
        return F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2)

    def forward(self, source, ids):
        x = self.embed(ids)
        t_at, s_at = _positions(x.shape[1]), _positions(source.shape[1])
        q, k, v = self.self_qkv(ch.rms(x)).chunk(3, -1)
        x = x + self.self_out(self._attend(q, k, v, t_at, t_at))
        k, v = self.cross_kv(source).chunk(2, -1)
        x = x + self.cross_out(self._attend(self.cross_q(ch.rms(x)), k, v, t_at, s_at))
        x = x + self.mlp(ch.rms(x))
        return ch.rms(self.out(x))


class AnimaModel(cc.CosmosModel):
    def __init__(self, blocks: int = 2, seed: int = 59):
        super().__init__(blocks, seed)
        with torch.random.fork_rng():
            torch.manual_seed(seed + 1)
            self.adapter = LLMAdapter(len(t5_like_tokenizer()))
        self.diffusion_model.llm_adapter = self.adapter

    def preprocess_text_embeds(self, qwen_states, t5xxl_ids, t5xxl_weights):
        """Anima.preprocess_text_embeds: the adapter's rows [B, T5 tokens], weighted, zero-padded to 512."""
        rows = self.adapter(qwen_states, t5xxl_ids) * t5xxl_weights.unsqueeze(-1).to(qwen_states.dtype)
        return F.pad(rows, (0, 0, 0, max(0, PADDED - rows.shape[1])))

    def extra_conds(self, qwen_states, t5xxl_ids, t5xxl_weights, inference: bool = True) -> dict:
        """model_base.Anima.extra_conds: under inference mode (ComfyUI's sampling) the adapter's rows are the
        context; otherwise (training) the Qwen states are, and the T5 ids and weights go to the model call."""
        ids, weights = t5xxl_ids.unsqueeze(0), t5xxl_weights.unsqueeze(0)
        if inference:
            return {"c_crossattn": self.preprocess_text_embeds(qwen_states, ids, weights)}
        return {"c_crossattn": qwen_states, "t5xxl_ids": ids, "t5xxl_weights": weights}

    def _velocity(self, x, sigma, context, t5xxl_ids=None, t5xxl_weights=None):
        if t5xxl_ids is not None:             # Anima.forward: the adapter inside the model call
            context = self.preprocess_text_embeds(context, t5xxl_ids, t5xxl_weights)
        return super()._velocity(x, sigma, context)


class AnimaCLIP:
    def __init__(self, seed: int = 61):
        self.t5 = cs.T5CLIP(t5_like_tokenizer(), key="t5xxl", min_length=1)
        self.bpe = cq.qwen_tokenizer()
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            self.qwen = nn.Embedding(QWEN_ROWS, QWEN_WIDTH)

    def tokenize(self, text: str) -> dict:
        qwen = [(t, 1.0) for segment, _ in cs.emphasis_segments(text) for t in self.bpe(segment)["input_ids"]]
        return {"qwen3_06b": [qwen or [(QWEN_PAD, 1.0)]], "t5xxl": self.t5.tokenize(text)["t5xxl"]}

    def encode(self, text: str):
        """(Qwen states [1, n, QWEN_WIDTH], t5xxl_ids [m], t5xxl_weights [m]) as AnimaTEModel gives them."""
        tokens = self.tokenize(text)
        qwen = torch.tensor([t for t, _ in tokens["qwen3_06b"][0]]) % QWEN_ROWS
        t5 = tokens["t5xxl"][0]
        return self.qwen(qwen).unsqueeze(0), torch.tensor([t for t, _ in t5]), torch.tensor([w for _, w in t5])

    def conditioning(self, model: AnimaModel, text: str, inference: bool = True) -> list[dict]:
        return [model.extra_conds(*self.encode(text), inference=inference)]
