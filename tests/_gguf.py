"""Shared by the GGUF tests: tiny GGUF files of Flux, Wan and SDXL (ComfyUI-GGUF's layout), the recipes they bake
and what each recipe asks of every element."""

import numpy as np
import pytest
from safetensors.torch import load_file

from _dit import run

from ckptbend.synth import write_checkpoint
from ckptbend.synth.gguf import write_model

H = 32                              # the tiny models' width
FLUX = 'schema = 1\nname = "t"\n[dit.joint]\nv = 1.5\nout = 0.75\nq = 1.25\n'
WAN = 'schema = 1\nname = "t"\n[dit.self]\nv = 1.5\nout = 0.75\n[dit.cross]\nk = 0.5\n'
SDXL = 'schema = 1\nname = "t"\n[unet.self]\nv = 1.5\nout = 0.75\n[unet.cross]\nk = 0.5\n'


def factors(arch: str, key: str, shape) -> np.ndarray:
    """What the recipes above ask of each element of a tensor (torch shape), from the models' own layouts."""
    f = np.ones(shape, dtype=np.float64)
    if arch == "flux":
        if key.endswith(("qkv.weight", "qkv.bias", "linear1.weight", "linear1.bias")):
            f[2 * H:3 * H] = 1.5
        elif key.endswith(("attn.proj.weight", "attn.proj.bias")):
            f *= 0.75
        elif key.endswith("linear2.weight"):
            f[:, :H] = 0.75
        elif key.endswith("query_norm.scale"):
            f *= 1.25
    elif arch == "wan":
        f *= {"self_attn.v": 1.5, "self_attn.o": 0.75, "cross_attn.norm_k": 0.5}.get(key.split(".", 2)[-1].rsplit(".", 1)[0],
                                                                                1.0)
    elif arch == "sdxl":
        f *= {"attn1.to_v": 1.5, "attn1.to_out.0": 0.75, "attn2.to_k": 0.5}.get(".".join(key.split(".")[-3:-1])
                                                                                 if "to_out" not in key else
                                                                                 ".".join(key.split(".")[-4:-1]), 1.0)
    return f


@pytest.fixture(scope="session")
def made(tmp_path_factory):
    """GGUF files of tiny Flux.1-dev, Wan 2.1 T2V and SDXL UNets, by form; attention (32 × 32) quantised too."""
    root, states, files = tmp_path_factory.mktemp("gguf"), {}, {}
    archs = {"flux": "flux_dev", "wan": "wan21_t2v", "sdxl": "sdxl"}

    def make(arch, form):
        if arch not in states:
            single = write_checkpoint(root / f"{arch}.safetensors", archs[arch], dtype=None)
            states[arch] = load_file(str(single))
        if (arch, form) not in files:
            files[arch, form] = write_model(root / f"{arch}-{form}.gguf", states[arch], form, archs[arch], small=256)
        return files[arch, form]
    return make


def bake(src, tmp_path, body, *extra):
    (tmp_path / "r.toml").write_text(body)
    out = tmp_path / "out.gguf"
    r = run("bake", tmp_path / "r.toml", src, "-o", out, "-q", *extra)
    assert r.returncode == 0, r.stderr
    return out, r
