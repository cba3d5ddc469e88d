"""DiTs whose ComfyUI loop neither offers "dit" block replaces nor writes transformer_options["block_index"]
(ComfyUI 0.3.64's HiDream and Cosmos Predict2): the block an attention call is in is told by its place among the
model call's attention calls, every one of which hands transformer_options to optimized_attention, block after
block in the model's order, a fixed number per block.

HiDream: one call per block, double-stream blocks then single-stream ones, each over [image; text] with the text
[T5; Llama's last layer; Llama's layer for the block] (its _forward puts the T5 and the last Llama layer first,
then the block's own layer). Cosmos Predict2: two per block, the self-attention then the cross-attention to T5.
"""

from __future__ import annotations

CALLS_PER_BLOCK = {"hidream": 1, "cosmos": 2}
LLAMA = "encoder_hidden_states_llama3"      # HiDream's extra cond: [b, layers, tokens, width]


def record(kind: str, call: dict, context, kwargs) -> None:
    """Start the model call's count; its text length (HiDream: T5's tokens, then twice Llama's; Cosmos: T5's)."""
    call["calls"], call["text"] = [0], context.shape[1]
    if kind == "cosmos" and kwargs.get("t5xxl_ids") is not None:    # Anima outside inference mode: its adapter runs
        call["text"] = max(512, kwargs["t5xxl_ids"].shape[-1])     # in the model; a row per T5 token, padded to 512
    if kind == "hidream":
        if kwargs.get("image_cond") is not None:
            raise ValueError("Attention Bending on HiDream bends text-to-image sampling only: HiDream E1's edit "
                             "image sits beside the target in one token grid")
        call["text"] = context.shape[1] + 2 * kwargs[LLAMA].shape[-2]


def layer_of(kind: str, text_call: int, call: dict, n_queries: int, n_keys: int):
    """The block of this attention call, or None when it is not the block's text attention."""
    index = call["calls"][0]
    call["calls"][0] += 1
    layer, which = divmod(index, CALLS_PER_BLOCK[kind])
    if which != text_call:
        return None
    frames, h, w = call["grid"]
    n_image = frames * h * w
    fits = n_queries == n_keys == n_image + call["text"] if kind == "hidream" else (n_queries, n_keys) == (
        n_image, call["text"])
    if not fits:
        raise ValueError(f"Attention Bending on {kind}: attention call {index} of the model call has {n_queries} "
                         f"queries and {n_keys} keys, not its block's text attention (another node adds calls?)")
    return layer
