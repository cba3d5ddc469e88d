"""Detection never guesses: a diffusers folder whose model config is missing or damaged is named by its
weights (never SD 1.x), a pipeline class without a table is read sub-folder by sub-folder (never SD's map),
and `[text]` reaches a text encoder's own layers only — a full T5's decoder and a LLaVA or CLIP vision
tower are left alone, and said to be. Folders are tiny synthetic pipelines (real diffusers and transformers
classes); the large encoders are the real transformers classes with tiny configs."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from _dit import run
from ckptbend.errors import CkptbendError
from ckptbend.layouts import detect


@pytest.fixture
def folders(synth_file):
    return lambda arch: synth_file(arch, "diffusers")


def variant(tmp_path, src, edit):
    dst = tmp_path / src.name
    shutil.copytree(src, dst)
    edit(dst)
    return dst


def model_class(folder, name):
    index = json.loads((folder / "model_index.json").read_text())
    (folder / "model_index.json").write_text(json.dumps({**index, "_class_name": name}))


MODEL_CONFIG = {
    "missing": lambda d: (d / "transformer" / "config.json").unlink(),
    "unreadable": lambda d: (d / "transformer" / "config.json").write_text("{not json"),
    "not an object": lambda d: (d / "transformer" / "config.json").write_text("[]"),
}


@pytest.mark.parametrize("arch,architecture", [("flux_dev", "flux-dev"), ("wan21_t2v", "wan21-t2v"),
                                               ("qwen_image", "qwen-image")])
@pytest.mark.parametrize("damage", MODEL_CONFIG)
def test_a_folder_without_a_readable_transformer_config_is_named_by_its_weights(tmp_path, folders, arch,
                                                                               architecture, damage):
    folder = variant(tmp_path, folders(arch), MODEL_CONFIG[damage])
    assert detect(folder).architecture == architecture            # was "sd1"
    recipe = tmp_path / "sd1.toml"
    recipe.write_text('schema = 1\nname = "r"\narchitecture = "sd1"\n[unet.self]\nq = 1.1\n')
    r = run("bake", recipe, folder, "-o", tmp_path / "out", "--dry-run")
    assert r.returncode == 2 and f"is {architecture}" in r.stderr, r.stderr   # was accepted


# (arch, a pipeline class without a table, the components its sub-folders hold)
UNKNOWN_PIPELINES = [
    ("wan21_t2v", "WanVACEPipeline", {"dit", "umt5xxl"}),
    ("flux_dev", "FluxKontextInpaintPipeline", {"dit", "clip_l", "t5xxl"}),
    ("hunyuan_video", "HunyuanVideoFramepackPipeline", {"dit", "llama", "clip_l"}),   # CLIP-L in text_encoder_2
    ("sd3_medium", "StableDiffusion3ControlNetPipeline", {"dit", "clip_l", "clip_g", "t5xxl"}),
]


@pytest.mark.parametrize("arch,pipeline,components", UNKNOWN_PIPELINES)
def test_a_pipeline_class_without_a_table_is_read_by_its_sub_folders(tmp_path, folders, arch, pipeline, components):
    known = detect(folders(arch))
    folder = variant(tmp_path, folders(arch), lambda d: model_class(d, pipeline))
    ckpt = detect(folder)
    assert set(ckpt.components) == components and ckpt.architecture == known.architecture
    assert [(s.file, s.component) for s in ckpt.sites] == [(s.file, s.component) for s in known.sites]
    recipe = tmp_path / "r.toml"
    recipe.write_text('schema = 1\nname = "r"\n[dit.joint]\nv = 1.2\n[dit.self]\nv = 1.2\n')
    assert run("bake", recipe, folder, "-o", tmp_path / "out", "--dry-run", "--allow-missing").returncode == 0


def test_a_folder_without_model_index_is_read_by_its_sub_folders(tmp_path, folders):
    folder = variant(tmp_path, folders("sd3_medium"), lambda d: (d / "model_index.json").unlink())
    assert set(detect(folder).components) == {"dit", "clip_l", "clip_g", "t5xxl"}   # was SD's map: T5 dropped


def test_what_a_folder_holds_beyond_what_ckptbend_knows_is_left_alone_and_said(tmp_path, folders):
    def edit(d):
        model_class(d, "FluxSomethingNewPipeline")
        config = json.loads((d / "text_encoder_2" / "config.json").read_text())
        (d / "text_encoder_2" / "config.json").write_text(json.dumps({**config, "model_type": "qwen3_5"}))
        (d / "controlnet").mkdir()
        save_file({"w": torch.ones(2)}, d / "controlnet" / "diffusion_pytorch_model.safetensors")
    ckpt = detect(variant(tmp_path, folders("flux_dev"), edit))
    assert set(ckpt.components) == {"dit", "clip_l"}
    assert any(n.startswith("text_encoder_2/") for n in ckpt.left_alone)
    assert any(n.startswith("controlnet/") for n in ckpt.left_alone)


# --- a text encoder's own layers ------------------------------------------------------------------------


def saved(path, model, rename=lambda k: k):
    save_file({rename(k): v.detach().clone().contiguous() for k, v in model.state_dict().items()}, path)
    return path


@pytest.fixture(scope="module")
def encoders(tmp_path_factory):
    import transformers as tf

    root = tmp_path_factory.mktemp("encoders")
    torch.manual_seed(0)
    t5 = tf.T5ForConditionalGeneration(tf.T5Config(vocab_size=64, d_model=32, d_kv=16, d_ff=64, num_layers=2,
                                                   num_heads=2, feed_forward_proj="gated-gelu"))
    vision = tf.CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                                 image_size=8, patch_size=4)
    llava = tf.LlavaForConditionalGeneration(tf.LlavaConfig(vision_config=vision, image_token_index=63,
                                                            text_config=tf.LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_attention_heads=2, num_hidden_layers=2,
        num_key_value_heads=1)))

    def released(key):   # the names of released LLaVA files (transformers 4), e.g. HunyuanVideo's text encoder
        return (key.replace("model.language_model.", "language_model.model.")
                .replace("model.vision_tower.", "vision_tower.vision_model.")
                .replace("model.multi_modal_projector.", "multi_modal_projector.")
                .replace("lm_head.", "language_model.lm_head."))
    return {"t5": saved(root / "t5.safetensors", t5),
            "llava": saved(root / "llava.safetensors", llava),
            "llava-released": saved(root / "llava-released.safetensors", llava, released),
            "clip-vision": saved(root / "clip-vision.safetensors", tf.CLIPVisionModel(vision), "vision_model.".__add__),
            "clip-vision-bare": saved(root / "clip-vision-bare.safetensors", tf.CLIPVisionModel(vision))}


@pytest.mark.parametrize("name,architecture,foreign", [("t5", "t5xxl-only", "decoder."),
                                                       ("llava", "llama-only", "vision_tower."),
                                                       ("llava-released", "llama-only", "vision_tower.")])
def test_text_reaches_only_the_encoders_own_layers(tmp_path, encoders, name, architecture, foreign):
    src = encoders[name]
    ckpt = detect(src)
    assert ckpt.architecture == architecture                                 # LLaVA was "qwen25_7b-only"
    assert ckpt.sites and not any(foreign in s.key for s in ckpt.sites)     # the decoder / tower was scaled
    (tmp_path / "r.toml").write_text('schema = 1\nname = "r"\n[text]\nq = 1.1\nv = 1.5\nout = 0.5\n')
    r = run("bake", tmp_path / "r.toml", src, "-o", tmp_path / "o.safetensors")
    assert r.returncode == 0 and f"note: left alone (no section reaches it): " in r.stderr, r.stderr
    before, after = load_file(src), load_file(tmp_path / "o.safetensors")
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == {s.key for s in ckpt.sites if s.proj != "k"}
    assert not any(foreign in k for k in changed)
    inspected = run("inspect", src).stdout
    assert "left alone:" in inspected and foreign in inspected


@pytest.mark.parametrize("name", ["clip-vision", "clip-vision-bare"])
def test_a_clip_vision_tower_alone_is_not_a_text_encoder(encoders, name):
    """Wan I2V's clip_vision file: HF CLIP names, but of a vision model — [clip] must never scale it."""
    with pytest.raises(CkptbendError, match="not a supported checkpoint layout"):
        detect(encoders[name])
