"""The stand-in ComfyUI host (comfy_standin.py) for Qwen-Image: a real tiny diffusers QwenImageTransformer2DModel
run the way ComfyUI's comfy/ldm/qwen_image/model.py runs it (shared/docs/comfyui-dit-hooks.md, Qwen-Image), and
ComfyUI's Qwen-Image CLIP object with a tiny Qwen2 byte-level BPE tokenizer built here.

- QwenModel: ComfyUI's BaseModel for Qwen-Image (flow matching, CONST: the model's timestep is σ itself, denoised
  = x − σ·v). The latent is 5-D [B, C, 1, H, W] (T = 1), cut into 2×2 patches in row-major (rows, cols) order.
  `.diffusion_model` has ComfyUI's face: `transformer_blocks`, `txt_norm`, `patch_size` = 2. Each block runs
  behind patches_replace["dit"][("double_block", i)] with {"img", "txt", "vec", "pe", "transformer_options"}.
- QwenHookedAttention: per-head RMS qk-norm on both streams, [text; image] joint q/k/v, RoPE applied to the
  joint q and k (diffusers' per-stream frequencies, concatenated [text; image] as ComfyUI's joint ids give
  them), [B, L, heads·d], then comfy's optimized_attention_masked(q, k, v, heads, None, transformer_options=…):
  the mask POSITIONAL and None, as ComfyUI's block never passes one (the text mask is not used).
- QwenCLIP: ComfyUI's QwenImageTokenizer: the prompt put into the chat template (unless it starts with
  "<|im_start|>"), weights disabled (emphasis stays literal text), escapes "\\(" resolved, tokenised as one
  segment, no start/end token, no padding; tokenize() → {"qwen25_7b": [[(id, 1.0), …]]}. The encoder
  (QwenImageTEModel.encode_token_weights) keeps the embeddings from the second "<|im_start|>", past its
  "user\\n": column 0 is the prompt's first token; the template's tail (<|im_end|>, \\n, <|im_start|>,
  assistant, \\n) follows the prompt.
"""

from __future__ import annotations

import torch

import comfy_standin as cs
import comfy_standin_joint as cj

QWEN_CONFIG = dict(patch_size=2, in_channels=16, out_channels=4, num_layers=3, attention_head_dim=16,
                   num_attention_heads=2, joint_attention_dim=32, axes_dims_rope=(4, 6, 6))
LATENT_CHANNELS = 4              # in_channels = channels × 2 × 2
TEMPLATE = ("<|im_start|>system\nDescribe the image by detailing the color, shape, size, texture, quantity, text, "
            "spatial relationships of the objects and background:<|im_end|>\n<|im_start|>user\n{}<|im_end|>\n"
            "<|im_start|>assistant\n")
TEMPLATE_START = 34              # the template's tokens before the prompt (diffusers' prompt_template_encode_start_idx)
TEMPLATE_TAIL = 5                # <|im_end|> \n <|im_start|> assistant \n
SPECIAL = {"<|endoftext|>": 151643, "<|im_start|>": 151644, "<|im_end|>": 151645}   # Qwen2.5's ids
USER, NEWLINE = 872, 198         # "user", "Ċ": Qwen2.5's ids, which ComfyUI's encoder tests for
VOCAB_SIZE = 151646


def tiny_qwen(seed: int = 17):
    """A tiny QwenImageTransformer2DModel with seeded random weights."""
    from diffusers import QwenImageTransformer2DModel

    return cj.seeded_transformer(QwenImageTransformer2DModel, QWEN_CONFIG, seed)


def _rope(x, freqs):
    """RoPE on [B, L, heads, d]: each interleaved pair (x[2i], x[2i+1]) as a complex number times freqs [L, d/2]
    (complex), as ComfyUI's apply_rotary_emb and diffusers' apply_rotary_emb_qwen(use_real=False) do."""
    pairs = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))
    return torch.view_as_real(pairs * freqs[:, None, :]).flatten(3).type_as(x)


class QwenHookedAttention:
    """diffusers' Qwen-Image attention run as ComfyUI's Attention.forward runs it (module docstring)."""

    def __init__(self, model: "QwenModel", layer: int):
        self.model, self.layer = model, layer

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, encoder_hidden_states_mask=None,
                 attention_mask=None, image_rotary_emb=None):
        def heads(x, proj, norm=None):
            y = proj(x).unflatten(-1, (attn.heads, -1))
            return y if norm is None else norm(y)

        n_text = encoder_hidden_states.shape[1]
        q = torch.cat([heads(encoder_hidden_states, attn.add_q_proj, attn.norm_added_q),
                       heads(hidden_states, attn.to_q, attn.norm_q)], 1)
        k = torch.cat([heads(encoder_hidden_states, attn.add_k_proj, attn.norm_added_k),
                       heads(hidden_states, attn.to_k, attn.norm_k)], 1)
        v = torch.cat([heads(encoder_hidden_states, attn.add_v_proj), heads(hidden_states, attn.to_v)], 1)
        image_freqs, text_freqs = image_rotary_emb
        freqs = torch.cat([text_freqs, image_freqs])                         # the joint ids: [text; image]
        q, k, v = _rope(q, freqs).flatten(2), _rope(k, freqs).flatten(2), v.flatten(2)
        options = self.model.block_options
        out = cs.BACKEND.optimized_attention_masked(q, k, v, attn.heads, None, transformer_options=options)
        self.model._note(self.layer, "joint", q, k, v, out, options)
        image = attn.to_out[1](attn.to_out[0](out[:, n_text:]))
        return image, attn.to_add_out(out[:, :n_text])


class QwenModel(cj.JointFlowModel):
    """ComfyUI's BaseModel for Qwen-Image around a diffusers QwenImageTransformer2DModel (module docstring)."""

    def __init__(self, transformer, shift: float = 1.15):
        super().__init__(transformer, shift)
        self.diffusion_model.transformer_blocks = transformer.transformer_blocks
        self.diffusion_model.txt_norm = transformer.txt_norm
        for i, block in enumerate(transformer.transformer_blocks):
            block.attn.set_processor(QwenHookedAttention(self, i))
            block.forward = self._block(block.forward, i)

    def _block(self, inner, index):
        def forward(hidden_states, encoder_hidden_states, encoder_hidden_states_mask, temb, image_rotary_emb=None,
                    joint_attention_kwargs=None, modulate_index=None):
            def original(args):
                self.block_options = args["transformer_options"]
                txt, img = inner(args["img"], args["txt"], encoder_hidden_states_mask, args["vec"], args["pe"])
                return {"txt": txt, "img": img}

            args = {"img": hidden_states, "txt": encoder_hidden_states, "vec": temb, "pe": image_rotary_emb,
                    "transformer_options": self.options}
            out = self._run_block(("double_block", index), args, original)
            return out["txt"], out["img"]

        return forward

    def _velocity(self, x, sigma, context):
        return qwen_velocity(self.transformer, x, sigma, context)


def qwen_velocity(transformer, x, sigma, context, mask=None):
    """The transformer's velocity for a 5-D latent [B, C, 1, H, W]; timestep σ (diffusers' pipeline passes
    timestep / 1000, ComfyUI σ: the same number)."""
    b, _, _, h, w = x.shape
    v = transformer(hidden_states=cj.pack(x[:, :, 0]), encoder_hidden_states=context, encoder_hidden_states_mask=mask,
                    timestep=sigma.expand(b), img_shapes=[[(1, h // 2, w // 2)]] * b).sample
    return cj.unpack(v, h, w)[:, :, None]


def diffusers_qwen_prediction(transformer, x, sigma, context):
    """x − σ·v from diffusers' own forward of a (non-hooked) QwenImageTransformer2DModel."""
    return x - qwen_velocity(transformer, x, sigma, context) * sigma.view(-1, 1, 1, 1, 1)


# --- the tokenizer -------------------------------------------------------------------------------------------

def _byte_alphabet() -> list[str]:
    """GPT-2's byte-level alphabet in its id order (Qwen2 shares it: "Ċ" = 198, "Ġ" = 220, "," = 11)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    rest = [b for b in range(256) if b not in printable]
    return [chr(b) for b in printable] + [chr(256 + n) for n in range(len(rest))]


TEMPLATE_WORDS = ("system", "Describe", "assistant", "user", *("Ġ" + w for w in (
    "the image by detailing color shape size texture quantity text spatial relationships of objects and "
    "background").split()))
PROMPT_WORDS = ("a", "photo", "romantic", "kiss", "at", "lake", "red", "car", "dog", "on", ("sun", "set"))


def qwen_tokenizer():
    """A Qwen2Tokenizer (byte-level BPE, Qwen2's pre-tokenizer) whose merges make each template word one token,
    so the template's prefix is 34 tokens and its tail 5 as with the real one, with Qwen2.5's ids for the
    special tokens, "user" and "Ċ". Prompt words exist bare and after a space ("Ġkiss"), as in the real
    vocabulary: the first word of a prompt, or one after "(", is bare; "sunset" is two pieces."""
    from transformers import Qwen2Tokenizer

    vocab = {c: i for i, c in enumerate(_byte_alphabet())}
    merges: list[tuple[str, str]] = []

    def add(token):
        current = token[0]
        for c in token[1:]:
            if (current, c) not in merges:
                merges.append((current, c))
            current += c
            vocab.setdefault(current, USER if current == "user" else len(vocab))

    pieces = [p for w in PROMPT_WORDS for p in ((w,) if isinstance(w, str) else w)]
    tokens = list(TEMPLATE_WORDS) + [s + p for p in pieces for s in ("", "Ġ")]
    for token in sorted(tokens, key=len, reverse=True):    # longer first: a short word's merge cannot cut a long one
        add(token)
    assert len(vocab) < USER                              # no id collides with "user"'s
    vocab.update(SPECIAL)
    tokenizer = Qwen2Tokenizer(vocab=vocab, merges=merges)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    ids = tokenizer(TEMPLATE.format(""))["input_ids"]
    assert len(ids) == TEMPLATE_START + TEMPLATE_TAIL and ids[TEMPLATE_START - 3:TEMPLATE_START] == [
        SPECIAL["<|im_start|>"], USER, NEWLINE], ids
    return tokenizer


def _resolve_escapes(text: str) -> str:
    """ComfyUI's escape_important / unescape_important with weights disabled: "\\(" → "(", "\\)" → ")"."""
    return text.replace("\\)", ")").replace("\\(", "(")


class QwenCLIP:
    """ComfyUI's Qwen-Image CLIP object, only tokenize() (module docstring)."""

    key = "qwen25_7b"

    def __init__(self, tokenizer=None):
        self.tokenizer = tokenizer or qwen_tokenizer()

    def tokenize(self, text: str) -> dict:
        if not text.startswith(("<|im_start|>", "<|start_header_id|>")):
            text = TEMPLATE.format(text)
        ids = self.tokenizer(_resolve_escapes(text))["input_ids"]
        return {self.key: [[(i, 1.0) for i in ids]]}


def encoder_columns(clip: QwenCLIP, text: str) -> list[int]:
    """The ids whose embeddings ComfyUI's QwenImageTEModel keeps (its template_end rule), for tests."""
    ids = [t for t, _ in clip.tokenize(text)[clip.key][0]]
    starts = [i for i, t in enumerate(ids) if t == SPECIAL["<|im_start|>"]][:2]
    end = starts[-1]
    if len(ids) > end + 3 and ids[end + 1] == USER and ids[end + 2] == NEWLINE:
        end += 3
    return ids[end:]
