"""A bake warns when its companion's techniques cannot act on the model it is written for: SAG and Slothful need an
SD UNet (both hosts refuse them elsewhere), and nothing reaches SVD. The warning comes from the plan, before any
write, so `--dry-run` and the bake itself print it."""

import pytest

from ckptbend.layouts import detect
from ckptbend.plan import make_plan
from ckptbend.recipe import parse_recipe
from ckptbend.synth import write_checkpoint

SECTIONS = {"sag": "[sag]\nscale = 0.5\n", "slothful": "[slothful]\nin_strength = 0.5\n",
            "bending": '[[bending]]\ntoken = "sunset"\nmode = "translate"\ntranslate_x = 0.3\n'}


def warnings_for(tmp_path, arch, *sections):
    path = write_checkpoint(tmp_path / f"{arch}.safetensors", arch, layout="single")
    recipe = parse_recipe('schema = 1\nname = "t"\n' + "".join(SECTIONS[s] for s in sections), "t.toml")
    return [w for w in make_plan(recipe, detect(path)).warnings if "companion" in w]


@pytest.mark.parametrize("arch, sections, expected", [
    ("sd1", ("sag", "slothful", "bending"), None),
    ("sdxl", ("sag",), None),
    ("flux_dev", ("bending",), None),
    ("flux_dev", ("sag", "bending"), "[sag]: SAG and Slothful Attention need an SD UNet"),
    ("wan21_t2v", ("slothful",), "[slothful]: SAG and Slothful Attention need an SD UNet"),
    ("svd", ("bending",), "[[bending]]: the companion's techniques do not reach SVD"),
    ("svd", ("sag", "bending"), "[sag], [[bending]]: the companion's techniques do not reach SVD"),
])
def test_a_bake_warns_where_the_companion_cannot_act(tmp_path, arch, sections, expected):
    found = warnings_for(tmp_path, arch, *sections)
    if expected is None:
        assert found == []
    else:
        assert len(found) == 1 and found[0].startswith(expected), found
