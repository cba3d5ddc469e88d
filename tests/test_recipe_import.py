"""`ckptbend recipe import`: hand-written ComfyUI workflows (UI and API formats), images carrying
them, Attention Bending YAML and baked checkpoints become recipes."""

import copy
import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from safetensors.torch import save_file

from ckptbend.bake import bake
from ckptbend.companion import emit
from ckptbend.errors import CkptbendError
from ckptbend.importers import Options, import_recipe
from ckptbend.layouts import detect
from ckptbend.plan import make_plan
from ckptbend.recipe import load_recipe, parse_recipe
from ckptbend.synth import large_text_encoders as lte
from ckptbend.synth import write_checkpoint

ROOT = Path(__file__).resolve().parent.parent
RECIPES = ROOT / "recipes"


def run(*args):
    return subprocess.run([sys.executable, str(ROOT / "bin" / "ckptbend"), *map(str, args)],
                          capture_output=True, text=True)


def assert_clean_error(result, fragment):
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and fragment in lines[0], result.stderr


def settings(toml_body):
    """The sampling and multiplier settings of a hand-written recipe body (name/description aside)."""
    r = parse_recipe('schema = 1\nname = "x"\n' + toml_body)
    return r.multipliers, r.sag, r.slothful, r.bending


def got(recipe):
    return recipe.multipliers, recipe.sag, recipe.slothful, recipe.bending


def write(path, data):
    path.write_text(json.dumps(data, indent=2))
    return path


def imported(path, **options):
    return import_recipe(path, Options(**options))


# A ComfyUI UI-format workflow as the frontend saves it: loader → self-attention multiply → SAG →
# KSampler, CLIP → CLIP multiply → both text encoders. KSampler's seed widget is followed by its
# control_after_generate value ("randomize").
UI = json.loads("""
{
  "last_node_id": 12, "last_link_id": 21,
  "nodes": [
    {"id": 4, "type": "CheckpointLoaderSimple", "pos": [26, 474], "size": [315, 98], "flags": {}, "order": 0, "mode": 0,
     "inputs": [],
     "outputs": [{"name": "MODEL", "type": "MODEL", "links": [10], "slot_index": 0},
                 {"name": "CLIP", "type": "CLIP", "links": [11], "slot_index": 1},
                 {"name": "VAE", "type": "VAE", "links": [12], "slot_index": 2}],
     "properties": {"Node name for S&R": "CheckpointLoaderSimple"}, "widgets_values": ["sd15.safetensors"]},
    {"id": 5, "type": "UNetSelfAttentionMultiply", "pos": [380, 300], "size": [270, 130], "flags": {}, "order": 1, "mode": 0,
     "inputs": [{"name": "model", "type": "MODEL", "link": 10}],
     "outputs": [{"name": "MODEL", "type": "MODEL", "links": [13], "slot_index": 0}],
     "properties": {"Node name for S&R": "UNetSelfAttentionMultiply"}, "widgets_values": [1.1, 1.1, 1, 1]},
    {"id": 6, "type": "SelfAttentionGuidance", "pos": [700, 300], "size": [270, 82], "flags": {}, "order": 3, "mode": 0,
     "inputs": [{"name": "model", "type": "MODEL", "link": 13}],
     "outputs": [{"name": "MODEL", "type": "MODEL", "links": [14], "slot_index": 0}],
     "properties": {"Node name for S&R": "SelfAttentionGuidance"}, "widgets_values": [0.6, 2]},
    {"id": 7, "type": "CLIPAttentionMultiply", "pos": [380, 500], "size": [270, 130], "flags": {}, "order": 2, "mode": 0,
     "inputs": [{"name": "clip", "type": "CLIP", "link": 11}],
     "outputs": [{"name": "CLIP", "type": "CLIP", "links": [15, 16], "slot_index": 0}],
     "properties": {"Node name for S&R": "CLIPAttentionMultiply"}, "widgets_values": [1, 1, 1, 0.9]},
    {"id": 8, "type": "CLIPTextEncode", "pos": [700, 450], "size": [400, 200], "flags": {}, "order": 4, "mode": 0,
     "inputs": [{"name": "clip", "type": "CLIP", "link": 15}],
     "outputs": [{"name": "CONDITIONING", "type": "CONDITIONING", "links": [17], "slot_index": 0}],
     "properties": {"Node name for S&R": "CLIPTextEncode"}, "widgets_values": ["a lake at sunset"]},
    {"id": 9, "type": "CLIPTextEncode", "pos": [700, 700], "size": [400, 200], "flags": {}, "order": 5, "mode": 0,
     "inputs": [{"name": "clip", "type": "CLIP", "link": 16}],
     "outputs": [{"name": "CONDITIONING", "type": "CONDITIONING", "links": [18], "slot_index": 0}],
     "properties": {"Node name for S&R": "CLIPTextEncode"}, "widgets_values": ["blurry"]},
    {"id": 10, "type": "EmptyLatentImage", "pos": [700, 950], "size": [315, 106], "flags": {}, "order": 6, "mode": 0,
     "inputs": [],
     "outputs": [{"name": "LATENT", "type": "LATENT", "links": [19], "slot_index": 0}],
     "properties": {"Node name for S&R": "EmptyLatentImage"}, "widgets_values": [512, 512, 1]},
    {"id": 3, "type": "KSampler", "pos": [1150, 300], "size": [315, 262], "flags": {}, "order": 7, "mode": 0,
     "inputs": [{"name": "model", "type": "MODEL", "link": 14},
                {"name": "positive", "type": "CONDITIONING", "link": 17},
                {"name": "negative", "type": "CONDITIONING", "link": 18},
                {"name": "latent_image", "type": "LATENT", "link": 19}],
     "outputs": [{"name": "LATENT", "type": "LATENT", "links": [20], "slot_index": 0}],
     "properties": {"Node name for S&R": "KSampler"},
     "widgets_values": [156680208700286, "randomize", 20, 7, "euler", "normal", 1]},
    {"id": 11, "type": "VAEDecode", "pos": [1500, 300], "size": [210, 46], "flags": {}, "order": 8, "mode": 0,
     "inputs": [{"name": "samples", "type": "LATENT", "link": 20}, {"name": "vae", "type": "VAE", "link": 12}],
     "outputs": [{"name": "IMAGE", "type": "IMAGE", "links": [21], "slot_index": 0}],
     "properties": {"Node name for S&R": "VAEDecode"}},
    {"id": 12, "type": "SaveImage", "pos": [1750, 300], "size": [210, 270], "flags": {}, "order": 9, "mode": 0,
     "inputs": [{"name": "images", "type": "IMAGE", "link": 21}],
     "properties": {}, "widgets_values": ["ComfyUI"]}
  ],
  "links": [
    [10, 4, 0, 5, 0, "MODEL"], [11, 4, 1, 7, 0, "CLIP"], [12, 4, 2, 11, 1, "VAE"],
    [13, 5, 0, 6, 0, "MODEL"], [14, 6, 0, 3, 0, "MODEL"], [15, 7, 0, 8, 0, "CLIP"],
    [16, 7, 0, 9, 0, "CLIP"], [17, 8, 0, 3, 1, "CONDITIONING"], [18, 9, 0, 3, 2, "CONDITIONING"],
    [19, 10, 0, 3, 3, "LATENT"], [20, 3, 0, 11, 0, "LATENT"], [21, 11, 0, 12, 0, "IMAGE"]
  ],
  "groups": [{"title": "attention", "bounding": [360, 220, 640, 440], "color": "#3f789e"}],
  "config": {}, "extra": {"ds": {"scale": 1, "offset": [0, 0]}}, "version": 0.4
}
""")

# The same graph in the API format (what the UI queues, and what the image's `prompt` chunk holds).
API = json.loads("""
{
  "3": {"class_type": "KSampler", "inputs": {"seed": 156680208700286, "steps": 20, "cfg": 7, "sampler_name": "euler",
        "scheduler": "normal", "denoise": 1, "model": ["6", 0], "positive": ["8", 0], "negative": ["9", 0],
        "latent_image": ["10", 0]}, "_meta": {"title": "KSampler"}},
  "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "sd15.safetensors"}},
  "5": {"class_type": "UNetSelfAttentionMultiply", "inputs": {"q": 1.1, "k": 1.1, "v": 1, "out": 1, "model": ["4", 0]}},
  "6": {"class_type": "SelfAttentionGuidance", "inputs": {"scale": 0.6, "blur_sigma": 2, "model": ["5", 0]}},
  "7": {"class_type": "CLIPAttentionMultiply", "inputs": {"q": 1, "k": 1, "v": 1, "out": 0.9, "clip": ["4", 1]}},
  "8": {"class_type": "CLIPTextEncode", "inputs": {"text": "a lake at sunset", "clip": ["7", 0]}},
  "9": {"class_type": "CLIPTextEncode", "inputs": {"text": "blurry", "clip": ["7", 0]}},
  "10": {"class_type": "EmptyLatentImage", "inputs": {"width": 512, "height": 512, "batch_size": 1}},
  "11": {"class_type": "VAEDecode", "inputs": {"samples": ["3", 0], "vae": ["4", 2]}},
  "12": {"class_type": "SaveImage", "inputs": {"filename_prefix": "ComfyUI", "images": ["11", 0]}}
}
""")

BASE = """
[unet.self]
q = 1.1
k = 1.1
[clip]
out = 0.9
[sag]
scale = 0.6
"""


def node(workflow, ident):
    return next(n for n in workflow["nodes"] if n["id"] == ident)


def add_node(workflow, spec, links):
    workflow["nodes"].append(spec)
    workflow["links"] += links
    return workflow


def relink(workflow, link_id, *, origin=None, target=None):
    """Point an existing link at another origin (node, slot) and/or target (node, slot)."""
    link = next(l for l in workflow["links"] if l[0] == link_id)
    if origin:
        link[1:3] = origin
    if target:
        link[3:5] = target


def insert_model_node(workflow, ident, kind, widgets, *, mode=0, extra_inputs=(), outputs=None):
    """Put a MODEL → MODEL node between the SAG node (6) and the KSampler (3): link 14 now ends at it."""
    relink(workflow, 14, target=(ident, 0))
    node(workflow, 3)["inputs"][0]["link"] = 99
    return add_node(workflow, {
        "id": ident, "type": kind, "pos": [900, 300], "size": [270, 130], "flags": {}, "order": 6, "mode": mode,
        "inputs": [{"name": "model", "type": "MODEL", "link": 14}, *extra_inputs],
        "outputs": outputs or [{"name": "MODEL", "type": "MODEL", "links": [99], "slot_index": 0}],
        "properties": {"Node name for S&R": kind}, "widgets_values": widgets,
    }, [[99, ident, 0, 3, 0, "MODEL"]])


# --- the node kinds, both formats --------------------------------------------------------------------------

def test_api_and_ui_formats_give_the_same_recipe(tmp_path):
    api = imported(write(tmp_path / "api.json", API)).recipe
    ui = imported(write(tmp_path / "ui.json", UI)).recipe
    assert got(api) == got(ui) == settings(BASE)
    assert api.sha256 != ui.sha256   # names and descriptions differ: each records its own source
    assert "api.json" in api.description and "sampler 3 (KSampler)" in api.description


def test_every_node_kind(tmp_path):
    workflow = copy.deepcopy(API)
    workflow["20"] = {"class_type": "UNetCrossAttentionMultiply",
                      "inputs": {"q": 1, "k": 0.95, "v": 1.05, "out": 1, "model": ["6", 0]}}
    workflow["21"] = {"class_type": "UNetTemporalAttentionMultiply",
                      "inputs": {"self_structural": 1, "self_temporal": 1.2, "cross_structural": 0.9,
                                 "cross_temporal": 1, "model": ["20", 0]}}
    workflow["22"] = {"class_type": "SlothfulAttentionSimple",
                      "inputs": {"time_decay": 1.5, "depth_decay": 0.5, "in_mode": "2D_MAX", "in_strength": 8,
                                 "in_blend": 0.25, "out_mode": "1D_AVG", "out_strength": 3, "out_blend": 0.5,
                                 "model": ["21", 0]}}
    workflow["3"]["inputs"]["model"] = ["22", 0]
    r = imported(write(tmp_path / "all.json", workflow)).recipe
    assert got(r) == settings(BASE + """
[unet.cross]
k = 0.95
v = 1.05
[unet.temporal]
self_temporal = 1.2
cross_structural = 0.9
[slothful]
simple = true
time_decay = 1.5
depth_decay = 0.5
in_mode = "2D_MAX"
in_strength = 8.0
in_blend = 0.25
out_mode = "1D_AVG"
out_strength = 3.0
out_blend = 0.5
""")


def test_ui_slothful_full_node_of_dec_2023(tmp_path):
    workflow = insert_model_node(copy.deepcopy(UI), 30, "SlothfulAttention",
                                 [0.5, False, "1D_MAX", -1, 12, 0.1, 0.2, "2D_AVG", 2, 5, 0.3, 0.4])
    r = imported(write(tmp_path / "ui.json", workflow)).recipe
    assert r.slothful == settings("""
[slothful]
time_decay = 0.5
keep_middle = false
in_mode = "1D_MAX"
in_depth_decay = -1.0
in_strength = 12.0
in_k_blend = 0.1
in_v_blend = 0.2
out_depth_decay = 2.0
out_strength = 5.0
out_k_blend = 0.3
out_v_blend = 0.4
""")[2]


def test_later_slothful_node_is_refused_in_both_formats(tmp_path):
    later = [0.4, 2.0, "2D_AVG", 2.0, 6.0, 0.0, 0.0, "2D_AVG", 2.0, 4.0, 0.0, 0.0]   # peak_time first, no keep_middle
    ui = write(tmp_path / "ui.json", insert_model_node(copy.deepcopy(UI), 30, "SlothfulAttention", later))
    api = copy.deepcopy(API)
    api["30"] = {"class_type": "SlothfulAttention", "inputs": {
        "peak_time": 0.4, "time_decay": 2.0, "in_mode": "2D_AVG", "in_depth_decay": 2.0, "in_slothful": 6.0,
        "in_k_blend": 0, "in_v_blend": 0, "out_mode": "2D_AVG", "out_depth_decay": 2.0, "out_slothful": 4.0,
        "out_k_blend": 0, "out_v_blend": 0, "model": ["6", 0]}}
    api["3"]["inputs"]["model"] = ["30", 0]
    for path in (ui, write(tmp_path / "api.json", api)):
        assert_clean_error(run("recipe", "import", path), "node 30 (SlothfulAttention) is the later Slothful Attention")


def test_chained_nodes_stay_separate_entries_in_chain_order(tmp_path):
    workflow = insert_model_node(copy.deepcopy(UI), 30, "UNetSelfAttentionMultiply", [1.2, 1, 1, 0.8])
    r = imported(write(tmp_path / "ui.json", workflow)).recipe
    # loader → node 5 (q = k = 1.1) → SAG → node 30 (q = 1.2, out = 0.8): two entries, multiplied by the bake
    assert [dict(e.factors) for e in r.multipliers["unet.self"]] == [{"q": 1.1, "k": 1.1}, {"q": 1.2, "out": 0.8}]


def test_the_recipe_text_says_where_everything_came_from(tmp_path):
    workflow = copy.deepcopy(UI)
    node(workflow, 6)["title"] = "SAG\nfor structure"   # a title a user typed, newline included
    result = run("recipe", "import", write(tmp_path / "flow.json", workflow))
    assert result.returncode == 0, result.stderr
    text = result.stdout
    assert "# sampler: node 3 (KSampler)" in text
    assert "node 4 (CheckpointLoaderSimple) loads 'sd15.safetensors'" in text
    assert "# node 5 (UNetSelfAttentionMultiply)\n[[unet.self]]" in text
    assert '# node 6 (SelfAttentionGuidance "SAG for structure")\n[sag]' in text
    assert 'name = "flow"' in text
    assert parse_recipe(text).sha256 == imported(tmp_path / "flow.json").recipe.sha256


def test_sampler_custom_advanced_is_followed_through_its_guider(tmp_path):
    workflow = copy.deepcopy(API)
    del workflow["3"]
    workflow.update({
        "20": {"class_type": "CFGGuider", "inputs": {"cfg": 1.0, "model": ["6", 0], "positive": ["8", 0],
                                                     "negative": ["9", 0]}},
        "21": {"class_type": "RandomNoise", "inputs": {"noise_seed": 3}},
        "22": {"class_type": "KSamplerSelect", "inputs": {"sampler_name": "euler"}},
        "23": {"class_type": "BasicScheduler", "inputs": {"scheduler": "normal", "steps": 20, "denoise": 1,
                                                          "model": ["4", 0]}},
        "24": {"class_type": "SamplerCustomAdvanced", "inputs": {
            "noise": ["21", 0], "guider": ["20", 0], "sampler": ["22", 0], "sigmas": ["23", 0],
            "latent_image": ["10", 0]}},
    })
    result = imported(write(tmp_path / "custom.json", workflow))
    assert got(result.recipe) == settings(BASE)
    assert any("cfg 1.0" in w for w in result.warnings)   # the guider's cfg, read for SAG's sake


def test_two_sag_nodes_cannot_share_one_section(tmp_path):
    workflow = insert_model_node(copy.deepcopy(UI), 30, "SelfAttentionGuidance", [0.4, 1.0])
    assert_clean_error(run("recipe", "import", write(tmp_path / "w.json", workflow)),
                       "two sources of [sag] (node 6 (SelfAttentionGuidance); node 30 (SelfAttentionGuidance))")


def test_values_beyond_comfyuis_range_need_allow_out_of_range(tmp_path):
    workflow = copy.deepcopy(API)
    workflow["5"]["inputs"]["q"] = 12.0   # written by a script: the widget stops at 10
    path = write(tmp_path / "w.json", workflow)
    assert_clean_error(run("recipe", "import", path), "pass --allow-out-of-range")
    assert imported(path, allow_out_of_range=True).recipe.multipliers["unet.self"][0].factor("q") == 12.0


# --- bypass, mute, reroutes, primitives, subgraphs -----------------------------------------------------------

def test_bypassed_nodes_pass_their_input_on(tmp_path):
    workflow = copy.deepcopy(UI)
    node(workflow, 6)["mode"] = 4     # SAG bypassed: its MODEL input passes through
    node(workflow, 7)["mode"] = 4     # CLIP multiply bypassed
    r = imported(write(tmp_path / "ui.json", workflow)).recipe
    assert got(r) == settings("[unet.self]\nq = 1.1\nk = 1.1\n")


def test_a_muted_node_on_the_path_is_refused_as_comfyui_refuses_the_run(tmp_path):
    """Muted (mode 2): the frontend drops the node and every input linked to it, so the sampler (or its
    text encoders) would miss a required input; ComfyUI does not run such a prompt."""
    workflow = copy.deepcopy(UI)
    node(workflow, 7)["mode"] = 2
    assert_clean_error(run("recipe", "import", write(tmp_path / "ui.json", workflow)),
                       "node 8 (CLIPTextEncode) input 'clip' comes from node 7 (CLIPAttentionMultiply), which is muted")
    workflow = copy.deepcopy(UI)
    node(workflow, 10)["mode"] = 2    # off the model and CLIP paths: nothing a recipe holds depends on it
    assert got(imported(write(tmp_path / "ui.json", workflow)).recipe) == settings(BASE)


def test_reroutes_are_followed_and_primitives_give_their_value(tmp_path):
    workflow = copy.deepcopy(UI)
    relink(workflow, 10, target=(40, 0))    # loader MODEL → Reroute → multiply node 5
    add_node(workflow, {"id": 40, "type": "Reroute", "pos": [300, 300], "size": [75, 26], "flags": {}, "order": 1,
                        "mode": 0, "inputs": [{"name": "", "type": "*", "link": 10}],
                        "outputs": [{"name": "", "type": "MODEL", "links": [41], "slot_index": 0}],
                        "properties": {"showOutputText": False, "horizontal": False}}, [[41, 40, 0, 5, 0, "MODEL"]])
    node(workflow, 5)["inputs"][0]["link"] = 41
    # q converted to an input and driven by a PrimitiveNode: its value wins over the widget's stale one
    node(workflow, 5)["inputs"].append({"name": "q", "type": "FLOAT", "link": 42, "widget": {"name": "q"}})
    add_node(workflow, {"id": 41, "type": "PrimitiveNode", "pos": [100, 200], "size": [210, 82], "flags": {},
                        "order": 0, "mode": 0, "outputs": [{"name": "FLOAT", "type": "FLOAT", "links": [42],
                                                            "widget": {"name": "q"}, "slot_index": 0}],
                        "title": "q", "properties": {"Run widget replace on values": False},
                        "widgets_values": [1.3, "fixed"]}, [[42, 41, 0, 5, 1, "FLOAT"]])
    r = imported(write(tmp_path / "ui.json", workflow)).recipe
    assert dict(r.multipliers["unet.self"][0].factors) == {"q": 1.3, "k": 1.1}


def test_backend_value_nodes_give_their_value(tmp_path):
    workflow = copy.deepcopy(API)
    workflow["30"] = {"class_type": "PrimitiveFloat", "inputs": {"value": 1.25}}
    workflow["5"]["inputs"]["k"] = ["30", 0]
    assert dict(imported(write(tmp_path / "w.json", workflow)).recipe.multipliers["unet.self"][0].factors) == \
        {"q": 1.1, "k": 1.25}
    workflow["31"] = {"class_type": "FloatMath", "inputs": {"a": 1.0, "b": 0.5}}   # computed: not a written value
    workflow["5"]["inputs"]["k"] = ["31", 0]
    assert_clean_error(run("recipe", "import", write(tmp_path / "w.json", workflow)),
                       "input 'k' comes from node 31; only values written in the workflow can be imported")


def test_nodes_inside_a_subgraph(tmp_path):
    """The self-attention multiply and SAG packed into a subgraph (frontend ≥ 1.24 format)."""
    workflow = copy.deepcopy(UI)
    inner = [copy.deepcopy(node(workflow, 5)), copy.deepcopy(node(workflow, 6))]
    workflow["nodes"] = [n for n in workflow["nodes"] if n["id"] not in (5, 6)]
    inner[0]["inputs"][0]["link"], inner[0]["outputs"][0]["links"] = 1, [2]
    inner[1]["inputs"][0]["link"], inner[1]["outputs"][0]["links"] = 2, [3]
    workflow["definitions"] = {"subgraphs": [{
        "id": "5e3a7c1e-2c55-4a4e-9b8e-0d6b3c2f1a10", "version": 1, "revision": 0, "name": "Attention",
        "state": {"lastGroupId": 0, "lastNodeId": 6, "lastLinkId": 3, "lastRerouteId": 0}, "config": {},
        "inputNode": {"id": -10, "bounding": [100, 300, 120, 60]},
        "outputNode": {"id": -20, "bounding": [900, 300, 120, 60]},
        "inputs": [{"id": "a1", "name": "model", "type": "MODEL", "linkIds": [1]}],
        "outputs": [{"id": "b1", "name": "MODEL", "type": "MODEL", "linkIds": [3]}],
        "widgets": [], "nodes": inner, "groups": [], "extra": {},
        "links": [{"id": 1, "origin_id": -10, "origin_slot": 0, "target_id": 5, "target_slot": 0, "type": "MODEL"},
                  {"id": 2, "origin_id": 5, "origin_slot": 0, "target_id": 6, "target_slot": 0, "type": "MODEL"},
                  {"id": 3, "origin_id": 6, "origin_slot": 0, "target_id": -20, "target_slot": 0, "type": "MODEL"}],
    }]}
    relink(workflow, 10, target=(50, 0))
    relink(workflow, 14, origin=(50, 0))
    workflow["nodes"].append({"id": 50, "type": "5e3a7c1e-2c55-4a4e-9b8e-0d6b3c2f1a10", "pos": [400, 300],
                              "size": [200, 50], "flags": {}, "order": 1, "mode": 0,
                              "inputs": [{"name": "model", "type": "MODEL", "link": 10}],
                              "outputs": [{"name": "MODEL", "type": "MODEL", "links": [14]}], "properties": {}})
    result = imported(write(tmp_path / "ui.json", workflow))
    assert got(result.recipe) == settings(BASE)
    assert "# node 50:5 (UNetSelfAttentionMultiply)" in result.text


# --- several samplers, other patches ----------------------------------------------------------------------

def test_two_samplers_with_different_chains_need_sampler(tmp_path):
    workflow = copy.deepcopy(API)   # a second pass straight from the loader, without the patches
    workflow["13"] = {"class_type": "KSamplerAdvanced", "inputs": {
        "add_noise": "disable", "noise_seed": 0, "steps": 20, "cfg": 7, "sampler_name": "euler",
        "scheduler": "normal", "start_at_step": 10, "end_at_step": 20, "return_with_leftover_noise": "disable",
        "model": ["4", 0], "positive": ["8", 0], "negative": ["9", 0], "latent_image": ["3", 0]}}
    path = write(tmp_path / "two.json", workflow)
    assert_clean_error(run("recipe", "import", path), "2 samplers use different model/CLIP chains")
    assert "3 (KSampler: 4 → 5 → 6)" in run("recipe", "import", path).stderr
    assert got(imported(path, sampler="3").recipe) == settings(BASE)
    assert got(imported(path, sampler="13").recipe) == settings("[clip]\nout = 0.9\n")
    assert_clean_error(run("recipe", "import", path, "--sampler", "99"), "no sampler with id 99")


def test_two_samplers_on_the_same_chain_are_one_recipe(tmp_path):
    workflow = copy.deepcopy(API)   # a hires-fix style second pass through the same patched model
    workflow["13"] = copy.deepcopy(workflow["3"])
    workflow["13"]["inputs"]["latent_image"] = ["3", 0]
    result = imported(write(tmp_path / "hires.json", workflow))
    assert got(result.recipe) == settings(BASE)
    assert "same chain: 13" in result.text


def test_other_patches_are_named_and_refused_unless_ignored(tmp_path):
    workflow = insert_model_node(copy.deepcopy(UI), 30, "LoraLoader", ["detail.safetensors", 0.8, 1.0],
                                 extra_inputs=[{"name": "clip", "type": "CLIP", "link": None}],
                                 outputs=[{"name": "MODEL", "type": "MODEL", "links": [99]},
                                          {"name": "CLIP", "type": "CLIP", "links": []}])
    path = write(tmp_path / "lora.json", workflow)
    assert_clean_error(run("recipe", "import", path), "node 30 (LoraLoader) on the model path")
    result = run("recipe", "import", path, "--ignore-other-patches")
    assert result.returncode == 0, result.stderr
    assert "# left out (not expressible in a recipe): node 30 (LoraLoader) on the model path" in result.stdout
    assert got(parse_recipe(result.stdout)) == settings(BASE)


def test_attention_nodes_behind_a_model_merge_are_not_dropped(tmp_path):
    """The walk stops at a merge (two MODEL inputs); an attention node behind it is refused, not left out,
    even with --ignore-other-patches."""
    workflow = copy.deepcopy(API)
    workflow["20"] = {"class_type": "ModelMergeSimple", "inputs": {"model1": ["6", 0], "model2": ["4", 0], "ratio": 0.5}}
    workflow["3"]["inputs"]["model"] = ["20", 0]
    with pytest.raises(CkptbendError, match=r"node 20 \(ModelMergeSimple\) merges several models; node 6 "
                                            r"\(SelfAttentionGuidance\) behind it cannot be imported"):
        imported(write(tmp_path / "w.json", workflow), ignore_other_patches=True)


def test_clip_patched_for_one_prompt_only_is_refused(tmp_path):
    workflow = copy.deepcopy(API)
    workflow["9"]["inputs"]["clip"] = ["4", 1]   # the negative prompt bypasses the CLIP multiply
    assert_clean_error(run("recipe", "import", write(tmp_path / "w.json", workflow)),
                       "encoded through different CLIP chains")


def test_api_inputs_are_told_apart_by_name_and_link(tmp_path):
    """API format has no types: ConditioningAverage's conditioning_to/_from are links to follow, its
    conditioning_to_strength a widget value; a loader's widget named "model" is no MODEL input."""
    workflow = copy.deepcopy(API)
    workflow["20"] = {"class_type": "ConditioningAverage", "inputs": {
        "conditioning_to": ["8", 0], "conditioning_from": ["9", 0], "conditioning_to_strength": 0.5}}
    workflow["3"]["inputs"]["positive"] = ["20", 0]
    workflow["4"]["inputs"]["model"] = "moge.pt"
    assert got(imported(write(tmp_path / "w.json", workflow)).recipe) == settings(BASE)


def test_sag_without_cfg_warns_reading_cfg_after_the_seed_control_widget(tmp_path):
    workflow = copy.deepcopy(UI)
    node(workflow, 3)["widgets_values"] = [7, "fixed", 20, 1.0, "euler", "normal", 1]   # cfg 1 after "fixed"
    result = run("recipe", "import", write(tmp_path / "w.json", workflow))
    assert result.returncode == 0
    assert "warning:" in result.stderr and "cfg 1.0" in result.stderr


# --- images -----------------------------------------------------------------------------------------------

def png(path, **chunks):
    info = PngInfo()
    for key, value in chunks.items():
        info.add_text(key, value if isinstance(value, str) else json.dumps(value))
    Image.new("RGB", (8, 8), (200, 120, 40)).save(path, pnginfo=info)
    return path


def test_png_with_prompt_and_workflow_chunks(tmp_path):
    both = imported(png(tmp_path / "ComfyUI_00001_.png", prompt=API, workflow=UI))
    assert got(both.recipe) == settings(BASE)
    assert "('prompt' metadata)" in both.text and 'name = "ComfyUI_00001"' in both.text
    only_ui = imported(png(tmp_path / "ui.png", workflow=UI))
    assert got(only_ui.recipe) == settings(BASE) and "('workflow' metadata)" in only_ui.text


def test_webp_with_exif_workflow(tmp_path):
    exif = Image.Exif()
    exif[0x0110] = "prompt:" + json.dumps(API)
    exif[0x010F] = "workflow:" + json.dumps(UI)
    Image.new("RGB", (8, 8)).save(tmp_path / "anim.webp", exif=exif)
    assert got(imported(tmp_path / "anim.webp").recipe) == settings(BASE)


@pytest.mark.parametrize("make, fragment", [
    (lambda p: p.write_text('{"3": {"class_type": "KSampler",'), "invalid JSON"),
    (lambda p: p.write_text('[1, 2, 3]'), "not a ComfyUI workflow"),
    (lambda p: write(p, {k: v for k, v in API.items() if k != "3"}), "no sampler node"),
    (lambda p: p.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40), "cannot read the image's metadata"),
    (lambda p: Image.new("RGB", (4, 4)).save(p, format="PNG"), "carries no ComfyUI workflow"),
    (lambda p: png(p, prompt='{"3": {x'), "('prompt' metadata): invalid JSON"),
    (lambda p: write(p, {"nodes": [{"id": 1}], "links": []}), "node 1 of the UI-format workflow has no type"),
    (lambda p: p.write_bytes(b"\xff\xfe{}"), "not UTF-8"),
])
def test_malformed_sources_are_one_line_errors_and_write_nothing(tmp_path, make, fragment):
    source = tmp_path / "source.png"
    make(source)
    out = tmp_path / "out.toml"
    assert_clean_error(run("recipe", "import", source, "-o", out), fragment)
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["source.png"]


# --- bending YAML -----------------------------------------------------------------------------------------

BENDING_YAML = """\
# as in the original's quickstart
attention_bending:
  enabled: true
  configs:
    - token: "kiss"
      mode: "scale"
      scale_factor: 2.5
      strength: 0.8
      angle: 30            # not used by mode scale
      apply_to_timesteps: [0, 15]
    - token: "sunset"
      mode: "regional_mask"
      region: [0.0, 0.0, 1.0, 0.5]
      region_feather: 0.2
      renormalize: false
      preserve_sparsity: false
"""


def test_bending_yaml(tmp_path):
    (tmp_path / "bend.yaml").write_text(BENDING_YAML)
    result = imported(tmp_path / "bend.yaml")
    assert got(result.recipe) == settings("""
[[bending]]
token = "kiss"
mode = "scale"
scale_factor = 2.5
strength = 0.8
apply_to_timesteps = [0, 15]
renormalize = "column"
[[bending]]
token = "sunset"
mode = "regional_mask"
region = [0.0, 0.0, 1.0, 0.5]
region_feather = 0.2
renormalize = "none"
""")
    assert "angle: 30 left out" in result.text   # [0, 15] is kept: both ends inclusive, as in the original


@pytest.mark.parametrize("text, fragment", [
    ("attention_bending:\n  enabled: false\n  configs:\n    - {token: a, mode: scale}\n", "switched off"),
    ("attention_bending: {configs: [{token: a, mode: scale, colour: red}]}\n", "unknown key 'colour'"),
    ("attention_bending: {configs: [{token: a, mode: twirl}]}\n", "mode = \"twirl\" is not valid"),
    ("attention_bending:\n  configs: [\n", "invalid YAML"),
    ("attention_bending: {configs: [{token: a, mode: [scale]}]}\n", "mode must be a string"),
    ("- just a list\n", "not an Attention Bending config"),
    ("!!python/object/apply:os.system ['echo hacked']\n", "invalid YAML"),
])
def test_bad_bending_yaml(tmp_path, text, fragment):
    (tmp_path / "b.yaml").write_text(text)
    assert_clean_error(run("recipe", "import", tmp_path / "b.yaml"), fragment)


# --- baked checkpoints and companions -----------------------------------------------------------------------

@pytest.fixture(scope="module")
def sd1(tmp_path_factory):
    return write_checkpoint(tmp_path_factory.mktemp("imp") / "sd1.safetensors", "sd1", dtype=torch.float16)


def test_baked_checkpoint_gives_back_its_recipe(sd1, tmp_path):
    baked = tmp_path / "sharp.safetensors"
    assert run("bake", RECIPES / "sharper-details.toml", sd1, "-o", baked, "-q").returncode == 0
    result = run("recipe", "import", baked, "-o", tmp_path / "back.toml")
    assert result.returncode == 0, result.stderr
    assert load_recipe(tmp_path / "back.toml").sha256 == load_recipe(RECIPES / "sharper-details.toml").sha256
    assert "baked from 'sd1.safetensors'" in (tmp_path / "back.toml").read_text()
    assert_clean_error(run("recipe", "import", sd1), "no ckptbend recipe recorded")


def test_a_baked_dit_gives_back_every_section(tmp_path):
    """[dit.joint] entries (and every other section the reader knows) come back: same recipe, same hash."""
    flux = write_checkpoint(tmp_path / "flux.safetensors", "flux_dev")
    recipe = load_recipe(RECIPES / "flux-balanced.toml")
    bake(recipe, flux, tmp_path / "baked.safetensors", progress=False, durable=False)
    back = imported(tmp_path / "baked.safetensors")
    assert back.recipe.sha256 == recipe.sha256 and len(back.recipe.multipliers["dit.joint"]) == 3


def test_a_companion_of_a_dit_recipe_gives_back_every_section(tmp_path):
    """The companion's workflow_api.json: [dit.cross], [[bending]] and the architecture all come back."""
    recipe = tmp_path / "wan-bend.toml"
    recipe.write_text('schema = 1\nname = "wan-bend"\narchitecture = "sd1"\n[dit.cross]\nv = 1.1\n'
                      '[[bending]]\ntoken = "kiss"\nmode = "scale"\nscale_factor = 2.0\n')
    emit(load_recipe(recipe), tmp_path / "companion")
    back = imported(tmp_path / "companion" / "workflow_api.json").recipe
    assert back.sha256 == load_recipe(recipe).sha256 and back.architecture == ("sd1",)


# ComfyUI's CLIPAttentionMultiply (comfy_extras/nodes_attention_multiply.py) patches every key of the CLIP
# object that ends in one of these, by the node's factor: the oracle the imported recipe is baked against.
COMFY_CLIP_MULTIPLY = {"self_attn.q_proj": "q", "self_attn.k_proj": "k", "self_attn.v_proj": "v",
                       "self_attn.out_proj": "out"}
CLIP_FACTORS = {"q": 1.3, "k": 0.7, "v": 1.6, "out": 0.8}


def comfyui_clip_multiply(keys) -> dict[str, float]:
    return {key: CLIP_FACTORS[name] for key in keys for suffix, name in COMFY_CLIP_MULTIPLY.items()
            if key.endswith((suffix + ".weight", suffix + ".bias"))}


@pytest.fixture(scope="module")
def text_encoder_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("te")
    files = {"clip_l": write_checkpoint(folder / "clip_l.safetensors", "sd1", layout="text_encoder")}
    for kind, name in (("llama", "llava_llama3_fp8_scaled.safetensors"), ("qwen25_7b", "qwen_2.5_vl_7b_fp8_scaled.safetensors"),
                       ("mistral3_24b", "mistral_3_small_flux2_bf16.safetensors"), ("qwen3_4b", "qwen_3_4b.safetensors"),
                       ("gemma2_2b", "gemma_2_2b_it_elm_bf16.safetensors"),
                       ("gemma3_12b", "gemma_3_12B_it_fp4_mixed.safetensors")):
        save_file(lte.file_state_dict(kind, lte.build(kind)), folder / name)
        files[kind] = folder / name
    return files


@pytest.mark.parametrize("loader, widgets, kinds", [
    ("DualCLIPLoader", {"clip_name1": "clip_l.safetensors", "clip_name2": "llava_llama3_fp8_scaled.safetensors",
                        "type": "hunyuan_video"}, ("clip_l", "llama")),
    ("CLIPLoader", {"clip_name": "qwen_2.5_vl_7b_fp8_scaled.safetensors", "type": "qwen_image"}, ("qwen25_7b",)),
    ("CLIPLoader", {"clip_name": "mistral_3_small_flux2_bf16.safetensors", "type": "flux2"}, ("mistral3_24b",)),
    ("CLIPLoader", {"clip_name": "gemma_2_2b_it_elm_bf16.safetensors", "type": "lumina2"}, ("gemma2_2b",)),
    ("CLIPLoader", {"clip_name": "qwen_3_4b.safetensors", "type": "lumina2"}, ("qwen3_4b",)),
    ("LTXAVTextEncoderLoader", {"text_encoder": "gemma_3_12B_it_fp4_mixed.safetensors", "ckpt_name": "ltx-2.safetensors"},
     ("gemma3_12b",)),
])
def test_clip_multiply_on_llm_text_encoders_bakes_what_comfyuis_node_patches(tmp_path, text_encoder_files, loader,
                                                                            widgets, kinds):
    """HunyuanVideo's Llama, Qwen-Image's Qwen2.5-VL, Flux.2's Mistral, Lumina 2's Gemma 2: the node scales their
    q, k, v (not o_proj). Z-Image's Qwen3 and LTX-2's Gemma 3 normalise q and k after q_proj / k_proj, which
    cancels the node's q and k there: v alone is imported, and the import says so."""
    workflow = copy.deepcopy(API)
    workflow["13"] = {"class_type": loader, "inputs": widgets}
    workflow["7"]["inputs"].update(CLIP_FACTORS, clip=["13", 0])
    result = imported(write(tmp_path / "w.json", workflow))
    for kind in kinds:
        ckpt = detect(text_encoder_files[kind])
        edits = make_plan(result.recipe, ckpt, allow_missing=True).edits
        baked = {e.key: math.prod(f for seg in e.segments for f in seg.factors) for e in edits}
        expected = comfyui_clip_multiply(t.name for f in ckpt.files for t in f.header.tensors)
        if kind in ("qwen3_4b", "gemma3_12b"):
            expected = {k: f for k, f in expected.items() if ".v_proj." in k}
            assert "whose qk-norm cancels them" in result.text
        assert baked == pytest.approx(expected) and len(expected) > 0, kind


@pytest.mark.parametrize("loader, widgets, fragment", [
    ("CLIPLoader", {"clip_name": "qwen3.5_9b_w4a8_gptq.safetensors", "type": "stable_diffusion"},
     "also scales the q, k and v of the LLM text encoder 'qwen3.5_9b_w4a8_gptq.safetensors', which a recipe's [text] "
     "cannot reach"),
    ("CLIPLoader", {"clip_name": "my_text_encoder.safetensors", "type": "stable_diffusion"},
     "cannot tell from its name which encoder it is"),
    ("CLIPLoader", {"clip_name": "umt5_xxl_fp8_e4m3fn_scaled.safetensors", "type": "wan"},
     "nothing to import: node 7 (CLIPAttentionMultiply) changes nothing here"),
])
def test_clip_multiply_where_a_recipe_cannot_follow(tmp_path, loader, widgets, fragment):
    workflow = copy.deepcopy(API)
    workflow["13"] = {"class_type": loader, "inputs": widgets}
    workflow["7"]["inputs"].update(CLIP_FACTORS, clip=["13", 0])
    workflow["5"]["inputs"].update(q=1, k=1)
    del workflow["6"]
    workflow["3"]["inputs"]["model"] = ["5", 0]
    with pytest.raises(CkptbendError, match=re.escape(fragment)):
        imported(write(tmp_path / "w.json", workflow))


def test_companion_workflow_round_trips_after_a_real_bake(sd1, tmp_path):
    """`bake` writes the companion beside its output; its workflow_api.json imports back to the recipe."""
    recipe = load_recipe(RECIPES / "sag-and-bending.toml")
    out = tmp_path / "sd1-sag.safetensors"
    assert run("bake", RECIPES / "sag-and-bending.toml", sd1, "-o", out, "-q").returncode == 0
    result = run("recipe", "import", tmp_path / "sd1_sag_ckptbend" / "workflow_api.json")
    assert result.returncode == 0, result.stderr
    assert parse_recipe(result.stdout).sha256 == recipe.sha256
    assert "'sd1-sag.safetensors' (baked from 'sd1.safetensors')" in result.stdout


def test_companion_node_edits_and_lookup(tmp_path):
    folder = tmp_path / "sab"
    assert run("emit", RECIPES / "sag-and-bending.toml", "-o", folder).returncode == 0
    workflow = json.loads((folder / "workflow_api.json").read_text())
    (node_id, companion), = [(k, n) for k, n in workflow.items() if n["class_type"].startswith("ckptbend_")]
    companion["inputs"].update(sag_scale=0.9, bend1_strength=0.5)
    elsewhere = write(tmp_path / "edited.json", workflow)   # not beside the companion folder's contents
    (tmp_path / "sab").rename(tmp_path / "x_sab")           # lookup must not depend on the folder's name
    r = imported(elsewhere).recipe
    assert r.sag.scale == 0.9 and r.bending[0].strength == 0.5 and r.bending[0].translate_x == -0.4
    assert r.name == "sag-and-bending" and r.description.startswith("Imported from edited.json")   # edited
    assert dict(r.multipliers["unet.self"][0].factors) == {"q": 1.05, "k": 1.05}
    other = tmp_path / "other"
    other.mkdir()
    lone = write(other / "w.json", workflow)
    assert_clean_error(run("recipe", "import", lone), "pass --companion DIR")
    assert imported(lone, companions=(tmp_path / "x_sab",)).recipe.sag.scale == 0.9


def test_companion_node_in_a_ui_workflow(tmp_path):
    """The companion node as the frontend saves it: widget values in the order of its INPUT_TYPES."""
    folder = tmp_path / "sab"
    assert run("emit", RECIPES / "sag-and-bending.toml", "-o", folder).returncode == 0
    kind = next(n["class_type"] for n in json.loads((folder / "workflow_api.json").read_text()).values()
                if n["class_type"].startswith("ckptbend_"))
    workflow = copy.deepcopy(UI)
    workflow["nodes"] = [n for n in workflow["nodes"] if n["id"] != 6]   # the companion replaces SAG
    workflow["nodes"].append({
        "id": 6, "type": kind, "pos": [700, 300], "size": [300, 200], "flags": {}, "order": 3, "mode": 0,
        "inputs": [{"name": "model", "type": "MODEL", "link": 13}, {"name": "bending_clip", "type": "CLIP", "link": 30}],
        "outputs": [{"name": "MODEL", "type": "MODEL", "links": [14], "slot_index": 0}],
        "properties": {"Node name for S&R": kind},
        # sag_scale, sag_blur_sigma, bending_prompt, bend1_token, bend1_strength
        "widgets_values": [0.7, 2, "a lake at (sunset)", "sunset", 0.25]})
    node(workflow, 4)["outputs"][1]["links"].append(30)
    workflow["links"].append([30, 4, 1, 6, 1, "CLIP"])
    result = imported(write(folder / "ui.json", workflow))
    r = result.recipe
    assert r.sag.scale == 0.7 and r.bending[0].strength == 0.25 and r.bending[0].token == "sunset"
    # the companion's own [unet.self] (q = k = 1.05), baked into its checkpoint, so first; then node 5's
    assert [dict(e.factors) for e in r.multipliers["unet.self"]] == [{"q": 1.05, "k": 1.05}, {"q": 1.1, "k": 1.1}]
    assert "bending prompt: 'a lake at (sunset)'" in result.text
    assert r.name == "sag-and-bending" and "ui.json" in r.description   # not the companion's recipe any more


# --- output ----------------------------------------------------------------------------------------------

def test_output_file_force_and_source_protection(tmp_path):
    source = write(tmp_path / "w.json", API)
    out = tmp_path / "r.toml"
    first = run("recipe", "import", source, "-o", out, "--name", "tuned")
    assert first.returncode == 0 and first.stdout == "" and "wrote" in first.stderr
    assert load_recipe(out).name == "tuned"
    assert_clean_error(run("recipe", "import", source, "-o", out), "already exists (use --force")
    assert run("recipe", "import", source, "-o", out, "--force", "--name", "again").returncode == 0
    assert load_recipe(out).name == "again"
    assert_clean_error(run("recipe", "import", source, "-o", source, "--force"), "would overwrite the input")
    assert json.loads(source.read_text()) == API
    assert_clean_error(run("recipe", "import", source, "--name", "no spaces"), "must be a filename-safe slug")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.toml", "w.json"]


def test_help_explains():
    result = run("recipe", "import", "--help")
    assert result.returncode == 0
    for word in ("--sampler", "--ignore-other-patches", "--companion", "API or UI format", "attention_bending"):
        assert word in result.stdout
