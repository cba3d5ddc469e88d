"""Which synthetic architectures exist, which generator module makes each, and the layouts each can
write. Plain data without torch, so the CLI can list choices without importing a model library."""

# generator module (ckptbend/synth/<module>.py) → (its architectures, its layouts)
_DIT_LAYOUTS = ("single", "single_prefixed", "comfy", "transformer_diffusers", "diffusers")
GENERATORS = {
    "sd": (("sd1", "sd2", "sdxl", "sdxl_refiner", "svd"),
           ("single", "diffusers", "unet", "unet_bare", "unet_diffusers", "text_encoder", "text_encoder_openclip")),
    "sd3": (("sd3_medium", "sd35_medium", "sd35_large"), _DIT_LAYOUTS),
    "qwen_image": (("qwen_image",), _DIT_LAYOUTS),
}
ARCHES = tuple(a for arches, _ in GENERATORS.values() for a in arches)
LAYOUTS = tuple(dict.fromkeys(layout for _, layouts in GENERATORS.values() for layout in layouts))
DTYPE_NAMES = ("fp32", "fp16", "bf16", "fp8_e4m3fn", "fp8_e5m2", "scaled_fp8")


def generator_of(arch: str) -> str | None:
    return next((module for module, (arches, _) in GENERATORS.items() if arch in arches), None)
