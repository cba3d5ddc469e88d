"""HiDream's text keys as ComfyUI's HiDream tokenizer and encoder make them: every block attends to [T5; Llama's last
layer; Llama's layer for the block] (comfy/ldm/hidream/model.py). T5: the first chunk of 128 tokens, no start token,
end token and padding kept. Llama 3.1: <|begin_of_text|> first, then the prompt, padded with <|eot_id|> to at least
128 tokens; ComfyUI's HiDreamTEModel keeps every token (its ll_out[:, 1:] drops the embedding layer, not a token), so
key 0 of each Llama part is <|begin_of_text|>. A word's columns: its T5 ones, then its Llama ones in both Llama parts.
"""

from __future__ import annotations

from typing import Mapping

from .. import tokens as bend_tokens

LLAMA_KEY = "llama"
HIDREAM_KEY = ("t5xxl", LLAMA_KEY, LLAMA_KEY)    # comfy_host.tokens.token_columns: encoders one after another


def llama_columns(clip, words, tokens: Mapping, empty: Mapping) -> dict[str, list[int]]:
    """word → its columns among the Llama tokens (the start token is column 0). Byte-level BPE spells a word after a
    space ("Ġsunset") unlike one at the prompt's start or after punctuation: both spellings are tried, the earlier
    in the prompt wins; a spelling is tokenised as the prompt is, less the start and padding tokens."""
    from .tokens import _token_ids

    special = set(_token_ids(empty, LLAMA_KEY))

    def spell(text):
        return [i for i in _token_ids(clip.tokenize(text), LLAMA_KEY) if i not in special]

    return bend_tokens.token_columns(words, _token_ids(tokens, LLAMA_KEY),
                                     lambda word: bend_tokens.Alternatives((spell(" " + word), spell(word))))
