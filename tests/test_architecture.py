"""A recipe's `architecture` names any architecture `inspect` can name and is enforced on every file; every
block label a selector names must exist in the model. Tiny synthetic checkpoints with real key names."""

import pytest

from _dit import recipe, run
from ckptbend.errors import CkptbendError
from ckptbend.layouts import ARCHITECTURE_NAMES, detect
from ckptbend.plan import labels_read_for, make_plan
from ckptbend.synth import ARCHES
from ckptbend.synth.catalog import GENERATORS, generator_of

MODELS = [a for a in ARCHES if generator_of(a) != "large_text_encoders"]   # a text encoder alone has no labels


def with_architecture(name, body="[dit.joint]\nv = 1.1\n"):
    return recipe(f'architecture = "{name}"\n{body}')


@pytest.mark.parametrize("arch", MODELS)
def test_every_architecture_inspect_names_can_be_a_recipes(synth_file, arch):
    ckpt = detect(synth_file(arch, GENERATORS[generator_of(arch)][1][0]))   # its first layout (HunyuanVideo 1.5:
    #                                                                            diffusers names only)
    assert ckpt.architecture in ARCHITECTURE_NAMES[ckpt.architecture]     # DiTs could not be named at all
    assert labels_read_for(with_architecture(ckpt.architecture), ckpt).startswith(ckpt.architecture)


def test_every_name_covers_itself():
    """What the families can name at released sizes (e.g. wan21-t2v-14b, ltx-video-13b) is a valid recipe name."""
    assert all(name in covered for name, covered in ARCHITECTURE_NAMES.items() if name not in ("sdxl",))
    assert ARCHITECTURE_NAMES["sdxl"] == ("sdxl-base",)


@pytest.mark.parametrize("name,arch,layout", [
    ("sdxl", "flux_dev", "comfy"),              # its [clip] matched CLIP-L: baked into a Flux all-in-one
    ("wan21-t2v", "ltx_video", "single"),       # a Wan recipe's B05 is not LTX-Video's B05
    ("flux", "sd3_medium", "single"),
    ("sdxl", "sdxl_refiner", "single"),         # the refiner's blocks differ: "sdxl" is the base model
    ("sdxl", "sd1", "unet"),                    # a UNet alone is told by its structure: was "cannot tell"
])
def test_architecture_is_enforced_on_every_file(tmp_path, synth_file, name, arch, layout):
    (tmp_path / "r.toml").write_text(f'schema = 1\nname = "r"\narchitecture = "{name}"\n[clip]\nv = 1.1\n')
    r = run("bake", tmp_path / "r.toml", synth_file(arch, layout), "-o", tmp_path / "o.safetensors", "--dry-run",
            "--allow-missing")
    assert r.returncode == 2 and f"is written for {name}, but" in r.stderr, r.stderr


def test_the_shipped_sdxl_recipe_is_kept_out_of_the_refiner(tmp_path, synth_file):
    r = run("bake", "recipes/sdxl-detail-per-block.toml", synth_file("sdxl_refiner"), "-o", tmp_path / "o.safetensors")
    assert r.returncode == 2 and "sdxl-refiner" in r.stderr and not (tmp_path / "o.safetensors").exists()
    ckpt = detect(synth_file("sdxl_refiner"))
    assert labels_read_for(recipe('architecture = "sdxl-refiner"\n[clip]\nv = 1.1\n'), ckpt).startswith("sdxl-refiner")


def test_a_file_of_text_encoders_alone_has_no_labels_to_check(synth_file):
    ckpt = detect(synth_file("sd1", "text_encoder"))
    assert labels_read_for(with_architecture("flux-dev", "[clip]\nv = 1.1\n"), ckpt).startswith("none: ")


def test_a_file_whose_architecture_cannot_be_told_is_refused_for_a_named_recipe(tmp_path, synth_file):
    from safetensors.torch import load_file, save_file

    state = {k: v for k, v in load_file(synth_file("sd1", "unet")).items() if "proj_in" not in k}   # no structure left
    save_file(state, tmp_path / "u.safetensors")
    ckpt = detect(tmp_path / "u.safetensors")
    with pytest.raises(CkptbendError, match="cannot tell its architecture"):
        labels_read_for(with_architecture("sd1", "[unet.self]\nv = 1.1\n"), ckpt)


@pytest.mark.parametrize("arch,section,blocks,missing,have", [
    ("sd1", "unet.self", '["IN01", "IN50"]', "IN50", "IN01, IN02, IN04"),
    ("flux_dev", "dit.joint", '["D00", "D50"]', "D50", "D00, D01, S00"),
    ("wan21_t2v", "dit.self", '["B00", "single"]', "single", "B00, B01"),
])
def test_any_unknown_block_label_is_an_error_listing_the_models_labels(synth_file, arch, section, blocks, missing, have):
    body = f"[[{section}]]\nblocks = {blocks}\nv = 1.2\n"
    ckpt = detect(synth_file(arch))
    with pytest.raises(CkptbendError, match=f"has no block {missing} with \\[{section}\\] attention") as e:
        make_plan(recipe(body), ckpt)
    assert f"(its blocks: {have}" in e.value.message
    plan = make_plan(recipe(body), ckpt, allow_missing=True)          # today: baked silently
    assert any(missing in w for w in plan.warnings) and plan.edits
