"""Bending at Flux.3's joint single blocks (Flux3Transformer2DModel, `single_transformer_blocks.i.attn`): one sequence
[text; image; reference images] per item, no mask, 4-axis RoPE on every token. The per-mode blocks before them
(`txt_mode_blocks`, `mode_blocks`) each attend within one mode (text alone, image alone, references alone), so they
hold no image-query × text-key block: left alone.

diffusers runs Flux.3 as a modular pipeline (Flux3ModularPipeline / Flux3DistilledModularPipeline): no encode_prompt.
Its text encoder step's _get_qwen3_vl_prompt_embeds is wrapped instead (one prompt per call: the first call after a
model call is the prompt's, a second the negative's): the prompt in Qwen3-VL's chat template (the user turn, the
generation prompt), right-padded to a multiple of 80 tokens that the transformer attends to, so column 0 is the
template's first token. CFG is the guider's: conditional and unconditional predictions in separate calls; the
conditional items are those whose text is the encoded prompt's. The denoiser passes t / 1000 in the latents' dtype;
image position ids are scaled (image_rope_scale), so the grid is read as their distinct rows and columns.

The host's processor computes the call; the conditional items' image-query rows are recomputed (PyTorch's attention
over the same q, k, v) with their text columns bent, then projected (to_out, as the processor): the text and
reference rows keep the host's result bit for bit.
"""

from __future__ import annotations

import inspect

import torch

from .. import bent_attention, tokens
from .calls import Call, step_near
from .prompts import same_columns, unmark
from .joint import _rope   # Flux's real-form RoPE on interleaved pairs
from .modular import wrap_blocks
from .recompute import acting, host_attention, recorder, refuse_beyond

FLUX3_MODELS = {"Flux3Transformer2DModel": "flux3"}
TEXT_STEP = "_get_qwen3_vl_prompt_embeds"       # the text encoder step's encoder, one prompt per call


def flux3_modules(model) -> list:
    """The joint single blocks' attentions, in order (the per-mode blocks see one mode each)."""
    return [(f"single_transformer_blocks.{i}.attn", b.attn) for i, b in enumerate(model.single_transformer_blocks)]


def describe(session, module, args, kwargs) -> Call:
    """The Call of one model call: step, image grid, text length; the conditional items are those whose text is the
    encoded prompt's (before any prompt, every item)."""
    names = ("hidden_states", "encoder_hidden_states", "timestep", "img_ids", "txt_ids")
    given = dict(zip(names, args), **kwargs)
    text, time, ids = given["encoder_hidden_states"], given["timestep"], given["img_ids"]
    ids = ids[0] if ids.ndim == 3 else ids
    grid = (len(torch.unique(ids[:, 1])), len(torch.unique(ids[:, 2])))
    if grid[0] * grid[1] != given["hidden_states"].shape[1]:
        raise ValueError(f"Attention Bending on Flux.3: img_ids give a {grid[0]}×{grid[1]} grid for "
                         f"{given['hidden_states'].shape[1]} image tokens")
    prompt = session.prompt_embeds
    rows = list(range(text.shape[0])) if prompt is None else [
        i for i in range(text.shape[0])
        if any(p.shape == text[i].shape and torch.equal(text[i], p.to(text)) for p in prompt)]
    time = torch.as_tensor(time)
    step = step_near(session.pipe.scheduler, float(time.flatten().max()) * 1000,
                     time.dtype if time.is_floating_point() else torch.float32)
    return Call(latent_hw=grid, token_hw=grid, frames=None, cfg=False, cond_rows=rows, step=step,
                alpha_cumprod=None, n_text=text.shape[1])




def flux3_attention(session, site, attn, given, original):
    active = acting(session, site)
    if not active:
        return original()
    call = session.call
    out = original()
    rows, n_text = call.cond_rows, call.n_text
    refuse_beyond(session, active, n_text)
    hidden = given["hidden_states"][rows]
    if getattr(attn, "fused_projections", False):
        q, k, v = attn.to_qkv(hidden).chunk(3, dim=-1)
    else:
        q, k, v = attn.to_q(hidden), attn.to_k(hidden), attn.to_v(hidden)
    q, k, v = (t.unflatten(-1, (attn.heads, -1)) for t in (q, k, v))
    q, k = attn.norm_q(q.float()), attn.norm_k(k.float())
    rotary = given.get("image_rotary_emb")
    if rotary is not None:
        q, k = _rope(q, rotary), _rope(k, rotary)
    q, k, v = (t.to(v.dtype).transpose(1, 2) for t in (q, k, v))
    # the generated image's queries (after the text) only: the text and reference rows keep the host's result
    image = slice(n_text, n_text + call.token_hw[0] * call.token_hw[1])
    target = host_attention(attn, q[:, :, image], k, v)
    observe = recorder(session, site, active, attn.heads, call.token_hw, n_text) if session.record_maps else None
    bent_attention.bend_rows(target, q[:, :, image], k, v, list(range(len(rows))), entries=active,
                             token_indices=session.token_indices, grid_hw=call.token_hw, step_index=call.step,
                             layer_index=site.layer, frames=None, text=slice(0, n_text), observe=observe)
    if session.phase == 2:
        out = out.clone()
        out[rows, image] = attn.to_out[1](attn.to_out[0](target.transpose(1, 2).flatten(2).to(out.dtype)))
    return out


def _blocks(block):
    yield block
    for sub in (getattr(block, "sub_blocks", None) or {}).values():
        yield from _blocks(sub)


def _upsamples(pipe) -> bool:
    """Whether the modular pipeline's blocks rewrite the prompt before encoding it (Flux3AutoBlocks' first step)."""
    return any("PromptUpsample" in type(b).__name__ for b in _blocks(getattr(pipe, "_blocks", None)))


def wrap_text_encoder(session) -> None:
    """Every text encoder step of the modular pipeline's blocks gets an instance attribute standing in for its
    encoder: with bending, the prompt's marks stripped and its words located first; always, the prompt's embeddings
    kept. A second call before the next model call (the negative prompt's) passes through."""
    for block in _blocks(getattr(session.pipe, "_blocks", None)):     # the blocks it runs (`blocks` is a copy)
        if not hasattr(block, TEXT_STEP):
            continue
        inner = getattr(block, TEXT_STEP)
        signature = inspect.signature(inner)

        def encode(*args, inner=inner, signature=signature, **kwargs):
            if session.prompt_encoded:
                return inner(*args, **kwargs)
            session.prompt_encoded = True
            if session.entries:
                bound = signature.bind(*args, **kwargs)
                bound.arguments["prompt"] = unmark(bound.arguments["prompt"])
                limit = (bound.arguments.get("max_sequence_length")
                         or signature.parameters["max_sequence_length"].default)
                try:
                    session.token_indices = flux3_columns(session, bound.arguments["tokenizer"],
                                                          bound.arguments["prompt"], limit)
                except ValueError as e:
                    if "not found" not in str(e) or not _upsamples(session.pipe):
                        raise
                    raise ValueError(f"{e} in the prompt the text encoder gets, {bound.arguments['prompt']!r} (the "
                                     "prompt upsampler rewrote it: pop its step, blocks.sub_blocks.pop("
                                     "'prompt_upsampler'), to encode the prompt as given)") from None
                args, kwargs = bound.args, bound.kwargs
            session.prompt_embeds = inner(*args, **kwargs)
            return session.prompt_embeds

        setattr(block, TEXT_STEP, encode)
        session._undo.append(lambda b=block: delattr(b, TEXT_STEP))
    wrap_blocks(session, "Flux.3", None)    # the marks stripped before any step: the prompt upsampler never sees them


def flux3_columns(session, processor, prompt, limit) -> dict[str, list[int]]:
    """The prompt's words in Qwen3-VL's chat template (the processor's template: the user turn, the generation
    prompt), tokenised by its tokenizer truncated at max_sequence_length; right padding leaves column 0 the template's
    first token. A word is found spelled after a space or bare (byte-level BPE), searched from where the prompt's
    tokens part from the empty prompt's."""
    tokenizer = getattr(processor, "tokenizer", processor)
    words = list(dict.fromkeys(e.token for e in session.entries))

    def ids(text):
        turn = processor.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                             add_generation_prompt=True)
        return tokenizer(turn, truncation=True, max_length=limit)["input_ids"]

    def spell(word):
        return tokenizer(word, add_special_tokens=False)["input_ids"]

    def columns(text):
        found, empty = ids(text), ids("")
        start = next((i for i, (a, b) in enumerate(zip(found, empty)) if a != b), min(len(found), len(empty)))
        at = tokens.token_columns(words, found[start:], lambda w: tokens.Alternatives((spell(" " + w), spell(w))))
        return {w: [start + j for j in js] for w, js in at.items()}

    return same_columns([columns(p) for p in ([prompt] if isinstance(prompt, str) else prompt)])
