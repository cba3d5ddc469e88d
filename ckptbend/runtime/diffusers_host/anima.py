"""Anima in diffusers: AnimaModularPipeline, a Cosmos Predict2 transformer (bent by the generic cross-attention path)
behind a text adapter, AnimaTextConditioner, whose output sits at the T5 token positions of the prompt: its queries
are the T5 ids' embeddings, its keys the Qwen3 states. So a word's columns are its T5 tokens (the pipeline's
t5_tokenizer, truncated at max_sequence_length), whatever Qwen3 makes of the prompt.

A modular pipeline has no encode_prompt: the text encoder step's encode_prompt (prompt and negative prompt in one
call) is wrapped to strip the marks and find the words, and the conditioning step's _condition_prompt_embeds (the
prompt's, then the negative's) to keep the prompt's conditioning, which tells the guider's conditional calls."""

from __future__ import annotations

import inspect

from .flux3 import _blocks
from .prompts import _columns, unmark

ANIMA_PIPELINES = ("AnimaModularPipeline",)
ENCODE, CONDITION = "encode_prompt", "_condition_prompt_embeds"


def wrap_text_steps(session) -> None:
    """Instance attributes standing in for the text encoder step's encode_prompt and the conditioning step's
    _condition_prompt_embeds, in every block of the pipeline that has them."""
    since_encode = [0]              # conditioning calls since the last encode_prompt: the first is the prompt's

    def wrap(block, name, make):
        inner = getattr(block, name)
        setattr(block, name, make(inner, inspect.signature(inner)))
        session._undo.append(lambda: delattr(block, name))

    def encoder(inner, signature):
        def encode(*args, **kwargs):
            since_encode[0] = 0
            if session.entries:
                bound = signature.bind(*args, **kwargs)
                prompt = bound.arguments.get("prompt")
                if prompt is None:
                    raise ValueError("Attention Bending finds its words in the prompt: call the pipeline with prompt=")
                bound.arguments["prompt"] = unmark(prompt)
                limit = (bound.arguments.get("max_sequence_length")
                         or signature.parameters["max_sequence_length"].default)
                components = bound.arguments["components"]
                session.token_indices = _columns(session, _limited(components.t5_tokenizer, limit),
                                                 bound.arguments["prompt"])
                args, kwargs = bound.args, bound.kwargs
            return inner(*args, **kwargs)
        return encode

    def conditioner(inner, signature):
        def condition(*args, **kwargs):
            out = inner(*args, **kwargs)
            if since_encode[0] == 0:
                session.prompt_embeds = out
            since_encode[0] += 1
            return out
        return condition

    for block in _blocks(getattr(session.pipe, "_blocks", None)):
        if hasattr(block, ENCODE) and hasattr(block, "_get_t5_prompt_ids"):
            wrap(block, ENCODE, encoder)
        if hasattr(block, CONDITION):
            wrap(block, CONDITION, conditioner)


class _limited:
    """The T5 tokenizer as the step calls it: truncated at max_sequence_length (prompts._columns truncates at the
    tokenizer's model_max_length)."""

    def __init__(self, tokenizer, limit):
        self.tokenizer, self.model_max_length = tokenizer, min(limit, tokenizer.model_max_length)

    def __call__(self, *args, **kwargs):
        return self.tokenizer(*args, **kwargs)
