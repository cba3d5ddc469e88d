"""A word's text-token columns as ComfyUI's tokenizers (clip.tokenize) and text encoders produce them."""

from __future__ import annotations

from typing import Mapping

from .. import tokens as bend_tokens
from .hidream import LLAMA_KEY, llama_columns
from .padded_tokens import LONGCAT_KEY, OVIS_KEY, padded_columns

def _token_ids(tokens: Mapping, key: str | None = None) -> list:
    """The token ids of ComfyUI's clip.tokenize output {"l": [[(id, weight, …), …77], …]} in
    cross-attention column order (the chunks' concatenation); an embedding vector counts as None.
    key: the encoder whose tokens the model attends to; default "l" (SDXL's "g" has the same
    positions), or the only one."""
    if key is None:
        key = "l" if "l" in tokens or len(tokens) != 1 else next(iter(tokens))
    key = key.partition(":")[0]              # "qwen3vl_8b:all" (Ideogram 4): the encoder, then how its tokens are kept
    if key not in tokens:
        raise ValueError(f"bending_clip tokenizes for {', '.join(sorted(tokens))}, but this model reads "
                         f"{key!r} tokens: wire the text encoder you sample with")
    return [t[0] if isinstance(t[0], int) else None for chunk in tokens[key] for t in chunk]


def token_columns(clip, prompt: str, words, key: str | tuple | None = None) -> dict[str, list[int]]:
    """token → its text-token columns in the cross-attention context of `prompt` as `clip` encodes it.

    The prompt goes to the wired CLIP's own tokenize() exactly as the user encodes it, after removing
    only the "{word}" bending marks (tokens.py): ComfyUI parses its emphasis ("(word:1.2)", "((word))",
    "\\(" escapes) and chunking itself, so a weighted word keeps its place and a target may carry a
    weight. A word's ids are clip.tokenize(word) less the ids an empty prompt has (start, end,
    padding); all of its sub-tokens are bent. Wildcards and comma groups: bend_tokens.token_columns.
    key: a tuple names encoders whose tokens follow one another in the context (SD3: ("l", "t5xxl"),
    77 CLIP tokens per chunk, then T5's): a word must be in the first; its columns in the others, shifted
    by the tokens before them, are bent too where it is found there.
    """
    text, _marked = bend_tokens.parse_marked_prompt(prompt)
    tokens, empty = clip.tokenize(text), clip.tokenize("")
    if key is None and len(tokens) == 1:          # the wired CLIP's only encoder (Flux.2: Mistral 3 or Qwen3)
        key = next(iter(tokens))
    keys = key if isinstance(key, tuple) else (key,)
    try:
        found = _columns_of(clip, words, tokens, empty, keys[0])
    except ValueError as e:
        raise ValueError(f"{e} in the bending prompt {text!r}; put the prompt you encode into the "
                         "node's bending_prompt, or change the entry's token") from None
    offset = len(_token_ids(tokens, keys[0])) if len(keys) > 1 else 0
    for later in keys[1:]:
        if later not in tokens:
            break
        for word in words:
            try:
                more = _columns_of(clip, [word], tokens, empty, later).get(word, [])
            except ValueError:
                continue                       # not among this encoder's tokens (or a wildcard)
            found[word] = found.get(word, []) + [offset + j for j in more]
        offset += len(_token_ids(tokens, later))
    return found


def llama_prompt_tokens(clip, prompt: str) -> int:
    """HunyuanVideo 1.0: how many Llama tokens of the prompt its encoder keeps (hunyuan_video.py)."""
    from .hunyuan_video import prompt_tokens
    return prompt_tokens(clip, prompt, _token_ids)


def _columns_of(clip, words, tokens: Mapping, empty: Mapping, key) -> dict[str, list[int]]:
    if key in (QWEN_KEY, KREA2_KEY):
        return _qwen_columns(clip, words, tokens, empty, key)
    if key == LLAMA_KEY:                         # HiDream's Llama 3.1 tokens
        return llama_columns(clip, words, tokens, empty)
    if key == HUNYUAN_KEY:                       # HunyuanVideo 1.0's Llama 3 tokens, cut by its template
        from .hunyuan_video import llama_columns as hunyuan_columns
        return hunyuan_columns(clip, words, tokens, empty, _token_ids)
    if key in WHOLE_TEXT_KEYS:
        return _whole_text_columns(clip, words, tokens, empty, key)
    if key in (LONGCAT_KEY, OVIS_KEY):
        return padded_columns(words, key, _token_ids(tokens, key), _token_ids(empty, key),
                              lambda text: _token_ids(clip.tokenize(text), key))
    special = set(_token_ids(empty, key))
    prompt = _token_ids(tokens, key)

    def ids(text):
        return [i for i in _token_ids(clip.tokenize(text), key) if i not in special]

    return bend_tokens.token_columns(words, prompt, bend_tokens.spelled_in(prompt, ids))     # T5: after punctuation too


# HunyuanVideo 1.0's text key: ComfyUI's "llama" tokens (HiDream's key too), kept by its template rule
# (hunyuan_video.py)
HUNYUAN_KEY = "llama (HunyuanVideo 1.0)"


# Qwen-Image: ComfyUI's QwenImageTokenizer puts the prompt into the chat template (system prompt, then
# "<|im_start|>user\n", the prompt, "<|im_end|>\n<|im_start|>assistant\n"; a prompt that starts with
# "<|im_start|>" is its own template) and tokenises it whole with weights disabled: "(word:1.2)" stays literal
# text, only the "\(" escapes are resolved. Its encoder (QwenImageTEModel.encode_token_weights) drops the
# embeddings before the second "<|im_start|>" and that token's "user\n": the joint attention's text key 0 is
# the prompt's first token, and the template's tail follows the prompt. These are Qwen2.5's token ids.
QWEN_KEY = "qwen25_7b"
KREA2_KEY = "qwen3vl_4b"     # Krea 2's Qwen3-VL: Qwen-Image's template, its encoder drops the same prefix
QWEN_IM_START, QWEN_USER, QWEN_NEWLINE = 151644, 872, 198
QWEN_PAD = 151643                # <|endoftext|>, ComfyUI's Qwen tokenizers' padding


def _qwen_text(ids: list) -> list:
    """The ids whose embeddings ComfyUI's Qwen-Image encoder keeps (its template_end rule)."""
    starts = [i for i, t in enumerate(ids) if t == QWEN_IM_START][:2]
    if not starts:
        raise ValueError("the Qwen-Image prompt has no <|im_start|> (ComfyUI then keeps only its last token)")
    end = starts[-1]
    if len(ids) > end + 3 and ids[end + 1] == QWEN_USER and ids[end + 2] == QWEN_NEWLINE:
        end += 3
    return ids[end:]


def _qwen_columns(clip, words, tokens: Mapping, empty: Mapping, key=QWEN_KEY) -> dict[str, list[int]]:
    """Qwen-Image: word → its columns among the kept text tokens. A word is found spelled after a space
    (" kiss") or bare (at the prompt's start, after "(" …): byte-level BPE gives them different ids; the
    earlier one in the prompt wins. Its spellings are tokenised inside the template, as the prompt is, and
    cut out of the kept tokens (less the template's tail)."""
    tail = len(_qwen_text(_token_ids(empty, key)))

    def spell(text):
        kept = _qwen_text(_token_ids(clip.tokenize(text), key))
        return kept[:len(kept) - tail]

    return bend_tokens.token_columns(words, _qwen_text(_token_ids(tokens, key)),
                                 lambda word: bend_tokens.Alternatives((spell(" " + word), spell(word))))


# Z-Image and Lumina 2: every token the tokenizer gives is a text key of the joint attention, column 0 the first.
# Z-Image's tokenizer puts the prompt into Qwen3's chat template ("<|im_start|>user\n", the prompt,
# "<|im_end|>\n<|im_start|>assistant\n") with weights disabled; Lumina 2's Gemma 2 tokenizer puts <bos> first (its
# system prompt is the text node's, part of the text encoded).
# Qwen-Image 2.x's Qwen3-VL tokenizer: the prompt in a chat template after a system turn, which its encoder drops
# (every token before the second <|im_start|>): column 0 is the user turn's <|im_start|>.
QWEN3_KEY, GEMMA2_KEY, QWEN3VL_KEY = "qwen3_4b", "gemma2_2b", "qwen3vl_8b"
# Flux.2: Mistral 3 ([SYSTEM_PROMPT]…[/SYSTEM_PROMPT][INST]prompt[/INST], a start token) or Klein's Qwen3 (its chat
# template with an empty think block, padded to 512): every token is a text key too.
# Ideogram 4's Qwen3-VL tokenizer: "<|im_start|>user\n", the prompt, "<|im_end|>\n<|im_start|>assistant\n", weights
# disabled; its encoder keeps every token (unlike Qwen-Image 2.x's, which reads the same tokenizer key).
IDEOGRAM4_KEY = QWEN3VL_KEY + ":all"
WHOLE_TEXT_KEYS = (QWEN3_KEY, GEMMA2_KEY, QWEN3VL_KEY, "qwen3_8b", "mistral3_24b", IDEOGRAM4_KEY)


def _kept(ids: list, key) -> list:
    """The tokens the model attends to: Qwen-Image 2.x's from the second <|im_start|>, the others all."""
    starts = [i for i, t in enumerate(ids) if t == QWEN_IM_START][:2] if key == QWEN3VL_KEY else []
    return ids[starts[1]:] if len(starts) > 1 else ids


def _unpadded(ids: list) -> list:
    """ids less a trailing run of Qwen's <|endoftext|>: Flux.2 Klein's tokenizers pad the template to 512 with it,
    which would hide where a word spelled alone ends."""
    end = len(ids)
    while end and ids[end - 1] == QWEN_PAD:
        end -= 1
    return ids[:end]


def _whole_text_columns(clip, words, tokens: Mapping, empty: Mapping, key) -> dict[str, list[int]]:
    """word → its columns among all the tokens, searched from where the prompt's tokens part from the empty
    prompt's (a word of a template or system prompt before it is not the prompt's). A word is found spelled after a
    space or bare (byte-level BPE and SentencePiece spell them apart), tokenised in place as the prompt is."""
    blank = _unpadded(_kept(_token_ids(empty, key), key))

    def start(ids):
        return next((i for i, (a, b) in enumerate(zip(ids, blank)) if a != b), min(len(ids), len(blank)))

    def spell(text):
        ids = _unpadded(_kept(_token_ids(clip.tokenize(text), key), key))
        at = start(ids)
        return ids[at:len(ids) - (len(blank) - at)]

    prompt = _kept(_token_ids(tokens, key), key)
    at = start(prompt)
    found = bend_tokens.token_columns(words, prompt[at:],
                                      lambda word: bend_tokens.Alternatives((spell(" " + word), spell(word))))
    return {w: [at + j for j in js] for w, js in found.items()}
