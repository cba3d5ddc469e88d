"""LongCat-Image and Ovis-Image: Flux.1's double/single blocks in two new models. Bakes are checked against the
run-time definition on the real `LongCatImageTransformer2DModel` / `OvisImageTransformer2DModel`: the baked
model's forward equals the original's with q (after its qk-norm), k, v or the attention output multiplied by
hooks. diffusers has no single-file converter for either, so the diffusers-named file is proved against the
class, and a ComfyUI-named (BFL) file is shown to bake to exactly the BFL naming of that proved bake. Ovis-Image's
single block `proj_mlp` / `linear1` holds the gated MLP's 2M rows: `linear2`'s attention columns stay [0, h)."""

import pytest
import torch
from diffusers import LongCatImageTransformer2DModel, OvisImageTransformer2DModel
from safetensors.torch import load_file

from _dit import compare, load_strict, recipe, run
from ckptbend.bake import bake
from ckptbend.layouts import detect
from ckptbend.plan import make_plan
from ckptbend.synth import write_checkpoint
from ckptbend.synth.dit import MODEL_PREFIX, build
from ckptbend.synth.flux_relatives import CONFIGS, FAMILIES

pytestmark = pytest.mark.usefixtures("one_thread_no_grad")
H, MLP = 32, 128   # h 2 × 16; MLP ratio 4
CLASSES = {"longcat_image": LongCatImageTransformer2DModel, "ovis_image": OvisImageTransformer2DModel}
NAMES = {"longcat_image": "longcat-image", "ovis_image": "ovis-image"}
ARCHES = tuple(CLASSES)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root, made = tmp_path_factory.mktemp("longcat_ovis"), {}

    def get(arch, layout):
        if (arch, layout) not in made:
            name = f"{arch}-{layout}" + ("" if layout == "diffusers" else ".safetensors")
            made[arch, layout] = write_checkpoint(root / name, arch, layout)
        return made[arch, layout]
    return get


_MODELS = {}


def original(arch):
    if arch not in _MODELS:
        _MODELS[arch] = build(FAMILIES[arch], arch).double()
    return _MODELS[arch]


def from_state(arch, state):
    state = {k.removeprefix(MODEL_PREFIX): v.double() for k, v in state.items()}
    return load_strict(CLASSES[arch](**CONFIGS[arch]).double(), state)


def forward(model):
    g = torch.Generator().manual_seed(123)
    ids = torch.zeros(8, 3)
    ids[:, 1], ids[:, 2] = torch.arange(2).repeat_interleave(4), torch.arange(4).repeat(2)
    return model(hidden_states=torch.randn(1, 8, 8, generator=g, dtype=torch.float64),
                 encoder_hidden_states=torch.randn(1, 5, 24, generator=g, dtype=torch.float64),
                 timestep=torch.tensor([0.37], dtype=torch.float64), img_ids=ids, txt_ids=torch.zeros(5, 3),
                 return_dict=False)[0]


# Run-time multiplies (dit-layouts.md §11) on diffusers' modules, per block kind and stream.
DOUBLE = {"image": {"q": "attn.norm_q", "k": "attn.norm_k", "v": "attn.to_v", "out": "attn.to_out.0"},
          "text": {"q": "attn.norm_added_q", "k": "attn.norm_added_k", "v": "attn.add_v_proj", "out": "attn.to_add_out"}}
SINGLE = {"q": "attn.norm_q", "k": "attn.norm_k", "v": "attn.to_v", "out": "proj_out"}


def _attention_columns(f):
    """proj_out reads [attention (h) | MLP]: the attention output times f before the fused projection."""
    def pre(module, args):
        x = args[0].clone()
        x[..., :H] *= f
        return (x,)
    return pre


def reference(arch, factors, stream=None, blocks=None, model=None):
    model = model or original(arch)
    handles = []
    for group, attr in (("D", "transformer_blocks"), ("S", "single_transformer_blocks")):
        for i, block in enumerate(getattr(model, attr)):
            if blocks is not None and f"{group}{i:02d}" not in blocks:
                continue
            for s in (("image", "text") if group == "D" else (None,)):
                if stream is not None and s != stream:
                    continue
                for proj, f in factors.items():
                    module = block.get_submodule(DOUBLE[s][proj] if group == "D" else SINGLE[proj])
                    if group == "S" and proj == "out":
                        handles.append(module.register_forward_pre_hook(_attention_columns(f)))
                    else:
                        handles.append(module.register_forward_hook(lambda m, a, out, f=f: out * f))
    assert handles
    try:
        return forward(model)
    finally:
        for h in handles:
            h.remove()


def lines(factors):
    return "".join(f"{k} = {v}\n" for k, v in factors.items())


def bake_to(tmp_path, body, src, name="out"):
    out = tmp_path / (name if src.is_dir() else f"{name}.safetensors")
    bake(recipe(body), src, out, progress=False)
    return out


# --- naming --------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("arch", ARCHES)
@pytest.mark.parametrize("layout", ["single", "single_prefixed", "comfy", "transformer_diffusers", "diffusers"])
def test_every_layout_is_named(files, arch, layout):
    ckpt = detect(files(arch, layout))
    assert ckpt.architecture == NAMES[arch]
    assert {s.block for s in ckpt.sites} == {"D00", "D01", "S00", "S01"}


def test_diffusers_named_file_loads_strict_into_the_real_class(files):
    for arch in ARCHES:
        model = from_state(arch, load_file(str(files(arch, "transformer_diffusers"))))
        assert all(torch.equal(model.state_dict()[k], v) for k, v in original(arch).state_dict().items())


def test_ovis_gated_single_block_ranges(files):
    """linear1 = q|k|v + 2M rows (value | gate), linear2 = h + M columns; diffusers: proj_mlp 2M rows, proj_out h + M."""
    got = {(s.key, s.proj): (s.rows, s.cols, s.fused) for s in detect(files("ovis_image", "single")).sites}
    assert got["single_blocks.1.linear1.weight", "v"] == ((2 * H, 3 * H), None, 3 * H + 2 * MLP)
    assert got["single_blocks.1.linear1.bias", "v"] == ((2 * H, 3 * H), None, 3 * H + 2 * MLP)
    assert got["single_blocks.1.linear2.weight", "out"] == (None, (0, H), H + MLP)
    assert ("single_blocks.1.linear2.bias", "out") not in got   # shared with the MLP
    diff = {(s.key, s.proj): (s.rows, s.cols, s.fused) for s in detect(files("ovis_image", "transformer_diffusers")).sites}
    assert diff["single_transformer_blocks.0.proj_out.weight", "out"] == (None, (0, H), H + MLP)
    assert diff["single_transformer_blocks.0.attn.to_v.weight", "v"] == (None, None, None)
    longcat = {(s.key, s.proj): (s.rows, s.fused) for s in detect(files("longcat_image", "single")).sites}
    assert longcat["single_blocks.0.linear1.weight", "v"] == ((2 * H, 3 * H), 3 * H + MLP)


# --- equivalence: baked == run-time multiply --------------------------------------------------------------------------

CASES = [   # (recipe body, factors, stream, blocks)
    ('stream = "image"\n', {"q": 1.7, "k": 0.6, "v": 1.9, "out": 0.55}, "image", ["D00", "D01"]),
    ('stream = "text"\n', {"q": 1.6, "k": 0.7, "v": 1.4, "out": 0.6}, "text", ["D00", "D01"]),
    ('blocks = ["single"]\n', {"q": 1.6, "k": 0.9, "v": 1.5, "out": 1.3}, None, ["S00", "S01"]),
    ("", {"q": 1.3, "k": 1.2, "v": 1.4, "out": 1.25}, None, None),
]   # products q·k and v·out kept away from 1, so the hooks' effect is plain


@pytest.mark.parametrize("arch", ARCHES)
@pytest.mark.parametrize("selector,factors,stream,blocks", CASES)
def test_bake_equals_runtime_multiply(files, tmp_path, arch, selector, factors, stream, blocks):
    out = bake_to(tmp_path, f"[dit.joint]\n{selector}{lines(factors)}", files(arch, "transformer_diffusers"))
    compare(forward(from_state(arch, load_file(str(out)))), reference(arch, factors, stream, blocks),
            forward(original(arch)))


@pytest.mark.parametrize("arch", ARCHES)
def test_bake_of_a_diffusers_folder_equals_runtime_multiply(files, tmp_path, arch):
    factors = CASES[-1][1]
    out = bake_to(tmp_path, f"[dit.joint]\n{lines(factors)}", files(arch, "diffusers"))
    compare(forward(CLASSES[arch].from_pretrained(out / "transformer").double()), reference(arch, factors),
            forward(original(arch)))


@pytest.mark.parametrize("arch", ARCHES)
@pytest.mark.parametrize("layout", ["single", "comfy"])
def test_comfyui_named_bake_is_the_proved_bake_in_comfyuis_names(files, tmp_path, arch, layout):
    """The same recipe on the BFL-named file and on the diffusers-named one: every tensor of the first equals the
    BFL naming (synth's to_original) of the second, so it holds the proved bake."""
    body = f"[dit.joint]\n{lines(CASES[-1][1])}"
    bfl = load_file(str(bake_to(tmp_path, body, files(arch, layout), "bfl")))
    proved = load_file(str(bake_to(tmp_path, body, files(arch, "transformer_diffusers"), "diff")))
    prefix = MODEL_PREFIX if layout == "comfy" else ""
    expected = {prefix + k: v for k, v in FAMILIES[arch].to_original(proved).items()}
    source = load_file(str(files(arch, layout)))
    assert any(not torch.equal(bfl[k], source[k]) for k in expected)
    assert all(torch.equal(bfl[k], v) for k, v in expected.items()), arch
    assert set(bfl) == set(source)


def test_scaling_the_projection_instead_of_the_norm_is_cancelled(files):
    """ComfyUI's literal way (the q projection) against ckptbend's (the norm weight): the RMSNorm undoes it."""
    state = {k: v.double() for k, v in load_file(str(files("ovis_image", "transformer_diffusers"))).items()}
    base = forward(original("ovis_image"))
    q = "single_transformer_blocks.0.attn.to_q."
    literal = dict(state, **{q + p: state[q + p] * 1.7 for p in ("weight", "bias")})
    leak = (forward(from_state("ovis_image", literal)) - base).abs().max().item()
    effect = (reference("ovis_image", {"q": 1.7}, blocks=["S00"]) - base).abs().max().item()
    assert effect > 1e-2 and leak < 1e-3 * effect, (effect, leak)


# --- what the user sees ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("arch", ARCHES)
def test_inspect_names_model_blocks_streams_and_qk_targets(files, arch):
    r = run("inspect", files(arch, "comfy"))
    assert r.returncode == 0, r.stderr
    assert f"architecture: {NAMES[arch]}" in r.stdout
    assert "D01   joint (streams: image, text) qk-norm" in r.stdout and "S01   joint qk-norm" in r.stdout
    assert "q/k factors scale: model.diffusion_model.double_blocks.N.img_attn.norm.key_norm.scale" in r.stdout


def test_plan_lists_the_gated_fused_ranges(files):
    plan = make_plan(recipe('[dit.joint]\nblocks = ["S01"]\nv = 1.5\nout = 0.5\n'), detect(files("ovis_image", "single")))
    text = "\n".join(plan.describe())
    assert f"single_blocks.1.linear1.weight rows {2 * H}:{3 * H}  ×1.5  (dit.joint.v)" in text
    assert f"single_blocks.1.linear2.weight columns 0:{H}  ×0.5  (dit.joint.out)" in text


@pytest.mark.parametrize("arch", ARCHES)
def test_a_recipe_for_the_architecture_applies_and_a_flux_recipe_does_not(files, tmp_path, arch):
    for name, code in ((NAMES[arch], 0), ("flux", 2)):
        (tmp_path / "r.toml").write_text(f'schema = 1\nname = "r"\narchitecture = "{name}"\n[dit.joint]\nv = 1.5\n')
        r = run("bake", tmp_path / "r.toml", files(arch, "single"), "-o", tmp_path / "o.safetensors", "--dry-run")
        assert r.returncode == code, (name, r.stderr)


# --- quantised files: the proved bake's factor on every dequantised value -----------------------------------------

@pytest.mark.parametrize("arch", ARCHES)
@pytest.mark.parametrize("form", ["q8_0", "fp8mixed"])
def test_quantised_files_bake_by_the_proved_factor_map(files, tmp_path, arch, form):
    """Powers of two (exact in GGUF block scales and fp32, and in fp8 but for its subnormals): each dequantised
    value of the baked file is the source value times the factor the proved bake (the fp32 ComfyUI-named file,
    shown above to be the diffusers bake in ComfyUI's names) gives that value. GGUF files say `flux`, as
    ComfyUI-GGUF writes them."""
    from _comfy_kitchen import dequantised
    from _dit import gguf_state

    body = '[dit.joint]\nq = 2.0\nk = 2.0\nv = 0.5\nout = 0.5\n'
    plain = load_file(str(files(arch, "single")))
    factor = {k: torch.where(v == 0, 1.0, b.double() / v.double())
              for k, b in load_file(str(bake_to(tmp_path, body, files(arch, "single"), "plain"))).items()
              if (v := plain[k]).is_floating_point()}
    suffix = "gguf" if form.startswith("q") else "safetensors"
    src = write_checkpoint(tmp_path / f"src.{suffix}", arch, "single", dtype=form)
    out = tmp_path / f"out.{suffix}"
    bake(recipe(body), src, out, progress=False)
    read = gguf_state if form.startswith("q") else dequantised
    before, after = read(src), read(out)
    if form.startswith("q"):
        assert detect(src).architecture == NAMES[arch] and b"flux" in src.read_bytes()[:4096]
    scaled = [k for k in factor if not torch.all(factor[k] == 1)]
    assert scaled and set(after) == set(before)
    for k in scaled:   # fp8: a value pushed into or through the subnormals rounds by at most one step of the
        #               smallest subnormal, 2^-9 of the scale (= amax / 448); ckptbend reports those as requantised
        step = 0.0 if form.startswith("q") else before[k].abs().max().item() / 448 * 2 ** -9 * 1.001   # scale rounded
        assert (after[k] - before[k] * factor[k]).abs().max().item() <= step, (arch, k)
    assert all(torch.equal(after[k], before[k]) for k in before if k not in scaled)
