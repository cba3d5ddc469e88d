"""The companion's example workflow for the DiT families added from ComfyUI's official graphs, the families
without a graph (no workflow at all, said in one line), and every graph's nodes against the official templates."""

import json
from collections import defaultdict
from importlib import resources

import pytest

from ckptbend.companion import example_workflow, write_companion
from ckptbend.layouts import detect
from ckptbend.recipe import parse_recipe
from ckptbend.synth import write_checkpoint
from ckptbend.workflows import CHECKPOINT_KINDS, FAMILIES

RECIPE = parse_recipe("""schema = 1
name = "bend-only"
[[bending]]
token = "sunset"
mode = "translate"
translate_x = -0.4
""", "bend.toml")


def graph_of(architecture, file="model.safetensors", kind="dit"):
    return example_workflow(RECIPE, {"file": file, "architecture": architecture, "kind": kind})


def by_class(graph):
    return {n["class_type"]: (k, n["inputs"]) for k, n in graph.items()}


def node_of(graph):
    return next((k, n["inputs"]) for k, n in graph.items() if n["class_type"].startswith("ckptbend_"))


# synth architecture → (the loader of its text encoder and the type it names, latent or I2V node, saver)
SYNTH = {
    "mochi": (("CLIPLoader", "mochi"), "EmptyMochiLatentVideo", "SaveVideo"),
    "auraflow": (("CheckpointLoaderSimple", None), "EmptyLatentImage", "SaveImage"),
    "hidream": (("QuadrupleCLIPLoader", None), "EmptySD3LatentImage", "SaveImage"),
    "cosmos_predict2": (("CLIPLoader", "cosmos"), "EmptySD3LatentImage", "SaveImage"),
    "lumina2": (("CLIPLoader", "lumina2"), "EmptySD3LatentImage", "SaveImage"),
    "chroma_radiance": (("CLIPLoader", "chroma"), "EmptyChromaRadianceLatentImage", "SaveImage"),
    "wan_vace": (("CLIPLoader", "wan"), "WanVaceToVideo", "SaveVideo"),
    "skyreels_v2": (("CLIPLoader", "wan"), "EmptyHunyuanLatentVideo", "SaveVideo"),
}


@pytest.mark.parametrize("arch", SYNTH)
def test_a_synth_dit_gets_its_family_graph(tmp_path, arch):
    """The architecture `inspect` gives a tiny file of the family picks its graph: UNETLoader into the node, the
    family's text-encoder loader wired into bending_clip, its latent node, an image or a video saved."""
    found = detect(write_checkpoint(tmp_path / f"{arch}.safetensors", arch))
    graph = graph_of(found.architecture, "bent.safetensors", found.kind)
    classes = by_class(graph)
    (encoder, clip_type), latent, saver = SYNTH[arch]
    loader, inputs = classes["UNETLoader"]
    assert inputs["unet_name"] == "bent.safetensors"
    te_key, te_inputs = classes[encoder]
    assert te_inputs.get("type") == clip_type
    _, node = node_of(graph)
    clip_output = 1 if encoder == "CheckpointLoaderSimple" else 0         # AuraFlow's own file: its CLIP
    assert node["model"] == [loader, 0] and node["bending_clip"] == [te_key, clip_output]
    assert latent in classes and saver in classes
    assert ("CreateVideo" in classes) == (saver == "SaveVideo")


def test_the_new_graphs_take_their_family_parts():
    """HiDream's four text encoders, Chroma Radiance's pixel space, Lumina 2's and Cosmos' loaders, AuraFlow's
    CLIP and VAE from its own file, VACE's trimmed latent and no start image."""
    hidream = by_class(graph_of("hidream"))
    assert set(hidream["QuadrupleCLIPLoader"][1]) == {"clip_name1", "clip_name2", "clip_name3", "clip_name4"}
    assert by_class(graph_of("chroma-radiance"))["VAELoader"][1]["vae_name"] == "pixel_space"
    aura = by_class(graph_of("auraflow"))
    ckpt = aura["CheckpointLoaderSimple"][0]
    assert aura["VAEDecode"][1]["vae"] == [ckpt, 2] and "VAELoader" not in aura
    vace = by_class(graph_of("wan-vace-14b"))
    assert vace["TrimVideoLatent"][1]["trim_amount"] == [vace["WanVaceToVideo"][0], 3]
    assert vace["VAEDecode"][1]["samples"] == [vace["TrimVideoLatent"][0], 0] and "LoadImage" not in vace


def test_wan_relatives_get_their_conditioning_nodes():
    camera = by_class(graph_of("wan-camera-14b"))
    assert camera["WanCameraImageToVideo"][1]["camera_conditions"] == [camera["WanCameraEmbedding"][0], 0]
    assert camera["WanCameraImageToVideo"][1]["clip_vision_output"] == [camera["CLIPVisionEncode"][0], 0]
    control = by_class(graph_of("wan22-fun-control-14b"))
    assert control["Wan22FunControlToVideo"][1]["ref_image"] == [control["LoadImage"][0], 0]
    chrono = by_class(graph_of("chronoedit-14b"))
    node, _ = node_of(graph_of("chronoedit-14b"))
    assert chrono["ScaleROPE"][1]["model"] == [node, 0]
    assert chrono["ModelSamplingSD3"][1]["model"] == [chrono["ScaleROPE"][0], 0]
    assert chrono["SaveImage"][1]["images"] == [chrono["ImageFromBatch"][0], 0] and "SaveVideo" not in chrono


def test_cosmos_video2world_is_told_by_its_file_name():
    t2i = by_class(graph_of("cosmos-predict2-2b", "cosmos_predict2_2B_t2i.safetensors"))
    v2w = by_class(graph_of("cosmos-predict2-2b", "cosmos_predict2_2B_video2world_480p_16fps.safetensors"))
    assert "EmptySD3LatentImage" in t2i and "SaveImage" in t2i
    latent = v2w["CosmosPredict2ImageToVideoLatent"][1]
    assert latent["start_image"] == [v2w["LoadImage"][0], 0] and latent["vae"] == [v2w["VAELoader"][0], 0]
    assert "SaveVideo" in v2w


@pytest.mark.parametrize("architecture", ["some-future-model", "svd", "motif-video", "sana"])
def test_an_architecture_without_a_graph_gets_no_workflow(tmp_path, architecture):
    """Never an SD 1.x graph for a model it cannot load: no workflow_api.json, and companion.json says why."""
    write_companion(RECIPE, tmp_path / "c", {"file": "x.safetensors", "architecture": architecture, "kind": "dit"})
    assert not (tmp_path / "c" / "workflow_api.json").exists()
    note = json.loads((tmp_path / "c" / "companion.json").read_text())["no_workflow"]
    assert note.startswith(f"no example ComfyUI workflow for {architecture}:") and "\n" not in note


def test_the_cli_says_when_there_is_no_workflow(tmp_path):
    from click.testing import CliRunner

    from ckptbend.cli import cli

    recipe = tmp_path / "r.toml"
    recipe.write_text('schema = 1\nname = "r"\narchitecture = "sana"\n[[bending]]\ntoken = "sunset"\n'
                      'mode = "translate"\ntranslate_x = -0.4\n')
    result = CliRunner().invoke(cli, ["emit", str(recipe), "-o", str(tmp_path / "c")])
    assert result.exit_code == 0, result.output
    assert "note: no example ComfyUI workflow for sana:" in result.output
    assert not (tmp_path / "c" / "workflow_api.json").exists()


# --- every graph against ComfyUI's official templates -------------------------------------------------------

# Official graphs not in the template package: ComfyUI_examples' mochi, cosmos_predict2 and sd3 (text encoders)
# pages, with the input names their graphs give.
EXAMPLES_ONLY = {"EmptyMochiLatentVideo": {"width", "height", "length", "batch_size"},
                 "TripleCLIPLoader": {"clip_name1", "clip_name2", "clip_name3"},
                 "CosmosPredict2ImageToVideoLatent": {"vae", "start_image", "width", "height", "length", "batch_size"}}
CONTROL = ("fixed", "randomize", "increment", "decrement")     # the UI's control_after_generate value after a seed


def official_nodes():
    """Node type → [(its named inputs, the widgets among them, its widget values)] over every template (subgraphs
    included)."""
    package = pytest.importorskip("comfyui_workflow_templates_json")
    found = defaultdict(list)
    for path in resources.files(package).joinpath("templates").iterdir():
        if not path.name.endswith(".json"):
            continue
        data = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(data, dict):
            continue
        nodes = [*data.get("nodes", []), *(n for g in data.get("definitions", {}).get("subgraphs", [])
                                           for n in g.get("nodes", []))]
        for n in nodes:
            if isinstance(n, dict) and "type" in n:
                widgets = {i["widget"]["name"] for i in n.get("inputs") or [] if "widget" in i}
                names = {i["name"] for i in n.get("inputs") or []} | widgets
                values = n.get("widgets_values")
                values = [v for v in values if v not in CONTROL] if isinstance(values, list) else []
                found[n["type"]].append((names, widgets, values))
    return found


def kind_of(value):
    return "link" if isinstance(value, list) else "number" if isinstance(value, (int, float)) else type(value).__name__


def unknown_inputs(official, class_type, inputs) -> list[str]:
    """The node's inputs no official template gives its type: a linked input by name; a widget by name, else by its
    place among the widgets (the UI stores widget values in the node's input order, unnamed) and its value's kind."""
    if class_type in EXAMPLES_ONLY:
        return [k for k in inputs if k not in EXAMPLES_ONLY[class_type]]
    if class_type not in official:
        return [class_type]
    named = set().union(*(names for names, _, _ in official[class_type]))
    widgets = [(i, k, v) for i, (k, v) in enumerate((k, v) for k, v in inputs.items() if kind_of(v) != "link")]
    unnamed = [(i, k, v) for i, k, v in widgets if k not in named]
    # by place only where the templates leave some of the type's widgets unnamed
    some_unnamed = len(set().union(*(w for _, w, _ in official[class_type]))) < max(
        len(values) for _, _, values in official[class_type])
    fits = some_unnamed and any(len(values) >= len(widgets) and
                                all(kind_of(values[i]) == kind_of(v) for i, _, v in unnamed)
                                for _, _, values in official[class_type])
    return ([k for k, v in inputs.items() if kind_of(v) == "link" and k not in named] +
            ([] if fits or not unnamed else [k for _, k, _ in unnamed]))


def test_every_graph_uses_only_official_nodes_and_inputs():
    official = official_nodes()
    wrong = {}
    for family in FAMILIES:
        for kind in ("dit", *CHECKPOINT_KINDS):
            graph = graph_of(family, f"{family}.safetensors", kind)
            for n in graph.values():
                if not n["class_type"].startswith("ckptbend_"):
                    bad = unknown_inputs(official, n["class_type"], n["inputs"])
                    if bad:
                        wrong[(family, kind, n["class_type"])] = bad
    assert not wrong, wrong


def test_the_template_check_catches_a_wrong_node_or_input():
    official = official_nodes()
    assert unknown_inputs(official, "EmptyMochiLatentVideoX", {}) == ["EmptyMochiLatentVideoX"]
    assert unknown_inputs(official, "KSampler", {"seed": 0, "stepz": 20, "model": ["1", 0]}) == ["stepz"]
    assert unknown_inputs(official, "VAEDecode", {"samplez": ["1", 0], "vae": ["2", 0]}) == ["samplez"]
    assert unknown_inputs(official, "QuadrupleCLIPLoader", {f"clip_name{i}": "x" for i in range(1, 6)}) != []
