"""One-line refusals of the node for families that ComfyUI's model code would take for a family the node bends,
each told by an attribute the family's weights force on any class that loads them."""

from __future__ import annotations

# Cosmos Predict2.5's weights carry crossattn_proj (Cosmos-Reason1's concatenated Qwen2.5-VL states → the keys'
# width); the node's Cosmos layout reads the wired CLIP's T5 tokens, which are not those rows.
COSMOS25 = ("Attention Bending in ComfyUI does not reach Cosmos Predict2.5: its cross-attention keys are its "
            "crossattn_proj's projection of a Qwen2.5-VL (Cosmos-Reason1) conversation, not T5 tokens, so the node "
            "cannot find a word's columns (the diffusers host refuses it too)")
# Qwen-Image Layered's weights carry time_text_embed.addition_t_embedding; the readable ComfyUI Qwen-Image code
# patches one frame, and none for Layered's layers (frames of one sequence, then the input image) could be read.
QWEN_LAYERED = ("Attention Bending in ComfyUI does not reach Qwen-Image Layered: no ComfyUI model code for its "
                "layers (generated frames and the input image in one sequence) could be read, so the node's one-frame "
                "Qwen-Image grid is unproven for it (the diffusers host bends it)")


def refuse(dm) -> None:
    if hasattr(dm, "t_embedding_norm") and getattr(dm, "crossattn_proj", None) is not None:
        raise ValueError(COSMOS25)
    if getattr(getattr(dm, "time_text_embed", None), "addition_t_embedding", None) is not None:
        raise ValueError(QWEN_LAYERED)
