"""Which synthetic architectures exist, which generator module makes each, and the layouts each can
write. Plain data without torch, so the CLI can list choices without importing a model library."""

# generator module (ckptbend/synth/<module>.py) → (its architectures, its layouts)
_DIT_LAYOUTS = ("single", "single_prefixed", "comfy", "transformer_diffusers", "diffusers")
GENERATORS = {
    "sd": (("sd1", "sd2", "sdxl", "sdxl_refiner", "svd"),
           ("single", "diffusers", "unet", "unet_bare", "unet_diffusers", "text_encoder", "text_encoder_openclip")),
    "wan": (("wan21_t2v", "wan21_i2v", "wan22_ti2v", "wan22_i2v", "wan_vace", "skyreels_v2", "ltx_video"),
            ("single", "comfy", "transformer_diffusers", "diffusers", "text_encoder")),
    "flux": (("flux_dev", "flux_schnell", "chroma", "chroma_radiance", "hunyuan_video"),
             ("single", "comfy", "transformer_diffusers", "diffusers")),
    "sd3": (("sd3_medium", "sd35_medium", "sd35_large"), _DIT_LAYOUTS),
    "qwen_image": (("qwen_image", "qwen_image_layered", "qwen_image_21"), _DIT_LAYOUTS),
    "flux2": (("flux2_dev", "flux2_klein"), _DIT_LAYOUTS),
    "lumina": (("z_image", "lumina2"), _DIT_LAYOUTS),
    "ltx2": (("ltx2", "ltx2_3", "ltx2_5"), _DIT_LAYOUTS),
    "hidream": (("hidream",), _DIT_LAYOUTS),
    "ernie_image": (("ernie_image",), _DIT_LAYOUTS),
    # a large text encoder alone (layouts/text_encoder_forms.py names them as ComfyUI does)
    "large_text_encoders": (("t5xxl", "umt5xxl", "byt5_small", "llama", "qwen25_7b", "mistral3_24b", "qwen3_4b",
                             "qwen3vl_4b", "gemma2_2b", "gemma3_12b", "gemma4_12b"), ("single", "comfy", "diffusers")),
    "flux3": (("flux3_klein", "flux3_klein_base"), _DIT_LAYOUTS[:-1]),   # no diffusers pipeline
    "krea2": (("krea2",), _DIT_LAYOUTS),
    "hunyuan_video15": (("hunyuan_video15",), ("transformer_diffusers", "diffusers")),
    "kandinsky5": (("kandinsky5",), _DIT_LAYOUTS),
    "minimax_h3": (("minimax_h3",), _DIT_LAYOUTS),
    "ideogram4": (("ideogram4",), _DIT_LAYOUTS),
    "cosmos": (("cosmos_predict2",), _DIT_LAYOUTS),
    "anima": (("anima",), _DIT_LAYOUTS[:3]),   # diffusers keeps its text adapter in another model
    "auraflow": (("auraflow",), _DIT_LAYOUTS),
    "sana": (("sana",), _DIT_LAYOUTS),
    "mochi": (("mochi",), _DIT_LAYOUTS),
    "motif_video": (("motif_video",), _DIT_LAYOUTS),
    "flux_relatives": (("longcat_image", "ovis_image"), _DIT_LAYOUTS),
}
ARCHES = tuple(a for arches, _ in GENERATORS.values() for a in arches)
LAYOUTS = tuple(dict.fromkeys(layout for _, layouts in GENERATORS.values() for layout in layouts))
SCALED_FP8 = "scaled_fp8"   # ComfyUI's scaled fp8 (fp8 e4m3fn + scale_weight): not a torch dtype, passed by name
# ComfyUI's quantised single-file forms (synth/quantised.py), passed by name; DiT families, single-file layouts.
QUANTISED = (SCALED_FP8, "fp8mixed", "int8", "int8_convrot", "nvfp4")
# GGUF files of the diffusion model alone, as ComfyUI-GGUF writes them, or of a large text encoder in llama.cpp's
# names (synth/gguf.py), passed by name.
GGUF = ("q4_0", "q4_1", "q5_0", "q5_1", "q8_0", "q2_k", "q3_k", "q4_k", "q5_k", "q6_k", "iq4_nl", "iq4_xs",
        "gguf-f16", "gguf-bf16", "gguf-k_m")
DTYPE_NAMES = ("fp32", "fp16", "bf16", "fp8_e4m3fn", "fp8_e5m2", *QUANTISED, *GGUF)


def generator_of(arch: str) -> str | None:
    return next((module for module, (arches, _) in GENERATORS.items() if arch in arches), None)
