"""The ComfyUI node's one-line refusals for families whose newest readable ComfyUI model code the node cannot reach,
each told by the structure (attributes) of ComfyUI's diffusion_model, as the family's class there has it."""

import pytest
from torch import nn

from ckptbend.runtime import comfy_host


def module(**children):
    m = nn.Module()
    for name, value in children.items():
        setattr(m, name, value)
    return m


def test_ernie_image_is_refused_with_its_reason():
    """ComfyUI's ErnieImageModel (comfy/ldm/ernie/model.py): `layers` of ErnieImageSharedAdaLNBlock, `text_proj`,
    `adaLN_modulation`, `patch_size`; its attention calls optimized_attention with no transformer_options."""
    model = module(layers=nn.ModuleList([module(self_attention=nn.Module())]), text_proj=nn.Linear(2, 2),
                   adaLN_modulation=nn.Sequential(), patch_size=1)
    with pytest.raises(ValueError, match="does not reach ERNIE-Image: ComfyUI's ERNIE-Image code calls "
                                         "optimized_attention without transformer_options"):
        comfy_host.dit_layout(model)


def test_minimax_h3_is_refused_not_taken_for_wan():
    """ComfyUI's MiniMaxH3Model (comfy/ldm/minimax/model.py) has `blocks` and `patch_size` as Wan does, but its latent
    is a [video, audio] pair packed with the text into one sequence."""
    model = module(blocks=nn.ModuleList([module(attn=nn.Module())]), patch_size=(1, 2, 2),
                   video_patch_proj=nn.Linear(2, 2), audio_patch_proj=nn.Linear(2, 2), token_refiner=nn.Module())
    with pytest.raises(ValueError, match="does not reach MiniMax H3: its latent is a video and audio pair"):
        comfy_host.dit_layout(model)


def test_wan_animate_2_is_refused_not_bent_at_the_wrong_call():
    """ComfyUI's WanAnimate2Model (comfy/ldm/wan/model_animate2.py) is Wan I2V-shaped, but with pose latents each
    WanAnimate2Block.forward_gen runs its self-attention as one call per frame before the cross-attention, so Wan's
    call 2 would be a frame's self-attention."""
    block = module(cross_attn=module(k_img=nn.Linear(2, 2)))
    block.forward_gen = lambda *args, **kwargs: None
    model = module(blocks=nn.ModuleList([block]), patch_size=(1, 2, 2))
    with pytest.raises(ValueError, match="does not reach Wan Animate 2: its blocks' self-attention attends "
                                         "to the pose branch in one call per frame"):
        comfy_host.dit_layout(model)


def test_an_unknown_dit_names_the_families_the_node_reaches():
    with pytest.raises(ValueError, match=r"this model's diffusion_model is a Module") as refused:
        comfy_host.dit_layout(module(layers=nn.ModuleList()))
    for family in ("HiDream", "Cosmos Predict2", "LTX-Video", "Krea 2", "Ideogram 4", "LongCat-Image", "Ovis-Image",
                   "Mochi", "AuraFlow"):
        assert family in str(refused.value), family


def test_pixart_is_refused_not_taken_for_wan():
    """ComfyUI 0.3.64's PixArtMS (comfy/ldm/pixart/pixartms.py) has `blocks` and `patch_size` as Wan does; its loop
    calls each block as block(x, y, t0, y_lens, (H, W)) and its cross-attention takes no transformer_options."""
    model = module(blocks=nn.ModuleList([module(cross_attn=nn.Module())]), patch_size=2, t_block=nn.Sequential(),
                   y_embedder=nn.Module(), x_embedder=nn.Module())
    with pytest.raises(ValueError, match="does not reach PixArt: ComfyUI's PixArt blocks take no dit block replace"):
        comfy_host.dit_layout(model)


@pytest.mark.parametrize("model", [
    # HunyuanDiT (comfy/ldm/hydit/models.py): `blocks` of HunYuanDiTBlock (attn1, attn2) and `patch_size`, as Wan has
    module(blocks=nn.ModuleList([module(attn1=nn.Module(), attn2=nn.Module())]), patch_size=2),
    # Cosmos 1.0's GeneralDIT (comfy/ldm/cosmos/model.py): `blocks` is a ModuleDict keyed by name
    module(blocks=nn.ModuleDict({"block0": module(blocks=nn.ModuleList())}), patch_spatial=2),
], ids=["hunyuan-dit", "cosmos-1"])
def test_a_dit_ckptbend_does_not_know_gets_the_one_line_refusal_not_a_crash(model):
    with pytest.raises(ValueError, match="Attention Bending in ComfyUI supports .*this model's diffusion_model is a"):
        comfy_host.dit_layout(model)
