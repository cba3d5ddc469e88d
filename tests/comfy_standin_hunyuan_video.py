"""The stand-in ComfyUI host's HunyuanVideo 1.0 text side: a Llama-3-like tokenizer and ComfyUI's CLIP object for it.

- llama_tokenizer(): a word-level `tokenizers` tokenizer in PreTrainedTokenizerFast with Llama 3's special ids
  (<|begin_of_text|> 128000 put first, <|start_header_id|> 128006, <|end_header_id|> 128007, <|eot_id|> 128009,
  "user" 882, the blank line "\\n\\n" 271, <image> 128257, <pad> 128258): enough to lay out ComfyUI's HunyuanVideo
  template as the real vocabulary does (the Llama 3 vocabulary is not in the unpacked ComfyUI 0.3.64). A word after
  a space and a bare one are the same token here; the other template words are <unk>.
- HunyuanVideoCLIP: tokenize() as ComfyUI's HunyuanVideoTokenizer: CLIP-L tokens under "l", the prompt put into its
  Llama template and tokenised whole under "llama" (one chunk, no padding: min_length 1).
"""

from __future__ import annotations

import comfy_standin as cs

TEMPLATE = ("<|start_header_id|>system<|end_header_id|>\n\nDescribe the video by detailing the following aspects: "
            "1. The main content and theme of the video.<|eot_id|><|start_header_id|>user<|end_header_id|>\n\n{}"
            "<|eot_id|>")      # ComfyUI's system text, shortened: its words are <unk> here either way
WORDS = ("a", "romantic", "kiss", "at", "sunset", "lake", "system", "describe", "the", "video")
SPECIAL = {"<|begin_of_text|>": 128000, "<|start_header_id|>": 128006, "<|end_header_id|>": 128007,
           "<|eot_id|>": 128009, "<image>": 128257, "<pad>": 128258}


def llama_tokenizer():
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "\n\n": 271, "user": 882, **SPECIAL, **{w: 1000 + i for i, w in enumerate(WORDS)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL])
    backend.add_tokens([AddedToken("\n\n", normalized=False)])
    backend.post_processor = processors.TemplateProcessing(single="<|begin_of_text|> $A",
                                                           special_tokens=[("<|begin_of_text|>", 128000)])
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<|begin_of_text|>", pad_token="<pad>",
                                   unk_token="<unk>")


class HunyuanVideoCLIP:
    def __init__(self, clip: cs.CLIP):
        self.clip, self.tokenizer = clip, llama_tokenizer()

    def tokenize(self, text: str) -> dict:
        ids = self.tokenizer(TEMPLATE.format(text.replace("{", "").replace("}", "")))["input_ids"]
        return {**self.clip.tokenize(text), "llama": [[(i, 1.0) for i in ids]]}
