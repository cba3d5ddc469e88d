r"""Finding an entry's word in a prompt: its token columns, whatever the host's tokenizer (standard library only).

An entry's token is one of (the original's later versions, after 6322d6f):
- a word or phrase: its sub-tokens' columns in the encoded prompt (all of them; first_only for the
  original's first sub-token). A word absent from the prompt is an error ("Token not found").
- a wildcard, "ALL", "*" or "ALLTOKENS" (any case): every text token, i.e. every key column of the
  cross-attention (start/end tokens and padding included, as the original's range(seq_len)).
- a comma-separated group, "kiss, rose, ship": every member found in the prompt is bent by the same
  entry, each column on its own, as one entry. Members missing from the prompt are skipped, as in
  the original; a group none of whose members is in the prompt is an error here (the original logs
  a warning and bends nothing).

Prompts may mark targets with braces, "a romantic {kiss} at {sunset}": the braces are removed before
encoding and nothing else is touched, so the host's emphasis syntax ("(sunset:1.2)", "((kiss))",
"\(" escapes; compel's weights in diffusers) passes to its tokenizer unchanged, and a target may carry
a weight: "{(sunset:1.2)}" or "({sunset}:1.2)". Marks are optional: the entry's token names the target.
The original marked targets with parentheses, which are ComfyUI's and A1111's emphasis; "{a|b}"
(dynamic-prompt choices) is not a mark.
"""

from __future__ import annotations

import re
from typing import Callable, Hashable, Iterable, Mapping, Sequence

WILDCARDS = ("ALL", "*", "ALLTOKENS")
_MARK = re.compile(r"\{([^{}|]+)\}")


def is_wildcard(token: str) -> bool:
    return token.strip().upper() in WILDCARDS


def group_members(token: str) -> list[str]:
    """'kiss, rose' → ['kiss', 'rose']; a single word → [word]."""
    return [w.strip() for w in token.split(",") if w.strip()]


def parse_marked_prompt(prompt: str) -> tuple[str, list[str]]:
    """'a romantic {kiss} at {(sunset:1.2)}' → ('a romantic kiss at (sunset:1.2)', ['kiss', '(sunset:1.2)'])."""
    words = [m.strip() for m in _MARK.findall(prompt)]
    return _MARK.sub(r"\1", prompt), words


def token_indices_for(word: str, prompt_tokens: Sequence[Hashable],
                      tokenize_word: Callable[[str], Sequence[Hashable]], first_only: bool = False) -> list[int]:
    """Positions of `word` in the encoded prompt: the first place where its sub-tokens appear in a row.

    prompt_tokens: the encoded prompt as the text encoder sees it (BOS at 0), token strings or ids;
    tokenize_word: one word (or phrase) → its sub-tokens of the same kind, without BOS/EOS, e.g.
    `tokenizer.tokenize` of a CLIP tokenizer or a ComfyUI tokenizer's ids, or Alternatives of such
    sequences (the earliest match wins). first_only=True bends only
    the first sub-token, as the original does; the default bends them all.
    """
    pieces = tokenize_word(word)
    tokens = list(prompt_tokens)
    hits = [(i, len(option)) for option in (pieces if isinstance(pieces, Alternatives) else [pieces])
            if (i := token_run(tokens, option)) is not None]
    if not hits:
        raise ValueError(f"Token not found: '{word}'")
    i, m = min(hits)
    return [i] if first_only else list(range(i, i + m))


BARE_PREFIX = ","        # a word right after it is spelled as right after any punctuation


def spelled_in(prompt_tokens: Sequence[Hashable], spell: Callable[[str], list]) -> Callable[[str], list]:
    """tokenize_word for token_columns, from `spell` (text → the host tokenizer's pieces, no specials): a word
    as spelled alone; where that is not in the prompt, as spelled right after punctuation. SentencePiece
    (T5, UMT5) gives a word after a space "▁sunset" but after punctuation with no space ("kiss,sunset",
    '"sunset"', ComfyUI's escaped "\\(sunset\\)") "s", "un", "set": spell(",sunset") less spell(",")'s
    pieces. CLIP's BPE spells both alike."""
    def word_pieces(word):
        alone = spell(word)
        if token_run(prompt_tokens, alone) is not None:
            return alone
        lead, after = spell(BARE_PREFIX), spell(BARE_PREFIX + word)
        return after[len(lead):] if lead and after[:len(lead)] == lead and after[len(lead):] else alone

    return word_pieces


class Alternatives(tuple):
    """What tokenize_word may return instead of one piece sequence: several spellings of the word, the
    earliest in the prompt wins. Byte-level BPE (Qwen2) spells a word after a space ("Ġkiss") unlike one
    at the prompt's start or after punctuation ("kiss")."""


def token_run(tokens: Sequence[Hashable], pieces: Sequence[Hashable]) -> int | None:
    """The first i where pieces appear in a row in tokens, or None (also for no pieces)."""
    tokens, pieces, m = list(tokens), list(pieces), len(pieces)
    return next((i for i in range(len(tokens) - m + 1) if m and tokens[i:i + m] == pieces), None)


def token_columns(words: Iterable[str], prompt_tokens: Sequence[Hashable],
                  tokenize_word: Callable[[str], Sequence[Hashable]], first_only: bool = False) -> dict[str, list[int]]:
    """{token: its columns} for every entry token (see above): a word's sub-tokens, a group's members'
    (those in the prompt), nothing for a wildcard (columns_for resolves it per call)."""
    out = {}
    for word in words:
        if is_wildcard(word):
            continue
        members = group_members(word) if "," in word else [word]
        found = []
        for member in members:
            try:
                found += token_indices_for(member, prompt_tokens, tokenize_word, first_only)
            except ValueError:
                if len(members) == 1:
                    raise
        if not found:
            raise ValueError(f"Token not found: no word of the group '{word}'")
        out[word] = list(dict.fromkeys(found))
    return out


def columns_for(token: str, token_indices: Mapping[str, Sequence[int]], n_text: int) -> list[int]:
    """The key columns an entry bends: every one of the n_text for a wildcard, else token_indices'."""
    if is_wildcard(token):
        return list(range(n_text))
    if token not in token_indices:
        raise ValueError(f"Token not found: '{token}'")
    return list(token_indices[token])
