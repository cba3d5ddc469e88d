"""The bending audit of the families the bake names: SVD refused in both hosts, Qwen-Image Layered bent on all its
generated frames in the diffusers host (refused in the node), Cosmos Predict2.5 refused in the node, Chroma Radiance's
16-px token grid, and Wan Camera / Wan 2.2 Fun Control absent from diffusers. Real diffusers classes, tiny and seeded.

Qwen-Image Layered: the reference is diffusers' own QwenImageTransformer2DModel (Layered's 3-D RoPE and extra time
embedding) with PyTorch's attention replaced by an explicit softmax whose [generated frames × text] block is bent by
bending.bend_probs over the frames, rows renormalised; the input image's queries are left as they are."""

import inspect
import types

import pytest
import torch
import torch.nn.functional as F
from diffusers import FlowMatchEulerDiscreteScheduler, QwenImageTransformer2DModel, UNetSpatioTemporalConditionModel
from torch import nn

from ckptbend.runtime import bending, comfy_host
from ckptbend.runtime import diffusers_host as dh

pytestmark = pytest.mark.usefixtures("one_thread_no_grad")
ENTRY = {"token": "sunset", "mode": "translate", "translate_x": 0.5}


# --- SVD ------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def svd_pipe():
    torch.manual_seed(0)
    unet = UNetSpatioTemporalConditionModel(
        sample_size=8, in_channels=8, out_channels=4, block_out_channels=(32, 32), layers_per_block=1,
        down_block_types=("CrossAttnDownBlockSpatioTemporal", "DownBlockSpatioTemporal"),
        up_block_types=("UpBlockSpatioTemporal", "CrossAttnUpBlockSpatioTemporal"), cross_attention_dim=16,
        num_attention_heads=(2, 2), transformer_layers_per_block=1, addition_time_embed_dim=4,
        projection_class_embeddings_input_dim=12, num_frames=2).eval()
    return types.SimpleNamespace(unet=unet, scheduler=FlowMatchEulerDiscreteScheduler())


@pytest.mark.parametrize("dynamic, reason", [
    ({"bending": [ENTRY]}, "SVD's cross-attention attends to the CLIP image embedding, not to a prompt"),
    ({"sag": {"scale": 0.5}}, "SAG and Slothful Attention do not support SVD"),
    ({"slothful": {}}, "SAG and Slothful Attention do not support SVD")])
def test_svd_is_refused_in_one_line_at_apply(svd_pipe, dynamic, reason):
    with pytest.raises(ValueError, match=reason) as refused:
        dh.apply(svd_pipe, dynamic)
    assert "\n" not in str(refused.value) and getattr(svd_pipe, dh.session.SESSION_ATTR, None) is None


def test_svd_is_refused_by_the_comfyui_node():
    """ComfyUI's SVD_img2vid (and SV3D) build UNetModel with use_temporal_resblock: its attribute tells them apart."""
    model = types.SimpleNamespace(model=types.SimpleNamespace(diffusion_model=types.SimpleNamespace(
        input_blocks=[], use_temporal_resblocks=True)))
    for dynamic in ({"bending": [ENTRY]}, {"sag": {}}, {"slothful": {}}):
        with pytest.raises(ValueError, match="do not reach SVD: its cross-attention attends to the CLIP image"):
            comfy_host.patch_model(model, dynamic)


# --- Qwen-Image Layered -----------------------------------------------------------------------------

TEXT, H, W, LAYERS = 5, 2, 3, 2              # text tokens, token grid, layers (layers + 1 generated frames)
FRAMES = LAYERS + 1
GEN = FRAMES * H * W                          # generated frames' tokens; the input image's H × W follow
COLUMNS = {"sunset": [1, 2]}


@pytest.fixture(scope="module")
def layered():
    with torch.random.fork_rng():
        torch.manual_seed(41)
        model = QwenImageTransformer2DModel(patch_size=2, in_channels=16, out_channels=4, num_layers=2,
                                            attention_head_dim=8, num_attention_heads=2, joint_attention_dim=16,
                                            axes_dims_rope=(2, 2, 4), use_layer3d_rope=True,
                                            use_additional_t_cond=True).eval()
    g = torch.Generator().manual_seed(5)
    inputs = dict(hidden_states=torch.randn(1, GEN + H * W, 16, generator=g),
                  encoder_hidden_states=torch.randn(1, TEXT, 16, generator=g),
                  encoder_hidden_states_mask=torch.ones(1, TEXT, dtype=torch.long),
                  img_shapes=[[(1, H, W)] * FRAMES + [(1, H, W)]], additional_t_cond=torch.tensor([0]))
    scheduler = FlowMatchEulerDiscreteScheduler()
    scheduler.set_timesteps(2)
    return model, inputs, types.SimpleNamespace(transformer=model, scheduler=scheduler)


def run_layered(layered, step=0, dynamic=None):
    model, inputs, pipe = layered
    if dynamic is not None:
        dh.apply(pipe, dynamic).token_indices = COLUMNS
    try:                                      # QwenImageLayeredPipeline passes t / 1000
        t = pipe.scheduler.timesteps[step:step + 1] / 1000
        return model(**inputs, timestep=t, return_dict=False)[0]
    finally:
        dh.remove(pipe)


def explicit_bent(entry, plain_sdpa):
    spec = bending.BendSpec.from_dict({**entry, "renormalize": "none"})

    def attend(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **kwargs):
        q, k, v = query, key, value
        logits = q.float() @ k.float().transpose(-1, -2) * q.shape[-1] ** -0.5
        if attn_mask is not None:
            logits = logits.masked_fill(~attn_mask, float("-inf")) if attn_mask.dtype == torch.bool \
                else logits + attn_mask
        probs = torch.softmax(logits, dim=-1)
        rows = slice(TEXT, TEXT + GEN)        # [text; generated frames; input image]
        block = probs[:, :, rows, :TEXT]
        bent = bending.bend_probs(block.reshape(-1, GEN, TEXT), COLUMNS, (H, W), [spec], frames=FRAMES)
        probs = probs.clone()
        probs[:, :, rows, :TEXT] = bent.view(block.shape)
        probs[:, :, rows] /= probs[:, :, rows].sum(-1, keepdim=True)
        return (probs @ v.float()).to(q.dtype)

    return attend


def test_layered_bends_every_generated_frame_as_the_explicit_bent_softmax(layered, monkeypatch):
    plain = run_layered(layered)
    bent = run_layered(layered, dynamic={"bending": [ENTRY]})
    model, inputs, pipe = layered
    monkeypatch.setattr(F, "scaled_dot_product_attention", explicit_bent(ENTRY, F.scaled_dot_product_attention))
    expected = model(**inputs, timestep=pipe.scheduler.timesteps[:1] / 1000, return_dict=False)[0]
    torch.testing.assert_close(bent, expected, rtol=1e-4, atol=1e-5)
    for frame in range(FRAMES):               # every generated layer is bent, not only the first
        rows = slice(frame * H * W, (frame + 1) * H * W)
        assert (bent[:, rows] - plain[:, rows]).abs().max() > 1e-4, frame


def test_layered_strength_zero_and_outside_the_step_window_are_bit_identical(layered):
    plain = run_layered(layered, step=1)
    assert torch.equal(run_layered(layered, step=1, dynamic={"bending": [{**ENTRY, "strength": 0.0}]}), plain)
    assert torch.equal(run_layered(layered, step=1, dynamic={"bending": [{**ENTRY, "apply_to_timesteps": [0, 0]}]}),
                       plain)
    assert not torch.equal(run_layered(layered, step=1, dynamic={"bending": [{**ENTRY, "apply_to_timesteps": [1, 1]}]}),
                           plain)


def test_layered_negative_call_is_bit_identical(layered):
    """QwenImageLayeredPipeline's true CFG: a second call with the negative's embeddings, left unbent."""
    model, inputs, pipe = layered
    plain = run_layered(layered)
    session = dh.apply(pipe, {"bending": [ENTRY]})
    session.token_indices = COLUMNS
    session.prompt_embeds = torch.randn(1, TEXT, 16)          # the prompt; this call carries another text
    try:
        out = model(**inputs, timestep=pipe.scheduler.timesteps[:1] / 1000, return_dict=False)[0]
    finally:
        dh.remove(pipe)
    assert torch.equal(out, plain)


# --- the ComfyUI node: Cosmos Predict2.5, Qwen-Image Layered refused; Chroma Radiance's grid ------------------------

def module(**children):
    m = nn.Module()
    for name, value in children.items():
        setattr(m, name, value)
    return m


def cosmos_dit(**extra):
    """ComfyUI's MiniTrainDIT (comfy/ldm/cosmos/predict2.py) by its attributes; Predict2.5 adds crossattn_proj."""
    return module(blocks=nn.ModuleList([module(cross_attn=nn.Module())]), patch_spatial=2, patch_temporal=1,
                  t_embedding_norm=nn.Module(), **extra)


def test_cosmos_predict25_is_refused_by_the_node_and_predict2_is_not():
    with pytest.raises(ValueError, match="does not reach Cosmos Predict2.5: its cross-attention keys are its "
                                         "crossattn_proj's projection of a Qwen2.5-VL"):
        comfy_host.dit_layout(cosmos_dit(crossattn_proj=nn.Sequential(nn.Linear(8, 4), nn.GELU())))
    assert comfy_host.dit_layout(cosmos_dit()).text_key == "t5xxl"
    assert comfy_host.dit_layout(cosmos_dit(crossattn_proj=None)).kind == "cosmos"


def test_qwen_image_layered_is_refused_by_the_node_and_qwen_image_is_not():
    """ComfyUI's Qwen-Image class names its modules as diffusers does: Layered's weights add
    time_text_embed.addition_t_embedding."""
    def qwen(**embed):
        return module(transformer_blocks=nn.ModuleList([nn.Module()]), txt_norm=nn.Module(), patch_size=2,
                      time_text_embed=module(**embed))

    with pytest.raises(ValueError, match="does not reach Qwen-Image Layered: no ComfyUI model code for its layers"):
        comfy_host.dit_layout(qwen(addition_t_embedding=nn.Embedding(2, 4)))
    assert comfy_host.dit_layout(qwen()).kind == "qwen"


def test_chroma_radiance_takes_flux_layout_with_its_16_px_patch():
    """ComfyUI 0.3.64's ChromaRadiance (comfy/ldm/chroma_radiance/model.py): Chroma's double and single blocks over
    [T5; image], the image a 16-px Conv2d patchify of the padded pixels, raster order (bin/check-comfyui
    chroma-radiance runs the node there)."""
    dm = module(double_blocks=nn.ModuleList([nn.Module()]), single_blocks=nn.ModuleList([nn.Module()] * 2),
                patch_size=16, nerf_blocks=nn.ModuleList())
    layout = comfy_host.dit_layout(dm)
    assert (layout.kind, layout.patch, layout.text_key, len(layout.blocks)) == ("flux", (1, 16, 16), "t5xxl", 3)


# --- diffusers: Wan Camera, Wan 2.2 Fun Control have no class ------------------------------------

def test_wan_camera_and_fun_control_have_no_diffusers_class():
    """Their extra modules (control_adapter, ref_conv) are in no diffusers Wan transformer: no pipeline loads them."""
    import diffusers

    wan = [getattr(diffusers, n) for n in dir(diffusers) if n.startswith("Wan") and n.endswith("Model")]
    assert wan and not any("Camera" in c.__name__ or "Fun" in c.__name__ for c in wan)
    for cls in wan:
        source = inspect.getsource(cls.__init__)
        assert "control_adapter" not in source and "ref_conv" not in source, cls.__name__


def test_layered_pipeline_finds_the_words_as_qwen_image():
    """QwenImageLayeredPipeline encodes the prompt with Qwen-Image's template and rule (its first 34 tokens dropped):
    the session's column finder gives it the columns it gives QwenImagePipeline."""
    from diffusers import QwenImageLayeredPipeline
    from _pipelines_joint import qwen_pipeline

    qwen = qwen_pipeline()
    layered = QwenImageLayeredPipeline(scheduler=qwen.scheduler, vae=qwen.vae, text_encoder=qwen.text_encoder,
                                       tokenizer=qwen.tokenizer, processor=None, transformer=qwen.transformer)
    found = []
    for pipe in (qwen, layered):
        session = dh.apply(pipe, {"bending": [ENTRY]})
        try:
            embeds = pipe.encode_prompt("a romantic kiss at {sunset}")[0]
            found.append((session.token_indices, embeds))
        finally:
            dh.remove(pipe)
    assert found[0][0] == found[1][0] and found[1][0]["sunset"]
    assert torch.equal(found[0][1], found[1][1])          # the same text keys
