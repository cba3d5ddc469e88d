"""Helpers for the diffusion-transformer tests: run-time hooks, forwards in float64, scaled-fp8 dequantisation."""

import torch
from safetensors.torch import load_file

from ckptbend.recipe import parse_recipe

SCALE_SUFFIXES = (".scale_weight", ".scale_input")


def recipe(body: str):
    return parse_recipe('schema = 1\nname = "t"\n' + body)


def hook_outputs(model, factors: dict[str, float]) -> int:
    """Multiply the output of each named submodule by its factor at run time (the semantics a bake must match)."""
    modules = dict(model.named_modules())
    for name, f in factors.items():
        modules[name].register_forward_hook(lambda m, args, out, f=f: out * f)
    assert factors, "a hook must be set, or the comparison proves nothing"
    return len(factors)


def load_strict(model, state):
    result = model.load_state_dict(state, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    return model.eval()


def dequantised(path) -> dict:
    """A safetensors file's tensors in float64; ComfyUI scaled fp8 weights times their scale_weight, the
    scale tensors and the marker dropped."""
    raw = load_file(str(path))
    out = {}
    for k, t in raw.items():
        if k.endswith(SCALE_SUFFIXES) or k.endswith("scaled_fp8"):
            continue
        scale = raw.get(k.removesuffix("weight") + "scale_weight") if k.endswith(".weight") else None
        out[k] = t.double() * scale.double() if scale is not None else (t.double() if t.is_floating_point() else t)
    return out


def compare(baked, reference, plain, rtol=1e-5):
    """The hooks must change the output, and the baked model must give the hooked output to float rounding."""
    scale = max(1.0, reference.abs().max().item())
    effect = (reference - plain).abs().max().item()
    err = (baked - reference).abs().max().item()
    assert effect > 1e-3 * scale, f"the factors must change the output (effect {effect:g})"
    assert err <= rtol * scale, f"baked differs from run-time hooks by {err:g} (scale {scale:g})"
    return effect, err


class _Result:
    def __init__(self, r):
        self.returncode, self.stdout, self.stderr = r.exit_code, r.stdout, r.stderr


def run(*args):
    """The CLI in-process (as `bin/ckptbend` runs it, without a new interpreter per call)."""
    from click.testing import CliRunner

    from ckptbend.cli import cli
    return _Result(CliRunner().invoke(cli, [str(a) for a in args], prog_name="ckptbend"))


def gguf_state(path) -> dict:
    """A GGUF file's tensors dequantised by gguf-py, in float64 and their torch shapes (ComfyUI-GGUF's orig_shape)."""
    import gguf
    import numpy as np

    reader = gguf.GGUFReader(str(path))
    out = {}
    for t in reader.tensors:
        field = reader.get_field(f"comfy.gguf.orig_shape.{t.name}")
        shape = tuple(int(field.parts[i][0]) for i in field.data) if field else tuple(int(d) for d in reversed(t.shape))
        values = gguf.quants.dequantize(np.array(t.data), t.tensor_type)
        out[t.name] = torch.from_numpy(np.ascontiguousarray(values, dtype=np.float64)).reshape(shape)
    return out
