"""Attention tensors ckptbend cannot scale faithfully are refused at detection, in one line, by `inspect`,
`bake --dry-run` and `bake` alike: a bias whose weight is missing or stored as quantiser parts (a bias is
never scaled alone), a site of the wrong rank, a fused q|k|v / q|k|v|MLP / attention|MLP tensor whose
length is not the one its layout is cut for. The files are tiny synthetic checkpoints with the real
class's parameter names, then edited one tensor at a time."""

import re

import pytest
import torch
from safetensors.torch import load_file, save_file

from _dit import recipe, run
from ckptbend.errors import CkptbendError
from ckptbend.layouts import detect
from ckptbend.plan import make_plan

RECIPE = ('schema = 1\nname = "r"\n[dit.joint]\nq = 1.1\nv = 1.2\nout = 0.5\n[dit.self]\nv = 1.2\n'
          '[dit.cross]\nv = 1.3\n[unet.self]\nv = 1.1\n[clip]\nv = 1.1\n')


def edited(tmp_path, src, changes: dict, name="edited.safetensors"):
    """`src` with tensors replaced (a tensor), removed (None) or renamed into several (a dict)."""
    state = load_file(src)
    for key, new in changes.items():
        old = state.pop(key)
        if isinstance(new, dict):
            state.update({k: v(old) for k, v in new.items()})
        elif new is not None:
            state[key] = new(old) if callable(new) else new
    save_file(state, tmp_path / name)
    return tmp_path / name


def refused_everywhere(tmp_path, path, *needles):
    """inspect, --dry-run and bake each end with one error line naming the problem; nothing is written."""
    recipe_file = tmp_path / "r.toml"
    recipe_file.write_text(RECIPE)
    out = tmp_path / "out.safetensors"
    for args in (["inspect", path], ["bake", recipe_file, path, "-o", out, "--dry-run", "--allow-missing"],
                 ["bake", recipe_file, path, "-o", out, "--allow-missing"]):
        r = run(*args)
        assert r.returncode == 2, (args[0], r.stdout, r.stderr)
        errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and "Traceback" not in r.stderr, r.stderr
        assert all(n in errors[0] for n in needles), errors[0]
    assert not out.exists()
    return errors[0]


FLUX_D0 = "double_blocks.0.img_attn."
QUANTO = {"weight._data": lambda w: (w * 100).to(torch.int8), "weight._scale": lambda w: torch.full((w.shape[0], 1), 0.01)}


def quanto(module):
    """optimum-quanto's form of a quantised Linear weight: int8 codes `._data` and a per-row `._scale`."""
    return {module + "." + part: make for part, make in QUANTO.items()}


@pytest.mark.parametrize("arch,key,what", [
    ("wan21_t2v", "blocks.0.self_attn.v.weight", "quanto"),                     # v: weight + bias
    ("wan21_t2v", "blocks.1.cross_attn.o.weight", "quanto"),                    # out: weight + bias
    ("flux_dev", FLUX_D0 + "qkv.weight", "quanto"),                             # a fused name: was a KeyError
    ("flux_dev", FLUX_D0 + "qkv.weight", "missing"),
    ("hunyuan_video", "single_blocks.0.linear1.weight", "missing"),
])
def test_a_bias_is_never_scaled_without_its_weight(tmp_path, synth_file, arch, key, what):
    module = key.removesuffix(".weight")
    path = edited(tmp_path, synth_file(arch), {key: quanto(module) if what == "quanto" else None})
    message = refused_everywhere(tmp_path, path, module)
    assert ("optimum-quanto" in message) if what == "quanto" else "never scaled without its weight" in message


def test_a_quanto_weight_without_bias_is_refused_by_name(tmp_path, synth_file):
    """T5 projections have no bias: the quantiser parts alone must still be refused, not silently skipped."""
    key = "blocks.0.self_attn.q.weight"   # a projection whose factor the qk-norm takes: no site of its own
    path = edited(tmp_path, synth_file("wan21_t2v"), {key: quanto(key.removesuffix(".weight"))})
    refused_everywhere(tmp_path, path, "optimum-quanto", "blocks.0.self_attn.q.weight._")


def one_dim(t):
    return t.reshape(-1)[:7].clone()


@pytest.mark.parametrize("arch,key,make,needle", [
    ("flux_dev", FLUX_D0 + "qkv.weight", lambda t: t[:-1].clone(), "needs 96 rows"),   # [95, 32]: was scaled 64:95
    ("flux_dev", FLUX_D0 + "qkv.weight", lambda t: torch.cat([t, t[:1]]), "needs 96 rows"),   # [97, 32]
    ("flux_dev", FLUX_D0 + "qkv.weight", one_dim, "must be 2-D"),                  # was an IndexError
    ("flux_dev", "single_blocks.0.linear2.weight", one_dim, "must be 2-D"),        # was scaled as 160 "columns"
    # linear1 (q|k|v|MLP rows) and linear2 (attention|MLP columns) must agree on the MLP width
    ("flux_dev", "single_blocks.0.linear2.weight", lambda t: t[:, :-1].clone(), "needs 223 rows"),
    ("flux_dev", "single_blocks.0.linear1.weight", lambda t: torch.cat([t, t[:3]]), "needs 224 rows"),
    ("flux_dev", "single_blocks.0.linear1.bias", lambda t: torch.tensor(1.0), "must be 1-D"),
    ("sd3_medium", "joint_blocks.0.x_block.attn.qkv.bias", lambda t: torch.tensor(1.0), "must be 1-D"),   # IndexError
    ("sd3_medium", "joint_blocks.0.x_block.attn.qkv.weight", lambda t: t[:-1].clone(), "needs 96 rows"),  # // 3
    ("ltx_video", "transformer_blocks.0.attn1.to_q.weight", one_dim, "must be 2-D"),   # was an IndexError
    ("wan21_t2v", "blocks.0.self_attn.norm_q.weight", lambda t: t.reshape(1, -1), "must be 1-D"),
    ("wan21_t2v", "blocks.0.self_attn.v.bias", lambda t: t[:-1].clone(), "entries but its weight"),
])
def test_odd_shapes_are_refused_in_one_line(tmp_path, synth_file, arch, key, make, needle):
    path = edited(tmp_path, synth_file(arch), {key: make})
    refused_everywhere(tmp_path, path, key.rpartition(".")[0][:-1], needle)


def test_openclip_in_proj_must_hold_three_widths(tmp_path, synth_file):
    path = synth_file("sdxl", "text_encoder_openclip")
    key = next(k for k in load_file(path) if k.endswith("resblocks.0.attn.in_proj_weight"))
    with pytest.raises(CkptbendError, match=r"needs \d+ rows"):
        detect(edited(tmp_path, path, {key: lambda t: t[:-2].clone()}))


INDEX = re.compile(r"\.\d+\.")
SHAPES = {"0-D": lambda t: torch.tensor(1.0), "1-D": one_dim, "row-1": lambda t: t[:-1].clone()}


@pytest.mark.parametrize("arch", ["flux_dev", "sd3_medium", "ltx_video"])
def test_no_odd_shape_of_any_site_crashes_detection_or_planning(tmp_path, synth_file, arch):
    """Every kind of site tensor in every odd shape: a one-line refusal, or a plan (a whole-tensor factor on a
    norm weight of another length is still exact); never another exception."""
    src = synth_file(arch)
    kinds = {INDEX.sub(".N.", s.key): s.key for s in detect(src).sites}
    outcomes = set()
    for key in kinds.values():
        for shape, make in SHAPES.items():
            path = edited(tmp_path, src, {key: make})
            try:
                make_plan(recipe(RECIPE.split("\n", 2)[2]), detect(path), allow_missing=True)
                outcomes.add("planned")
            except CkptbendError as e:
                assert "\n" not in e.message
                outcomes.add("refused")
    assert "refused" in outcomes   # (an odd norm length is "planned": the whole vector is scaled)
