"""The diffusers host (ckptbend/runtime/diffusers_host.py) on real, tiny diffusers pipelines.

Every component is a real diffusers / transformers class with random (seeded) weights and a
tokenizer written here; nothing is downloaded. SD 1.x-like, SDXL-like, PixArt-α, Wan 2.1 and
Wan 2.2 A14B (two experts) pipelines; latents 16×16 (VAE scale factor 1; Wan: 2 frames of 8×8), the
UNets have two levels (middle block 8×8), 3 sampling steps (Wan 2.2's window test: 4),
output_type="latent". Pipelines are module fixtures: every
test removes what it applies.
"""

import contextlib
import math
import types
from pathlib import Path

import PIL.Image
import pytest
import torch
import torch.nn.functional as F
from diffusers import (DDIMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler, HeunDiscreteScheduler,
                       FlowMatchEulerDiscreteScheduler, PNDMScheduler, UniPCMultistepScheduler, PixArtAlphaPipeline, PixArtTransformer2DModel, StableDiffusionPipeline,
                       StableDiffusionSAGPipeline, StableDiffusionXLPipeline, UNet2DConditionModel, WanImageToVideoPipeline,
                       WanPipeline)
from diffusers.models.attention_processor import AttnProcessor2_0
from transformers import CLIPTextModel, CLIPTextModelWithProjection

from ckptbend.runtime import bending, sag
from ckptbend.runtime import bent_attention as ba
from ckptbend.runtime import diffusers_host as dh
from _helpers import imported_roots
from _pipelines import (SCHEDULER_CONFIG, SIZE, clip_text_config, sd_pipeline, t5_encoder, t5_like_tokenizer,
                        t5_sentencepiece_tokenizer, tiny_vae, wan22_i2v_pipeline, wan22_pipeline, wan22_ti2v_pipeline,
                        wan_pipeline, write_clip_tokenizer)

PROMPT = "a romantic kiss at sunset"
MARKED = "a romantic {kiss} at {sunset}"
SUNSET = 5                       # <BOS> a romantic kiss at sunset
STEPS = 3
SD_CROSS_SITES = 7               # down 1 + 1, mid 1, up 2 + 2

torch.set_num_threads(min(2, torch.get_num_threads()))


# --- tiny real components ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def clip_tokenizer(tmp_path_factory):
    return write_clip_tokenizer(tmp_path_factory.mktemp("clip_tokenizer"))


@pytest.fixture(scope="module")
def sd(clip_tokenizer):
    return sd_pipeline(clip_tokenizer)


@pytest.fixture(scope="module")
def sdxl(clip_tokenizer):
    """SDXL-like: two CLIP encoders, text_time conditioning, heads 2 and 4 (Slothful's SDXL-family rule)."""
    torch.manual_seed(1)
    unet = UNet2DConditionModel(
        sample_size=SIZE, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4), use_linear_projection=True, addition_embed_type="text_time",
        addition_time_embed_dim=8, transformer_layers_per_block=(1, 2), projection_class_embeddings_input_dim=80,
        cross_attention_dim=64, norm_num_groups=1).eval()
    pipe = StableDiffusionXLPipeline(
        vae=tiny_vae(), text_encoder=CLIPTextModel(clip_text_config(clip_tokenizer)).eval(),
        text_encoder_2=CLIPTextModelWithProjection(clip_text_config(clip_tokenizer)).eval(),
        tokenizer=clip_tokenizer, tokenizer_2=clip_tokenizer, unet=unet,
        scheduler=EulerDiscreteScheduler(**SCHEDULER_CONFIG))
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def pixart():
    """PixArt-α: a real PixArtTransformer2DModel and T5 encoder."""
    tokenizer = t5_like_tokenizer()
    torch.manual_seed(2)
    text_encoder = t5_encoder(tokenizer)
    transformer = PixArtTransformer2DModel(
        sample_size=SIZE, num_layers=2, patch_size=2, attention_head_dim=8, num_attention_heads=3,
        caption_channels=32, in_channels=4, cross_attention_dim=24, out_channels=8, attention_bias=True,
        activation_fn="gelu-approximate", num_embeds_ada_norm=1000, norm_type="ada_norm_single",
        norm_elementwise_affine=False, norm_eps=1e-6).eval()
    pipe = PixArtAlphaPipeline(tokenizer=tokenizer, text_encoder=text_encoder, vae=tiny_vae(),
                               transformer=transformer, scheduler=DPMSolverMultistepScheduler())
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def wan():
    return wan_pipeline()


WAN_FRAMES, WAN_GRID = 2, (4, 4)                          # 5 frames → 2 latent frames; 64 px → 8 → 4


def latents(pipe, prompt=PROMPT, **kw):
    kw = {"height": SIZE, "width": SIZE, "num_inference_steps": STEPS, "output_type": "latent",
          "generator": torch.Generator().manual_seed(0), **kw}
    if isinstance(pipe, PixArtAlphaPipeline):
        kw = {"use_resolution_binning": False, "clean_caption": False, "max_sequence_length": 16, **kw}
    if isinstance(pipe, (WanPipeline, WanImageToVideoPipeline)):
        kw = {**kw, "height": 64, "width": 64, "num_frames": 5, "max_sequence_length": 16}
        if isinstance(pipe, WanImageToVideoPipeline):
            kw = {"image": PIL.Image.new("RGB", (64, 64), (200, 120, 40)), **kw}
        with torch.no_grad():
            return pipe(prompt=prompt, **kw).frames
    with torch.no_grad():
        return pipe(prompt=prompt, **kw).images


@contextlib.contextmanager
def i2v_prompts_cleaned_as_wan_does():
    """diffusers' WanImageToVideoPipeline calls ftfy.fix_text without checking that the optional ftfy is
    installed (WanPipeline checks, and leaves the text as it is): do as WanPipeline does without ftfy."""
    import diffusers.pipelines.wan.pipeline_wan_i2v as i2v
    with pytest.MonkeyPatch.context() as mp:
        if not hasattr(i2v, "ftfy"):
            mp.setattr(i2v, "ftfy", types.SimpleNamespace(fix_text=lambda text: text), raising=False)
        yield


@contextlib.contextmanager
def applied(pipe, dynamic, **kw):
    session = dh.apply(pipe, dynamic, **kw)
    try:
        yield session
    finally:
        dh.remove(pipe)


@contextlib.contextmanager
def hooked(module, hook, pre=False):
    """A test's own hook on a module (with kwargs), removed afterwards."""
    register = module.register_forward_pre_hook if pre else module.register_forward_hook
    handle = register(hook, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()


def with_scheduler(pipe, scheduler_class):
    """The same components with another scheduler built from this one's config."""
    parts = dict(pipe.components, scheduler=scheduler_class.from_config(pipe.scheduler.config))
    if isinstance(pipe, StableDiffusionPipeline):
        parts["requires_safety_checker"] = False
    other = type(pipe)(**parts)
    other.set_progress_bar_config(disable=True)
    return other


def module(pipe, name):
    model = pipe.unet if hasattr(pipe, "unet") else pipe.transformer
    return dict(model.named_modules())[name]


BEND = {"token": "sunset", "mode": "translate", "translate_x": -0.5, "translate_y": 0.25}


# --- the module itself ------------------------------------------------------------------------------

def test_imports_only_torch_stdlib_and_the_runtime():
    for path in Path(dh.__file__).parent.glob("*.py"):
        roots = imported_roots(path)
        assert roots <= {"__future__", "dataclasses", "functools", "inspect", "warnings", "typing", "math", "torch", "."}, path


def test_unknown_keys_and_bad_values_are_clear_errors(sd):
    with pytest.raises(ValueError, match="unknown dynamic technique.*sga"):
        dh.apply(sd, {"sga": {}})
    with pytest.raises(ValueError, match="unknown SAG parameter.*sigma"):
        dh.apply(sd, {"sag": {"scale": 0.5, "sigma": 1}})
    with pytest.raises(ValueError, match="unknown Slothful"):
        dh.apply(sd, {"slothful": {"strength": 2}})
    with pytest.raises(ValueError, match="unknown bending field"):
        dh.apply(sd, {"bending": [{**BEND, "shift": 1}]})
    with pytest.raises(ValueError, match="bad bending entry"):
        dh.apply(sd, {"bending": [{"token": "sunset"}]})
    with pytest.raises(ValueError, match="phase"):
        dh.apply(sd, {}, phase=3)
    assert getattr(sd, dh.SESSION_ATTR, None) is None        # nothing was left behind
    dh.apply(sd, {"slothful_simple": False})
    try:
        with pytest.raises(ValueError, match="already applied; call remove first"):
            dh.apply(sd, {})
    finally:
        dh.remove(sd)
    dh.remove(sd)                                            # unpatched: a no-op


def hook_state(model):
    return {name: (list(m._forward_hooks), list(m._forward_pre_hooks), dict(m._forward_hooks_with_kwargs),
                   dict(m._forward_pre_hooks_with_kwargs))
            for name, m in model.named_modules()}


def processors(model):
    return {name: m.processor for name, m in model.named_modules() if hasattr(m, "processor")}


def denoisers(pipe):
    """The UNet, or the transformer and (Wan 2.2 A14B) transformer_2."""
    names = ("unet",) if hasattr(pipe, "unet") else ("transformer", "transformer_2")
    return [m for m in (getattr(pipe, n, None) for n in names) if m is not None]


def check_remove_restores(pipe, dynamic, prompt=MARKED):
    models = denoisers(pipe)
    before = latents(pipe)
    procs, hooks, attrs = [processors(m) for m in models], [hook_state(m) for m in models], dict(vars(pipe))
    session = dh.apply(pipe, dynamic)
    assert sd_session_is_stored(pipe, session)
    for model, old, old_hooks in zip(models, procs, hooks):
        assert all(p is not old[n] for n, p in processors(model).items() if n.endswith(("attn1", "attn2")))
        assert hook_state(model) != old_hooks
    assert "encode_prompt" in vars(pipe)
    changed = latents(pipe, prompt)
    dh.remove(pipe)
    for model, old, old_hooks in zip(models, procs, hooks):
        now = processors(model)
        assert now.keys() == old.keys() and all(now[n] is old[n] for n in old)
        assert hook_state(model) == old_hooks
    assert vars(pipe).keys() == attrs.keys() and all(vars(pipe)[k] is attrs[k] for k in attrs)
    after = latents(pipe)
    assert torch.equal(after, before)
    assert not torch.equal(changed, before)
    return changed


def sd_session_is_stored(pipe, session):
    return getattr(pipe, dh.SESSION_ATTR) is session


ALL_THREE = {"sag": {"scale": 0.6, "blur_sigma": 2.0}, "slothful": {"in_strength": 6.0, "out_strength": 4.0},
             "slothful_simple": False, "bending": [BEND]}


def test_remove_restores_processors_hooks_and_attributes_exactly(sd):
    check_remove_restores(sd, ALL_THREE)


# --- where the host gets the step and ᾱ -------------------------------------------------------------

@pytest.mark.parametrize("scheduler_class, extra", [
    (DDIMScheduler, {}), (EulerDiscreteScheduler, {}), (DPMSolverMultistepScheduler, {}),
    (DPMSolverMultistepScheduler, {"use_karras_sigmas": True}), (HeunDiscreteScheduler, {}), (UniPCMultistepScheduler, {}),
    (PNDMScheduler, {"skip_prk_steps": True}), (PNDMScheduler, {"skip_prk_steps": False})],
    ids=["ddim", "euler", "dpm++2m", "dpm++2m-karras", "heun", "unipc", "pndm-plms", "pndm-prk"])
def test_step_index_and_alpha_cumprod_follow_the_scheduler(scheduler_class, extra):
    """Every scheduler's model calls map onto the steps 0 … N − 1, each evaluation to the step it goes into."""
    karras = extra.get("use_karras_sigmas", False)
    scheduler = scheduler_class(**SCHEDULER_CONFIG, **extra)
    scheduler.set_timesteps(4)
    x = torch.zeros(1, 4, 8, 8)
    steps, alphas = [], []
    for t in scheduler.timesteps:                       # the pipeline's loop, one model call per entry
        scheduler.scale_model_input(x, t)
        position = dh.calls.scheduler_position(scheduler, float(t))
        steps.append(dh.calls.step_of(scheduler, position))
        alphas.append(dh.calls.alpha_cumprod_at(scheduler, float(t), position))
        assert float(scheduler.timesteps[position]) == float(t)
        scheduler.step(torch.zeros_like(x), t, x)
    expected = {"HeunDiscreteScheduler": [0, 0, 1, 1, 2, 2, 3],     # [t0, t1, t1, t2, t2, t3, t3]: two per step
                "PNDMScheduler": [0, 0, 1, 2, 3] if extra.get("skip_prk_steps") else [0] * 4 + [1] * 4 + [2] * 4 + [3]}
    assert steps == expected.get(scheduler_class.__name__, [0, 1, 2, 3])
    sigmas = getattr(scheduler, "sigmas", None)
    for i, (t, a) in enumerate(zip(scheduler.timesteps, alphas)):
        if sigmas is None:                              # DDIM: integer timesteps
            assert a == pytest.approx(float(scheduler.alphas_cumprod[int(t)]))
        else:                                           # what the scheduler itself uses (Karras included)
            assert a == pytest.approx(1 / (1 + float(sigmas[i]) ** 2))
            if not karras and float(t) == round(float(t)):
                assert a == pytest.approx(float(scheduler.alphas_cumprod[int(t)]), rel=1e-4)


def test_pndm_records_the_same_steps_as_ddim(sd):
    """SD 1.x's default scheduler (PNDM, PLMS: four model calls for three steps) bends and records steps 0, 1, 2,
    as DDIM does (test_phase_one_…): the first step's two evaluations are both step 0."""
    ddim = sd.scheduler
    sd.scheduler = PNDMScheduler.from_config(ddim.config, skip_prk_steps=True)
    try:
        session = dh.apply(sd, {"bending": [BEND]}, phase=1)
        sd("a photo of a cat at {sunset}", num_inference_steps=3, guidance_scale=5.0, height=SIZE, width=SIZE,
           output_type="latent", generator=torch.Generator().manual_seed(0))
        dh.remove(sd)
    finally:
        sd.scheduler = ddim
    assert sorted({m["step"] for m in session.maps}) == [0, 1, 2]
    assert sum(m["step"] == 0 for m in session.maps) == 2 * sum(m["step"] == 1 for m in session.maps)


# --- explicit attention ------------------------------------------------------------------------------

def test_explicit_attention_equals_the_original_processor(sd, pixart, wan):
    """dh.attention (Slothful's reduced path, Bending's path) with nothing reduced = the original
    processor: AttnProcessor2_0, also with PixArt's text mask, and WanAttnProcessor (norms across heads)."""
    def explicit(q, k, v, heads, bias):
        return ba.attention_with_bending(q, k, v, heads, bias=bias)

    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        attn = module(sd, "down_blocks.1.attentions.0.transformer_blocks.0.attn1")
        h = torch.randn(2, 64, 64, generator=g)
        torch.testing.assert_close(dh.attention(attn, h, h, h), AttnProcessor2_0()(attn, h), rtol=0, atol=0)

        cross = module(pixart, "transformer_blocks.1.attn2")
        h, text = torch.randn(2, 64, 24, generator=g), torch.randn(2, 6, 24, generator=g)
        mask = torch.tensor([[0.0] * 4 + [-10000.0] * 2, [0.0] * 6])[:, None]     # PixArt's bias [b, 1, T]
        expected = AttnProcessor2_0()(cross, h, text, mask)
        torch.testing.assert_close(dh.attention(cross, h, text, text, mask), expected, rtol=0, atol=0)
        torch.testing.assert_close(dh.attention(cross, h, text, text, mask, explicit), expected,
                                   rtol=1e-5, atol=1e-6)
        assert not torch.allclose(AttnProcessor2_0()(cross, h, text), expected, atol=1e-4)   # the mask matters

        wan_cross = module(wan, "blocks.1.attn2")
        h, text = torch.randn(2, 32, 24, generator=g), torch.randn(2, 6, 24, generator=g)
        expected = type(wan_cross.processor)()(wan_cross, h, text)
        torch.testing.assert_close(dh.attention(wan_cross, h, text, text), expected, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(dh.attention(wan_cross, h, text, text, None, explicit), expected,
                                   rtol=1e-5, atol=1e-6)


def test_processor_is_transparent_to_the_host(sd):
    """Attention.forward hands a processor only the cross_attention_kwargs its __call__ names: the
    stand-in shows the original's signature, so an original with an extra parameter still gets it;
    positional calls (WanAttention's style) pass through too."""
    attn = module(sd, LAYER0_ATTN2)
    seen = []

    class Custom(AttnProcessor2_0):
        def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, my_flag=None):
            seen.append(my_flag)
            return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask)

    original, custom = attn.processor, Custom()
    attn.set_processor(custom)
    h, text = torch.randn(1, 256, 32), torch.randn(1, 6, 32)
    try:
        with torch.no_grad(), applied(sd, {"bending": [BEND]}):
            assert attn.processor is not custom
            out = attn(h, encoder_hidden_states=text, my_flag=7)
            positional = attn.processor(attn, h, text, None)
        assert attn.processor is custom
        torch.testing.assert_close(out, custom(attn, h, text), rtol=0, atol=0)
        torch.testing.assert_close(positional, out, rtol=0, atol=0)
        assert seen[0] == 7
    finally:
        attn.set_processor(original)


# --- SAG ------------------------------------------------------------------------------------------------

def test_sag_scale_zero_is_bit_identical(sd):
    base = latents(sd)
    with applied(sd, {"sag": {"scale": 0.0, "blur_sigma": 2.0}}):
        assert torch.equal(latents(sd), base)


def test_sag_correction_equals_explicit_recomputation(sd):
    """At step 1: the δ added inside the pipeline, seen in x0 space, is scale·(degraded − sag_x0), with
    the mask from the middle block's attention, the x0 conversions and the extra UNet call done here."""
    scale, blur_sigma, step = 0.6, 2.0, 1
    unet, mid_attn = sd.unet, module(sd, dh.unet.SAG_SITE)
    seen = {"inputs": [], "raw": [], "final": [], "mid": []}

    def keep_inputs(m, args, kwargs):
        if args[0].shape[0] == 2:                        # the pipeline's call, not SAG's extra one
            seen["inputs"].append((args, kwargs))

    def keep(key):
        def hook(m, args, kwargs, out):
            if args[0].shape[0] == 2:
                seen[key].append((out[0] if isinstance(out, tuple) else out.sample).clone())
        return hook

    def keep_mid(m, args, kwargs):
        if args[0].shape[0] == 2:
            seen["mid"].append(args[0].clone())

    with hooked(unet, keep_inputs, pre=True), hooked(unet, keep("raw")), hooked(mid_attn, keep_mid, pre=True):
        with applied(sd, {"sag": {"scale": scale, "blur_sigma": blur_sigma}}), hooked(unet, keep("final")):
            latents(sd)                                   # our hook runs between "raw" and "final"
    assert len(seen["raw"]) == len(seen["final"]) == STEPS

    args, kwargs = seen["inputs"][step]
    x, t, text = args[0][:1], args[1], kwargs["encoder_hidden_states"][:1]   # unconditional half
    eps_u = seen["raw"][step][:1]
    delta = seen["final"][step] - seen["raw"][step]
    torch.testing.assert_close(delta[0], delta[1], rtol=0, atol=1e-6)  # the same δ on both halves

    a = sd.scheduler.alphas_cumprod[int(t)]
    x0_u = (x - (1 - a).sqrt() * eps_u) / a.sqrt()
    with torch.no_grad():                                 # the middle block's attention, explicitly
        h = seen["mid"][step][:1]
        heads = mid_attn.heads
        q = mid_attn.to_q(h).unflatten(-1, (heads, -1)).transpose(1, 2)
        k = mid_attn.to_k(h).unflatten(-1, (heads, -1)).transpose(1, 2)
        probs = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]), dim=-1).flatten(0, 1)
    mask = sag.attention_mask_from_probs(probs, 1, heads, SIZE, SIZE, mid_hw=(SIZE // 2, SIZE // 2))
    assert 0 < float(mask.mean()) < 1
    degraded = sag.degrade(x0_u, mask, blur_sigma)
    x_deg = a.sqrt() * degraded + (1 - a).sqrt() * eps_u          # degraded x0 with this step's noise
    with torch.no_grad():
        eps_deg = unet(x_deg, t, encoder_hidden_states=text).sample
    sag_x0 = (x_deg - (1 - a).sqrt() * eps_deg) / a.sqrt()
    expected_x0_shift = scale * (degraded - sag_x0)
    observed_x0_shift = -(1 - a).sqrt() / a.sqrt() * delta[:1]    # x0 of the prediction moved by this
    assert float(expected_x0_shift.abs().max()) > 1e-3
    torch.testing.assert_close(observed_x0_shift, expected_x0_shift, rtol=1e-4, atol=1e-5)


def test_sag_matches_diffusers_sag_pipeline(sd):
    """diffusers' own StableDiffusionSAGPipeline (blur σ 1, DDIM) on the same components is an
    independent reference: same latents with our SAG at the same scale and blur."""
    reference_pipe = StableDiffusionSAGPipeline(**dict(sd.components, requires_safety_checker=False))
    reference_pipe.set_progress_bar_config(disable=True)
    procs = processors(sd.unet)
    reference = latents(reference_pipe, sag_scale=0.75)
    assert all(p is procs[n] for n, p in processors(sd.unet).items())   # it puts them back itself
    effect = (reference - latents(reference_pipe, sag_scale=0.0)).abs().max()
    assert effect > 0.1
    with applied(sd, {"sag": dict(sag.DIFFUSERS_PIPELINE_DEFAULTS)}):
        ours = latents(sd)
    # float32 rounding only (their mid attn1 is explicit, ours SDPA; CFG 7.5 amplifies): ≪ the effect
    torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-4)


def test_sag_without_cfg_warns_once_and_changes_nothing(sd):
    base = latents(sd, guidance_scale=1.0)
    with applied(sd, {"sag": {"scale": 0.6}}):
        with pytest.warns(UserWarning, match="classifier-free guidance") as caught:
            out = latents(sd, guidance_scale=1.0)
    assert len([w for w in caught if "classifier-free" in str(w.message)]) == 1
    assert torch.equal(out, base)


@pytest.mark.parametrize("scheduler_class", [EulerDiscreteScheduler, DPMSolverMultistepScheduler])
def test_sag_with_other_schedulers(sd, scheduler_class):
    pipe = with_scheduler(sd, scheduler_class)
    base = latents(pipe)
    with applied(pipe, {"sag": {"scale": 0.6, "blur_sigma": 2.0}}):
        out = latents(pipe)
    assert torch.isfinite(out).all() and not torch.allclose(out, base, atol=1e-4)


def test_sag_with_sdxl_keeps_the_return_type(sdxl):
    base = latents(sdxl)
    unet = sdxl.unet
    x = torch.randn(2, 4, SIZE, SIZE, generator=torch.Generator().manual_seed(4))
    cond = {"encoder_hidden_states": torch.randn(2, 6, 64), "added_cond_kwargs":
            {"text_embeds": torch.randn(2, 32), "time_ids": torch.tensor([[16.0, 16, 0, 0, 16, 16]] * 2)}}
    with applied(sdxl, {"sag": {"scale": 0.6, "blur_sigma": 2.0}}):
        out = latents(sdxl)                              # then direct calls: batch 2 = uncond + cond
        with torch.no_grad():
            as_tuple = unet(x, 500, return_dict=False, **cond)
            as_output = unet(x, 500, **cond)
    assert torch.isfinite(out).all() and not torch.allclose(out, base, atol=1e-4)
    assert isinstance(as_tuple, tuple) and len(as_tuple) == 1
    assert type(as_output).__name__ == "UNet2DConditionOutput"
    torch.testing.assert_close(as_tuple[0], as_output.sample, rtol=0, atol=0)
    with torch.no_grad():
        plain = unet(x, 500, **cond).sample
    assert not torch.allclose(plain, as_output.sample, atol=1e-5)   # the direct calls got SAG too


# --- Slothful Attention ------------------------------------------------------------------------------------

def to_k_inputs(pipe, names, dynamic, **kw):
    """Key-input token counts at the given attn1 sites in the pipeline's first model call (step 0)."""
    counts = {name: [] for name in names}
    hooks = []
    for name in names:
        def keep(m, args, kwargs, name=name):
            counts[name].append(args[0].shape[1])
        hooks.append(module(pipe, name).to_k.register_forward_pre_hook(keep, with_kwargs=True))
    try:
        with applied(pipe, dynamic):
            latents(pipe, **kw)
    finally:
        for h in hooks:
            h.remove()
    return {name: c[0] for name, c in counts.items()}


def first_sigma(pipe):
    scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config)
    scheduler.set_timesteps(STEPS)
    t = int(scheduler.timesteps[0])
    if getattr(scheduler, "sigmas", None) is not None:
        return float(scheduler.sigmas[0])
    a = float(scheduler.alphas_cumprod[t])
    return math.sqrt((1 - a) / a)


def expected_pooled_tokens(n, latent_n, sigma, strength, sdxl, grid):
    """slothful.md's stride and 2-D window, computed here."""
    t = min(1.0, max(0.0, (math.log(sigma) + 2.2) / 5))
    r = (4 if sdxl else 1) * n / latent_n
    stride = strength * r ** 0.5 * t                    # depth_decay 1, time_decay 1
    if stride <= 1:
        return n
    sty = math.ceil(math.sqrt(stride))
    stx = math.ceil(stride / sty)
    return (grid[0] // stx) * (grid[1] // sty)


SD_ATTN1 = {"down0": "down_blocks.0.attentions.0.transformer_blocks.0.attn1",
            "down1": "down_blocks.1.attentions.0.transformer_blocks.0.attn1",
            "mid": "mid_block.attentions.0.transformer_blocks.0.attn1",
            "up1": "up_blocks.1.attentions.0.transformer_blocks.0.attn1"}


def test_slothful_strength_zero_is_bit_identical(sd):
    base = latents(sd)
    with applied(sd, {"slothful": {"in_strength": 0.0, "out_strength": 0.0}}):
        assert torch.equal(latents(sd), base)


def test_slothful_token_counts_sd_rule_and_keep_middle(sd):
    sigma = first_sigma(sd)
    params = {"in_strength": 9.0, "out_strength": 9.0}
    counts = to_k_inputs(sd, SD_ATTN1.values(), {"slothful": params})
    for name, grid in (("down0", (16, 16)), ("down1", (8, 8)), ("up1", (16, 16))):
        n = grid[0] * grid[1]
        expected = expected_pooled_tokens(n, SIZE * SIZE, sigma, 9.0, sdxl=False, grid=grid)
        assert expected < n
        assert counts[SD_ATTN1[name]] == expected, name
    assert counts[SD_ATTN1["mid"]] == 64                # keep_middle (default) leaves it alone
    counts = to_k_inputs(sd, [SD_ATTN1["mid"]], {"slothful": {**params, "keep_middle": False}})
    assert counts[SD_ATTN1["mid"]] == expected_pooled_tokens(64, SIZE * SIZE, sigma, 9.0, False, (8, 8)) < 64


def test_slothful_sdxl_family_rule(sdxl):
    """Heads ≠ 8: r = 4n/N, so the 8×8 level of a 16×16 latent gets the full strength."""
    name = "down_blocks.1.attentions.0.transformer_blocks.0.attn1"
    assert module(sdxl, name).heads != 8
    sigma = first_sigma(sdxl)
    counts = to_k_inputs(sdxl, [name], {"slothful": {"in_strength": 6.0}})
    sdxl_count = expected_pooled_tokens(64, SIZE * SIZE, sigma, 6.0, sdxl=True, grid=(8, 8))
    sd_count = expected_pooled_tokens(64, SIZE * SIZE, sigma, 6.0, sdxl=False, grid=(8, 8))
    assert sdxl_count != sd_count
    assert counts[name] == sdxl_count


def explicit_attention(attn, h, k_in, v_in):
    heads = attn.heads
    q, k, v = (x.unflatten(-1, (heads, -1)).transpose(1, 2) for x in (attn.to_q(h), attn.to_k(k_in), attn.to_v(v_in)))
    probs = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]), dim=-1)
    return attn.to_out[0]((probs @ v).transpose(1, 2).flatten(2))


@pytest.mark.parametrize("k_blend, v_blend", [(1.0, 0.0), (1.0, 1.0)])
def test_slothful_attention_output_at_one_site(sd, k_blend, v_blend):
    """down_blocks.0 attn1 (16×16 tokens) at step 0: the output is attention with K from average-
    pooled hidden states on the recovered grid (blend 1), V from the subsampled ones cropped to the
    pooled grid (blend 0); with both blends 1, the reference's quirk: both uncropped subsampled."""
    attn = module(sd, SD_ATTN1["down0"])
    strength = 9.0
    seen = []

    def keep(m, args, kwargs, out):
        seen.append((args[0].clone(), out.clone()))

    params = {"in_strength": strength, "in_k_blend": k_blend, "in_v_blend": v_blend}
    with hooked(attn, keep), applied(sd, {"slothful": params}):
        latents(sd)
    h, out = seen[0]
    sigma = first_sigma(sd)
    stride = strength * ((math.log(sigma) + 2.2) / 5)   # r = 1 at the top level
    sty = math.ceil(math.sqrt(stride))
    stx = math.ceil(stride / sty)
    assert (stx, sty) == (2, 3)                         # 16 % 3 ≠ 0: cropping shows
    grid = h.transpose(1, 2).reshape(2, h.shape[-1], 16, 16)
    pooled = F.avg_pool2d(grid, (stx, sty)).flatten(2).transpose(1, 2)                   # 8×5
    one = grid[:, :, ::stx, ::sty]                                                       # 8×6
    cropped = one[:, :, :8, :5].flatten(2).transpose(1, 2)
    uncropped = one.flatten(2).transpose(1, 2)
    k_in, v_in = (pooled, cropped) if v_blend == 0 else (uncropped, uncropped)
    assert pooled.shape[1] == 40 and uncropped.shape[1] == 48
    with torch.no_grad():
        expected = explicit_attention(attn, h, k_in, v_in)
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)


# --- Attention Bending ------------------------------------------------------------------------------------

def test_bending_strength_zero_is_bit_identical_and_marks_are_stripped(sd):
    base = latents(sd)                                   # the unmarked prompt, unpatched
    with applied(sd, {"bending": [{**BEND, "strength": 0.0}]}) as session:
        assert torch.equal(latents(sd, MARKED), base)
        assert session.maps == [] and session.token_indices == {"sunset": [SUNSET]}


def test_a_second_encode_prompt_before_denoising_is_the_negative_prompts(sd):
    """Pipelines that encode the negative prompt in a call of its own (Flux's true CFG, Qwen-Image, HunyuanVideo 1.5,
    Kandinsky 5): the words are found in the first call's prompt only, its embeddings stay the conditional ones; the
    first call after a model call is a new run's prompt."""
    args = ("cpu", 1, False)
    with torch.no_grad(), applied(sd, {"bending": [BEND]}) as session:
        prompt = sd.encode_prompt(MARKED, *args)
        columns = dict(session.token_indices)
        negative = sd.encode_prompt("a dog", *args)             # no "sunset": not searched
        assert session.token_indices == columns and session.prompt_embeds is prompt[0]
        assert not torch.equal(negative[0], prompt[0])
        latents(sd, MARKED, num_inference_steps=1)
        with pytest.raises(ValueError, match="Token not found: 'sunset'"):
            sd.encode_prompt("a dog", *args)


def test_encode_prompt_removes_the_marks(sd):
    args = ("cpu", 1, True)
    with torch.no_grad():
        plain = sd.encode_prompt(PROMPT, *args)
        with applied(sd, {"bending": [BEND]}):
            marked = sd.encode_prompt(MARKED, *args)
        unmarked_raw = sd.encode_prompt(MARKED, *args)   # unpatched: the braces are tokens
        # only the braces go: parentheses (compel-style weights, left to the user's encoder) stay
        weighted = "a (romantic:1.2) kiss at {sunset}"
        with applied(sd, {"bending": [BEND]}) as session:
            kept = sd.encode_prompt(weighted, *args)
        raw = sd.encode_prompt(weighted.replace("{", "").replace("}", ""), *args)
    assert torch.equal(marked[0], plain[0]) and torch.equal(marked[1], plain[1])
    assert not torch.equal(unmarked_raw[0], plain[0])
    assert torch.equal(kept[0], raw[0])
    columns = session.token_indices["sunset"]
    assert columns[0] > SUNSET and sd.tokenizer.convert_ids_to_tokens(
        sd.tokenizer(weighted.replace("{", "").replace("}", ""))["input_ids"])[columns[0]].startswith("sun")


LAYER0_ATTN2 = "down_blocks.0.attentions.0.transformer_blocks.0.attn2"


def recorded_with_layer0_inputs(pipe, dynamic, prompt, **kw):
    """(session, latents, [(hidden_states, text)] of layer 0's cross-attention per call)."""
    inputs = []

    def keep(m, args, kwargs):
        inputs.append((args[0].clone(), kwargs["encoder_hidden_states"].clone()))

    with hooked(module(pipe, LAYER0_ATTN2), keep, pre=True), applied(pipe, dynamic, **kw) as session:
        out = latents(pipe, prompt)
    return session, out, inputs


def conditional_probs(attn2, h, text):
    """The conditional item's cross-attention probabilities [heads, S, T], explicitly."""
    heads = attn2.heads
    with torch.no_grad():
        q = attn2.to_q(h[1:]).unflatten(-1, (heads, -1)).transpose(1, 2)
        k = attn2.to_k(text[1:]).unflatten(-1, (heads, -1)).transpose(1, 2)
        return torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]), dim=-1)[0]


def test_phase_one_records_maps_and_leaves_the_output_alone(sd):
    base = latents(sd)
    session, out, inputs = recorded_with_layer0_inputs(sd, {"bending": [BEND]}, MARKED, phase=1)
    assert session.record_maps
    assert torch.equal(out, base)
    records = session.maps
    assert sorted((r["step"], r["layer"]) for r in records) == \
        [(s, layer) for s in range(STEPS) for layer in range(SD_CROSS_SITES)]
    for r in records:
        assert set(r) == {"token", "layer", "step", "site", "original", "bent"} and r["token"] == "sunset"
        for key in ("original", "bent"):
            assert r[key].dtype == torch.float32 and r[key].device.type == "cpu"
        assert r["original"].shape == ((16, 16) if r["layer"] in (0, 5, 6) else (8, 8))
        assert not torch.allclose(r["original"], r["bent"])
    # layer 0, step 0, recomputed: the conditional item's column of "sunset", averaged over heads.
    probs = conditional_probs(module(sd, LAYER0_ATTN2), *inputs[0])
    bent = bending.bend_probs(probs, {"sunset": [SUNSET]}, (16, 16), [BEND])
    first = next(r for r in records if (r["step"], r["layer"]) == (0, 0))
    torch.testing.assert_close(first["original"], probs[:, :, SUNSET].mean(0).reshape(16, 16), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(first["bent"], bent[:, :, SUNSET].mean(0).reshape(16, 16), rtol=1e-5, atol=1e-6)


def test_phase_two_changes_the_output_and_identity_bend_does_not(sd):
    base = latents(sd)
    with applied(sd, {"bending": [BEND]}) as session:
        assert not session.record_maps
        out = latents(sd, MARKED)
        assert session.maps == []
    assert torch.isfinite(out).all() and (out - base).abs().max() > 1e-2
    identity = {"token": "sunset", "mode": "scale", "scale_factor": 1.0, "renormalize": "none"}
    with applied(sd, {"bending": [identity]}, record_maps=True) as session:
        same = latents(sd, MARKED)
    assert len(session.maps) == STEPS * SD_CROSS_SITES     # the explicit path ran everywhere
    # explicit softmax vs SDPA: float32 rounding, amplified by CFG 7.5 over 3 steps
    torch.testing.assert_close(same, base, rtol=1e-4, atol=1e-4)


def test_timestep_and_layer_filters(sd):
    base = latents(sd)
    entry = {**BEND, "apply_to_timesteps": [1, 3], "apply_to_layers": [0, 5]}
    with applied(sd, {"bending": [entry]}, record_maps=True) as session:
        out = latents(sd, MARKED)
    assert sorted((r["step"], r["layer"]) for r in session.maps) == [(1, 0), (1, 5), (2, 0), (2, 5)]
    assert not torch.allclose(out, base, atol=1e-4)
    for entry in ({**BEND, "apply_to_layers": [99]}, {**BEND, "apply_to_timesteps": [STEPS, STEPS + 5]}):
        with applied(sd, {"bending": [entry]}, record_maps=True) as session:
            assert torch.equal(latents(sd, MARKED), base)
        assert session.maps == []


def test_token_not_found_before_any_denoising(sd):
    calls = []
    with hooked(sd.unet, lambda m, a, k: calls.append(1), pre=True):
        with applied(sd, {"bending": [{**BEND, "token": "beach"}]}):
            with pytest.raises(ValueError, match="Token not found: 'beach'"):
                latents(sd, MARKED)
    assert calls == []


def test_prompt_embeds_only_is_an_error(sd):
    with torch.no_grad():
        embeds, negative = sd.encode_prompt(PROMPT, "cpu", 1, True)
    with applied(sd, {"bending": [BEND]}):
        with pytest.raises(ValueError, match="prompt_embeds alone"):
            latents(sd, None, prompt_embeds=embeds, negative_prompt_embeds=negative)


def test_prompt_lists(sd):
    with applied(sd, {"bending": [BEND]}, record_maps=True) as session:
        out = latents(sd, ["a photo at {sunset}", "a cat at sunset"], num_inference_steps=1)
        assert out.shape[0] == 2 and session.token_indices == {"sunset": [4]}
        with pytest.raises(ValueError, match="same token positions"):
            latents(sd, ["a photo at sunset", "a romantic kiss at sunset"])


def test_word_with_several_subtokens(sd):
    """A word outside the vocabulary's merges is several sub-tokens: all are bent, the map is their mean."""
    pieces = len(sd.tokenizer.tokenize("moon"))
    assert pieces > 1
    entry = {**BEND, "token": "moon"}
    session, _, inputs = recorded_with_layer0_inputs(sd, {"bending": [entry]}, "a photo of a {moon}", phase=1)
    columns = list(range(5, 5 + pieces))
    assert session.token_indices == {"moon": columns}
    probs = conditional_probs(module(sd, LAYER0_ATTN2), *inputs[0])
    bent = bending.bend_probs(probs, {"moon": columns}, (16, 16), [entry])
    first = next(r for r in session.maps if (r["step"], r["layer"]) == (0, 0))
    torch.testing.assert_close(first["original"], probs[:, :, columns].mean((0, 2)).reshape(16, 16),
                               rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(first["bent"], bent[:, :, columns].mean((0, 2)).reshape(16, 16), rtol=1e-5, atol=1e-6)


def test_without_cfg_every_item_is_bent(sd):
    base = latents(sd, guidance_scale=1.0)
    with applied(sd, {"bending": [BEND]}, record_maps=True) as session:
        out = latents(sd, MARKED, guidance_scale=1.0)
    assert len(session.maps) == STEPS * SD_CROSS_SITES
    assert not torch.allclose(out, base, atol=1e-4)


# --- SDXL, all three ------------------------------------------------------------------------------------------

def test_sdxl_all_three_and_remove(sdxl):
    changed = check_remove_restores(sdxl, ALL_THREE)
    assert torch.isfinite(changed).all()


# --- PixArt (a DiT, through the same apply) ----------------------------------------------------------------

def test_pixart_bending(pixart):
    base = latents(pixart)
    with applied(pixart, {"bending": [{**BEND, "strength": 0.0}]}):
        assert torch.equal(latents(pixart, MARKED), base)
    with applied(pixart, {"bending": [BEND]}, record_maps=True) as session:
        bent = latents(pixart, MARKED)
    assert session.token_indices == {"sunset": [4]}      # T5: no BOS
    assert torch.isfinite(bent).all() and not torch.allclose(bent, base, atol=1e-4)
    assert sorted((r["step"], r["layer"]) for r in session.maps) == [(s, i) for s in range(STEPS) for i in range(2)]
    assert all(r["original"].shape == (SIZE // 2, SIZE // 2) for r in session.maps)   # patch 2
    identity = {"token": "sunset", "mode": "scale", "renormalize": "none"}
    with applied(pixart, {"bending": [identity]}):           # explicit path with T5's padding mask
        torch.testing.assert_close(latents(pixart, MARKED), base, rtol=1e-4, atol=1e-5)


def test_pixart_rejects_unet_only_techniques(pixart):
    for dynamic in ({"sag": {"scale": 0.5}}, {"slothful": {}}):
        with pytest.raises(ValueError, match="need a UNet"):
            dh.apply(pixart, dynamic)
    assert getattr(pixart, dh.SESSION_ATTR, None) is None


def test_pixart_remove_restores(pixart):
    check_remove_restores(pixart, {"bending": [BEND]})


# --- Wan 2.1 (video DiT, CFG in two calls) -------------------------------------------------------------------

def test_wan_bending(wan):
    base = latents(wan)
    with applied(wan, {"bending": [{**BEND, "strength": 0.0}]}):
        assert torch.equal(latents(wan, MARKED), base)
    with applied(wan, {"bending": [BEND]}, record_maps=True) as session:
        bent = latents(wan, MARKED)
    assert session.token_indices == {"sunset": [4]}
    assert torch.isfinite(bent).all() and not torch.allclose(bent, base, atol=1e-4)
    # only the conditional call of each step is bent: one record per step and layer, per-frame maps
    assert sorted((r["step"], r["layer"]) for r in session.maps) == [(s, i) for s in range(STEPS) for i in range(2)]
    assert all(r["original"].shape == (WAN_FRAMES, *WAN_GRID) for r in session.maps)
    identity = {"token": "sunset", "mode": "scale", "renormalize": "none"}
    with applied(wan, {"bending": [identity]}):           # explicit path: RMS norms across heads
        torch.testing.assert_close(latents(wan, MARKED), base, rtol=1e-4, atol=1e-5)


def test_wan_finds_a_word_right_after_punctuation():
    """With a SentencePiece tokenizer (T5's, UMT5's conventions), "dusk,sunset" spells sunset "s", "un", "set"
    where the word alone is "▁sunset": the adapter finds it there, and its columns spell the word."""
    pipe = wan_pipeline(tokenizer=t5_sentencepiece_tokenizer())
    with applied(pipe, {"bending": [BEND]}) as session:
        latents(pipe, "a kiss at dusk,{sunset}", num_inference_steps=1)
    ids = pipe.tokenizer("a kiss at dusk,sunset")["input_ids"]
    pieces = pipe.tokenizer.convert_ids_to_tokens([ids[j] for j in session.token_indices["sunset"]])
    assert pieces == ["s", "un", "set"]


def test_wan_remove_restores(wan):
    check_remove_restores(wan, {"bending": [BEND]})


# --- Wan 2.2 A14B: two experts, one step count --------------------------------------------------------------

WAN22_STEPS = 4              # timesteps 1000, 934 (high-noise expert), 781, 47 (low-noise expert)
SCALE_KISS = {"token": "kiss", "mode": "scale", "scale_factor": 30.0, "renormalize": "column"}


@pytest.fixture(scope="module", params=["t2v", "i2v"])
def wan22(request):
    """Wan 2.2 A14B, text to video or (the image encoded into the experts' input) image to video."""
    if request.param == "t2v":
        yield wan22_pipeline()
    else:
        with i2v_prompts_cleaned_as_wan_does():
            yield wan22_i2v_pipeline()


def expert_calls(pipe, steps=WAN22_STEPS):
    """A run's model calls in order: (expert 0 = transformer | 1 = transformer_2, keyword inputs, output)."""
    calls = []
    experts = [pipe.transformer, pipe.transformer_2]

    def record(module, args, kwargs, out):
        assert not args                              # WanPipeline passes keywords
        calls.append((experts.index(module), dict(kwargs), out[0].clone()))

    handles = [m.register_forward_hook(record, with_kwargs=True) for m in experts]
    try:
        latents(pipe, MARKED, num_inference_steps=steps)
    finally:
        for handle in handles:
            handle.remove()
    return calls


@pytest.mark.parametrize("window", [[1, 2], [2, 3]])
def test_wan22_both_experts_bend_one_step_window(wan22, window):
    """apply_to_timesteps counts the pipeline's steps whichever expert runs them: [1, 2] spans the switch
    (step 1 on the high-noise expert, step 2 on the low-noise one), [2, 3] is the low-noise expert's two.
    Each call's output against the same expert, unpatched, on the same inputs: bit-identical outside the
    window and for the unconditional calls; different for the conditional calls inside it."""
    entries = [{**e, "apply_to_timesteps": window} for e in (BEND, SCALE_KISS)]
    with applied(wan22, {"bending": entries}, record_maps=True) as session:
        calls = expert_calls(wan22)
    assert [expert for expert, _, _ in calls] == [0] * 4 + [1] * 4       # per step: cond, then uncond
    experts = [wan22.transformer, wan22.transformer_2]
    for i, (expert, inputs, out) in enumerate(calls):
        step, conditional = i // 2, i % 2 == 0
        with torch.no_grad():
            plain = experts[expert](**inputs)[0]
        if conditional and window[0] <= step <= window[1]:
            assert (out - plain).abs().max() > 1e-4, (step, expert)
        else:
            assert torch.equal(out, plain), (step, expert)
    steps = range(window[0], window[1] + 1)
    assert sorted((r["step"], r["layer"], r["token"]) for r in session.maps) == \
        [(s, layer, w) for s in steps for layer in range(2) for w in ("kiss", "sunset")]


def test_wan22_remove_restores_both_experts(wan22):
    check_remove_restores(wan22, {"bending": [BEND]})


# --- Wan 2.2 TI2V-5B, image to video: a timestep per token --------------------------------------------------

@pytest.fixture(scope="module")
def wan_ti2v():
    with i2v_prompts_cleaned_as_wan_does():
        yield wan22_ti2v_pipeline()


@pytest.mark.parametrize("window", [[0, 0], [1, 2]])
def test_wan22_ti2v_step_is_the_noised_tokens_timestep(wan_ti2v, window):
    """With expand_timesteps the model gets a timestep per token: 0 for the image's latent frame, t for the
    others. The step is found from t (the first token's 0 matches no step): a window bends the conditional
    call of exactly its steps; every other call is the unpatched model's output bit for bit."""
    calls = []

    def record(module, args, kwargs, out):
        calls.append((dict(kwargs), out[0].clone()))

    entries = [{**BEND, "apply_to_timesteps": window}]
    with applied(wan_ti2v, {"bending": entries}, record_maps=True) as session, \
            hooked(wan_ti2v.transformer, record):
        latents(wan_ti2v, MARKED, num_inference_steps=4)
    assert len(calls) == 8                                   # 4 steps × (cond, uncond)
    assert calls[0][0]["timestep"].ndim == 2 and calls[0][0]["timestep"][0, 0] == 0     # per token, image first
    for i, (inputs, out) in enumerate(calls):
        step, conditional = i // 2, i % 2 == 0
        with torch.no_grad():
            plain = wan_ti2v.transformer(**inputs)[0]
        if conditional and window[0] <= step <= window[1]:
            assert (out - plain).abs().max() > 1e-4, step
        else:
            assert torch.equal(out, plain), step
    assert sorted({r["step"] for r in session.maps}) == list(range(window[0], window[1] + 1))


# --- the lean path: SDPA + bent_output's correction equals the explicit probabilities -------------------------

LEAN_ENTRIES = [
    {**BEND, "renormalize": "row"},
    {"token": "kiss", "mode": "scale", "scale_factor": 30.0, "renormalize": "column"},
    {"token": "kiss, sunset", "mode": "flip", "flip_horizontal": True, "strength": 0.7, "renormalize": "none"},
    {"token": "ALL", "mode": "blur", "sigma": 1.5, "strength": 0.5},
]


@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("n_entries", [1, 4])
def test_bent_attention_equals_the_explicit_probability_path(masked, n_entries):
    """dh.bent_sdpa (SDPA + exact correction, no [S, T] matrix) = ba.attention_with_bending
    (explicit float32 softmax, bent, renormalised, times V) on the conditional rows, to float32 rounding;
    the unconditional rows are SDPA's output bit for bit. With PixArt's padding mask as a bias."""
    g = torch.Generator().manual_seed(11)
    heads, n_q, n_text, d = 3, 2 * 4 * 6, 7, 8
    q, k, v = (torch.randn(2, n, heads * d, generator=g) * 2 for n in (n_q, n_text, n_text))
    bias = None
    if masked:
        bias = torch.tensor([0.0] * 5 + [-10000.0] * 2).expand(2 * heads, 1, n_text)
    columns = {"sunset": [4], "kiss": [2, 3], "kiss, sunset": [2, 3, 4]}
    entries = LEAN_ENTRIES[:n_entries]
    bend = dict(entries=entries, token_indices=columns, grid_hw=(4, 6), step_index=2, layer_index=1, frames=2)
    lean = dh.bent_sdpa(q, k, v, heads, bias, [1], **bend)
    explicit = ba.attention_with_bending(q, k, v, heads, entries, columns, (4, 6), 2, 1, 2, bend_batch=[1],
                                              bias=bias)
    torch.testing.assert_close(lean[1], explicit[1], rtol=1e-5, atol=1e-5)    # outputs of size ~5
    assert torch.equal(lean[0], dh.recompute.sdpa(q, k, v, heads, bias)[0])
    assert not torch.allclose(lean[1], dh.recompute.sdpa(q, k, v, heads, bias)[1], atol=1e-3)      # it bends


def test_wan_run_bends_as_the_explicit_path(wan):
    """In a Wan pipeline run, every bent text cross-attention's output equals the old explicit-probability
    route recomputed from the same inputs (dh.attention with attention_with_bending)."""
    entries = [BEND, {"token": "kiss", "mode": "scale", "scale_factor": 30.0, "renormalize": "column"}]
    calls = []

    def record(module, args, kwargs, out):
        calls.append((module, args[0] if args else kwargs["hidden_states"],
                      kwargs.get("encoder_hidden_states", args[1] if len(args) > 1 else None), out))

    handles = [b.attn2.register_forward_hook(record, with_kwargs=True) for b in wan.transformer.blocks]
    try:
        with applied(wan, {"bending": entries}) as session:
            latents(wan, MARKED)
            steps = []
            for module, h, text, out in calls:
                layer = [b.attn2 for b in wan.transformer.blocks].index(module)
                step = len(steps) // 4                 # per step: cond (2 blocks), then uncond (2 blocks)
                steps.append(step)
                if len(steps) % 4 in (1, 2):           # the conditional call
                    def explicit(q, k, v, heads, bias, layer=layer, step=step):
                        return ba.attention_with_bending(q, k, v, heads, entries, session.token_indices,
                                                              (WAN_GRID), step, layer, WAN_FRAMES)
                    with torch.no_grad():
                        expected = dh.attention(module, h, text, text, None, explicit)
                    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)
                    assert not torch.allclose(out, dh.attention(module, h, text, text), atol=1e-4)
    finally:
        for handle in handles:
            handle.remove()
    assert len(calls) == 4 * STEPS


def test_bending_refuses_a_model_whose_text_attention_it_does_not_reach():
    """HunyuanVideo FramePack's transformer (diffusers' HunyuanVideoFramepackTransformer3DModel: no attn1 / attn2, not
    among the families bent): apply() says so in one line instead of sampling unbent, and leaves the model as it was."""
    from diffusers import HunyuanVideoFramepackTransformer3DModel

    transformer = HunyuanVideoFramepackTransformer3DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8, num_layers=1, num_single_layers=1,
        num_refiner_layers=1, text_embed_dim=16, pooled_projection_dim=8, rope_axes_dim=(2, 2, 4))
    pipe = types.SimpleNamespace(transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler())
    processors = {n: m.processor for n, m in transformer.named_modules() if hasattr(m, "processor")}
    with pytest.raises(ValueError, match="text attention of a HunyuanVideoFramepackTransformer3DModel"):
        dh.apply(pipe, {"bending": [BEND]})
    assert {n: m.processor for n, m in transformer.named_modules() if hasattr(m, "processor")} == processors
    assert getattr(pipe, dh.SESSION_ATTR, None) is None
