"""Sana in the diffusers host: the word columns of SanaPipeline's Gemma 2 text, and Sana Sprint's step. Its text
cross-attention (attn2, SanaAttnProcessor2_0: the prompt's padding masked) is bent by the generic cross-attention
path (cross.py)."""

from __future__ import annotations

import inspect
import math

from .. import tokens
from .calls import scheduler_position
from .prompts import same_columns

SANA_MODELS = ("SanaTransformer2DModel",)


def sana_columns(session, arguments) -> dict[str, list[int]]:
    """SanaPipeline.encode_prompt: each prompt lower-cased and stripped (its _text_preprocessing), after the
    "complex human instruction" lines when given (joined by newlines), tokenized with <bos> and right-padded to
    max_length_all = (the instruction's own token count) + max_sequence_length - 2; the model then sees the
    columns [0] + the last max_sequence_length - 1 of them (select_index): <bos> and the prompt's tail of the
    instruction. The columns are found in that kept row, from where it parts from the empty prompt's (a word of the
    instruction is not the prompt's); a word after a space or bare (Gemma's SentencePiece spells them apart)."""
    pipe = session.pipe
    defaults = {n: p.default for n, p in inspect.signature(pipe.encode_prompt).parameters.items()}
    given = {**defaults, **arguments}
    length, clean = given.get("max_sequence_length") or 300, bool(given.get("clean_caption"))
    instruction = given.get("complex_human_instruction")
    tokenizer = pipe.tokenizer
    prepare = pipe._text_preprocessing

    def kept(prompt):
        text, total = prepare(prompt, clean_caption=clean)[0], length
        if instruction:
            prefix = "\n".join(instruction)
            text, total = prefix + text, len(tokenizer.encode(prefix)) + length - 2
        ids = tokenizer(text, padding="max_length", max_length=total, truncation=True,
                        add_special_tokens=True)["input_ids"]
        return [ids[0]] + ids[len(ids) - length + 1:]          # select_index = [0] + range(1 - length, 0)

    def spell(word):                          # lower-cased as the prompt is (its leading space kept)
        return tokenizer(word.lower(), add_special_tokens=False)["input_ids"]

    empty = kept("")
    words = list(dict.fromkeys(e.token for e in session.entries))

    def columns(prompt):
        ids = kept(prompt)
        start = next((i for i, (a, b) in enumerate(zip(ids, empty)) if a != b), len(ids))
        found = tokens.token_columns(words, ids[start:], lambda w: tokens.Alternatives((spell(" " + w), spell(w))))
        return {w: [start + j for j in js] for w, js in found.items()}

    prompt = arguments["prompt"]
    return same_columns([columns(p) for p in ([prompt] if isinstance(prompt, str) else prompt)])


def sprint_position(scheduler, t: float) -> int | None:
    """SanaSprintPipeline gives the model sin(a) / (cos(a) + sin(a)) of its SCM scheduler's timestep a (an angle in
    about [0, π/2]; its 1.5708 gives t just above 1): the call's position in scheduler.timesteps is the angle's,
    atan2(t, 1 − t)."""
    if type(scheduler).__name__ != "SCMScheduler":
        return None
    return scheduler_position(scheduler, math.atan2(t, 1.0 - t))
