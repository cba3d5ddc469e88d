"""Per DiT family, as ComfyUI's model code has it: the blocks behind its "dit" block replaces, which attention call
of a block attends to the text, whether that attention is joint, the patch size and the text encoder's tokens.

The family is told by the diffusion model's structure (its attributes), not by a class name, so that a
ComfyUI that renames a class keeps working.
"""

from __future__ import annotations

from .hidream import HIDREAM_KEY
from .tokens import GEMMA2_KEY, IDEOGRAM4_KEY, KREA2_KEY, LONGCAT_KEY, OVIS_KEY, QWEN3_KEY, QWEN3VL_KEY, QWEN_KEY
from .tokens import HUNYUAN_KEY
from .refusals import refuse


class DiTLayout:
    """How a DiT's text attention is reached: its blocks as (replace name, index, layer), which call
    of a block is the text attention, whether it is joint ([text; image] keys and queries), the patch
    (frames, rows, cols) and the tokenizer key of the text it attends to."""

    def __init__(self, kind, blocks, text_call, joint, patch, text_key, pad=None, registers=0):
        self.kind, self.blocks, self.text_call, self.joint = kind, blocks, text_call, joint
        self.patch, self.text_key = patch, text_key
        self.pad = pad          # NextDiT: text and image tokens each padded to a multiple of it (Z-Image: 32)
        self.registers = registers      # AuraFlow: learned register tokens before the text keys
        self.prompt_tokens = None       # HunyuanVideo 1.0: the prompt's kept Llama tokens, which end its context


def dit_layout(diffusion_model) -> DiTLayout:
    """Wan 2.1/2.2 (T2V: call 1 of a block is the text cross-attention; I2V/FLF: call 2, after the
    CLIP-image attention), Flux.1/Chroma/Flux.2 (double then single blocks, joint; Flux.2's text key is the wired
    CLIP's only one, Mistral 3 or Klein's Qwen3) and SD3/SD3.5 (joint
    blocks; the dual blocks' second call is image self-attention) and Qwen-Image (transformer_blocks, joint
    [text; image], mask passed positionally: None). Layers count the blocks in order.
    SD3's text_key ("l", "t5xxl"): its context is the CLIP tokens then T5's; a word's keys in both are
    bent (token_columns). NextDiT (Z-Image, Lumina 2): one attention per main block over [text; image], the block
    told by transformer_options["block_index"] (its loop has no "dit" replace; 0.3.64's writes none: by call order,
    nextdit.py), Z-Image's Qwen3 or Lumina 2's Gemma 2 tokens. HunyuanVideo 1.5: Flux's blocks over [image; text], the text its refined Qwen2.5-VL prompt
    tokens (Qwen-Image's template rule) then ByT5 glyph tokens, with a key mask; HunyuanVideo 1.0 the same without
    the glyphs, its text the Llama 3 tokens its encoder keeps (hunyuan_video.py). Qwen-Image 2.x: one block-causal
    sequence [text; target image] of unpatched latent tokens, the block told alike; the target image's call is
    bent. Kandinsky 5: Wan's shape, call 1 of a visual block its visual→text cross-attention (raster order), the
    Qwen2.5-VL tokens kept by Qwen-Image's template rule (ComfyUI's Kandinsky 5 encoder applies it). HiDream and
    Cosmos Predict2: no "dit" replace, no block_index: blocks told by call order (counted.py); HiDream one joint
    call per block over [image; T5; Llama; Llama] (hidream.py), Cosmos call 1 of a block its T5 cross-attention.
    LTX-Video: Wan's shape with patch 1, call 1 (attn2) to T5 under the text mask. Krea 2 and
    Ideogram 4 (single stream over [text; image]; newest readable ComfyUI source): their loops tell a block neither
    by a "dit" replace nor by block_index, so the node counts their joint calls; Krea 2's Qwen3-VL tokens are kept by
    Qwen-Image's rule, Ideogram 4's all. Mochi: one joint attention per block over [video; the first num_tokens T5
    tokens] (ComfyUI crops the padding). AuraFlow: double then single blocks over [8 register tokens; Pile-T5
    tokens; image], the word's columns after the registers."""
    dm = diffusion_model
    name = type(dm).__name__
    refuse(dm)                # Cosmos Predict2.5, Qwen-Image Layered: one line each (refusals.py)

    def patch3(size):
        size = tuple(size) if isinstance(size, (tuple, list)) else (size, size)
        return (1, *size) if len(size) == 2 else size

    # the first of `blocks` (a list, or Cosmos 1.0's dict by name): Wan's and its relatives' have a cross_attn
    first_block = next(iter(dm.blocks.children()), None) if hasattr(getattr(dm, "blocks", None), "children") else None
    blocks = getattr(dm, "transformer_blocks", None) or ()
    if len(blocks) and hasattr(blocks[0], "audio_attn2"):                           # LTX-2 (LTXAV)
        raise ValueError("Attention Bending in ComfyUI does not reach LTX-2: its latent packs video and audio into "
                         "one tensor, so the node cannot read the video grid (the diffusers host bends its video)")
    if len(blocks) and hasattr(dm, "patchifier"):                                   # LTX-Video: attn2 to T5
        return DiTLayout("ltxv", [("double_block", i, i) for i in range(len(blocks))], 1, False,
                         tuple(dm.patchifier.patch_size), "t5xxl")
    if hasattr(dm, "double_stream_blocks") and hasattr(dm, "single_stream_blocks"):  # HiDream: blocks by call order
        return DiTLayout("hidream", [], 0, True, patch3(dm.patch_size), HIDREAM_KEY)
    # Cosmos Predict2, and Anima: its llm_adapter runs in extra_conds, before the model call; its rows are T5's tokens
    if hasattr(dm, "blocks") and hasattr(dm, "patch_spatial") and hasattr(dm, "t_embedding_norm"):  # Cosmos Predict2
        return DiTLayout("cosmos", [], 1, False, (dm.patch_temporal, dm.patch_spatial, dm.patch_spatial), "t5xxl")
    if hasattr(dm, "video_patch_proj") and hasattr(dm, "audio_patch_proj"):          # MiniMax H3
        raise ValueError("Attention Bending in ComfyUI does not reach MiniMax H3: its latent is a video and audio "
                         "pair packed with the text into one sequence, whose video grid the node cannot read")
    if hasattr(dm, "txtfusion") and hasattr(dm, "blocks"):                          # Krea 2: blocks counted
        return DiTLayout("krea2", [], 0, True, patch3(dm.patch), KREA2_KEY)
    if hasattr(dm, "llm_cond_proj") and hasattr(dm, "embed_image_indicator"):      # Ideogram 4: blocks counted
        return DiTLayout("ideogram4", [], 0, True, (1, 1, 1), IDEOGRAM4_KEY)      # its latent is already patched
    if hasattr(dm, "layers") and hasattr(dm, "text_proj") and hasattr(dm, "adaLN_modulation"):   # ERNIE-Image
        raise ValueError("Attention Bending in ComfyUI does not reach ERNIE-Image: ComfyUI's ERNIE-Image code calls "
                         "optimized_attention without transformer_options and has no dit block replace, so the node's "
                         "override never sees its attention (the diffusers host bends it)")
    if hasattr(dm, "visual_transformer_blocks") and hasattr(dm, "text_transformer_blocks"):   # Kandinsky 5
        blocks = [("double_block", i, i) for i in range(len(dm.visual_transformer_blocks))]
        return DiTLayout("kandinsky5", blocks, 1, False, patch3(dm.patch_size), QWEN_KEY)
    if hasattr(first_block, "forward_gen"):                                          # Wan Animate 2
        raise ValueError("Attention Bending in ComfyUI does not reach Wan Animate 2: its blocks' self-attention "
                         "attends to the pose branch in one call per frame, so the text cross-attention is no fixed "
                         "call of a block")
    if hasattr(dm, "blocks") and hasattr(dm, "y_embedder") and hasattr(dm, "t_block"):       # PixArt (PixArtMS)
        raise ValueError("Attention Bending in ComfyUI does not reach PixArt: ComfyUI's PixArt blocks take no dit "
                         "block replace and call their cross-attention without transformer_options (the diffusers "
                         "host bends it)")
    if hasattr(dm, "blocks") and hasattr(dm, "t5_yproj"):                          # Mochi: [video; T5]
        blocks = [("double_block", i, i) for i in range(len(dm.blocks))]
        return DiTLayout("mochi", blocks, 0, True, patch3(dm.patch_size), "t5xxl")
    if hasattr(dm, "double_layers") and hasattr(dm, "register_tokens"):           # AuraFlow
        n = len(dm.double_layers)
        blocks = [("double_block", i, i) for i in range(n)]
        blocks += [("single_block", i, n + i) for i in range(len(dm.single_layers))]
        return DiTLayout("auraflow", blocks, 0, True, patch3(dm.patch_size), "pile_t5xl",
                         registers=dm.register_tokens.shape[1])
    if hasattr(first_block, "cross_attn") and hasattr(dm, "patch_size"):            # Wan
        blocks = [("double_block", i, i) for i in range(len(dm.blocks))]
        image_call = hasattr(first_block.cross_attn, "k_img")
        return DiTLayout("wan", blocks, 2 if image_call else 1, False, patch3(dm.patch_size), "umt5xxl")
    if hasattr(dm, "double_blocks") and hasattr(getattr(dm, "txt_in", None), "individual_token_refiner"):
        n = len(dm.double_blocks)                       # HunyuanVideo 1.5: [image; Qwen2.5-VL prompt; ByT5 glyphs]
        blocks = [("double_block", i, i) for i in range(n)]
        blocks += [("single_block", i, n + i) for i in range(len(getattr(dm, "single_blocks", ())))]
        v1 = getattr(dm, "byt5_in", None) is None       # HunyuanVideo 1.0: [image; Llama 3 prompt], no glyphs
        return DiTLayout("hunyuan", blocks, 0, True, patch3(dm.patch_size), HUNYUAN_KEY if v1 else QWEN_KEY)
    if hasattr(dm, "double_blocks"):                                                # Flux, Chroma, Flux.2
        n = len(dm.double_blocks)
        blocks = [("double_block", i, i) for i in range(n)]
        blocks += [("single_block", i, n + i) for i in range(len(getattr(dm, "single_blocks", ())))]
        flux2 = hasattr(dm, "double_stream_modulation_img")       # Flux.2's shared modulations: Mistral 3 / Qwen3 text
        return DiTLayout("flux", blocks, 0, True, patch3(getattr(dm, "patch_size", 2)),
                         None if flux2 else _flux_text_key(dm))
    if hasattr(dm, "layers") and hasattr(dm, "context_refiner") and hasattr(dm, "cap_embedder"):   # NextDiT
        pad = getattr(dm, "pad_tokens_multiple", None)
        return DiTLayout("nextdit", [], 0, True, patch3(dm.patch_size), QWEN3_KEY if pad else GEMMA2_KEY, pad)
    if hasattr(dm, "transformer_blocks") and hasattr(dm, "txt_norm"):              # Qwen-Image
        blocks = [("double_block", i, i) for i in range(len(dm.transformer_blocks))]
        return DiTLayout("qwen", blocks, 0, True, patch3(getattr(dm, "patch_size", 2)), QWEN_KEY)
    if hasattr(dm, "transformer_blocks") and hasattr(dm, "txt_in") and hasattr(dm, "modulation"):   # Qwen-Image 2.x
        return DiTLayout("qwen21", [], 0, True, (1, 1, 1), QWEN3VL_KEY)
    if hasattr(dm, "joint_blocks"):                                                 # SD3, SD3.5
        blocks = [("double_block", i, i) for i in range(len(dm.joint_blocks))]
        return DiTLayout("sd3", blocks, 0, True, patch3(getattr(dm, "patch_size", 2)), ("l", "t5xxl"))
    raise ValueError("Attention Bending in ComfyUI supports UNets (SD 1.x/2.x, SDXL), Wan 2.1/2.2, Flux.1/Chroma, "
                     "SD3/SD3.5, Qwen-Image, Qwen-Image 2.x, Z-Image, Lumina 2, HunyuanVideo, Kandinsky 5, "
                     "HiDream, Cosmos Predict2, Anima, LTX-Video, Krea 2, Ideogram 4, LongCat-Image, Ovis-Image, "
                     "Mochi and AuraFlow; "
                     f"this model's diffusion_model is a {name}")


def _flux_text_key(dm):
    """ComfyUI runs LongCat-Image and Ovis-Image as Flux: Ovis has its txt_norm, both lack the pooled vector_in (None;
    Chroma's class has no such attribute); Flux.1 reads T5."""
    if getattr(dm, "txt_norm", None) is not None:
        return OVIS_KEY
    return LONGCAT_KEY if hasattr(dm, "vector_in") and dm.vector_in is None else "t5xxl"
