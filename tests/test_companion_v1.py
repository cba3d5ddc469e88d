"""A companion folder as ckptbend wrote it before the runtime became one package (tests/fixtures/
v1_companion_ckptbend: runtime/*.py copied file by file, kept byte for byte as emitted): it still loads
and acts in both hosts, exactly as today's runtime does, and `recipe import` still reads its workflow."""

import importlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import comfy_standin as cs
from ckptbend.recipe import load_recipe
from ckptbend.runtime import comfy_host, diffusers_host

FIXTURES = Path(__file__).resolve().parent / "fixtures"
OLD = FIXTURES / "v1_companion_ckptbend"
ROOT = Path(__file__).resolve().parent.parent
PROMPT = "a romantic {kiss} at {sunset}"

pytestmark = pytest.mark.usefixtures("one_thread_no_grad")


@pytest.fixture(scope="module")
def old():
    sys.path.insert(0, str(FIXTURES))
    try:
        yield importlib.import_module(OLD.name)
    finally:
        sys.path.remove(str(FIXTURES))


def test_the_fixture_is_the_v1_layout(old):
    """The old layout: runtime modules side by side, imported by the folder's __init__ one by one."""
    assert sorted(p.name for p in (OLD / "runtime").iterdir() if p.suffix == ".py") == [
        "__init__.py", "bending.py", "comfy_host.py", "diffusers_host.py", "maps.py", "sag.py", "slothful.py"]
    assert old._comfy_host.__name__ == "v1_companion_ckptbend.runtime.comfy_host"
    assert old.DYNAMIC["sag"] and old.DYNAMIC["slothful"] and len(old.DYNAMIC["bending"]) == 2


def test_old_companion_in_diffusers_equals_todays_runtime(old, tmp_path):
    from _pipelines import sd_pipeline, write_clip_tokenizer

    pipe = sd_pipeline(write_clip_tokenizer(tmp_path / "tokenizer"))

    def run():
        return pipe(PROMPT, num_inference_steps=3, guidance_scale=5.0, height=16, width=16, output_type="latent",
                    generator=torch.Generator().manual_seed(0)).images

    session = old.apply(pipe, record_maps=True)
    by_old = run()
    old.remove(pipe)
    diffusers_host.apply(pipe, old.DYNAMIC)
    by_today = run()
    diffusers_host.remove(pipe)
    plain = pipe(PROMPT.replace("{", "").replace("}", ""), num_inference_steps=3, guidance_scale=5.0, height=16,
                 width=16, output_type="latent", generator=torch.Generator().manual_seed(0)).images
    assert torch.equal(by_old, by_today) and not torch.allclose(by_old, plain, atol=1e-3)
    assert {m["token"] for m in session.maps} == {"kiss", "sunset"}


def test_old_companion_node_in_comfyui_equals_todays_node(old, comfy, tmp_path):
    cs.write_tokenizer(tmp_path)
    clip, model = cs.CLIP(tmp_path), cs.EPSModel(cs.tiny_unet())
    g = torch.Generator().manual_seed(1)
    positive, negative = (torch.randn(1, 77, cs.CONTEXT_DIM, generator=g) for _ in range(2))
    noise = torch.randn(1, 4, 16, 24, generator=torch.Generator().manual_seed(2))

    def sample(mappings):
        (cls,) = mappings.values()
        assert cls.__name__ == comfy_host.node_id(old.RECIPE_NAME, old.RECIPE_SHA256)
        patched = getattr(cls(), cls.FUNCTION)(model=cs.ModelPatcher(model), bending_clip=clip,
                                               bending_prompt=PROMPT)[0]
        return cs.sample(patched, noise, positive, negative, steps=3)

    by_old = sample(old.NODE_CLASS_MAPPINGS)
    by_today = sample(comfy_host.node_class_mappings(old.DYNAMIC, old.RECIPE_NAME, old.RECIPE_SHA256)[0])
    plain = cs.sample(cs.ModelPatcher(model), noise, positive, negative, steps=3)
    assert torch.equal(by_old, by_today) and not torch.allclose(by_old, plain, atol=1e-3)


def test_recipe_import_reads_the_old_companions_workflow(tmp_path):
    out = tmp_path / "imported.toml"
    r = subprocess.run([sys.executable, str(ROOT / "bin" / "ckptbend"), "recipe", "import", OLD / "workflow_api.json",
                        "--companion", OLD, "-o", out], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert load_recipe(out).sha256 == json.loads((OLD / "companion.json").read_text())["recipe_sha256"]
