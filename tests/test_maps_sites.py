"""Maps of a layer that records two attentions (Motif-Video: each block's joint `attn`, then its text `cross_attn`,
both the block's layer): every record names its site, the file keeps it, and `ckptbend maps` renders a labelled
column per (layer, site), so neither hides the other. Several records of one (step, layer, site) (a second-order
sampler's two calls) still show the last; a file without sites (written before, or one attention per layer) renders
a column per layer as before."""

import types

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from diffusers.models.transformers import transformer_motif_video as tm
from PIL import Image

import comfy_standin_joint as cj
from ckptbend.errors import CkptbendError
from ckptbend.maps_render import CELL, GAP, LABEL, _columns, _tile, render_file
from ckptbend.runtime import diffusers_host as dh
from ckptbend.runtime.maps import load_maps, save_maps

CONFIG = dict(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8, num_layers=1,
              num_single_layers=1, num_decoder_layers=0, mlp_ratio=2.0, text_embed_dim=16, image_embed_dim=None,
              rope_axes_dim=(2, 2, 4), enable_text_cross_attention_dual=True, enable_text_cross_attention_single=True)
F_, H, W, TEXT = 1, 3, 4, 5

pytestmark = pytest.mark.usefixtures("one_thread_no_grad")


def cell(sheet, column, row):
    x, y = LABEL * 4 + column * (2 * CELL + 2 * GAP), LABEL + row * (CELL + GAP)
    return sheet.crop((x, y, x + 2 * CELL + GAP, y + CELL))


def same_image(a, b):
    return a.size == b.size and a.tobytes() == b.tobytes()


def test_motif_video_maps_keep_both_attentions_of_a_layer(tmp_path):
    """A real Motif-Video phase-1 call (one dual, one single block, both with cross_attn): 4 maps, each its own cell."""
    model = cj.seeded_transformer(tm.MotifVideoTransformer3DModel, CONFIG, 5)
    g = torch.Generator().manual_seed(1)
    scheduler = FlowMatchEulerDiscreteScheduler()
    scheduler.set_timesteps(2)
    pipe = types.SimpleNamespace(transformer=model, scheduler=scheduler)
    session = dh.apply(pipe, {"bending": [{"token": "sunset", "mode": "translate", "translate_x": 0.5}]}, phase=1)
    session.token_indices = {"sunset": [1, 2]}
    try:
        model(hidden_states=torch.randn(1, 4, F_, 2 * H, 2 * W, generator=g),
              encoder_hidden_states=torch.randn(1, TEXT, 16, generator=g), timestep=scheduler.timesteps[:1])
    finally:
        dh.remove(pipe)
    records = session.maps
    assert [(r["layer"], r["site"]) for r in records] == [(0, "attn"), (0, "cross_attn"), (1, "attn"),
                                                          (1, "cross_attn")]
    assert not torch.equal(records[0]["original"], records[1]["original"])       # two different attentions
    path = tmp_path / "maps.safetensors"
    save_maps(session, path)
    back = [(r["layer"], r["step"], r["site"]) for r in load_maps(path)]
    assert back == [(r["layer"], 0, r["site"]) for r in records]
    (png,) = render_file(path, tmp_path / "png")
    sheet = Image.open(png).convert("RGB")
    assert sheet.size == (LABEL * 4 + 4 * (2 * CELL + 2 * GAP), LABEL + CELL + GAP)
    for c, r in enumerate(records):
        assert same_image(cell(sheet, c, 0), _tile(r["original"], r["bent"]))


def record(g, layer, step, site=None):
    r = {"token": "kiss", "layer": layer, "step": step, "original": torch.rand(3, 4, generator=g),
         "bent": torch.rand(3, 4, generator=g)}
    return r if site is None else {**r, "site": site}


def test_two_sites_of_one_step_and_layer_each_get_a_labelled_column(tmp_path):
    g = torch.Generator().manual_seed(0)
    records = [record(g, 2, 0, "attn"), record(g, 2, 0, "cross_attn"), record(g, 0, 0, "attn1"),
               record(g, 2, 1, "attn"), record(g, 2, 1, "cross_attn"),
               record(g, 2, 1, "attn"), record(g, 2, 1, "cross_attn")]          # step 1 twice: the last pair shows
    path = tmp_path / "maps.safetensors"
    save_maps(records, path)
    back = load_maps(path)
    assert [r["site"] for r in back] == [r["site"] for r in records]
    assert _columns(back) == {(0, "attn1"): "layer 0", (2, "attn"): "layer 2 attn",
                              (2, "cross_attn"): "layer 2 cross_attn"}
    (png,) = render_file(path, tmp_path / "png")
    sheet = Image.open(png).convert("RGB")
    assert sheet.size == (LABEL * 4 + 3 * (2 * CELL + 2 * GAP), LABEL + 2 * (CELL + GAP))
    shown = {(0, 0): records[2], (1, 0): records[0], (2, 0): records[1], (1, 1): records[5], (2, 1): records[6]}
    for (c, row), r in shown.items():
        assert same_image(cell(sheet, c, row), _tile(r["original"], r["bent"]))
    assert same_image(cell(sheet, 0, 1), Image.new("RGB", (2 * CELL + GAP, CELL), "white"))   # layer 0: no step 1


def test_a_file_without_sites_renders_a_column_per_layer(tmp_path):
    g = torch.Generator().manual_seed(2)
    records = [record(g, 0, 0), record(g, 0, 0), record(g, 1, 0)]        # a second-order sampler's two calls
    save_maps(records, tmp_path / "maps.safetensors")
    back = load_maps(tmp_path / "maps.safetensors")
    assert [r["site"] for r in back] == [None] * 3
    assert _columns(back) == {(0, None): "layer 0", (1, None): "layer 1"}
    (png,) = render_file(tmp_path / "maps.safetensors", tmp_path / "png")
    sheet = Image.open(png).convert("RGB")
    assert sheet.size == (LABEL * 4 + 2 * (2 * CELL + 2 * GAP), LABEL + CELL + GAP)
    assert same_image(cell(sheet, 0, 0), _tile(records[1]["original"], records[1]["bent"]))


def test_a_site_that_is_not_a_name_is_refused_in_one_line(tmp_path):
    path = tmp_path / "maps.safetensors"
    save_maps([record(torch.Generator().manual_seed(3), 0, 0, "attn")], path)
    raw = path.read_bytes()
    old = b'\\"site\\": \\"attn\\"'
    path.write_bytes(raw.replace(old, b'\\"site\\": 7'.ljust(len(old))))         # same length: the header holds
    assert path.read_bytes() != raw
    with pytest.raises(CkptbendError) as e:
        render_file(path, tmp_path / "png")
    assert e.value.message == f"{path}: not a ckptbend maps file: record 0's site must be a non-empty string or null"
