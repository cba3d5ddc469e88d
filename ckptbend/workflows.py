"""The companion's example ComfyUI workflow (API format), per model family, as data.

Each family names its loaders, latent, sampler settings and output: a checkpoint with its text encoders and
VAE inside ("single-file", as SD 1.x/SDXL files are) loads with CheckpointLoaderSimple; a bare UNet / DiT
(what `bake` writes for a ComfyUI diffusion_models file, and diffusers folders, which ComfyUI loads as such
files) with UNETLoader, the family's text-encoder loader (CLIPLoader with the right type, DualCLIPLoader,
TripleCLIPLoader) and VAELoader. Text encoder and VAE names are the ones ComfyUI's own workflow templates
use; a video model ends in CreateVideo and SaveVideo. The companion's node sits between the model loader
and the sampler, with the text encoder wired into its bending_clip.

An architecture without a graph gets none (missing_graph says why in one line): an SD 1.x graph would not
load a DiT. Only no architecture at all (`emit` without a checkpoint) and the SD UNet names get the SD graph.
"""

from __future__ import annotations

EXAMPLE_PROMPT = "a photo of a lake at sunset"
NEGATIVE_PROMPT = "blurry, low quality"


def _sampler(steps, cfg, sampler="euler", scheduler="simple"):
    return {"steps": steps, "cfg": cfg, "sampler_name": sampler, "scheduler": scheduler}


def _latent(class_type, **inputs):
    return {"class_type": class_type, "inputs": {**inputs, "batch_size": 1}}


WAN_TE = ("CLIPLoader", {"clip_name": "umt5_xxl_fp8_e4m3fn_scaled.safetensors", "type": "wan"})
FLUX_TE = ("DualCLIPLoader", {"clip_name1": "clip_l.safetensors", "clip_name2": "t5xxl_fp16.safetensors",
                              "type": "flux"})
T5_TE = "t5xxl_fp16.safetensors"
VIDEO_LATENT = _latent("EmptyHunyuanLatentVideo", width=832, height=480, length=33)
IMAGE_1024 = _latent("EmptySD3LatentImage", width=1024, height=1024)
COSMOS_TE = ("CLIPLoader", {"clip_name": "oldt5_xxl_fp8_e4m3fn_scaled.safetensors", "type": "cosmos"})
# Flux.2 samples with its own resolution-aware schedule (Flux2Scheduler) through SamplerCustomAdvanced.
FLUX2_SIGMAS = ("Flux2Scheduler", {"steps": 20, "width": 1024, "height": 1024})
# Flux.2 Klein: the distilled files (flux-2-klein-4b…) sample in 4 steps without CFG, the base files, whose names
# say "base" (flux-2-klein-base-4b…), in 20 steps at cfg 5, as the official templates do.
FLUX2_KLEIN = {"vae": "flux2-vae.safetensors", "latent": _latent("EmptyFlux2LatentImage", width=1024, height=1024),
               "sampler": _sampler(4, 1.0), "sigmas": ("Flux2Scheduler", {"steps": 4, "width": 1024, "height": 1024})}
FLUX2_KLEIN_BASE = {"sampler": _sampler(20, 5.0), "sigmas": FLUX2_SIGMAS}
KLEIN_4B = {**FLUX2_KLEIN, "text_encoder": ("CLIPLoader", {"clip_name": "qwen_3_4b.safetensors", "type": "flux2"})}
KLEIN_9B = {**FLUX2_KLEIN, "text_encoder": ("CLIPLoader", {"clip_name": "qwen_3_8b_fp8mixed.safetensors",
                                                           "type": "flux2"}),
            "vae": "full_encoder_small_decoder.safetensors"}


def _kandinsky5_te(kind):
    return ("DualCLIPLoader", {"clip_name1": "qwen_2.5_vl_7b_fp8_scaled.safetensors",
                               "clip_name2": "clip_l.safetensors", "type": kind})


# architecture (as `ckptbend inspect` names it; the longest matching prefix wins) → the family's graph parts.
# text_encoder: (loader class, its inputs); model_sampling: a node between the model and the sampler;
# guidance: FluxGuidance on the positive; conditioning: a node taking positive and negative (LTX-Video);
# image_to_video: the family's I2V node (start image, CLIP vision); fps: a video model's output.
# encode: the family's own text-encode node (positive, negative out); zero_negative: ConditioningZeroOut as the
# negative; guidance_negative: FluxGuidance on the negative too; latent "conditioning": the conditioning node's
# third output; sigmas (+ guider): SamplerCustomAdvanced with that sigmas node instead of KSampler;
# unconditional_model: DualModelGuider's model_negative file (its own UNETLoader, no node on it).
# A list of model_sampling nodes chains them; a text encoder loader that is CheckpointLoaderSimple gives the VAE
# too; image_input: the I2V node's image input (None: none); i2v_inputs: nodes feeding its other inputs;
# trim_latent: TrimVideoLatent by the I2V node's 4th output; frames: a node picking the frames to save as images;
# by_file: another graph for a file whose name holds the word; a latent input "IMAGE" is a LoadImage.
FAMILIES = {
    "sd1": {"latent": _latent("EmptyLatentImage", width=512, height=512), "sampler": _sampler(25, 7.0, scheduler="normal")},
    "sd2": {"latent": _latent("EmptyLatentImage", width=768, height=768), "sampler": _sampler(25, 7.0, scheduler="normal")},
    "sdxl": {"latent": _latent("EmptyLatentImage", width=1024, height=1024), "sampler": _sampler(25, 7.0, scheduler="normal")},
    "flux-dev": {"text_encoder": FLUX_TE, "vae": "ae.safetensors", "latent": IMAGE_1024, "guidance": 3.5,
                 "sampler": _sampler(20, 1.0)},
    "flux-schnell": {"text_encoder": FLUX_TE, "vae": "ae.safetensors", "latent": IMAGE_1024, "sampler": _sampler(4, 1.0)},
    "chroma": {"text_encoder": ("CLIPLoader", {"clip_name": T5_TE, "type": "chroma"}), "vae": "ae.safetensors",
               "latent": IMAGE_1024, "sampler": _sampler(26, 4.0)},
    "sd3": {"text_encoder": ("TripleCLIPLoader", {"clip_name1": "clip_l.safetensors", "clip_name2": "clip_g.safetensors",
                                                  "clip_name3": T5_TE}),
            "vae": "sd3_vae.safetensors", "latent": IMAGE_1024, "sampler": _sampler(28, 4.5, scheduler="sgm_uniform")},
    "qwen-image": {"text_encoder": ("CLIPLoader", {"clip_name": "qwen_2.5_vl_7b_fp8_scaled.safetensors",
                                                   "type": "qwen_image"}),
                   "vae": "qwen_image_vae.safetensors", "model_sampling": ("ModelSamplingAuraFlow", {"shift": 3.1}),
                   "latent": _latent("EmptySD3LatentImage", width=1328, height=1328), "sampler": _sampler(20, 2.5)},
    "wan21-t2v": {"text_encoder": WAN_TE, "vae": "wan_2.1_vae.safetensors",
                  "model_sampling": ("ModelSamplingSD3", {"shift": 8.0}), "latent": VIDEO_LATENT,
                  "sampler": _sampler(30, 6.0, "uni_pc"), "fps": 16},
    "wan21-i2v": {"text_encoder": WAN_TE, "vae": "wan_2.1_vae.safetensors",
                  "model_sampling": ("ModelSamplingSD3", {"shift": 8.0}), "sampler": _sampler(20, 6.0, "uni_pc"),
                  "image_to_video": ("WanImageToVideo", {"width": 832, "height": 480, "length": 33, "batch_size": 1}),
                  "clip_vision": "clip_vision_h.safetensors", "fps": 16},
    "wan21-flf2v": "wan21-i2v",
    "flux": "flux-dev",   # a recipe's or a diffusers folder's "flux" (dev or schnell): the dev graph
    "wan22-i2v": {"text_encoder": WAN_TE, "vae": "wan_2.1_vae.safetensors",
                  "model_sampling": ("ModelSamplingSD3", {"shift": 8.0}), "sampler": _sampler(20, 3.5, "uni_pc"),
                  "image_to_video": ("WanImageToVideo", {"width": 832, "height": 480, "length": 33, "batch_size": 1}),
                  "fps": 16},
    "wan22-ti2v": {"text_encoder": WAN_TE, "vae": "wan2.2_vae.safetensors",
                   "model_sampling": ("ModelSamplingSD3", {"shift": 8.0}),
                   "latent": {"class_type": "Wan22ImageToVideoLatent",
                              "inputs": {"width": 1280, "height": 704, "length": 41, "batch_size": 1, "vae": "VAE"}},
                   "sampler": _sampler(20, 5.0, "uni_pc"), "fps": 24},
    "ltx-video": {"text_encoder": ("CLIPLoader", {"clip_name": T5_TE, "type": "ltxv"}), "vae": "ltx-video-vae.safetensors",
                  "latent": _latent("EmptyLTXVLatentVideo", width=768, height=512, length=97),
                  "conditioning": ("LTXVConditioning", {"frame_rate": 25.0}), "sampler": _sampler(30, 3.0), "fps": 24},
    # Families added from ComfyUI's official templates / ComfyUI_examples (file names, nodes, sampler settings).
    "mochi": {"text_encoder": ("CLIPLoader", {"clip_name": T5_TE, "type": "mochi"}), "vae": "mochi_vae.safetensors",
              "latent": _latent("EmptyMochiLatentVideo", width=848, height=480, length=37),
              "sampler": _sampler(30, 4.5), "fps": 24},
    # AuraFlow ships as one file with its Pile-T5 encoder and SDXL VAE: a bare DiT takes them from that file.
    "auraflow": {"text_encoder": ("CheckpointLoaderSimple", {"ckpt_name": "aura_flow_0.2.safetensors"}),
                 "latent": _latent("EmptyLatentImage", width=1024, height=1024),
                 "sampler": _sampler(20, 3.5, scheduler="sgm_uniform")},
    "hidream": {"text_encoder": ("QuadrupleCLIPLoader", {"clip_name1": "clip_l_hidream.safetensors",
                                                         "clip_name2": "clip_g_hidream.safetensors",
                                                         "clip_name3": "t5xxl_fp8_e4m3fn_scaled.safetensors",
                                                         "clip_name4": "llama_3.1_8b_instruct_fp8_scaled.safetensors"}),
                "vae": "ae.safetensors", "model_sampling": ("ModelSamplingSD3", {"shift": 3.0}), "latent": IMAGE_1024,
                "sampler": _sampler(50, 5.0, "uni_pc")},
    # Text-to-image and Video2World share one architecture name; ComfyUI's file names tell them apart.
    "cosmos-predict2": {"text_encoder": COSMOS_TE, "vae": "wan_2.1_vae.safetensors", "latent": IMAGE_1024,
                        "sampler": _sampler(30, 4.0), "by_file": {"video2world": "cosmos-predict2-video2world"}},
    "cosmos-predict2-video2world": {"text_encoder": COSMOS_TE, "vae": "wan_2.1_vae.safetensors",
                                    "latent": {"class_type": "CosmosPredict2ImageToVideoLatent",
                                               "inputs": {"width": 848, "height": 480, "length": 93, "batch_size": 1,
                                                          "vae": "VAE", "start_image": "IMAGE"}},
                                    "sampler": _sampler(30, 4.0), "fps": 16},
    "lumina2": {"text_encoder": ("CLIPLoader", {"clip_name": "gemma_2_2b_fp16.safetensors", "type": "lumina2"}),
                "vae": "ae.safetensors", "model_sampling": ("ModelSamplingAuraFlow", {"shift": 6.0}),
                "latent": IMAGE_1024, "sampler": _sampler(25, 4.0, "res_multistep")},
    "chroma-radiance": {"text_encoder": ("CLIPLoader", {"clip_name": "t5xxl_fp8_e4m3fn_scaled.safetensors",
                                                        "type": "chroma"}),
                        "vae": "pixel_space", "model_sampling": ("ModelSamplingAuraFlow", {"shift": 1.0}),
                        "latent": _latent("EmptyChromaRadianceLatentImage", width=1024, height=1024),
                        "sampler": _sampler(30, 3.5, scheduler="beta")},
    # Wan relatives: VACE's own conditioning (no start image; its latent trimmed after sampling), the camera
    # models' camera embedding, Fun Control's reference image; ChronoEdit edits an image as a short Wan I2V
    # clip with its temporal RoPE scaled, its last frame the result; SkyReels V2 loads as Wan 2.1 T2V.
    "wan-vace": {"text_encoder": WAN_TE, "vae": "wan_2.1_vae.safetensors",
                 "model_sampling": ("ModelSamplingSD3", {"shift": 8.0}), "sampler": _sampler(30, 6.0, "uni_pc"),
                 "image_to_video": ("WanVaceToVideo", {"width": 832, "height": 480, "length": 33, "batch_size": 1,
                                                       "strength": 1.0}),
                 "image_input": None, "trim_latent": True, "fps": 16},
    "wan-camera": {"text_encoder": WAN_TE, "vae": "wan_2.1_vae.safetensors",
                   "model_sampling": ("ModelSamplingSD3", {"shift": 8.0}), "sampler": _sampler(20, 6.0, "uni_pc"),
                   "image_to_video": ("WanCameraImageToVideo", {"width": 832, "height": 480, "length": 33,
                                                                "batch_size": 1}),
                   "clip_vision": "clip_vision_h.safetensors", "fps": 16,
                   "i2v_inputs": {"camera_conditions": ("WanCameraEmbedding", {"camera_pose": "Zoom In", "width": 832,
                                                                                "height": 480, "length": 33})}},
    "wan22-fun-control": {"text_encoder": WAN_TE, "vae": "wan_2.1_vae.safetensors",
                          "model_sampling": ("ModelSamplingSD3", {"shift": 8.0}), "sampler": _sampler(20, 3.5),
                          "image_to_video": ("Wan22FunControlToVideo", {"width": 640, "height": 640, "length": 33,
                                                                        "batch_size": 1}),
                          "image_input": "ref_image", "fps": 16},
    "chronoedit": {"text_encoder": WAN_TE, "vae": "wan_2.1_vae.safetensors",
                   "model_sampling": [("ScaleROPE", {"scale_x": 1.0, "shift_x": 0.0, "scale_y": 1.0, "shift_y": 0.0,
                                                     "scale_t": 7.0, "shift_t": 0.0}),
                                      ("ModelSamplingSD3", {"shift": 5.0})],
                   "sampler": _sampler(20, 4.0, "uni_pc"),
                   "image_to_video": ("WanImageToVideo", {"width": 720, "height": 720, "length": 5, "batch_size": 1}),
                   "clip_vision": "clip_vision_h.safetensors", "frames": ("ImageFromBatch", {"batch_index": 4,
                                                                                             "length": 1})},
    "skyreels-v2": "wan21-t2v",
    "hunyuan-video": {"text_encoder": ("DualCLIPLoader", {"clip_name1": "clip_l.safetensors",
                                                          "clip_name2": "llava_llama3_fp8_scaled.safetensors",
                                                          "type": "hunyuan_video"}),
                      "vae": "hunyuan_video_vae_bf16.safetensors",
                      "model_sampling": ("ModelSamplingSD3", {"shift": 7.0}),
                      "latent": _latent("EmptyHunyuanLatentVideo", width=848, height=480, length=73), "guidance": 6.0,
                      "sampler": _sampler(20, 1.0), "fps": 24},
    # families of newer ComfyUI (from its official templates; their nodes are not in 0.3.64)
    "flux2-dev": {"text_encoder": ("CLIPLoader", {"clip_name": "mistral_3_small_flux2_bf16.safetensors",
                                                  "type": "flux2"}),
                  "vae": "full_encoder_small_decoder.safetensors", "guidance": 4.0,
                  "latent": _latent("EmptyFlux2LatentImage", width=1024, height=1024), "sampler": _sampler(20, 1.0),
                  "sigmas": FLUX2_SIGMAS, "guider": "BasicGuider"},
    "flux2-klein": {**KLEIN_4B, "by_file": {"base": "flux2-klein-base"}},
    "flux2-klein-base": {**KLEIN_4B, **FLUX2_KLEIN_BASE},
    "flux2-klein-9b": {**KLEIN_9B, "by_file": {"base": "flux2-klein-9b-base"}},
    "flux2-klein-9b-base": {**KLEIN_9B, **FLUX2_KLEIN_BASE},
    "flux2": "flux2-dev",
    "z-image": {"text_encoder": ("CLIPLoader", {"clip_name": "qwen_3_4b.safetensors", "type": "lumina2"}),
                "vae": "ae.safetensors", "model_sampling": ("ModelSamplingAuraFlow", {"shift": 3.0}),
                "latent": IMAGE_1024, "sampler": _sampler(25, 4.0, "res_multistep")},
    "qwen-image-2.1": {"text_encoder": ("CLIPLoader", {"clip_name": "qwen3vl_8b_int8_convrot.safetensors",
                                                       "type": "qwen_image"}),
                       "vae": "qwen_image_2.1_vae_bf16.safetensors",
                       "encode": ("TextEncodeQwenImage21", {"prompt": "PROMPT", "negative_prompt": "NEGATIVE_PROMPT",
                                                            "resolution": 1024}),
                       "latent": _latent("EmptyLatentImage", width=1024, height=1024), "sampler": _sampler(25, 1.0)},
    "kandinsky5": {"text_encoder": _kandinsky5_te("kandinsky5_image"), "vae": "ae.safetensors",
                   "model_sampling": ("ModelSamplingSD3", {"shift": 3.0}),
                   "latent": _latent("EmptyLatentImage", width=1024, height=1024), "sampler": _sampler(50, 3.5)},
    "kandinsky5-lite-video": {"text_encoder": _kandinsky5_te("kandinsky5"), "vae": "hunyuan_video_vae_bf16.safetensors",
                              "model_sampling": ("ModelSamplingSD3", {"shift": 5.0}),
                              "conditioning": ("Kandinsky5ImageToVideo", {"width": 768, "height": 512, "length": 121,
                                                                          "batch_size": 1, "vae": "VAE"}),
                              "latent": "conditioning", "sampler": _sampler(50, 5.0, "euler_ancestral", "beta"),
                              "fps": 24},
    "kandinsky5-pro-video": "kandinsky5-lite-video",
    "krea2": {"text_encoder": ("CLIPLoader", {"clip_name": "qwen3vl_4b_fp8_scaled.safetensors", "type": "krea2"}),
              "vae": "qwen_image_vae.safetensors", "latent": _latent("EmptyLatentImage", width=1024, height=1024),
              "zero_negative": True, "sampler": _sampler(8, 1.0)},
    "longcat-image": {"text_encoder": ("CLIPLoader", {"clip_name": "qwen_2.5_vl_7b_fp8_scaled.safetensors",
                                                      "type": "longcat_image"}),
                      "vae": "ae.safetensors", "model_sampling": ("CFGNorm", {"strength": 1.0}), "latent": IMAGE_1024,
                      "guidance": 4.0, "guidance_negative": True, "sampler": _sampler(20, 4.0)},
    "ovis-image": {"text_encoder": ("CLIPLoader", {"clip_name": "ovis_2.5.safetensors", "type": "ovis"}),
                   "vae": "ae.safetensors", "model_sampling": ("ModelSamplingAuraFlow", {"shift": 3.0}),
                   "latent": IMAGE_1024, "sampler": _sampler(20, 5.0)},
    "hunyuan-video-1.5": {"text_encoder": ("DualCLIPLoader", {"clip_name1": "qwen_2.5_vl_7b_fp8_scaled.safetensors",
                                                              "clip_name2": "byt5_small_glyphxl_fp16.safetensors",
                                                              "type": "hunyuan_video_15"}),
                          "vae": "hunyuanvideo15_vae_fp16.safetensors",
                          "model_sampling": ("ModelSamplingSD3", {"shift": 7.0}),
                          "latent": _latent("EmptyHunyuanVideo15Latent", width=1280, height=720, length=121),
                          "sampler": _sampler(20, 6.0), "fps": 24},
    "anima": {"text_encoder": ("CLIPLoader", {"clip_name": "qwen_3_06b_base.safetensors", "type": "stable_diffusion"}),
              "vae": "qwen_image_vae.safetensors", "latent": _latent("EmptyLatentImage", width=1024, height=1024),
              "sampler": _sampler(30, 4.0)},
    # Ideogram 4's negative is a second, unconditional model (no text) through DualModelGuider; the companion's node
    # sits on the conditional one. Its schedule: the template's "Default" preset (20 steps, mu 0, std 1.75).
    "ideogram4": {"text_encoder": ("CLIPLoader", {"clip_name": "qwen3vl_8b_fp8_scaled.safetensors",
                                                  "type": "ideogram4"}),
                  "vae": "flux2-vae.safetensors",
                  "model_sampling": ("CFGOverride", {"cfg": 3.0, "start_percent": 0.7, "end_percent": 1.0}),
                  "latent": _latent("EmptyFlux2LatentImage", width=1024, height=1024), "zero_negative": True,
                  "sampler": _sampler(20, 7.0), "guider": "DualModelGuider",
                  "unconditional_model": "ideogram4_unconditional_fp8_scaled.safetensors",
                  "sigmas": ("Ideogram4Scheduler", {"steps": 20, "width": 1024, "height": 1024, "mu": 0.0,
                                                    "std": 1.75})},
}
DEFAULT_FAMILY = "sd1"
# A file with its text encoders and VAE inside (CheckpointLoaderSimple gives MODEL, CLIP, VAE). LTX-Video's
# single files hold the VAE but no text encoder: the family's loader adds it.
CHECKPOINT_KINDS = ("single-file",)


def _wired(inputs: dict, links: dict) -> dict:
    return {k: links.get(v, v) if isinstance(v, str) else v for k, v in inputs.items()}


def _custom_sampler(add, spec, model, positive, negative, latent) -> str:
    """SamplerCustomAdvanced with the family's sigmas node (Flux.2's Flux2Scheduler, Ideogram 4's
    Ideogram4Scheduler) and guider, as its template samples."""
    sampler = spec["sampler"]
    if spec.get("guider") == "BasicGuider":
        guider = add("BasicGuider", {"model": model, "conditioning": positive})
    elif spec.get("guider") == "DualModelGuider":     # the negative from its own model, straight from its loader
        unconditional = add("UNETLoader", {"unet_name": spec["unconditional_model"], "weight_dtype": "default"})
        guider = add("DualModelGuider", {"cfg": sampler["cfg"], "model": model, "positive": positive,
                                         "model_negative": [unconditional, 0], "negative": negative})
    else:
        guider = add("CFGGuider", {"cfg": sampler["cfg"], "model": model, "positive": positive, "negative": negative})
    class_type, inputs = spec["sigmas"]
    noise = add("RandomNoise", {"noise_seed": 0})
    select = add("KSamplerSelect", {"sampler_name": sampler["sampler_name"]})
    return add("SamplerCustomAdvanced", {"noise": [noise, 0], "guider": [guider, 0], "sampler": [select, 0],
                                         "sigmas": [add(class_type, dict(inputs)), 0], "latent_image": latent})


def family_of(architecture: str | None) -> str | None:
    """The FAMILIES key for an architecture name ("sdxl-base" → "sdxl", "wan21-t2v-14b" → "wan21-t2v",
    "sd35-large" → "sd3"); the default (an SD 1.x image graph) for None or an unidentified UNet; None for an
    architecture without a graph."""
    if not architecture or architecture == "unet-only":
        return DEFAULT_FAMILY
    name = "sd3" if architecture.startswith("sd35") else architecture
    matches = [f for f in FAMILIES if name == f or name.startswith(f + "-")]
    return max(matches, key=len) if matches else None


def missing_graph(architecture: str | None) -> str | None:
    """One line saying why a companion for `architecture` has no example workflow; None where it has one."""
    if family_of(architecture) is not None:
        return None
    return (f"no example ComfyUI workflow for {architecture}: ckptbend has no graph for this family yet, so the "
            "companion has no workflow_api.json (an SD 1.x graph would not load it)")


def example_workflow(node_id: str, node_inputs: dict, checkpoint_file: str, architecture: str | None = None,
                     kind: str | None = None) -> dict | None:
    """The API-format graph: loaders → the companion's node (node_inputs: its own inputs, with "MODEL" and
    "CLIP" where it takes the loaders' outputs) → sampler → decode → save; None for an architecture without
    a graph (missing_graph)."""
    family = family_of(architecture)
    if family is None:
        return None
    spec = FAMILIES[family]
    spec = FAMILIES[spec] if isinstance(spec, str) else spec
    variant = next((v for word, v in spec.get("by_file", {}).items() if word in checkpoint_file.lower()), None)
    spec = FAMILIES[variant] if variant else spec
    graph: dict = {}

    def add(class_type, inputs) -> str:
        key = str(len(graph) + 1)
        graph[key] = {"class_type": class_type, "inputs": inputs}
        return key

    if kind in CHECKPOINT_KINDS or "text_encoder" not in spec:
        loader = add("CheckpointLoaderSimple", {"ckpt_name": checkpoint_file})
        model, clip, vae = [loader, 0], [loader, 1], [loader, 2]
        if "text_encoder" in spec and family == "ltx-video":
            clip = [add(spec["text_encoder"][0], dict(spec["text_encoder"][1])), 0]
    else:
        model = [add("UNETLoader", {"unet_name": checkpoint_file, "weight_dtype": "default"}), 0]
        encoders = add(spec["text_encoder"][0], dict(spec["text_encoder"][1]))
        clip = [encoders, 0]
        if spec["text_encoder"][0] == "CheckpointLoaderSimple":     # the family's own file: its CLIP and VAE
            clip, vae = [encoders, 1], [encoders, 2]
        else:
            vae = [add("VAELoader", {"vae_name": spec["vae"]}), 0]
    links = {"MODEL": model, "CLIP": clip}
    node = add(node_id, {k: links[v] if isinstance(v, str) and v in links else v for k, v in node_inputs.items()})
    model = [node, 0]
    patches = spec.get("model_sampling", [])
    for class_type, inputs in [patches] if isinstance(patches, tuple) else patches:
        model = [add(class_type, {**inputs, "model": model}), 0]
    prompt = node_inputs.get("bending_prompt") or EXAMPLE_PROMPT
    words = {"PROMPT": prompt, "NEGATIVE_PROMPT": NEGATIVE_PROMPT, "VAE": vae}
    if "encode" in spec:            # the family's own text-encode node, giving positive and negative (Qwen-Image 2.1)
        class_type, inputs = spec["encode"]
        both = add(class_type, {"clip": clip, **_wired(inputs, words)})
        positive, negative = [both, 0], [both, 1]
    else:
        positive = [add("CLIPTextEncode", {"text": prompt, "clip": clip}), 0]
    if spec.get("zero_negative"):   # a zeroed negative, as its template has (no negative text encoded)
        negative = [add("ConditioningZeroOut", {"conditioning": positive}), 0]
    elif "encode" not in spec:
        negative = [add("CLIPTextEncode", {"text": NEGATIVE_PROMPT, "clip": clip}), 0]
    if "guidance" in spec:
        positive = [add("FluxGuidance", {"guidance": spec["guidance"], "conditioning": positive}), 0]
        if spec.get("guidance_negative"):
            negative = [add("FluxGuidance", {"guidance": spec["guidance"], "conditioning": negative}), 0]
    if "conditioning" in spec:
        class_type, inputs = spec["conditioning"]
        both = add(class_type, {**_wired(inputs, words), "positive": positive, "negative": negative})
        positive, negative = [both, 0], [both, 1]

    def image():
        return [add("LoadImage", {"image": "example.png"}), 0]

    i2v = None
    if "image_to_video" in spec:
        class_type, inputs = spec["image_to_video"]
        extra = {name: [add(c, dict(i)), 0] for name, (c, i) in spec.get("i2v_inputs", {}).items()}
        image_input = spec.get("image_input", "start_image")
        start = image() if image_input else None
        if image_input:
            extra[image_input] = start
        if "clip_vision" in spec:
            vision = [add("CLIPVisionLoader", {"clip_name": spec["clip_vision"]}), 0]
            extra["clip_vision_output"] = [add("CLIPVisionEncode", {"clip_vision": vision, "image": start,
                                                                    "crop": "none"}), 0]
        i2v = add(class_type, {**inputs, **extra, "positive": positive, "negative": negative, "vae": vae})
        positive, negative, latent = [i2v, 0], [i2v, 1], [i2v, 2]
    elif spec["latent"] == "conditioning":      # the conditioning node gives the latent too (Kandinsky 5 video)
        latent = [both, 2]
    else:
        inputs = {k: image() if v == "IMAGE" else vae if v == "VAE" else v
                  for k, v in spec["latent"]["inputs"].items()}
        latent = [add(spec["latent"]["class_type"], inputs), 0]
    if "sigmas" in spec:
        sampled = _custom_sampler(add, spec, model, positive, negative, latent)
    else:
        sampled = add("KSampler", {"seed": 0, **spec["sampler"], "denoise": 1.0, "model": model, "positive": positive,
                                   "negative": negative, "latent_image": latent})
    samples = [sampled, 0]
    if spec.get("trim_latent"):
        samples = [add("TrimVideoLatent", {"samples": samples, "trim_amount": [i2v, 3]}), 0]
    images = [add("VAEDecode", {"samples": samples, "vae": vae}), 0]
    if "frames" in spec:
        class_type, inputs = spec["frames"]
        images = [add(class_type, {**inputs, "image": images}), 0]
    if "fps" in spec:
        video = add("CreateVideo", {"images": images, "fps": float(spec["fps"])})
        add("SaveVideo", {"video": [video, 0], "filename_prefix": "video/ckptbend", "format": "auto", "codec": "auto"})
    else:
        add("SaveImage", {"images": images, "filename_prefix": "ckptbend"})
    return graph
