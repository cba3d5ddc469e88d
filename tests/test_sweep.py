"""Sweeps: several recipes or a grid in one command give exactly the outputs of separate bakes."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ckptbend.bake import bake
from ckptbend.errors import CkptbendError
from ckptbend.recipe import parse_recipe
from ckptbend.sweep import expand, parse_grid
from ckptbend.synth import write_checkpoint

ROOT = Path(__file__).resolve().parent.parent
BASE = parse_recipe('schema = 1\nname = "base"\n[unet.self]\nq = 1.1\n[unet.cross]\nv = 1.2\n')


def test_grid_expands_to_every_combination_with_validated_values():
    variants = expand(BASE, [parse_grid("unet.self.q=1.0,1.3"), parse_grid("unet.self.k=0.8,1.0,1.2")])
    assert [v.name for v in variants] == [
        "base.unet.self.q-1.unet.self.k-0.8", "base.unet.self.q-1.unet.self.k-1", "base.unet.self.q-1.unet.self.k-1.2",
        "base.unet.self.q-1.3.unet.self.k-0.8", "base.unet.self.q-1.3.unet.self.k-1", "base.unet.self.q-1.3.unet.self.k-1.2"]
    assert variants[0].multipliers["unet.self"][0].factors == (("k", 0.8),)        # q = 1.0 is no factor
    assert variants[5].multipliers["unet.self"][0].factors == (("q", 1.3), ("k", 1.2))
    assert all(v.multipliers["unet.cross"] == BASE.multipliers["unet.cross"] for v in variants)


@pytest.mark.parametrize("spec, fragment", [
    ("unet.self.qq=1.0", "SECTION.KEY"), ("unet.slef.q=1.0", "SECTION.KEY"), ("unet.self.q=a,b", "numbers"),
    ("unet.self.q=", "no values"), ("unet.self.q=11", "0"),
])
def test_bad_grids_are_clear_errors(spec, fragment):
    with pytest.raises(CkptbendError, match=fragment):
        expand(BASE, [parse_grid(spec)])


def test_a_grid_over_a_selector_section_is_refused():
    recipe = parse_recipe('schema = 1\nname = "b"\n[[unet.self]]\nblocks = ["M00"]\nq = 1.1\n')
    with pytest.raises(CkptbendError, match="selectors"):
        expand(recipe, [parse_grid("unet.self.q=1.0,1.2")])


def test_sweep_outputs_equal_separate_bakes(tmp_path):
    src = write_checkpoint(tmp_path / "m.safetensors", "sd1", dtype=torch.float16)
    (tmp_path / "base.toml").write_text(BASE.canonical())
    r = subprocess.run([sys.executable, ROOT / "bin" / "ckptbend", "bake", tmp_path / "base.toml", src,
                        "-o", tmp_path / "sweep", "--grid", "unet.self.k=0.9,1.1", "-q"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    for k in (0.9, 1.1):
        separate = parse_recipe(f'schema = 1\nname = "base.unet.self.k-{k:g}"\n[unet.self]\nq = 1.1\nk = {k}\n'
                                '[unet.cross]\nv = 1.2\n')
        bake(separate, src, tmp_path / f"separate-{k}.safetensors", progress=False)
        swept = tmp_path / "sweep" / f"m.base.unet.self.k-{k:g}.safetensors"
        assert swept.read_bytes() == (tmp_path / f"separate-{k}.safetensors").read_bytes()
