"""NextDiT (Lumina 2, Z-Image) on a ComfyUI whose main loop writes no transformer_options["block_index"]
(ComfyUI 0.3.64's `for layer in self.layers`): the main layer of an attention call is told by its place among the
model call's attention calls. Every call hands transformer_options to optimized_attention: first the refiners' (the
context refiner's over the text alone, the noise refiner's over the image alone, one per refiner layer), then one per
main layer over the joint [text; image] tokens, in order. A newer ComfyUI writes block_index, which dit.py reads.
The refiners' calls are told by order, not length: a context refiner's text alone may be as long as the joint tokens
(a long padded context under an attention mask).

The text part of the joint tokens: ComfyUI's NextDiT keeps each row's first num_tokens context tokens (under an
attention mask, as many as the row's mask keeps), not the whole context.
"""

from __future__ import annotations


def refiners(diffusion_model) -> int:
    """The attention calls before the main layers' in one model call: one per refiner layer."""
    return len(diffusion_model.context_refiner) + len(diffusion_model.noise_refiner)


def text_length(context, kwargs) -> int:
    """Lumina 2's text tokens in the joint sequence (NextDiT without padding); a batch whose rows keep different
    numbers of tokens has no one text slice and is refused."""
    mask = kwargs.get("attention_mask")
    if mask is not None:
        kept = {int(n) for n in mask.sum(1).tolist()}
        if len(kept) > 1:
            raise ValueError("Attention Bending on Lumina 2: the prompts batched in one model call keep different "
                             "numbers of text tokens (attention masks), so the word's columns differ by row")
        return kept.pop()
    return int(kwargs["num_tokens"]) if kwargs.get("num_tokens") is not None else context.shape[1]


def counted_layer(call: dict, n_queries: int, n_keys: int):
    """The main layer of this attention call: the number of joint calls before it in its model call, past the
    refiners' calls (call["refiners"]); None for a refiner's call or any call not over the joint tokens."""
    call["calls"] += 1
    if call["calls"] <= call["refiners"] or not n_queries == n_keys == call["joint"]:
        return None
    call["main"] += 1
    return call["main"]
