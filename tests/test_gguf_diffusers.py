"""Baked GGUF files loaded by diffusers' own GGUF support (`from_single_file(..., quantization_config=
GGUFQuantizationConfig(...))`, a local config: no hub): the tiny Flux.1-dev and Wan 2.1 transformers run forwards
equal to a model holding the original's dequantised weights times the recipe's factors.

diffusers' Flux converter hard-codes Flux's width 3072; it runs here as tests/_dit_flux.py runs it elsewhere, its
own source with that constant read from the file (the tiny model's width)."""

import gguf
import numpy as np
import pytest
import torch

from _dit_flux import CONVERTERS, empty, inputs as flux_inputs
from _gguf import FLUX, WAN, bake, factors, made  # noqa: F401  (made: a fixture)
from _helpers import load_strict
from ckptbend.synth import flux as synth_flux
from ckptbend.synth import wan as synth_wan

pytest.importorskip("accelerate")      # diffusers' GGUF loading needs it (a test dependency)

import diffusers  # noqa: E402
import diffusers.loaders.single_file_model as single_file_model  # noqa: E402
from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers  # noqa: E402

WAN_ARCH = "wan21_t2v"


def _wan():
    cls, config, *_ = synth_wan.ARCHES[WAN_ARCH]
    return getattr(diffusers, cls)(**config).eval()


MODELS = {"flux": (lambda: synth_flux.build_transformer("flux_dev", "tiny", 0), "FluxTransformer2DModel"),
          "wan": (_wan, synth_wan.ARCHES[WAN_ARCH][0])}


def wan_inputs():
    g = torch.Generator().manual_seed(123)
    config = synth_wan.ARCHES[WAN_ARCH][1]
    return dict(hidden_states=torch.randn(1, config["in_channels"], 2, 4, 4, generator=g, dtype=torch.float64),
                timestep=torch.tensor([0.37], dtype=torch.float64),
                encoder_hidden_states=torch.randn(1, 5, 24, generator=g, dtype=torch.float64), return_dict=False)


def forward(model, arch, dtype):
    kwargs = flux_inputs("flux_dev") if arch == "flux" else wan_inputs()
    kwargs = {k: v.to(dtype) if torch.is_tensor(v) and v.is_floating_point() else v for k, v in kwargs.items()}
    with torch.no_grad():
        return model(**kwargs)[0].double()


@pytest.fixture(scope="module")
def config_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("configs")
    for arch, (build, _) in MODELS.items():
        build().save_config(root / arch / "transformer")
    return root


def load_gguf(path, arch, config_dir, monkeypatch):
    """The file as diffusers loads a GGUF: quantised Linear weights kept as GGUFParameter, dequantised per call."""
    cls = getattr(diffusers, MODELS[arch][1])
    if arch == "flux":
        monkeypatch.setitem(single_file_model.SINGLE_FILE_LOADABLE_CLASSES["FluxTransformer2DModel"],
                            "checkpoint_mapping_fn", CONVERTERS["flux_dev"])
    model = cls.from_single_file(str(path), config=str(config_dir / arch), subfolder="transformer",
                                 quantization_config=diffusers.GGUFQuantizationConfig(compute_dtype=torch.float32),
                                 torch_dtype=torch.float32)
    assert any(type(p).__name__ == "GGUFParameter" for p in model.parameters())
    return model.eval()


def reference(path, arch, scaled=True):
    """A float64 model of the original's weights, dequantised by gguf-py, times what the recipe asks (`scaled`)."""
    reader, state = gguf.GGUFReader(path), {}
    for t in reader.tensors:
        shape = tuple(int(d) for d in reversed(t.shape))
        values = gguf.quants.dequantize(np.array(t.data), t.tensor_type).astype(np.float64).reshape(shape)
        state[t.name] = torch.from_numpy(values * factors(arch, t.name, shape) if scaled else values)
    if arch == "flux":
        return load_strict(empty("flux_dev"), CONVERTERS["flux_dev"](state))
    return load_strict(_wan().double(), convert_wan_transformer_to_diffusers(state))


@pytest.mark.parametrize("arch, form", [("flux", "q8_0"), ("flux", "q4_1"), ("wan", "q8_0"), ("wan", "q5_0")])
def test_diffusers_runs_the_baked_gguf_as_factor_times_original(made, tmp_path, config_dir, monkeypatch, arch, form):
    src = made(arch, form)
    out, _ = bake(src, tmp_path, {"flux": FLUX, "wan": WAN}[arch])
    want = forward(reference(src, arch), arch, torch.float64)
    baked = forward(load_gguf(out, arch, config_dir, monkeypatch), arch, torch.float32)
    plain = forward(load_gguf(src, arch, config_dir, monkeypatch), arch, torch.float32)
    # diffusers dequantises in fp16 (d·q + m rounded): how far its forward of the original is from gguf-py's values
    floor = (plain - forward(reference(src, arch, scaled=False), arch, torch.float64)).abs().max()
    error = (baked - want).abs().max()
    assert error <= 2 * floor + 1e-3 * want.abs().max()    # + one fp16 rounding of each block scale
    assert (plain - want).abs().max() > 20 * error         # what the factors change, far above that
