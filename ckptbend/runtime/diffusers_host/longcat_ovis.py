"""LongCat-Image and Ovis-Image in the diffusers host: their word columns. Their attentions are Flux.1's: each
processor (LongCatImageAttnProcessor, OvisImageAttnProcessor) forms q, k, v as FluxAttnProcessor does ([text; image],
per-head RMS norms, Flux's RoPE on the whole sequence, no mask), so joint.py bends them as Flux (JOINT_MODELS).
Both pipelines run CFG as two calls, the prompt's first, and pass timestep t / 1000.

What the transformer sees as text:
- LongCatImagePipeline: the prompt tokenized bare (no special tokens), each part between quotes one character at a
  time (its split_quotation), cut at tokenizer_max_length (512) and padded to it, then wrapped in its system-and-user
  prefix and assistant suffix for Qwen2.5-VL, whose output drops both: column j is the prompt's token j. By default
  the pipeline first rewrites the prompt with its text encoder (enable_prompt_rewrite): the words are found in that.
  LongCatImageEditPipeline keeps its prefix's image tokens (from <|vision_start|> on) before the prompt's, and adds
  the reference image's latent tokens after the target's: the target's queries are bent, the reference's left alone.
- OvisImagePipeline: Qwen3's chat template of one user turn, its system_prompt + the prompt (no thinking), padded to
  max_sequence_length + user_prompt_begin_id tokens, of which the first user_prompt_begin_id (28) are dropped.
"""

from __future__ import annotations

import inspect

from .. import tokens

LONGCAT_OVIS_MODELS = {"LongCatImageTransformer2DModel": "longcat", "OvisImageTransformer2DModel": "ovis"}


def longcat_ovis_columns(session, arguments) -> dict[str, list[int]]:
    """word → its columns in the text the transformer sees, the same in every prompt of a list (else ValueError);
    a word spelled after a space or bare (byte-level BPE), or (LongCat, between quotes) a character at a time."""
    from .prompts import same_columns

    pipe, prompt = session.pipe, arguments["prompt"]
    tokenizer = pipe.tokenizer
    words = list(dict.fromkeys(e.token for e in session.entries))

    def spell(text):
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    def spellings(word):          # LongCat tokenizes text between quotes a character at a time
        found = [spell(" " + word), spell(word)]
        quoted = [[i for c in word for i in spell(c)]] if session.joint == "longcat" else []
        return tokens.Alternatives(found + quoted)

    before = 0
    if session.joint == "longcat":
        ids, length = _longcat_ids, pipe.tokenizer_max_length
        if arguments.get("image") is not None:       # LongCatImageEditPipeline: the image's tokens come first
            before = _edit_image_tokens(pipe, arguments["image"])
    else:
        ids, length = _ovis_ids, arguments.get("max_sequence_length") or 256

    def columns(text):
        found, empty = ids(pipe, text, length), ids(pipe, "", length)
        # searched from where the prompt parts from the empty prompt's (Ovis: past the system prompt's rest)
        start = next((i for i, (a, b) in enumerate(zip(found, empty)) if a != b), min(len(found), len(empty)))
        at = tokens.token_columns(words, found[start:], spellings)
        pad = length - len(found) if getattr(tokenizer, "padding_side", "right") == "left" else 0
        return {w: [before + pad + start + j for j in js] for w, js in at.items()}

    try:
        return same_columns([columns(p) for p in ([prompt] if isinstance(prompt, str) else prompt)])
    except ValueError as e:
        if not hasattr(pipe, "rewire_prompt") or "not found" not in str(e):
            raise
        raise ValueError(f"{e} in the prompt {type(pipe).__name__} encodes, {prompt!r} (it rewrites the prompt "
                         "first unless called with enable_prompt_rewrite=False)") from None


def wrap_rewrite(session) -> None:
    """LongCatImagePipeline rewrites the prompt with its text encoder before encoding it (enable_prompt_rewrite, on
    by default): the rewriter gets the prompt less the "{word}" marks; the words are found in what it writes."""
    from .prompts import unmark

    pipe = session.pipe
    had, before, inner = "rewire_prompt" in vars(pipe), vars(pipe).get("rewire_prompt"), pipe.rewire_prompt

    def rewire_prompt(prompt, *args, **kwargs):
        return inner(unmark(prompt), *args, **kwargs)

    pipe.rewire_prompt = rewire_prompt
    session._undo.append(lambda: setattr(pipe, "rewire_prompt", before) if had else delattr(pipe, "rewire_prompt"))


def _longcat_ids(pipe, prompt, length) -> list[int]:
    """LongCatImagePipeline._encode_prompt's tokens of one prompt, before padding (its module's own quote splitter:
    the companion imports no diffusers)."""
    ids = []
    for part, quoted in inspect.getmodule(type(pipe)).split_quotation(prompt):
        for piece in (part if quoted else [part]):
            ids += pipe.tokenizer(piece, add_special_tokens=False)["input_ids"]
    return ids[:length]


def _edit_image_tokens(pipe, image) -> int:
    """LongCatImageEditPipeline keeps <|vision_start|>, the image's <|image_pad|> tokens (its Qwen2.5-VL grid less
    the merge) and <|vision_end|> of its prefix before the prompt's tokens in the encoder output."""
    processor = pipe.image_processor_vl
    grid = processor(images=image, return_tensors="pt")["image_grid_thw"]
    return int(grid.prod()) // processor.merge_size ** 2 + 2


def _ovis_ids(pipe, prompt, length) -> list[int]:
    """OvisImagePipeline._get_ovis_prompt_embeds' tokens of one prompt, before padding, less the dropped ones."""
    turn = [{"role": "user", "content": pipe.system_prompt + prompt}]
    text = pipe.tokenizer.apply_chat_template(turn, tokenize=False, add_generation_prompt=True, enable_thinking=False)
    drop = pipe.user_prompt_begin_id
    return pipe.tokenizer(text, truncation=True, max_length=length + drop, add_special_tokens=False)[
        "input_ids"][drop:]
