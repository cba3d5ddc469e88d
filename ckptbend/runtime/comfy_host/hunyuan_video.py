"""HunyuanVideo 1.0's text keys in ComfyUI: a word's columns among the Llama 3 tokens its encoder keeps.

ComfyUI's HunyuanVideoTokenizer puts the prompt into a Llama 3 chat template (a system turn, then
"<|start_header_id|>user<|end_header_id|>\\n\\n", the prompt, "<|eot_id|>") and its encoder
(HunyuanVideoClipModel.encode_token_weights) keeps the tokens from past the user header (and past its "\\n\\n" token
when that follows) through the first <|eot_id|> after it: the joint attention's text key 0 is the prompt's first
token, the <|eot_id|> the last. These are Llama 3's token ids.
"""

from __future__ import annotations

from typing import Mapping

from .. import tokens as bend_tokens

LLAMA_KEY = "llama"
START_HEADER, USER, END_HEADER, EOT, BLANK_LINE = 128006, 882, 128007, 128009, 271


def kept(ids: list) -> list:
    """The ids whose embeddings the encoder keeps (its template_end / user_end rule: the last user header, the
    first <|eot_id|> after it)."""
    headers = [i + 2 for i in range(len(ids) - 2) if ids[i:i + 3] == [START_HEADER, USER, END_HEADER]]
    if not headers:
        raise ValueError("the HunyuanVideo prompt has no Llama user header (ComfyUI then keeps every token)")
    start = headers[-1]
    end = next((i + 1 for i in range(start, len(ids)) if ids[i] == EOT), -1)
    if len(ids) > start + 2 and ids[start + 1] == BLANK_LINE:
        start += 2
    return ids[start:end]


def llama_columns(clip, words, tokens: Mapping, empty: Mapping, token_ids) -> dict[str, list[int]]:
    """word → its columns among the kept tokens. A word is found spelled after a space or bare (byte-level BPE
    spells them apart; the earlier in the prompt wins), tokenised inside the template as the prompt is and cut out
    of the kept tokens (less the template's tail, the <|eot_id|>)."""
    tail = len(kept(token_ids(empty, LLAMA_KEY)))

    def spell(text):
        ids = kept(token_ids(clip.tokenize(text), LLAMA_KEY))
        return ids[:len(ids) - tail]

    return bend_tokens.token_columns(words, kept(token_ids(tokens, LLAMA_KEY)),
                                     lambda word: bend_tokens.Alternatives((spell(" " + word), spell(word))))


def prompt_tokens(clip, prompt: str, token_ids) -> int:
    """How many of the prompt's Llama tokens the encoder keeps: they end the context, after any image tokens of an
    image-to-video prompt (the encoder puts those first)."""
    text, _marked = bend_tokens.parse_marked_prompt(prompt)
    return len(kept(token_ids(clip.tokenize(text), LLAMA_KEY)))
