"""bin/check-comfyui's `gguf` check: a GGUF baked by ckptbend, loaded by ComfyUI-GGUF's own UnetLoaderGGUF
node inside the real ComfyUI, dequantised by ComfyUI-GGUF's own dequantize_tensor and sampled by comfy.sample.

The tiny Flux GGUF comes from `ckptbend synth`, the bake from `ckptbend bake` (the CLI, as a user runs them).
Expected: every tensor the recipe does not reach is bit-identical after dequantisation; every reached
element is f × the original's, up to one fp16 rounding of each scale field of its block (block-relative
2^-11, or 3·2^-11 where a value is d·q + m; F32 values: exact). Dequantised in float32 (dequant_dtype): by
default ComfyUI-GGUF multiplies scale and code in fp16, which adds an fp16 rounding of each product on both
sides. Which tensors and rows a factor reaches is stated here from ComfyUI's own Flux code
(comfy/ldm/flux/layers.py): qkv and linear1 rows are [q; k; v; (mlp)], linear2's columns [attention; mlp],
and q/k are RMS-normalised right after projection, so their factors land on the norms' scales.
The bake's sample is compared with the original's under ComfyUI's own run-time weight patches of the same
factors (ModelPatcher.add_patches, as ComfyUI's attention multiply nodes use it): within 1% of the change
those patches make (the scales' fp16 rounding, carried through three sampling steps).
"""

import asyncio
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent.parent
FACTORS = {"q": 1.25, "k": 0.8, "v": 1.5, "out": 0.75}
RECIPE = 'schema = 1\nname = "gguf-check"\n[[dit.joint]]\n' + "".join(f"{k} = {v}\n" for k, v in FACTORS.items())
SCALE_ROUNDING = 2.0 ** -11                  # one fp16 rounding of a block scale, relative
WITH_MIN = {"Q4_1", "Q5_1", "Q2_K", "Q4_K", "Q5_K"}   # x = d·q + m: |d·q| + |m| ≤ 3 × the block's largest |x|


def bound(kind: str) -> float:
    """Largest |baked − f·x| over the block's largest |f·x| (+ float32's rounding of f·x)."""
    return SCALE_ROUNDING * (3 if kind in WITH_MIN else 1) + 2.0 ** -22


def block_error(y: torch.Tensor, expected: torch.Tensor, moved: torch.Tensor, kind: str) -> float:
    """Per quantisation block (a row's run of gguf's block size; single elements for F32/F16)."""
    import gguf
    types = gguf.GGMLQuantizationType
    size = gguf.GGML_QUANT_SIZES[types[kind]][0] if kind in types.__members__ else 1
    top = expected.abs().reshape(-1, size).amax(1, keepdim=True).expand(-1, size).reshape(expected.shape)
    return float(((y - expected).abs() / top)[moved].max())


def flux_reach(key: str, hidden: int):
    """(index, factor's name) for a Flux tensor the recipe reaches, else None (ComfyUI's Flux layout)."""
    v_rows, attention_columns = slice(2 * hidden, 3 * hidden), (slice(None), slice(0, hidden))
    table = (("norm.query_norm.scale", ..., "q"), ("norm.key_norm.scale", ..., "k"),
             ("attn.qkv.weight", v_rows, "v"), ("attn.qkv.bias", v_rows, "v"),
             ("attn.proj.weight", ..., "out"), ("attn.proj.bias", ..., "out"),
             ("linear1.weight", v_rows, "v"), ("linear1.bias", v_rows, "v"),
             ("linear2.weight", attention_columns, "out"))
    for suffix, index, factor in table:
        if key.endswith(suffix) and key.split(".")[0] in ("double_blocks", "single_blocks"):
            return index, factor
    return None


def tiny_flux_widths():
    """ComfyUI's Flux detection (comfy/model_detection.py) fixes the full-size widths: 3072 hidden, 24 heads,
    4096 context, mlp ratio 4. Wrap it (for this process only) to read the tiny file's widths from the state
    dict; the loader node, the ops, load_diffusion_model_state_dict and the patcher run as shipped."""
    import comfy.model_detection as detection
    detect = detection.detect_unet_config

    def widths(state_dict, key_prefix, metadata=None):
        config = detect(state_dict, key_prefix, metadata=metadata)
        if config and config.get("image_model") == "flux":
            shape = lambda key: state_dict[key_prefix + key].shape  # noqa: E731
            hidden, head = shape("img_in.weight")[0], shape("double_blocks.0.img_attn.norm.key_norm.scale")[0]
            config.update(hidden_size=hidden, num_heads=hidden // head, context_in_dim=shape("txt_in.weight")[1],
                          mlp_ratio=shape("double_blocks.0.img_mlp.0.weight")[0] / hidden,
                          axes_dim=[head - 2 * (head * 3 // 8), head * 3 // 8, head * 3 // 8])
        return config

    detection.detect_unet_config = widths


def ckptbend(*args):
    env = {**os.environ, "PYTHONPATH": str(HERE)}
    r = subprocess.run([sys.executable, str(HERE / "bin" / "ckptbend"), *map(str, args)], capture_output=True,
                       text=True, env=env)
    assert r.returncode == 0, r.stderr
    return (r.stdout + r.stderr).strip().splitlines()[-1]


def gguf_loader(gguf_nodes: Path):
    """ComfyUI-GGUF loaded by ComfyUI's own custom-node loader: its UnetLoaderGGUF class and its dequant module."""
    import nodes
    loaded = nodes.load_custom_node(str(gguf_nodes))
    assert (asyncio.run(loaded) if asyncio.iscoroutine(loaded) else loaded), "ComfyUI did not load ComfyUI-GGUF"
    cls = nodes.NODE_CLASS_MAPPINGS["UnetLoaderGGUF"]
    package = cls.__module__.rsplit(".", 1)[0]
    return cls, sys.modules[package + ".dequant"]


def plain(t: torch.Tensor) -> torch.Tensor:
    """A plain-tensor copy (F32/F16 parameters dequantise to ComfyUI-GGUF's GGMLTensor subclass itself)."""
    with torch._C.DisableTorchFunctionSubclass():
        return t.as_subclass(torch.Tensor).detach().clone()


def check_gguf(gguf_nodes: Path, sample, dtypes=("q8_0", "q4_1")):
    """Q8_0 (one scale d per block) and Q4_1 (d and the block minimum m, both scaled)."""
    import folder_paths

    cls, dequant = gguf_loader(gguf_nodes)
    folder = Path(tempfile.mkdtemp())
    (folder / "r.toml").write_text(RECIPE)
    folder_paths.add_model_folder_path("diffusion_models", str(folder))
    tiny_flux_widths()
    for dtype in dtypes:
        check_file(cls, dequant, folder, dtype, sample)


def runtime_patched(patcher, hidden: int):
    """The original with the recipe's factors applied at run time by ComfyUI's own weight patches, as its
    attention multiply nodes apply theirs (add_patches({key: (None,)}, 0.0, f): the weight times f), a row
    or column range through a patch's offset (dim, start, length). ComfyUI-GGUF's ops apply them after
    dequantising."""
    m = patcher.clone()
    for key in dict(m.model.named_parameters()):
        reach = flux_reach(key.removeprefix("diffusion_model."), hidden)
        if reach is None:
            continue
        index, name = reach
        dim, span = (0, index) if isinstance(index, slice) else (1, index[1]) if index is not ... else (None, None)
        target = key if dim is None else (key, (dim, span.start, span.stop - span.start))
        assert m.add_patches({target: (None,)}, 0.0, FACTORS[name]), key
    return m


def inputs(config: dict):
    g = torch.Generator().manual_seed(1)
    cond = [[torch.randn(1, 8, config["context_in_dim"], generator=g),
             {"pooled_output": torch.randn(1, config["vec_in_dim"], generator=g)}]]
    return (1, config["in_channels"], 8, 8), cond


def check_file(cls, dequant, folder: Path, dtype: str, sample):
    names = f"flux-{dtype}.gguf", f"flux-{dtype}-baked.gguf"
    print("  " + ckptbend("synth", "flux_dev", folder / names[0], "--dtype", dtype))
    print("  " + ckptbend("bake", folder / "r.toml", folder / names[0], "-o", folder / names[1]))
    original, baked = (getattr(cls(), cls.FUNCTION)(unet_name=name)[0] for name in names)
    assert type(baked).__name__ == "GGUFModelPatcher", type(baked)
    config = baked.model.model_config.unet_config
    hidden = config["hidden_size"]

    a = dict(original.model.diffusion_model.named_parameters())
    b = dict(baked.model.diffusion_model.named_parameters())
    assert a.keys() == b.keys() and a
    types, identical, scaled, error = {}, 0, 0, {}
    for key in a:
        kind = getattr(getattr(b[key], "tensor_type", None), "name", "plain parameter")   # copied into ComfyUI's own
        types[kind] = types.get(kind, 0) + 1
        x, y = (plain(dequant.dequantize_tensor(t, torch.float32, torch.float32)) for t in (a[key], b[key]))
        reach = flux_reach(key, hidden)
        expected = x.clone()
        if reach is not None:
            expected[reach[0]] *= FACTORS[reach[1]]
            scaled += 1
        else:
            identical += 1
        kept = expected == x                            # elements no factor reaches: bit for bit
        assert torch.equal(y[kept], x[kept]), key
        moved = ~kept
        if moved.any():
            error[kind] = max(error.get(kind, 0.0), block_error(y, expected, moved, kind))
    print(f"  ComfyUI-GGUF loaded both ({', '.join(f'{k} {n}' for k, n in sorted(types.items()))} parameters); "
          f"{identical} tensors not reached: identical after dequantize_tensor; {scaled} reached: largest "
          f"|baked − f × original| over its block's largest |f × original|: "
          + ", ".join(f"{k} {e:.3g} (bound {bound(k):.3g})" for k, e in sorted(error.items())))
    assert scaled and all(e <= bound(k) for k, e in error.items())

    shape, cond = inputs(config)
    before, ours = sample(original, shape, cond, cond, cfg=1.0), sample(baked, shape, cond, cond, cfg=1.0)
    theirs = sample(runtime_patched(original, hidden), shape, cond, cond, cfg=1.0)
    assert torch.isfinite(ours).all() and ours.shape == shape
    change, apart = float((theirs - before).abs().max()), float((ours - theirs).abs().max())
    print(f"  sampled through comfy.sample (3 euler steps): ComfyUI's run-time patches of the same factors move "
          f"the original's sample by {change:.3g}; the baked file's sample differs from theirs by {apart:.3g} "
          f"({apart / change:.2g} of that)")
    assert change > 1e-3 and apart < 1e-2 * change
