"""Text-encoder tensors under the names real files use: HF CLIP (``text_model.…``) and OpenCLIP
(fused ``attn.in_proj_weight``, ``resblocks``), from a real transformers CLIP model."""

from __future__ import annotations

import math
import re

import torch

OPENCLIP_COMPONENTS = ("clip_h", "clip_g")
_CLIP_H_EMBED_DIM = {"tiny": 16, "full": 1024}


def openclip_extra(name, model, size, g):
    width = model.config.hidden_size
    shapes = {"logit_scale": ()}
    if name == "clip_h":
        shapes["text_projection"] = (width, _CLIP_H_EMBED_DIM[size])
    if g is None:
        return {k: torch.empty(s, device="meta") for k, s in shapes.items()}
    extra = {k: torch.randn(s, generator=g) * width ** -0.5 for k, s in shapes.items()}
    extra["logit_scale"] = torch.tensor(math.log(1 / 0.07)) + torch.randn((), generator=g) * 0.01
    return extra


def hf_clip_state_dict(model) -> dict:
    """HF CLIP text-encoder names as real files have them: ``text_model.…`` (+ ``text_projection.weight``).
    transformers 5's CLIPTextModel drops the ``text_model.`` prefix from its own state dict; it is put back."""
    state = model.state_dict()
    if not any(k.startswith("text_model.") for k in state):
        state = {"text_model." + k: v for k, v in state.items()}
    return state


_OPENCLIP_LAYER = {"self_attn.out_proj": "attn.out_proj", "layer_norm1": "ln_1", "layer_norm2": "ln_2",
                   "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj"}
_HF_LAYER = re.compile(r"text_model\.encoder\.layers\.(\d+)\.(.+)\.(weight|bias)")


def openclip_state_dict(model) -> dict:
    """An HF CLIP text model → OpenCLIP names (no prefix): ``transformer.resblocks.N.attn.in_proj_weight``
    [3d, d] (q rows 0:d, k d:2d, v 2d:3d), ``in_proj_bias``, ``attn.out_proj``, ``ln_1``, ``ln_2``,
    ``mlp.c_fc``, ``mlp.c_proj``, ``token_embedding.weight``, ``positional_embedding``, ``ln_final``,
    ``text_projection`` [d, embed] (HF's ``text_projection.weight`` transposed), ``logit_scale``."""
    out, qkv = {}, {}
    for key, t in hf_clip_state_dict(model).items():
        if key == "text_model.embeddings.token_embedding.weight":
            out["token_embedding.weight"] = t
        elif key == "text_model.embeddings.position_embedding.weight":
            out["positional_embedding"] = t
        elif key.startswith("text_model.final_layer_norm."):
            out["ln_final." + key.rsplit(".", 1)[1]] = t
        elif key == "text_projection.weight":
            out["text_projection"] = t.t().contiguous()
        elif m := _HF_LAYER.fullmatch(key):
            n, module, kind = int(m[1]), m[2], m[3]
            if module in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"):
                qkv.setdefault((n, kind), {})[module[10]] = t
            elif module in _OPENCLIP_LAYER:
                out[f"transformer.resblocks.{n}.{_OPENCLIP_LAYER[module]}.{kind}"] = t
            else:
                raise KeyError(f"no OpenCLIP name for {key}")
        elif key != "text_model.embeddings.position_ids":
            raise KeyError(f"no OpenCLIP name for {key}")
    for (n, kind), parts in qkv.items():
        out[f"transformer.resblocks.{n}.attn.in_proj_{kind}"] = torch.cat([parts["q"], parts["k"], parts["v"]])
    for name, t in getattr(model, "openclip_extra", {}).items():
        out.setdefault(name, t)
    return out


def position_ids(model):
    return torch.arange(model.config.max_position_embeddings, dtype=torch.int64)[None]
