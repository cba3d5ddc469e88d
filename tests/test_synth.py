"""The synthetic checkpoints have the names and layouts of real ones.

The single-file layout tables are checked against diffusers' OWN LDM → diffusers converters
(`diffusers.loaders.single_file_utils`), not against themselves: each file is converted back and
loaded strictly into a freshly built model, and every tensor must equal the original model's.
Facts about real files (tensor counts, shapes of well-known keys) are hard-coded below.
"""

import json
import re

import numpy as np
import pytest
import torch
from diffusers.loaders import single_file_utils as sfu
from diffusers.loaders.single_file_utils import (
    convert_ldm_clip_checkpoint,
    convert_ldm_unet_checkpoint,
    convert_ldm_vae_checkpoint,
    convert_open_clip_checkpoint,
    infer_diffusers_model_type,
)
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from ckptbend import synth
from ckptbend.errors import CkptbendError
from _helpers import fresh, load_strict

TEXT_ARCHES = ("sd1", "sd2", "sdxl", "sdxl_refiner")


def assert_same_tensors(model, reference):
    got, want = model.state_dict(), reference.state_dict()
    assert got.keys() == want.keys()
    for key in want:
        assert torch.equal(got[key], want[key]), key


def for_hf_text_model(model, converted):
    """transformers 5's CLIPTextModel names its parameters without the `text_model.` prefix real files
    use (CLIPTextModelWithProjection keeps it), and no longer persists `position_ids` (real SD 1.x /
    SDXL files have it; diffusers loads non-strictly)."""
    converted = {k: v for k, v in converted.items() if not k.endswith("embeddings.position_ids")}
    if "embeddings.token_embedding.weight" in model.state_dict():
        converted = {k.removeprefix("text_model."): v for k, v in converted.items()}
    return converted


def under(state, prefix):
    return {k: v for k, v in state.items() if k.startswith(prefix)}


def untouched(state, converted):
    """Keys of `state` whose storage no converted tensor uses (the converters move or view tensors)."""
    used = {t.data_ptr() for t in converted.values()}
    return [k for k, t in state.items() if t.data_ptr() not in used]


# --- single files, through diffusers' own converters -----------------------------------------------

@pytest.mark.parametrize("arch", TEXT_ARCHES)
def test_single_file_converts_back_with_diffusers(tmp_path, arch):
    models = synth.build_models(arch)
    ckpt = load_file(synth.write_checkpoint(tmp_path / "model.safetensors", arch))

    unet = models["unet"]
    converted = convert_ldm_unet_checkpoint(ckpt, dict(unet.config))
    assert_same_tensors(load_strict(fresh(unet), converted), unet)
    assert not untouched(under(ckpt, "model.diffusion_model."), converted)

    vae = models["vae"]
    converted = convert_ldm_vae_checkpoint(ckpt, dict(vae.config))
    assert_same_tensors(load_strict(fresh(vae), converted), vae)
    assert not untouched(under(ckpt, "first_stage_model."), converted)
    assert ckpt["first_stage_model.decoder.mid.attn_1.q.weight"].ndim == 4   # 1×1 convs, as in real files

    accounted = len(under(ckpt, "model.diffusion_model.")) + len(under(ckpt, "first_stage_model."))
    for name, (prefix, naming) in synth.SINGLE_FILE_TEXT[arch].items():
        model = models[name]
        if naming == "hf":
            converted = convert_ldm_clip_checkpoint(ckpt, remove_prefix=prefix)
            assert not untouched(under(ckpt, prefix), converted)
            assert ckpt[prefix + "text_model.embeddings.position_ids"].dtype == torch.int64
        else:
            converted = convert_open_clip_checkpoint(model, ckpt, prefix=prefix)
            # OpenCLIP tensors the HF model has no place for.
            assert ckpt[prefix + "logit_scale"].shape == ()
            if name == "clip_h":   # diffusers drops SD 2's text_projection (its CLIPTextModel has none)
                assert torch.equal(ckpt[prefix + "text_projection"], model.openclip_extra["text_projection"])
            layers = model.config.num_hidden_layers
            resblocks = [k for k in under(ckpt, prefix) if ".resblocks." in k]
            assert len(resblocks) == 12 * layers
            assert ckpt[prefix + "transformer.resblocks.0.attn.in_proj_weight"].shape == (
                3 * model.config.hidden_size, model.config.hidden_size)
        assert_same_tensors(load_strict(fresh(model), for_hf_text_model(model, converted)), model)
        accounted += len(under(ckpt, prefix))
    ddpm = synth.ddpm_schedule_buffers() if arch in ("sd1", "sd2") else {}
    for key, value in ddpm.items():
        assert torch.equal(ckpt[key], value)
    assert accounted + len(ddpm) == len(ckpt), "every tensor belongs to a component"


def test_sdxl_tiny_keeps_the_real_block_structure(tmp_path):
    keys = load_file(synth.write_checkpoint(tmp_path / "x.safetensors", "sdxl")).keys()
    block = r"model\.diffusion_model\.(input_blocks\.\d+|middle_block|output_blocks\.\d+)\.1\.transformer_blocks"
    attn = {m[1] for k in keys if (m := re.match(block, k))}
    assert attn == {"input_blocks.4", "input_blocks.5", "input_blocks.7", "input_blocks.8", "middle_block",
                    "output_blocks.0", "output_blocks.1", "output_blocks.2", "output_blocks.3",
                    "output_blocks.4", "output_blocks.5"}
    assert "model.diffusion_model.input_blocks.7.1.transformer_blocks.1.attn1.to_q.weight" in keys
    assert "model.diffusion_model.input_blocks.9.0.in_layers.0.weight" not in keys
    assert "model.diffusion_model.output_blocks.8.0.skip_connection.weight" in keys
    sd1 = load_file(synth.write_checkpoint(tmp_path / "1.safetensors", "sd1")).keys()
    attn = {int(m[1]) for k in sd1 if (m := re.match(r"model\.diffusion_model\.input_blocks\.(\d+)\.1\.", k))}
    assert attn == {1, 2, 4, 5, 7, 8}
    attn = {int(m[1]) for k in sd1 if (m := re.match(r"model\.diffusion_model\.output_blocks\.(\d+)\.1\.transf", k))}
    assert attn == set(range(3, 12))


# --- SVD: diffusers has no single-file converter for it ------------------------------------------

def svd_unet_to_diffusers(ckpt, config):
    """Run diffusers' SD converter (block indices, resnet/attention renames) and finish the names
    generative-models' video modules add: VideoResBlock = ResBlock + `time_stack` (3-D ResBlock) +
    `time_mixer`; SpatialVideoTransformer = SpatialTransformer + `time_stack` (VideoTransformerBlocks),
    `time_pos_embed` (Sequential linear/SiLU/linear) and `time_mixer`; `label_emb` as in SDXL."""
    converted = convert_ldm_unet_checkpoint(ckpt, {**dict(config), "addition_embed_type": "text_time"})
    out = {}
    for key, t in converted.items():
        if m := re.fullmatch(r"(.*\.resnets\.\d+\.)(.*)", key):
            head, rest = m.groups()
            if rest.startswith("time_stack."):
                key = head + "temporal_res_block." + rest[len("time_stack."):]
            elif not rest.startswith("time_mixer."):
                key = head + "spatial_res_block." + rest
        else:
            key = (key.replace(".time_stack.", ".temporal_transformer_blocks.")
                   .replace(".time_pos_embed.0.", ".time_pos_embed.linear_1.")
                   .replace(".time_pos_embed.2.", ".time_pos_embed.linear_2."))
        out[key] = t
    return out


def svd_vae_to_diffusers(ckpt):
    """diffusers' VAE converter for the shared structure, then sgm's temporal_ae names: VideoResBlock =
    ResnetBlock + `time_stack` (in_layers / out_layers) + `mix_factor`; AE3DConv's `time_mix_conv`."""
    converted = convert_ldm_vae_checkpoint(ckpt, {"down_block_types": [0] * 4, "up_block_types": [0] * 4})
    temporal = {"in_layers.0": "norm1", "in_layers.2": "conv1", "out_layers.0": "norm2", "out_layers.3": "conv2"}
    out = {}
    for key, t in converted.items():
        if m := re.fullmatch(r"(decoder\..*\.resnets\.\d+\.)(.*)", key):
            head, rest = m.groups()
            if rest.startswith("time_stack."):
                layer, _, param = rest[len("time_stack."):].rpartition(".")
                key = head + "temporal_res_block." + temporal[layer] + "." + param
            elif rest == "mix_factor":
                key = head + "time_mixer.mix_factor"
            else:
                key = head + "spatial_res_block." + rest
        out[key] = t
    for param in ("weight", "bias"):
        out[f"decoder.time_conv_out.{param}"] = ckpt[f"first_stage_model.decoder.conv_out.time_mix_conv.{param}"]
    return out


def test_svd_single_file(tmp_path):
    assert not [n for n in dir(sfu) if re.search(r"svd|spatio|temporal", n, re.I)], \
        "diffusers now has an SVD converter: check the SVD names against it"
    models = synth.build_models("svd")
    ckpt = load_file(synth.write_checkpoint(tmp_path / "svd.safetensors", "svd"))
    assert not [k for k in ckpt if not k.startswith(("model.diffusion_model.", "first_stage_model."))]

    unet = models["unet"]
    converted = svd_unet_to_diffusers(ckpt, unet.config)
    assert_same_tensors(load_strict(fresh(unet), converted), unet)
    assert not untouched(under(ckpt, "model.diffusion_model."), converted)

    vae = models["vae"]
    converted = svd_vae_to_diffusers(ckpt)
    assert not untouched(under(ckpt, "first_stage_model."), converted)
    result = (rebuilt := fresh(vae)).load_state_dict(converted, strict=False)
    # sgm's AutoencodingEngine has no quant_conv: the one tensor pair diffusers' class adds.
    assert not result.unexpected_keys and set(result.missing_keys) == {"quant_conv.weight", "quant_conv.bias"}
    got, want = rebuilt.state_dict(), vae.state_dict()
    assert all(torch.equal(got[k], want[k]) for k in want if not k.startswith("quant_conv."))


# --- full size: real configs on the meta device --------------------------------------------------

def full_state(arch):
    return synth.ldm_state_dict(arch, synth.build_models(arch, "full"))


def shape(state, key):
    return tuple(state[key].shape)


def test_full_sd15_matches_real_sd15():
    state = full_state("sd1")
    counts = {p: len(under(state, p)) for p in ("model.diffusion_model.", "first_stage_model.", "cond_stage_model.")}
    # Real SD 1.5: 686 UNet, 248 VAE and 197 CLIP tensors (196 + position_ids), plus the 12 DDPM buffers.
    assert counts == {"model.diffusion_model.": 686, "first_stage_model.": 248, "cond_stage_model.": 197}
    assert len(state) == 686 + 248 + 197 + 12
    u = "model.diffusion_model."
    assert shape(state, u + "input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight") == (320, 320)
    assert shape(state, u + "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight") == (320, 768)
    assert shape(state, u + "input_blocks.1.1.proj_in.weight") == (320, 320, 1, 1)   # conv proj in SD 1.x
    assert shape(state, u + "middle_block.1.transformer_blocks.0.attn2.to_v.weight") == (1280, 768)
    assert shape(state, u + "output_blocks.11.1.transformer_blocks.0.attn1.to_out.0.weight") == (320, 320)
    assert shape(state, u + "input_blocks.0.0.weight") == (320, 4, 3, 3)
    assert shape(state, u + "input_blocks.3.0.op.weight") == (320, 320, 3, 3)
    assert shape(state, u + "input_blocks.4.0.skip_connection.weight") == (640, 320, 1, 1)
    assert shape(state, u + "output_blocks.2.1.conv.weight") == (1280, 1280, 3, 3)
    assert shape(state, u + "output_blocks.5.2.conv.weight") == (1280, 1280, 3, 3)
    assert shape(state, u + "time_embed.0.weight") == (1280, 320)
    assert shape(state, u + "out.2.weight") == (4, 320, 3, 3)
    assert shape(state, "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight") == (49408, 768)
    clip = "cond_stage_model.transformer.text_model."
    assert shape(state, clip + "encoder.layers.11.self_attn.q_proj.weight") == (768, 768)
    assert state["cond_stage_model.transformer.text_model.embeddings.position_ids"].shape == (1, 77)
    assert shape(state, "first_stage_model.decoder.mid.attn_1.q.weight") == (512, 512, 1, 1)
    assert shape(state, "first_stage_model.encoder.down.1.block.0.nin_shortcut.weight") == (256, 128, 1, 1)
    assert shape(state, "alphas_cumprod") == (1000,)
    assert sum(t.numel() for k, t in state.items() if k.startswith(u)) == 859_520_964


def test_full_sd2_and_sdxl_shapes():
    sd2 = full_state("sd2")
    assert shape(sd2, "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight") == (320, 1024)
    assert shape(sd2, "model.diffusion_model.input_blocks.1.1.proj_in.weight") == (320, 320)   # linear in SD 2
    assert shape(sd2, "cond_stage_model.model.transformer.resblocks.23.attn.in_proj_weight") == (3072, 1024)
    assert shape(sd2, "cond_stage_model.model.text_projection") == (1024, 1024)
    assert shape(sd2, "cond_stage_model.model.positional_embedding") == (77, 1024)

    xl = full_state("sdxl")
    u = "model.diffusion_model."
    assert len(under(xl, u)) == 1680 and len(under(xl, "conditioner.embedders.1.model.")) == 390
    assert shape(xl, u + "input_blocks.7.1.transformer_blocks.9.attn2.to_k.weight") == (1280, 2048)
    assert shape(xl, u + "input_blocks.4.1.transformer_blocks.1.attn1.to_q.weight") == (640, 640)
    assert u + "input_blocks.4.1.transformer_blocks.2.attn1.to_q.weight" not in xl
    assert shape(xl, u + "middle_block.1.transformer_blocks.9.attn1.to_v.weight") == (1280, 1280)
    assert shape(xl, u + "output_blocks.0.1.transformer_blocks.9.attn2.to_v.weight") == (1280, 2048)
    assert shape(xl, u + "label_emb.0.0.weight") == (1280, 2816)
    assert u + "input_blocks.9.0.in_layers.0.weight" not in xl and u + "output_blocks.9.0.in_layers.0.weight" not in xl
    g = "conditioner.embedders.1.model."
    assert shape(xl, g + "transformer.resblocks.31.attn.in_proj_weight") == (3840, 1280)
    assert shape(xl, g + "text_projection") == (1280, 1280)
    assert shape(xl, "conditioner.embedders.0.transformer.text_model.encoder.layers.11.mlp.fc1.weight") == (3072, 768)
    # fp16 SDXL base is 6.94 GB
    assert 3.46e9 < sum(t.numel() for t in xl.values()) < 3.48e9

    refiner = full_state("sdxl_refiner")
    assert shape(refiner, "conditioner.embedders.0.model.transformer.resblocks.31.attn.in_proj_weight") == (3840, 1280)
    assert shape(refiner, u + "input_blocks.4.1.transformer_blocks.3.attn2.to_k.weight") == (768, 1280)


@pytest.mark.parametrize("arch, expected", [("sd1", "v1"), ("sd2", "v2"), ("sdxl", "xl_base"),
                                            ("sdxl_refiner", "xl_refiner")])
def test_full_key_sets_convert_with_diffusers(arch, expected):
    """diffusers recognises the full-size files, and its converters map every key onto the real configs."""
    models = synth.build_models(arch, "full")
    state = synth.ldm_state_dict(arch, models)
    assert infer_diffusers_model_type(state) == expected

    def same_shapes(converted, model):
        want = model.state_dict()
        assert converted.keys() == want.keys()
        assert all(converted[k].shape == want[k].shape for k in want)

    same_shapes(convert_ldm_unet_checkpoint(state, dict(models["unet"].config)), models["unet"])
    same_shapes(convert_ldm_vae_checkpoint(state, dict(models["vae"].config)), models["vae"])
    for name, (prefix, naming) in synth.SINGLE_FILE_TEXT[arch].items():
        model = models[name]
        if naming == "hf":
            converted = convert_ldm_clip_checkpoint(state, remove_prefix=prefix)
        else:
            converted = convert_open_clip_checkpoint(model, state, prefix=prefix)
            if arch == "sd2":   # diffusers drops resblocks.23 (SD 2 uses the penultimate layer)
                converted.update({k: v for k, v in model.state_dict().items() if ".layers.23." in k})
        same_shapes(for_hf_text_model(model, converted), model)


def test_full_svd_names():
    state = full_state("svd")
    u = "model.diffusion_model."
    # Derived from generative-models (sgm) module definitions; see svd_unet_to_diffusers.
    assert shape(state, u + "input_blocks.1.1.time_stack.0.attn1.to_q.weight") == (320, 320)
    assert shape(state, u + "input_blocks.1.1.time_stack.0.attn2.to_k.weight") == (320, 1024)
    assert shape(state, u + "input_blocks.1.1.time_stack.0.ff_in.net.0.proj.weight") == (2560, 320)
    assert shape(state, u + "input_blocks.1.1.time_pos_embed.0.weight") == (1280, 320)
    assert shape(state, u + "input_blocks.1.1.time_mixer.mix_factor") == (1,)
    assert shape(state, u + "input_blocks.1.0.time_stack.in_layers.2.weight") == (320, 320, 3, 1, 1)
    assert shape(state, u + "input_blocks.1.0.time_mixer.mix_factor") == (1,)
    assert shape(state, u + "middle_block.1.time_stack.0.attn1.to_out.0.weight") == (1280, 1280)
    assert shape(state, u + "output_blocks.11.1.time_stack.0.attn2.to_v.weight") == (320, 1024)
    assert shape(state, u + "label_emb.0.0.weight") == (1280, 768)
    assert shape(state, u + "input_blocks.0.0.weight") == (320, 8, 3, 3)
    assert shape(state, "first_stage_model.decoder.up.3.block.0.time_stack.in_layers.2.weight") == (512, 512, 3, 1, 1)
    assert shape(state, "first_stage_model.decoder.conv_out.time_mix_conv.weight") == (3, 3, 3, 1, 1)
    assert shape(state, "first_stage_model.decoder.up.0.block.0.mix_factor") == (1,)
    assert "first_stage_model.quant_conv.weight" not in state
    assert len(under(state, u)) == len(synth.build_models("svd", "full")["unet"].state_dict())


# --- writing ------------------------------------------------------------------------------------

def test_writer_is_byte_identical_to_safetensors(tmp_path):
    """Same tensor order (dtype, then name), header and padding as safetensors' own writer."""
    state = {k: v.contiguous() for k, v in synth.ldm_state_dict("sd1", synth.build_models("sd1")).items()}
    save_file(state, tmp_path / "ref.safetensors", metadata={"format": "pt"})
    path = synth.write_checkpoint(tmp_path / "sd1.safetensors", "sd1")
    assert path.read_bytes() == (tmp_path / "ref.safetensors").read_bytes()

    mixed = {"b": torch.ones(3, dtype=torch.bfloat16), "a": torch.ones(5).to(torch.float8_e5m2),
             "c": torch.ones(7).to(torch.float8_e4m3fn), "d": torch.arange(3, dtype=torch.int32),
             "e": torch.tensor(2.0, dtype=torch.float64), "f": torch.ones(2, dtype=torch.float16),
             "g": torch.ones(1, dtype=torch.bool), "h": torch.ones(1, dtype=torch.uint8),
             "i": torch.ones(1, dtype=torch.int8), "j": torch.ones(1, dtype=torch.int16), **state}
    save_file(mixed, tmp_path / "mixed-ref.safetensors", metadata={"format": "pt"})
    ours = synth.write_safetensors(tmp_path / "mixed.safetensors", mixed, dtype=None)
    assert ours.read_bytes() == (tmp_path / "mixed-ref.safetensors").read_bytes()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float8_e4m3fn, torch.float8_e5m2])
def test_dtypes(tmp_path, dtype):
    ref = synth.ldm_state_dict("sdxl", synth.build_models("sdxl"))
    got = load_file(synth.write_checkpoint(tmp_path / "x.safetensors", "sdxl", dtype=dtype))
    assert got.keys() == ref.keys()
    for key, t in got.items():
        if ref[key].is_floating_point():
            assert t.dtype == dtype and torch.equal(t, ref[key].to(dtype)), key
        else:
            assert t.dtype == torch.int64 and torch.equal(t, ref[key]), key


def test_deterministic_per_seed(tmp_path):
    a = synth.write_checkpoint(tmp_path / "a.safetensors", "sd2", seed=3)
    b = synth.write_checkpoint(tmp_path / "b.safetensors", "sd2", seed=3)
    c = synth.write_checkpoint(tmp_path / "c.safetensors", "sd2", seed=4)
    assert a.read_bytes() == b.read_bytes() != c.read_bytes()
    d1 = synth.write_checkpoint(tmp_path / "d1", "sdxl", layout="diffusers", seed=5, shard_size="30KB")
    d2 = synth.write_checkpoint(tmp_path / "d2", "sdxl", layout="diffusers", seed=5, shard_size="30KB")
    files = sorted(p.relative_to(d1) for p in d1.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(d2) for p in d2.rglob("*") if p.is_file())
    assert all((d1 / f).read_bytes() == (d2 / f).read_bytes() for f in files)


def test_tiny_files_are_small(tmp_path):
    for arch in synth.sd.ARCHES:
        size = synth.write_checkpoint(tmp_path / f"{arch}.safetensors", arch).stat().st_size
        assert size < (11e6 if arch == "svd" else 2e6), (arch, size)   # SVD: 32-channel floor


def test_random_streaming_for_meta_tensors(tmp_path, monkeypatch):
    """The `full` path: meta tensors get seeded random values, chunk by chunk, never zero."""
    monkeypatch.setattr(synth.files, "_CHUNK", 1000)
    models = synth.build_models("sdxl")
    spec = {k: (torch.empty(v.shape, device="meta") if v.is_floating_point() else v)
            for k, v in synth.ldm_state_dict("sdxl", models).items()}
    for dtype in (torch.float16, torch.float8_e4m3fn):
        paths = [synth.write_safetensors(tmp_path / f"{dtype}-{i}.safetensors", spec, dtype,
                                         np.random.default_rng(seed))
                 for i, seed in enumerate((7, 7, 8))]
        assert paths[0].read_bytes() == paths[1].read_bytes() != paths[2].read_bytes()
        got = load_file(paths[0])
        assert got.keys() == spec.keys()
        for key, t in got.items():
            assert t.shape == spec[key].shape
            if spec[key].is_meta:
                magnitude = t.float().abs()
                assert t.dtype == dtype and magnitude.min() >= 1 / 32 and magnitude.max() <= 1 / 8, key
                assert t.numel() < 64 or ((t.float() < 0).any() and (t.float() > 0).any()), key
            else:
                assert torch.equal(t, spec[key])


def test_full_size_file_streams(tmp_path):
    """One real full-size write (CLIP-L, 123 M parameters, fp8): real shapes, random non-zero values."""
    path = synth.write_checkpoint(tmp_path / "clip_l.safetensors", "sd1", layout="text_encoder", size="full",
                                  dtype=torch.float8_e4m3fn)
    assert path.stat().st_size > 123e6
    with safe_open(path, "pt") as f:
        assert len(f.keys()) == 196
        t = f.get_tensor("text_model.embeddings.token_embedding.weight")
        assert t.shape == (49408, 768) and t.dtype == torch.float8_e4m3fn and bool((t.float() != 0).all())
        assert f.get_slice("text_model.encoder.layers.11.self_attn.out_proj.weight").get_shape() == [768, 768]


# --- other layouts -------------------------------------------------------------------------------

@pytest.mark.parametrize("arch", synth.sd.ARCHES)
def test_diffusers_folder_loads_with_from_pretrained(tmp_path, arch):
    import diffusers
    import transformers

    models = synth.build_models(arch)
    root = synth.write_checkpoint(tmp_path / "model", arch, layout="diffusers")
    index = json.loads((root / "model_index.json").read_text())
    for sub in ("unet", "vae"):
        cls = getattr(diffusers, index[sub][1])
        loaded, info = cls.from_pretrained(root / sub, output_loading_info=True)
        assert not info["missing_keys"] and not info["unexpected_keys"]
        assert_same_tensors(loaded, models[sub])
    for name, sub in synth.DIFFUSERS_TEXT[arch].items():
        cls = getattr(transformers, index[sub][1])
        loaded, info = cls.from_pretrained(root / sub, output_loading_info=True)
        assert not info["missing_keys"] and not info["unexpected_keys"]
        with safe_open(root / sub / "model.safetensors", "pt") as f:
            assert all(k.startswith(("text_model.", "text_projection.")) for k in f.keys())   # real names
        want = models[name].state_dict()
        if arch == "sd2":   # SD 2's text_encoder: CLIP-H up to the penultimate layer
            last = models[name].config.num_hidden_layers - 1
            assert loaded.config.num_hidden_layers == last
            want = {k: v for k, v in want.items() if f"layers.{last}." not in k}
        got = loaded.state_dict()
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
        transformers.CLIPTokenizer.from_pretrained(root / sub.replace("text_encoder", "tokenizer"))
    getattr(diffusers, index["scheduler"][1]).from_pretrained(root / "scheduler")
    listed = {k for k, v in index.items() if isinstance(v, list) and v[0] is not None}
    assert listed == {p.name for p in root.iterdir() if p.is_dir()}


def test_sharded_diffusers_folder(tmp_path):
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModelWithProjection

    models = synth.build_models("sdxl")
    root = synth.write_checkpoint(tmp_path / "model", "sdxl", layout="diffusers", shard_size="20KB",
                                  dtype=torch.float16)
    for sub, stem in (("unet", "diffusion_pytorch_model"), ("vae", "diffusion_pytorch_model"),
                      ("text_encoder", "model"), ("text_encoder_2", "model")):
        index = json.loads((root / sub / f"{stem}.safetensors.index.json").read_text())
        shards = set(index["weight_map"].values())
        assert len(shards) > 1 and all((root / sub / s).exists() for s in shards)
        assert not (root / sub / f"{stem}.safetensors").exists()
    unet, info = UNet2DConditionModel.from_pretrained(root / "unet", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    ref = models["unet"].state_dict()
    assert all(torch.equal(t, ref[k].half()) for k, t in unet.state_dict().items())
    AutoencoderKL.from_pretrained(root / "vae")
    clip_g, info = CLIPTextModelWithProjection.from_pretrained(root / "text_encoder_2", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]


def test_streamed_diffusers_weights_load(tmp_path):
    """The writer the `full` size uses for diffusers folders, on a tiny UNet: sharded, loadable."""
    from diffusers import UNet2DConditionModel

    unet = synth.build_models("sd1")["unet"]
    unet.save_config(tmp_path)
    synth.write_weights(tmp_path, "diffusion_pytorch_model", unet.state_dict(), torch.float32, None, "50KB")
    loaded, info = UNet2DConditionModel.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert_same_tensors(loaded, unet)


@pytest.mark.parametrize("arch", synth.sd.ARCHES)
def test_unet_only_layouts(tmp_path, arch):
    unet = synth.build_models(arch)["unet"]
    prefixed = load_file(synth.write_checkpoint(tmp_path / "u.safetensors", arch, layout="unet"))
    bare = load_file(synth.write_checkpoint(tmp_path / "b.safetensors", arch, layout="unet_bare"))
    named = load_file(synth.write_checkpoint(tmp_path / "d.safetensors", arch, layout="unet_diffusers"))
    assert prefixed.keys() == {"model.diffusion_model." + k for k in bare}
    assert all(torch.equal(prefixed["model.diffusion_model." + k], v) for k, v in bare.items())
    assert_same_tensors(load_strict(fresh(unet), named), unet)
    if arch == "svd":
        converted = svd_unet_to_diffusers(prefixed, unet.config)
    else:
        converted = convert_ldm_unet_checkpoint(prefixed, dict(unet.config))
    assert_same_tensors(load_strict(fresh(unet), converted), unet)


@pytest.mark.parametrize("arch, name", [("sd1", "clip_l"), ("sd2", "clip_h"), ("sdxl", "clip_l"),
                                        ("sdxl_refiner", "clip_g")])
def test_text_encoder_file(tmp_path, arch, name):
    model = synth.build_models(arch)[name]
    state = load_file(synth.write_checkpoint(tmp_path / "te.safetensors", arch, layout="text_encoder"))
    assert all(k.startswith(("text_model.", "text_projection.")) for k in state)
    if arch == "sd2":
        last = model.config.num_hidden_layers - 1
        assert not [k for k in state if f".layers.{last}." in k]
        assert len(state) == len(model.state_dict()) - 16
    else:
        assert_same_tensors(load_strict(fresh(model), for_hf_text_model(model, state)), model)


@pytest.mark.parametrize("arch, name", [("sd2", "clip_h"), ("sdxl", "clip_g"), ("sdxl_refiner", "clip_g")])
def test_openclip_text_encoder_file(tmp_path, arch, name):
    model = synth.build_models(arch)[name]
    state = load_file(synth.write_checkpoint(tmp_path / "oc.safetensors", arch, layout="text_encoder_openclip"))
    assert "token_embedding.weight" in state and "transformer.resblocks.0.attn.in_proj_weight" in state
    assert "logit_scale" in state and "text_projection" in state
    converted = convert_open_clip_checkpoint(model, state, prefix="")
    if name == "clip_h":   # a CLIPTextModel: the projection stays an OpenCLIP-only tensor
        assert torch.equal(converted.pop("text_projection.weight").T, state["text_projection"])
    assert_same_tensors(load_strict(fresh(model), for_hf_text_model(model, converted)), model)


def test_errors(tmp_path):
    with pytest.raises(CkptbendError, match="no text encoder"):
        synth.write_checkpoint(tmp_path / "x.safetensors", "svd", layout="text_encoder")
    with pytest.raises(CkptbendError, match="no OpenCLIP"):
        synth.write_checkpoint(tmp_path / "x.safetensors", "sd1", layout="text_encoder_openclip")
    with pytest.raises(CkptbendError, match="unknown architecture"):
        synth.build_models("sd3")
    with pytest.raises(CkptbendError, match="unknown layout"):
        synth.write_checkpoint(tmp_path / "x.safetensors", "sd1", layout="ckpt")
    with pytest.raises(CkptbendError, match="shard_size"):
        synth.write_checkpoint(tmp_path / "x.safetensors", "sd1", shard_size="1MB")
    with pytest.raises(CkptbendError, match="dtype"):
        synth.write_checkpoint(tmp_path / "x.safetensors", "sd1", dtype=torch.int8)
    assert not list(tmp_path.iterdir())
