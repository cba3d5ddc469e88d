"""The companion's example graphs for the families only newer ComfyUI runs (Flux.2, Z-Image, Qwen-Image 2.1,
Kandinsky 5, Krea 2, LongCat-Image, Ovis-Image, HunyuanVideo 1.5, Anima, Ideogram 4), checked against ComfyUI's official
workflow templates (PyPI comfyui-workflow-templates-json, a test extra), since the runnable ComfyUI 0.3.64 has
none of their nodes:
- every node class of a graph is one some official template uses, and every input name is one of that class's
  sockets in some template (a widget the templates never save as a socket: its value is among that class's
  widget values there);
- against the family's own template: every node class the template has carries values the template's node of
  that class has (loader file names, CLIPLoader type, latent size, shift, sampler, steps, cfg, fps); the
  sampler settings match the template's sampler or its scheduler, guider and sampler nodes (Ideogram 4's
  scheduler: the preset its template picks)."""

import json
from collections import defaultdict
from pathlib import Path

import pytest

from ckptbend.workflows import FAMILIES, example_workflow, family_of

templates = pytest.importorskip("comfyui_workflow_templates_json")
FOLDER = Path(templates.__file__).parent / "templates"
NODE = "ckptbend_check"

# architecture → (its official template, the subgraph holding the text-to-image/video recipe, or None: all)
TEMPLATES = {
    "flux2-dev": ("image_flux2_text_to_image.json", None),
    "flux2-klein-4b": ("image_flux2_klein_text_to_image.json", "Text to Image (FLUX.2 Klein 4B Distilled)"),
    "flux2-klein-4b base": ("image_flux2_klein_text_to_image.json", "Text to Image (FLUX.2 Klein 4B)"),
    "flux2-klein-9b": ("image_flux2_klein_image_edit_9b_distilled.json", "Image Edit (FLUX.2 Klein 9B Distilled)"),
    "flux2-klein-9b base": ("image_flux2_text_to_image_9b.json", None),
    "z-image": ("image_z_image.json", None),
    "qwen-image-2.1": ("image_qwen_image_2_1_t2i.json", None),
    "kandinsky5-lite-image": ("image_kandinsky5_t2i.json", None),
    "kandinsky5-lite-video": ("video_kandinsky5_t2v.json", None),
    "krea2": ("image_krea2_turbo_t2i.json", None),
    "longcat-image": ("image_longcat_text_to_image.json", None),
    "ovis-image": ("image_ovis_text_to_image.json", None),
    "hunyuan-video-1.5": ("video_hunyuan_video_1.5_720p_t2v.json", None),
    "anima": ("image_anima_base_v1.json", None),
    "ideogram4": ("image_ideogram4_t2i.json", "Text to Image (Ideogram v4)"),
}
# the file a case's graph loads ("baked.safetensors" for the rest): Klein's base files say "base" in their names,
# as the templates' do (flux-2-klein-base-4b.safetensors; distilled: flux-2-klein-4b.safetensors)
FILES = {"flux2-klein-4b base": "flux-2-klein-base-4b.safetensors", "flux2-klein-4b": "flux-2-klein-4b.safetensors",
         "flux2-klein-9b base": "flux-2-klein-base-9b-fp8.safetensors", "flux2-klein-9b": "flux-2-klein-9b-fp8.safetensors"}
VIDEO = {"kandinsky5-lite-video", "hunyuan-video-1.5"}
# values that are the example's own, not the template's: the file baked, the prompts, the seed, the output name
OWN = {"unet_name", "text", "prompt", "negative_prompt", "seed", "noise_seed", "filename_prefix"}
UNCHECKED = {"CLIPTextEncode", "SaveImage", "SaveVideo", NODE}


def nodes_of(data, subgraph=None):
    graphs = [data, *(data.get("definitions") or {}).get("subgraphs", [])]
    return [n for g in graphs if subgraph is None or g.get("name") == subgraph for n in g["nodes"]
            if n.get("mode", 0) == 0]          # bypassed (4) or muted (2) nodes are not the recipe


def load(name):
    return json.loads((FOLDER / name).read_text(encoding="utf-8"))


def widgets(node, template):
    """A template node's widget values. Ideogram 4's template links Ideogram4Scheduler's steps, mu and std from a
    presets JSON, by the preset its CustomCombo picks (the values saved beside those links are stale): that preset's."""
    values = node.get("widgets_values") or []
    if node["type"] != "Ideogram4Scheduler":
        return values
    choice = next(n["widgets_values"][0] for n in template if n["type"] == "CustomCombo")
    presets = next(json.loads(n["widgets_values"][0]) for n in template
                   if n["type"] == "JsonExtractString" and n["widgets_values"][0].lstrip().startswith("{"))
    return [presets[choice]["num_steps"], *values[1:3], presets[choice]["mu"], presets[choice]["std"]]


@pytest.fixture(scope="module")
def official():
    """class → (input socket names, widget values) over every official template."""
    sockets, values = defaultdict(set), defaultdict(list)
    for path in FOLDER.glob("*.json"):
        data = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(data, dict) or not isinstance(data.get("nodes"), list):
            continue
        for n in nodes_of(data):
            sockets[n["type"]] |= {s["name"] for s in n.get("inputs") or []}
            values[n["type"]] += n.get("widgets_values") or [] if isinstance(n.get("widgets_values"), list) else []
    return sockets, values


def graph_of(case):
    """The graph for a case of TEMPLATES: its architecture (the case's first word) and file."""
    inputs = {"model": "MODEL", "bending_clip": "CLIP", "bending_prompt": "a photo of a lake at sunset"}
    return example_workflow(NODE, inputs, FILES.get(case, "baked.safetensors"), case.split()[0], "dit")


@pytest.mark.parametrize("architecture", TEMPLATES)
def test_every_class_and_input_is_one_an_official_template_has(architecture, official):
    sockets, values = official
    graph = graph_of(architecture)
    for key, node in graph.items():
        kind = node["class_type"]
        if kind == NODE:
            continue
        assert kind in sockets, (architecture, kind)
        for name, value in node["inputs"].items():
            if isinstance(value, list):                     # a link: a socket the class has
                assert name in sockets[kind], (architecture, kind, name)
                assert value[0] in graph and value[0] != key, (architecture, kind, name)
            else:
                assert name in sockets[kind] or value in values[kind], (architecture, kind, name, value)


def _check_sampler(architecture, graph, template):
    """KSampler's steps, cfg, sampler and scheduler: the template's KSampler, or (templates sampling with
    SamplerCustomAdvanced) its BasicScheduler, CFGGuider and KSamplerSelect, which KSampler equals."""
    by_class = defaultdict(list)
    for n in template:
        by_class[n["type"]].append(n.get("widgets_values") or [])
    ks = [n["inputs"] for n in graph.values() if n["class_type"] == "KSampler"]
    for s in ks:
        settings = [s["steps"], s["cfg"], s["sampler_name"], s["scheduler"]]
        if "KSampler" in by_class:
            assert any(w[2:6] == settings for w in by_class["KSampler"]), (architecture, settings)
        else:
            assert [s["scheduler"], s["steps"], 1] in by_class["BasicScheduler"], (architecture, settings)
            assert [s["cfg"]] in by_class["CFGGuider"] and [s["sampler_name"]] in by_class["KSamplerSelect"]


@pytest.mark.parametrize("architecture", TEMPLATES)
def test_values_are_the_family_templates(architecture):
    name, subgraph = TEMPLATES[architecture]
    template = nodes_of(load(name), subgraph)
    kinds = {n["type"] for n in template}
    graph = graph_of(architecture)
    classes = [n["class_type"] for n in graph.values()]
    # the family's loaders, latent and sampling nodes are the template's
    for kind in ("UNETLoader", "VAELoader", "VAEDecode"):
        assert kind in classes and kind in kinds, (architecture, kind)
    assert kinds & {"CLIPLoader", "DualCLIPLoader"} & set(classes), architecture
    for node in graph.values():
        kind = node["class_type"]
        if kind in UNCHECKED or kind == "KSampler" or kind not in kinds:
            continue
        own = [v for k, v in node["inputs"].items() if k not in OWN and not isinstance(v, list)]
        assert any(all(v in widgets(n, template) for v in own) for n in template if n["type"] == kind), \
            (architecture, kind, own)
    # every class the graph adds beyond the generic ones is in the family's template
    generic = UNCHECKED | {"KSampler", "UNETLoader", "VAEDecode", "CreateVideo", "ConditioningZeroOut"}
    assert set(classes) - generic <= kinds, (architecture, set(classes) - generic - kinds)
    _check_sampler(architecture, graph, template)
    if architecture in VIDEO:
        assert classes[-2:] == ["CreateVideo", "SaveVideo"] and "SaveVideo" in {n["type"] for n in nodes_of(load(name))}
    else:
        assert classes[-1] == "SaveImage"


@pytest.mark.parametrize("architecture, family", [
    ("flux2-dev", "flux2-dev"), ("flux2", "flux2"), ("flux2-klein", "flux2-klein"),
    ("flux2-klein-4b", "flux2-klein"), ("flux2-klein-9b", "flux2-klein-9b"), ("z-image", "z-image"),
    ("z-image-omni", "z-image"), ("qwen-image-2.1", "qwen-image-2.1"), ("qwen-image", "qwen-image"),
    ("kandinsky5-lite-image", "kandinsky5"), ("kandinsky5-lite-video", "kandinsky5-lite-video"),
    ("kandinsky5-pro-video", "kandinsky5-pro-video"), ("krea2", "krea2"), ("longcat-image", "longcat-image"),
    ("ovis-image", "ovis-image"), ("hunyuan-video-1.5", "hunyuan-video-1.5"), ("hunyuan-video", "hunyuan-video"),
    ("anima", "anima"), ("ideogram4", "ideogram4")])
def test_family_of_the_newer_architectures(architecture, family):
    assert family_of(architecture) == family and family in FAMILIES


def test_the_node_sits_between_the_loader_and_the_sampling():
    """Flux.2 dev: UNETLoader → the node → BasicGuider → SamplerCustomAdvanced with Flux2Scheduler's sigmas;
    the CLIPLoader (type flux2) feeds the node's bending_clip and the prompt; FluxGuidance on the positive."""
    graph = graph_of("flux2-dev")
    by_class = {n["class_type"]: k for k, n in graph.items()}
    node = graph[by_class[NODE]]["inputs"]
    assert node["model"] == [by_class["UNETLoader"], 0] and node["bending_clip"] == [by_class["CLIPLoader"], 0]
    guider = graph[by_class["BasicGuider"]]["inputs"]
    assert guider["model"] == [by_class[NODE], 0] and guider["conditioning"] == [by_class["FluxGuidance"], 0]
    sampler = graph[by_class["SamplerCustomAdvanced"]]["inputs"]
    assert sampler["sigmas"] == [by_class["Flux2Scheduler"], 0] and sampler["guider"] == [by_class["BasicGuider"], 0]
    assert sampler["latent_image"] == [by_class["EmptyFlux2LatentImage"], 0]


def test_qwen_image_21_encodes_both_prompts_with_its_own_node():
    graph = graph_of("qwen-image-2.1")
    by_class = {n["class_type"]: k for k, n in graph.items()}
    encode = by_class["TextEncodeQwenImage21"]
    assert graph[encode]["inputs"]["prompt"] == "a photo of a lake at sunset" and "CLIPTextEncode" not in by_class
    ks = graph[by_class["KSampler"]]["inputs"]
    assert ks["positive"] == [encode, 0] and ks["negative"] == [encode, 1]


def test_kandinsky5_video_takes_its_latent_from_its_conditioning_node():
    graph = graph_of("kandinsky5-pro-video")
    by_class = {n["class_type"]: k for k, n in graph.items()}
    i2v = by_class["Kandinsky5ImageToVideo"]
    assert graph[i2v]["inputs"]["vae"] == [by_class["VAELoader"], 0] and "start_image" not in graph[i2v]["inputs"]
    ks = graph[by_class["KSampler"]]["inputs"]
    assert (ks["positive"], ks["negative"], ks["latent_image"]) == ([i2v, 0], [i2v, 1], [i2v, 2])


def _upstream(graph, key, name, skip=()):
    """The class names feeding a node's input `name`, following each node's "model" input back to a loader."""
    chain = []
    while True:
        key = graph[key]["inputs"][name][0]
        if graph[key]["class_type"] not in skip:
            chain.append(graph[key]["class_type"])
        if "model" not in graph[key]["inputs"]:
            return chain, key
        name = "model"


def test_ideogram4_bends_the_conditional_model_only():
    """Ideogram 4: UNETLoader (the baked file) → the node → CFGOverride → DualModelGuider's model (the one
    that sees the prompt), as the template's conditional chain (UNETLoader → CFGOverride → model);
    model_negative straight from a second UNETLoader of the template's unconditional file; Ideogram4Scheduler's
    sigmas."""
    name, subgraph = TEMPLATES["ideogram4"]
    template = nodes_of(load(name), subgraph)
    links = {link["id"]: link for g in load(name)["definitions"]["subgraphs"] if g["name"] == subgraph
             for link in g["links"]}
    by_id = {n["id"]: n for n in template}
    (guide,) = [n for n in template if n["type"] == "DualModelGuider"]

    def template_chain(socket):
        chain, node = [], guide
        while True:
            link = next(i["link"] for i in node.get("inputs") or [] if i["name"] == socket)
            node, socket = by_id[links[link]["origin_id"]], "model"
            chain.append(node["type"])
            if node["type"] == "UNETLoader":
                return chain, node

    graph = graph_of("ideogram4")
    (guider,) = [k for k, n in graph.items() if n["class_type"] == "DualModelGuider"]
    chain, loader = _upstream(graph, guider, "model")
    assert chain == ["CFGOverride", NODE, "UNETLoader"] and graph[loader]["inputs"]["unet_name"] == "baked.safetensors"
    assert _upstream(graph, guider, "model", skip={NODE})[0] == template_chain("model")[0]
    negative, unconditional = _upstream(graph, guider, "model_negative")
    expected, official = template_chain("model_negative")
    assert negative == expected == ["UNETLoader"]
    assert graph[unconditional]["inputs"]["unet_name"] == official["widgets_values"][0] != "baked.safetensors"
    inputs = graph[guider]["inputs"]
    clip = [k for k, n in graph.items() if n["class_type"] == "CLIPLoader"]
    assert graph[inputs["positive"][0]]["inputs"]["clip"] == [clip[0], 0] and len(clip) == 1
    assert graph[inputs["negative"][0]] == {"class_type": "ConditioningZeroOut", "inputs": {"conditioning":
                                                                                           inputs["positive"]}}
    node = next(n["inputs"] for n in graph.values() if n["class_type"] == NODE)
    assert node["bending_clip"] == [clip[0], 0]
    assert [n["class_type"] for n in graph.values()].count(NODE) == 1
    sampler = next(n["inputs"] for n in graph.values() if n["class_type"] == "SamplerCustomAdvanced")
    assert sampler["guider"] == [guider, 0] and graph[sampler["sigmas"][0]]["class_type"] == "Ideogram4Scheduler"


def test_a_baked_ideogram4_companion_writes_its_graph(tmp_path):
    """A baked Ideogram 4 file (`inspect`'s architecture ideogram4, tests/test_dit_ideogram4.py): the companion
    now writes workflow_api.json (no no_workflow line), its node on the baked file, the unconditional model
    loaded beside it."""
    from ckptbend.companion import write_companion
    from ckptbend.recipe import parse_recipe

    recipe = parse_recipe('schema = 1\nname = "b"\n[[bending]]\ntoken = "sunset"\nmode = "translate"\n'
                          'translate_x = -0.4\n', "b.toml")
    write_companion(recipe, tmp_path / "c", {"file": "bent.safetensors", "architecture": "ideogram4", "kind": "dit"})
    assert "no_workflow" not in json.loads((tmp_path / "c" / "companion.json").read_text())
    graph = json.loads((tmp_path / "c" / "workflow_api.json").read_text())
    (node,) = [n["inputs"] for n in graph.values() if n["class_type"].startswith("ckptbend_")]
    assert graph[node["model"][0]]["inputs"]["unet_name"] == "bent.safetensors"
    loaders = sorted(n["inputs"]["unet_name"] for n in graph.values() if n["class_type"] == "UNETLoader")
    assert loaders == ["bent.safetensors", FAMILIES["ideogram4"]["unconditional_model"]]
