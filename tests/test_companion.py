"""The companion folder: what `bake` and `emit` write, and that it stands on its own."""

import hashlib
import json
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import torch

from ckptbend.companion import RUNTIME_DIR, dynamic_part, emit, folder_for
from ckptbend.recipe import load_recipe, parse_recipe
from ckptbend.runtime import slothful
from ckptbend.runtime.bending import BendSpec
from ckptbend.runtime.maps import load_maps, save_maps
from ckptbend.synth import write_checkpoint

from _helpers import imported_roots

ROOT = Path(__file__).resolve().parent.parent
RECIPES = ROOT / "recipes"
SAG_AND_BENDING = RECIPES / "sag-and-bending.toml"

# Every bending mode once, and the Simple Slothful node: the companion must carry each faithfully.
ALL_DYNAMIC = """schema = 1
name = "all-dynamic"
[sag]
scale = 0.7
blur_sigma = 1.5
[slothful]
simple = true
depth_decay = -1.0
in_blend = 0.5
[[bending]]
token = "kiss"
mode = "scale"
scale_factor = 2.0
apply_to_layers = [0, 2]
[[bending]]
token = "kiss"
mode = "spatial_scale"
zoom_factor = 1.5
[[bending]]
token = "kiss"
mode = "rotate"
angle = 30.0
[[bending]]
token = "sunset"
mode = "translate"
translate_x = -0.4
apply_to_timesteps = [0, 15]
[[bending]]
token = "sunset"
mode = "flip"
flip_vertical = true
[[bending]]
token = "sunset"
mode = "blur"
kernel_size = 5
[[bending]]
token = "sunset"
mode = "sharpen"
sharpen_amount = 0.5
renormalize = "column"
[[bending]]
token = "sunset"
mode = "regional_mask"
region = [0.0, 0.0, 0.5, 1.0]
[[bending]]
token = "sunset"
mode = "frequency_filter"
filter = "lowpass"
cutoff = 0.25
[[bending]]
token = "sunset"
mode = "frequency_filter"
sigma = 0.5
"""


def run(*args, cwd=None):
    return subprocess.run([sys.executable, str(ROOT / "bin" / "ckptbend"), *map(str, args)],
                          capture_output=True, text=True, cwd=cwd)


def sha256_tree(folder: Path) -> dict:
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def sd1(tmp_path_factory):
    return write_checkpoint(tmp_path_factory.mktemp("companion") / "sd1.safetensors", "sd1", dtype=torch.float16)


def test_dynamic_part_feeds_the_runtime_modules_unchanged():
    recipe = parse_recipe(ALL_DYNAMIC, "all.toml")
    part = dynamic_part(recipe)
    assert part["sag"] == {"scale": 0.7, "blur_sigma": 1.5}
    assert part["slothful_simple"] is True
    assert slothful.resolve_params(part["slothful"]) == {**slothful.simple_params(depth_decay=-1.0, in_blend=0.5)}
    specs = [BendSpec.from_dict(e) for e in part["bending"]]
    assert [s.mode for s in specs] == [b.mode for b in recipe.bending]
    assert specs[0].apply_to_layers == (0, 2) and specs[3].apply_to_timesteps == (0, 15)
    assert specs[6].renormalize == "column" and specs[7].region == (0.0, 0.0, 0.5, 1.0)
    assert specs[8].filter == "lowpass" and specs[8].cutoff == 0.25
    assert specs[9].filter is None and specs[9].sigma == 0.5        # the original's placeholder form
    json.dumps(part)                                                # plain data, JSON-able


def test_static_recipe_has_no_dynamic_part():
    assert dynamic_part(load_recipe(RECIPES / "sharper-details.toml")) == {}


def test_folder_name_is_importable(tmp_path):
    assert folder_for(tmp_path / "my-model.v2.safetensors") == tmp_path / "my_model_v2_ckptbend"
    assert folder_for(tmp_path / "2024 mix.safetensors").name.isidentifier()
    assert folder_for(tmp_path / "diffusers-folder").name == "diffusers_folder_ckptbend"


def test_emit_writes_a_complete_folder(tmp_path):
    out = tmp_path / "sag_bend"
    r = run("emit", SAG_AND_BENDING, "-o", out)
    assert r.returncode == 0, r.stderr
    recipe = load_recipe(SAG_AND_BENDING)
    # The runtime package, whole and as it is.
    assert sha256_tree(out / "runtime") == {name: digest for name, digest in sha256_tree(RUNTIME_DIR).items()
                                            if "__pycache__" not in name}
    manifest = json.loads((out / "companion.json").read_text())
    assert manifest["recipe_sha256"] == recipe.sha256 and manifest["recipe_name"] == recipe.name
    assert manifest["dynamic"] == dynamic_part(recipe) and manifest["checkpoint"] is None
    assert parse_recipe((out / "recipe.toml").read_text(), "copy").sha256 == recipe.sha256
    project = tomllib.loads((out / "pyproject.toml").read_text())
    assert project["project"]["name"] == "ckptbend-sag-and-bending" and project["project"]["version"]
    assert project["tool"]["comfy"]["DisplayName"] == "ckptbend: sag-and-bending"
    # The runtime copy imports only torch, the standard library and itself, relatively (and ComfyUI's own
    # modules, inside the functions ComfyUI calls): never diffusers, nor an installed ckptbend.
    for path in (out / "runtime").rglob("*.py"):
        assert imported_roots(path) <= {".", "torch", "comfy", *sys.stdlib_module_names}, path

    before = sha256_tree(out)
    r = run("emit", SAG_AND_BENDING, "-o", out)
    assert r.returncode == 2 and "already exists" in r.stderr and "Traceback" not in r.stderr
    assert sha256_tree(out) == before
    assert run("emit", SAG_AND_BENDING, "-o", out, "--force").returncode == 0


def test_emit_refuses_a_static_recipe(tmp_path):
    r = run("emit", RECIPES / "sharper-details.toml", "-o", tmp_path / "c")
    assert r.returncode == 2 and "nothing to put in a companion" in r.stderr
    assert list(tmp_path.iterdir()) == []


def test_bake_writes_the_companion_beside_the_output(sd1, tmp_path):
    out = tmp_path / "sd1-sag.safetensors"
    r = run("bake", SAG_AND_BENDING, sd1, "-o", out)
    assert r.returncode == 0, r.stderr
    companion = tmp_path / "sd1_sag_ckptbend"
    manifest = json.loads((companion / "companion.json").read_text())
    assert manifest["checkpoint"]["file"] == out.name
    assert manifest["checkpoint"]["source_sha256"] == {sd1.name: hashlib.sha256(sd1.read_bytes()).hexdigest()}
    # A second bake refuses before writing anything: neither the output nor the companion changes.
    out.unlink()
    before = sha256_tree(companion)
    r = run("bake", SAG_AND_BENDING, sd1, "-o", out)
    assert r.returncode == 2 and "companion folder already exists" in r.stderr
    assert not out.exists() and sha256_tree(companion) == before
    assert run("bake", SAG_AND_BENDING, sd1, "-o", out, "--force").returncode == 0
    # A static recipe writes no companion.
    assert run("bake", RECIPES / "sharper-details.toml", sd1, "-o", tmp_path / "plain.safetensors").returncode == 0
    assert not (tmp_path / "plain_ckptbend").exists()


def test_emit_with_checkpoint_checks_the_recorded_recipe(sd1, tmp_path):
    baked = tmp_path / "sharp.safetensors"
    assert run("bake", RECIPES / "sharper-details.toml", sd1, "-o", baked).returncode == 0
    r = run("emit", SAG_AND_BENDING, "-o", tmp_path / "c", "--checkpoint", baked)
    assert r.returncode == 2 and "was baked from recipe 'sharper-details'" in r.stderr
    assert not (tmp_path / "c").exists()


def test_companion_imports_without_ckptbend_and_recognises_its_checkpoint(sd1, tmp_path):
    out = tmp_path / "sd1-sag.safetensors"
    assert run("bake", SAG_AND_BENDING, sd1, "-o", out).returncode == 0
    code = f"""
import importlib.abc, sys
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("ckptbend", "diffusers"):
            raise ImportError("blocked: " + name)
sys.meta_path.insert(0, Block())
sys.path.insert(0, {str(tmp_path)!r})
import sd1_sag_ckptbend as c
print(c.RECIPE_NAME, c.matches({str(out)!r}), c.matches({str(sd1)!r}))
print(sorted(c.NODE_DISPLAY_NAME_MAPPINGS.values()))
print(sorted(m for m in sys.modules if m.split(".")[0] in ("ckptbend", "diffusers")))
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == ["sag-and-bending True False", "['ckptbend: sag-and-bending']", "[]"]


def test_maps_file_round_trip_and_render(tmp_path):
    g = torch.Generator().manual_seed(0)
    records = [{"token": t, "layer": layer, "step": step, "original": torch.rand(6, 10, generator=g),
                "bent": torch.rand(6, 10, generator=g)}
               for t in ("sunset", "kiss") for layer in (0, 3) for step in (0, 1, 2)]
    path = tmp_path / "maps.safetensors"
    assert save_maps(records, path) == 12
    back = load_maps(path)
    assert [(r["token"], r["layer"], r["step"]) for r in back] == [(r["token"], r["layer"], r["step"]) for r in records]
    assert all(torch.equal(a[k], b[k]) for a, b in zip(back, records) for k in ("original", "bent"))
    from safetensors.torch import load_file                     # any safetensors reader opens it
    assert torch.equal(load_file(path)["5.bent"], records[5]["bent"])

    r = run("maps", path, "-o", tmp_path / "png")
    assert r.returncode == 0, r.stderr
    from PIL import Image
    from ckptbend.maps_render import CELL, GAP, LABEL
    sheet = Image.open(tmp_path / "png" / "sunset.png")
    assert sheet.size == (LABEL * 4 + 2 * (2 * CELL + GAP + GAP), LABEL + 3 * (CELL + GAP))
    # The bent map's brightest cell is where the record's maximum is (same colour scale for the pair).
    rec = records[0]
    peak = int(rec["bent"].argmax())
    y, x = divmod(peak, 10)
    lo = min(rec["original"].min(), rec["bent"].min())
    hi = max(rec["original"].max(), rec["bent"].max())
    px = sheet.getpixel((LABEL * 4 + CELL + GAP + int((x + 0.5) * CELL / 10), LABEL + int((y + 0.5) * CELL / 6)))
    from ckptbend.maps_render import colorize
    expected = tuple(int(v) for v in colorize((rec["bent"].max() - lo) / (hi - lo)))
    assert px == expected


def test_maps_command_rejects_other_files(sd1, tmp_path):
    r = run("maps", sd1, "-o", tmp_path / "png")
    assert r.returncode == 2 and "not a ckptbend maps file" in r.stderr and "Traceback" not in r.stderr
    r = run("maps", tmp_path / "missing.safetensors", "-o", tmp_path / "png")
    assert r.returncode == 2 and "Traceback" not in r.stderr


KISS = """schema = 1
name = "kiss"
[sag]
scale = 0.8
[slothful]
in_strength = 9.0
[[bending]]
token = "sunset"
mode = "translate"
translate_x = -0.5
"""

FRESH_PROCESS = """
import importlib.abc, sys
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "ckptbend":
            raise ImportError("blocked: " + name)
sys.meta_path.insert(0, Block())
sys.path.insert(0, sys.argv[1])
import torch
from diffusers import StableDiffusionPipeline
from safetensors.torch import save_file
import kiss_ckptbend as companion

torch.set_num_threads(1)
pipe = StableDiffusionPipeline.from_pretrained(sys.argv[2])
pipe.set_progress_bar_config(disable=True)
session = companion.apply(pipe, record_maps=True)
latents = pipe("a romantic kiss at {sunset}", num_inference_steps=3, guidance_scale=5.0, height=16, width=16,
               output_type="latent", generator=torch.Generator().manual_seed(0)).images
companion.save_maps(session, sys.argv[4])
companion.remove(pipe)
save_file({"latents": latents.contiguous()}, sys.argv[3])
"""


def test_companion_in_a_fresh_process_gives_the_in_tree_latents(tmp_path):
    """The emitted folder, imported where ckptbend cannot be, samples exactly like the in-tree adapter;
    its phase maps render with `ckptbend maps`."""
    from diffusers import StableDiffusionPipeline
    from safetensors.torch import load_file

    from _pipelines import sd_pipeline, write_clip_tokenizer
    from ckptbend.runtime import diffusers_host

    sd_pipeline(write_clip_tokenizer(tmp_path / "tokenizer")).save_pretrained(tmp_path / "pipe")
    recipe = parse_recipe(KISS, "kiss.toml")
    emit(recipe, tmp_path / "kiss_ckptbend")
    r = subprocess.run([sys.executable, "-c", FRESH_PROCESS, tmp_path, tmp_path / "pipe", tmp_path / "latents.safetensors",
                        tmp_path / "maps.safetensors"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        pipe = StableDiffusionPipeline.from_pretrained(tmp_path / "pipe")
        pipe.set_progress_bar_config(disable=True)
        plain = pipe("a romantic kiss at sunset", num_inference_steps=3, guidance_scale=5.0, height=16, width=16,
                     output_type="latent", generator=torch.Generator().manual_seed(0)).images
        diffusers_host.apply(pipe, dynamic_part(recipe))
        in_tree = pipe("a romantic kiss at {sunset}", num_inference_steps=3, guidance_scale=5.0, height=16, width=16,
                       output_type="latent", generator=torch.Generator().manual_seed(0)).images
        diffusers_host.remove(pipe)
    finally:
        torch.set_num_threads(threads)
    fresh = load_file(tmp_path / "latents.safetensors")["latents"]
    assert torch.equal(fresh, in_tree)
    assert not torch.allclose(fresh, plain, atol=1e-3)          # the companion did act

    records = load_maps(tmp_path / "maps.safetensors")
    assert {(m["step"], m["layer"]) for m in records} == {(s, layer) for s in range(3) for layer in range(7)}
    assert all(m["token"] == "sunset" and m["original"].shape == m["bent"].shape in {(16, 16), (8, 8)}
               for m in records)
    r = run("maps", tmp_path / "maps.safetensors", "-o", tmp_path / "png")
    assert r.returncode == 0 and (tmp_path / "png" / "sunset.png").is_file(), r.stderr


# --- the example workflow per model family -------------------------------------------------------------

BEND_ONLY = """schema = 1
name = "bend-only"
[[bending]]
token = "sunset"
mode = "translate"
translate_x = -0.4
"""


def classes(graph: dict) -> list[str]:
    return [n["class_type"] for n in graph.values()]


@pytest.mark.parametrize("architecture, family", [
    (None, "sd1"), ("sd1", "sd1"), ("sdxl-base", "sdxl"), ("sdxl-refiner", "sdxl"), ("flux-dev", "flux-dev"),
    ("sd35-large", "sd3"), ("sd3-medium", "sd3"), ("wan21-t2v-14b", "wan21-t2v"), ("wan21-t2v", "wan21-t2v"),
    ("wan22-i2v-a14b", "wan22-i2v"), ("ltx-video-13b", "ltx-video"), ("qwen-image", "qwen-image"),
    ("unet-only", "sd1"), ("some-future-model", None), ("svd", None), ("mochi", "mochi"), ("lumina2", "lumina2"),
    ("chroma-radiance", "chroma-radiance"), ("wan-vace-14b", "wan-vace"), ("cosmos-predict2-2b", "cosmos-predict2")])
def test_family_of_an_architecture(architecture, family):
    from ckptbend.workflows import family_of
    assert family_of(architecture) == family


def test_a_baked_wan_file_gets_a_wan_video_graph(tmp_path):
    """A bare Wan transformer (ComfyUI's diffusion_models file) loads with UNETLoader, its UMT5 through CLIPLoader
    type "wan", a video latent, and is saved as a video; the node sits between the loader and the sampler."""
    from ckptbend.bake import bake

    wan = write_checkpoint(tmp_path / "wan.safetensors", "wan21_t2v", layout="single")
    bake(parse_recipe(BEND_ONLY, "bend.toml"), wan, tmp_path / "wan-bent.safetensors", progress=False)
    companion = tmp_path / "wan_bent_ckptbend"
    assert json.loads((companion / "companion.json").read_text())["checkpoint"]["architecture"].startswith("wan21-t2v")
    graph = json.loads((companion / "workflow_api.json").read_text())
    by_class = {n["class_type"]: (k, n["inputs"]) for k, n in graph.items()}
    loader, inputs = by_class["UNETLoader"]
    assert inputs["unet_name"] == "wan-bent.safetensors"
    clip, clip_inputs = by_class["CLIPLoader"]
    assert clip_inputs["type"] == "wan"
    node_key, node = next((k, n["inputs"]) for k, n in graph.items() if n["class_type"].startswith("ckptbend_"))
    assert node["model"] == [loader, 0] and node["bending_clip"] == [clip, 0]
    assert by_class["ModelSamplingSD3"][1]["model"] == [node_key, 0]
    assert {"EmptyHunyuanLatentVideo", "CreateVideo", "SaveVideo"} <= set(classes(graph))
    assert "CheckpointLoaderSimple" not in classes(graph) and "SaveImage" not in classes(graph)


def test_sd1_and_emit_without_checkpoint_keep_the_image_graph(tmp_path):
    assert run("emit", SAG_AND_BENDING, "-o", tmp_path / "c").returncode == 0
    graph = json.loads((tmp_path / "c" / "workflow_api.json").read_text())
    assert classes(graph) == ["CheckpointLoaderSimple", classes(graph)[1], "CLIPTextEncode", "CLIPTextEncode",
                              "EmptyLatentImage", "KSampler", "VAEDecode", "SaveImage"]
    assert graph["2"]["inputs"]["model"] == ["1", 0] and graph["2"]["inputs"]["bending_clip"] == ["1", 1]
