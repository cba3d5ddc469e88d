"""The prompt's side of Bending in diffusers: encode_prompt wrapped to strip the "{word}" marks and find each
word's token columns with the pipeline's own tokenizer(s), as its text encoder sees them."""

from __future__ import annotations

import inspect

from .. import tokens
from .longcat_ovis import longcat_ovis_columns


def wrap_encode_prompt(session):
    """pipe.encode_prompt as an instance attribute: with bending, strip the marks and locate the
    words first (errors come before any denoising); always, keep the conditional embeddings. Only the first
    call after a model call (or apply) is the prompt's; the calls after it, before denoising, the negative's."""
    pipe = session.pipe
    had, before = "encode_prompt" in vars(pipe), vars(pipe).get("encode_prompt")
    inner = pipe.encode_prompt
    signature = inspect.signature(inner)

    def encode_prompt(*args, **kwargs):
        if session.prompt_encoded:          # a second call before denoising: the negative prompt's (Flux's true
            return inner(*args, **kwargs)   # CFG, Qwen-Image, HunyuanVideo 1.5, Kandinsky 5 encode it apart)
        session.prompt_encoded = True
        if session.entries:
            bound = signature.bind(*args, **kwargs)
            prompt = bound.arguments.get("prompt")
            if prompt is None:
                raise ValueError("Attention Bending finds its words in the prompt: call the pipeline "
                                 "with prompt=..., not with prompt_embeds alone")
            for name in ("prompt", "prompt_2"):
                if bound.arguments.get(name) is not None:
                    bound.arguments[name] = unmark(bound.arguments[name])
            session.token_indices = _locate(session, bound.arguments)
            args, kwargs = bound.args, bound.kwargs
        result = inner(*args, **kwargs)
        # prompt_embeds first, in every diffusers pipeline but ERNIE-Image's (a list of per-prompt tensors)
        session.prompt_embeds = result if session.family == "ernie" else result[0]
        return result

    pipe.encode_prompt = encode_prompt
    session._undo.append(lambda: setattr(pipe, "encode_prompt", before) if had else delattr(pipe, "encode_prompt"))
    if hasattr(pipe, "upsample_prompt"):
        _unmark_before(session, "upsample_prompt")


def _unmark_before(session, method: str) -> None:
    """pipe.<method>, a step that rewrites the prompt before encode_prompt (Ideogram4Pipeline.upsample_prompt: an LLM),
    as an instance attribute that, with bending, gets the prompt without its marks, as it would in an unbent run; the
    words are then found in what it writes."""
    pipe = session.pipe
    had, before = method in vars(pipe), vars(pipe).get(method)
    inner = getattr(pipe, method)
    signature = inspect.signature(inner)

    def rewrite(*args, **kwargs):
        if session.entries:
            bound = signature.bind(*args, **kwargs)
            bound.arguments["prompt"] = unmark(bound.arguments["prompt"])
            args, kwargs = bound.args, bound.kwargs
        return inner(*args, **kwargs)

    setattr(pipe, method, rewrite)
    session._undo.append(lambda: setattr(pipe, method, before) if had else delattr(pipe, method))

def _locate(session, arguments) -> dict[str, list[int]]:
    """word → its token columns, the same in every prompt of a list (else ValueError), in the text
    the model attends to: pipe.tokenizer's encoding of prompt; on Flux the T5 tokens (tokenizer_2, of
    prompt_2 when given, as FluxPipeline encodes them); on SD3 the CLIP-L tokens (tokenizer: CLIP-G's
    share their places) and, where the word is among them, its T5 tokens (tokenizer_3, of prompt_3 when
    given), which follow the tokenizer_max_length CLIP tokens in the context."""
    pipe = session.pipe
    if session.joint in ("longcat", "ovis"):
        return longcat_ovis_columns(session, arguments)
    if session.joint == "flux":                       # Chroma: T5 is its only tokenizer
        t5 = getattr(pipe, "tokenizer_2", None) or pipe.tokenizer
        return _columns(session, t5, arguments.get("prompt_2") or arguments["prompt"])
    if session.joint == "qwen":
        return _qwen_columns(session, arguments["prompt"])
    from .families import FAMILIES            # here: the families table imports this module
    family = FAMILIES.get(session.family)
    if family is not None and family.columns is not None:      # the family's own tokenizer and template
        return family.columns(session, arguments)
    if session.joint == "flux2":                # Mistral 3's (Klein: Qwen3's) chat template
        return single_columns(session, arguments)
    if hasattr(pipe, "connectors"):
        return _ltx2_columns(session, arguments["prompt"])
    found = _columns(session, pipe.tokenizer, arguments["prompt"], arguments.get("clean_caption", False))
    if session.joint == "sd3" and getattr(pipe, "text_encoder_3", None) is not None:
        t5_prompt = arguments.get("prompt_3") or arguments["prompt"]
        for word in found:
            try:
                more = _columns(session, pipe.tokenizer_3, t5_prompt, words=[word])[word]
            except ValueError:
                continue                   # the word is not among the T5 tokens
            found[word] = found[word] + [pipe.tokenizer_max_length + j for j in more]
    return found

def _qwen_columns(session, prompt) -> dict[str, list[int]]:
    """QwenImagePipeline: the prompt in its chat template (prompt_template_encode), the first
    prompt_template_encode_start_idx tokens dropped (diffusers' rule; ComfyUI's template_end rule drops
    the same 34 with Qwen2.5's tokenizer), the template's tail after the prompt. A word is found spelled
    after a space or bare (byte-level BPE: the first word, one after "("), the earlier wins."""
    pipe = session.pipe
    template, drop = pipe.prompt_template_encode, pipe.prompt_template_encode_start_idx

    def kept(text):
        return pipe.tokenizer(template.format(text))["input_ids"][drop:]

    tail = len(kept(""))

    def spell(text):
        ids = kept(text)
        return ids[:len(ids) - tail]

    words = list(dict.fromkeys(e.token for e in session.entries))
    return same_columns([tokens.token_columns(words, kept(text), lambda w: tokens.Alternatives(
        (spell(" " + w), spell(w)))) for text in ([prompt] if isinstance(prompt, str) else prompt)])

def hidream_columns(session, arguments) -> dict[str, list[int]]:
    """HiDream: every block attends to [T5; Llama's last layer; Llama's layer for the block], each padded to
    max_sequence_length (the tokenizer's limit if smaller): a word's T5 columns (tokenizer_3, of prompt_3) and its
    Llama columns (tokenizer_4, of prompt_4) in both Llama parts; found in at least one of the two."""
    pipe = session.pipe
    limit = arguments.get("max_sequence_length") or 128
    n_t5, n_llama = (min(limit, t.model_max_length) for t in (pipe.tokenizer_3, pipe.tokenizer_4))
    llama, llama_prompt = pipe.tokenizer_4, arguments.get("prompt_4") or arguments["prompt"]

    def llama_columns(word):                     # byte-level BPE: a word after a space or bare
        def spell(text):
            return llama(text, add_special_tokens=False)["input_ids"]

        return same_columns([tokens.token_columns([word], llama(p, truncation=True, max_length=n_llama)["input_ids"],
                                                  lambda w: tokens.Alternatives((spell(" " + w), spell(w))))
                             for p in ([llama_prompt] if isinstance(llama_prompt, str) else llama_prompt)])[word]

    found = {}
    for word in dict.fromkeys(e.token for e in session.entries):
        columns = []
        for find, offsets in ((lambda w: _columns(session, pipe.tokenizer_3, arguments.get("prompt_3")
                                                  or arguments["prompt"], words=[w])[w], (0,)),
                              (llama_columns, (n_t5, n_t5 + n_llama))):
            try:
                js = find(word)
            except (ValueError, KeyError):
                continue                         # not among this encoder's tokens (or a wildcard)
            columns += [offset + j for offset in offsets for j in js]
        if not columns and not tokens.is_wildcard(word):
            raise ValueError(f"Token not found: '{word}'")
        if columns:
            found[word] = columns
    return found


def _ltx2_columns(session, prompt) -> dict[str, list[int]]:
    """LTX-2: Gemma 3's tokens of the stripped prompt, <bos> first, left-padded; its text connector moves the valid
    tokens to the front (learnable registers fill the rest), so column 0 is <bos>. A connector without registers
    would leave them after the padding, at an offset per prompt: refused."""
    pipe, tokenizer = session.pipe, session.pipe.tokenizer
    if getattr(getattr(pipe.connectors, "video_connector", None), "learnable_registers", 0) is None:
        raise ValueError("Attention Bending on LTX-2 needs its text connector's learnable registers (without them "
                         "each prompt's tokens sit after its own padding)")
    words = list(dict.fromkeys(e.token for e in session.entries))

    def spell(word):
        return tokenizer(word, add_special_tokens=False)["input_ids"]

    return same_columns([tokens.token_columns(words, tokenizer(p.strip())["input_ids"], lambda w: tokens.Alternatives(
        (spell(" " + w), spell(w)))) for p in ([prompt] if isinstance(prompt, str) else prompt)])


def ernie_columns(session, arguments) -> dict[str, list[int]]:
    """ERNIE-Image: each prompt tokenized bare with special tokens (<bos> first), truncated at the tokenizer's
    limit, every token fed to the model: column 0 is the first. A word after a space or bare (byte-level BPE)."""
    tokenizer, prompt = session.pipe.tokenizer, arguments["prompt"]
    words = list(dict.fromkeys(e.token for e in session.entries))

    def spell(word):
        return tokenizer(word, add_special_tokens=False)["input_ids"]

    return same_columns([tokens.token_columns(words, tokenizer(p, truncation=True)["input_ids"],
                                              lambda w: tokens.Alternatives((spell(" " + w), spell(w))))
                         for p in ([prompt] if isinstance(prompt, str) else prompt)])


def krea2_columns(session, arguments) -> dict[str, list[int]]:
    """Krea 2: its system-and-user-header prefix + the prompt, padded to a fixed length, the prefix's
    prompt_template_encode_start_idx tokens dropped: column 0 is the prompt's first token (spelled bare)."""
    pipe = session.pipe
    drop = pipe.prompt_template_encode_start_idx
    limit = (arguments.get("max_sequence_length") or 512) + drop - pipe.prompt_template_encode_num_suffix_tokens
    words = list(dict.fromkeys(e.token for e in session.entries))

    def spell(word):
        return pipe.tokenizer(word, add_special_tokens=False)["input_ids"]

    def ids(prompt):
        return pipe.tokenizer(pipe.prompt_template_encode_prefix + prompt, truncation=True, max_length=limit)[
            "input_ids"][drop:]

    prompt = arguments["prompt"]
    return same_columns([tokens.token_columns(words, ids(p), lambda w: tokens.Alternatives((spell(" " + w), spell(w))))
                         for p in ([prompt] if isinstance(prompt, str) else prompt)])


def single_columns(session, arguments) -> dict[str, list[int]]:
    """Z-Image: the prompt as the user's turn of the tokenizer's own chat template with the generation prompt
    (ZImagePipeline: apply_chat_template, enable_thinking=True; Qwen3's template then adds no think block); Lumina 2:
    system prompt + " <Prompt Start> " + prompt, Gemma 2's <bos> first (Lumina2Pipeline). Both feed every token
    (up to max_sequence_length) to the transformer: column 0 is the first. Qwen-Image 2.x: its text-to-image
    template, the system turn's _drop_idx tokens dropped (column 0 is the user turn's <|im_start|>); HunyuanVideo
    1.5: system and user turns of its chat template, crop_start (108) tokens dropped; Kandinsky 5: its
    prompt_template around the whitespace-collapsed prompt (its prompt_clean), 128 tokens dropped, through its
    Qwen2.5-VL processor's tokenizer, right-padded to the longest prompt; Flux.2: Mistral 3's chat
    template with the pipeline's system message, or (Klein) Qwen3's without thinking, all max_sequence_length
    tokens attended (a left-padding tokenizer shifts the prompt by its padding). A word is
    found spelled after a space or bare (byte-level BPE and Gemma's SentencePiece spell them apart), the earlier
    in the prompt (not in the template or system prompt before it)."""
    pipe = session.pipe
    family = ("flux2" if session.joint == "flux2" else session.family if session.family in ("qwen21", "hunyuan15",
              "kandinsky5") else session.single)
    tokenizer = pipe.processor.tokenizer if family == "qwen21" else pipe.tokenizer
    if family == "kandinsky5":             # a Qwen2.5-VL processor: text only, its tokenizer's tokens
        tokenizer = getattr(tokenizer, "tokenizer", tokenizer)
    drop = {"qwen21": getattr(pipe, "_drop_idx", 0), "hunyuan15": getattr(pipe, "prompt_template_encode_start_idx", 0),
            "kandinsky5": getattr(pipe, "prompt_template_encode_start_idx", 0)}
    drop = drop.get(family, 0)
    limit = {"zimage": 512, "lumina2": 256, "flux2": 512,
             "hunyuan15": getattr(pipe, "tokenizer_max_length", 1000) + drop}
    limit = arguments.get("max_sequence_length") or limit.get(family, 1 << 20)
    if family == "kandinsky5":              # its pipeline keeps max_sequence_length tokens after the dropped ones
        limit = (arguments.get("max_sequence_length") or _default_length(pipe)) + drop
    system = arguments.get("system_prompt") or getattr(pipe, "system_prompt", None)

    def text(prompt):
        if family == "zimage":
            return tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                                 add_generation_prompt=True, enable_thinking=True)
        if family == "hunyuan15":           # an empty prompt is " " (format_text_input)
            turns = [{"role": "system", "content": pipe.system_message}, {"role": "user", "content": prompt or " "}]
            return tokenizer.apply_chat_template(turns, tokenize=False, add_generation_prompt=True)
        if family == "qwen21":
            return pipe.prompt_template_t2i.format(prompt)
        if family == "kandinsky5":
            return pipe.prompt_template.format(" ".join(prompt.split()))
        if family == "flux2":               # Flux2KleinPipeline: Qwen3, no thinking
            return tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                                 add_generation_prompt=True, enable_thinking=False)
        return f"{system} <Prompt Start> {prompt}"

    def spell(word):
        return tokenizer(word, add_special_tokens=False)["input_ids"]

    def ids(prompt):
        if family == "flux2" and hasattr(pipe, "system_message"):     # Flux2Pipeline: Mistral 3, its system turn
            turns = [{"role": "system", "content": [{"type": "text", "text": pipe.system_message}]},
                     {"role": "user", "content": [{"type": "text", "text": prompt.replace("[IMG]", "")}]}]
            return list(tokenizer.apply_chat_template(turns, add_generation_prompt=False, tokenize=True,
                                                      return_dict=True, truncation=True, max_length=limit)["input_ids"])
        return tokenizer(text(prompt), truncation=True, max_length=limit)["input_ids"][drop:]

    def columns(prompt):          # searched from where the prompt's tokens part from the empty prompt's
        found, empty = ids(prompt), ids("")
        start = next((i for i, (a, b) in enumerate(zip(found, empty)) if a != b), min(len(found), len(empty)))
        at = tokens.token_columns(words, found[start:], lambda w: tokens.Alternatives((spell(" " + w), spell(w))))
        # Flux.2 attends to all max_sequence_length tokens, padding included: left padding shifts the prompt
        pad = limit - len(found) if family == "flux2" and getattr(tokenizer, "padding_side", "") == "left" else 0
        return {w: [pad + start + j for j in js] for w, js in at.items()}

    words = list(dict.fromkeys(e.token for e in session.entries))
    prompt = arguments["prompt"]
    return same_columns([columns(p) for p in ([prompt] if isinstance(prompt, str) else prompt)])


def _default_length(pipe) -> int:
    """The pipeline's own default max_sequence_length (Kandinsky 5: 512, its image editing 1024)."""
    found = inspect.signature(type(pipe).encode_prompt).parameters.get("max_sequence_length")
    return found.default if found is not None and isinstance(found.default, int) else 1 << 20


def _columns(session, tokenizer, prompt, clean_caption=False, words=None) -> dict[str, list[int]]:
    # PixArt lower-cases (and may clean) prompts before tokenising: search what the encoder sees.
    prepare = getattr(session.pipe, "_text_preprocessing", None)

    def ids(text, special=True):
        if prepare is not None:
            text = prepare(text, clean_caption=clean_caption)[0]
        return tokenizer(text, add_special_tokens=special, truncation=True,
                         max_length=tokenizer.model_max_length)["input_ids"]

    def columns(text):          # T5 (Flux, SD3, Wan, PixArt): a word right after punctuation too
        prompt_ids = ids(text)
        return tokens.token_columns(words, prompt_ids,
                                     tokens.spelled_in(prompt_ids, lambda w: ids(w, special=False)))

    words = words or list(dict.fromkeys(e.token for e in session.entries))
    return same_columns([columns(text) for text in ([prompt] if isinstance(prompt, str) else prompt)])


def same_columns(found: list) -> dict[str, list[int]]:
    """The one column map of a prompt list's prompts (else ValueError)."""
    if any(f != found[0] for f in found):
        raise ValueError("Attention Bending needs its words at the same token positions in every prompt "
                         f"of a batch; got {found}")
    return found[0]


def unmark(prompt):
    """The prompt(s) without the "{word}" marks."""
    if isinstance(prompt, str):
        return tokens.parse_marked_prompt(prompt)[0]
    return [tokens.parse_marked_prompt(p)[0] for p in prompt]
