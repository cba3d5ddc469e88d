"""A word's text-token columns for ComfyUI encoders that pad inside their chat template: LongCat-Image's Qwen2.5-VL
(the prompt's tokens padded to 512 between the template's prefix and suffix, the prefix dropped as Qwen-Image's
encoder drops it) and Ovis-Image's Qwen3 (the whole template padded to 284 tokens, everything before its last word
ahead of the prompt dropped). Both models attend to every kept token, padding included.

The padding hides where a word spelled alone ends, so a spelling is the kept tokens from where they part from the
empty prompt's up to the first padding or <|im_end|> token; the word is searched from where the prompt parts from
the empty prompt (a word of the template before it is not the prompt's)."""

from __future__ import annotations

from .. import tokens as bend_tokens

LONGCAT_KEY, OVIS_KEY = "qwen25_7b:longcat", "qwen3_2b:ovis"    # the tokenizer's key, then the keep rule's name
PAD, IM_END = 151643, 151645                                    # Qwen's <|endoftext|> (its padding), <|im_end|>
OVIS_CUT, COLON = 4004, 25       # ComfyUI's Ovis encoder keeps its tokens from the first 4004, or the 25 after it


def _ovis_kept(ids: list) -> list:
    if OVIS_CUT not in ids:
        raise ValueError("the Ovis-Image prompt lacks the template's last word (ComfyUI then keeps one token)")
    at = ids.index(OVIS_CUT)
    return ids[at + 1:] if ids[at + 1:at + 2] == [COLON] else ids[at:]


def _kept(ids: list, key) -> list:
    from .tokens import _qwen_text         # LongCat's encoder drops the prefix as Qwen-Image's does
    return _ovis_kept(ids) if key == OVIS_KEY else _qwen_text(ids)


def padded_columns(words, key, prompt_ids: list, empty_ids: list, ids_of) -> dict[str, list[int]]:
    """word → its columns among the kept tokens of prompt_ids; ids_of(text): the tokenizer's ids of a text."""
    blank = _kept(empty_ids, key)

    def start(ids):
        return next((i for i, (a, b) in enumerate(zip(ids, blank)) if a != b), min(len(ids), len(blank)))

    def spell(text):
        ids = _kept(ids_of(text), key)
        at = start(ids)
        end = next((i for i in range(at, len(ids)) if ids[i] in (PAD, IM_END)), len(ids))
        return ids[at:end]

    prompt = _kept(prompt_ids, key)
    at = start(prompt)
    found = bend_tokens.token_columns(words, prompt[at:],
                                      lambda word: bend_tokens.Alternatives((spell(" " + word), spell(word))))
    return {w: [at + j for j in js] for w, js in found.items()}
