"""`recipe import` on UI workflows shaped as today's frontend saves them (tests/_comfy_ui.py): subgraphs with
promoted widgets, switches, legacy group nodes, several stages, sampling-only nodes, CLIPAttentionMultiply on
LLM text encoders."""

import json

import pytest

from _comfy_ui import Graph, Subgraph, add, sd15_graph, socket
from ckptbend.errors import CkptbendError
from ckptbend.importers import Options, import_recipe


def imported(tmp_path, data, name="w.json", **options):
    path = tmp_path / name
    path.write_text(json.dumps(data))
    return import_recipe(path, Options(**options))


def refused(tmp_path, data, fragment, **options):
    with pytest.raises(CkptbendError) as e:
        imported(tmp_path, data, **options)
    message = str(e.value)
    assert fragment in message and "\n" not in message, message
    return message


def factors(recipe, section):
    return [dict(e.factors) for e in recipe.multipliers.get(section, ())]


# --- subgraphs ------------------------------------------------------------------------------------------------

def attention_subgraph(root, name="Attention", q=1.0, k=1.0):
    """MODEL → UNetSelfAttentionMultiply (q and k promoted to subgraph inputs) → SAG → MODEL."""
    sub = Subgraph(root, name)
    for declared, kind in (("model", "MODEL"), ("q", "FLOAT"), ("k", "FLOAT")):
        sub.add_input(declared, kind)
    mult = add(sub, "UNetSelfAttentionMultiply", q, k, 1.0, 1.0)
    socket(sub, mult, "q")
    socket(sub, mult, "k")
    sag = add(sub, "SelfAttentionGuidance", 0.5, 2.0)
    sub.feed("model", mult, "model")
    sub.feed("q", mult, "q")
    sub.feed("k", mult, "k")
    sub.connect(mult, 0, sag, "model")
    sub.add_output("MODEL", "MODEL", sag)
    return sub, mult


def test_subgraph_inputs_are_bound_by_name_and_the_promoted_values_are_read(tmp_path):
    g = Graph()
    ids = sd15_graph(g)
    sub, _ = attention_subgraph(g)        # the inner widgets hold stale 1.0s
    instance = g.instance(sub, values={"q": 1.5, "k": 1.2})
    g.insert(ids["sampler"], "model", instance, "model")
    data = g.workflow()
    saved = next(n for n in data["nodes"] if n["id"] == instance)
    assert [s["name"] for s in saved["inputs"]] == ["model"] and saved["widgets_values"] == [1.5, 1.2]
    result = imported(tmp_path, data)
    assert factors(result.recipe, "unet.self") == [{"q": 1.5, "k": 1.2}] and result.recipe.sag.scale == 0.5
    assert f"# node {instance}:1 (UNetSelfAttentionMultiply)" in result.text


def test_a_linked_subgraph_input_wins_and_positions_do_not_matter(tmp_path):
    """k comes from a PrimitiveNode outside; the saved instance lists k before model (positions differ
    from the declared order model, q, k)."""
    g = Graph()
    ids = sd15_graph(g)
    sub, _ = attention_subgraph(g)
    instance = g.instance(sub, values={"q": 1.5, "k": 1.2})
    node = g.node(instance)
    node["inputs"].insert(0, node["inputs"].pop(2))      # k, model, q
    primitive = add(g, "PrimitiveNode", 1.25, "fixed")
    g.connect(primitive, 0, instance, "k")
    g.insert(ids["sampler"], "model", instance, "model")
    assert factors(imported(tmp_path, g.workflow()).recipe, "unet.self") == [{"q": 1.5, "k": 1.25}]


def test_nested_subgraphs_take_the_outermost_promoted_value(tmp_path):
    g = Graph()
    ids = sd15_graph(g)
    inner, _ = attention_subgraph(g, "Inner")
    outer = Subgraph(g, "Outer")
    outer.add_input("model", "MODEL")
    outer.add_input("q", "FLOAT")
    nested = outer.instance(inner, values={"q": 1.5, "k": 1.2})
    outer.feed("model", nested, "model")
    outer.feed("q", nested, "q")
    outer.add_output("MODEL", "MODEL", nested)
    instance = g.instance(outer, values={"q": 1.7})
    g.insert(ids["sampler"], "model", instance, "model")
    result = imported(tmp_path, g.workflow())
    assert factors(result.recipe, "unet.self") == [{"q": 1.7, "k": 1.2}]
    assert f"node {instance}:{nested}:1 (UNetSelfAttentionMultiply)" in result.text


def test_legacy_proxy_widgets(tmp_path):
    """Frontends of late 2025 showed an inner widget on the instance directly (properties.proxyWidgets);
    the instance's values, when saved, replace the inner ones, pair by pair."""
    g = Graph()
    ids = sd15_graph(g)
    sub = Subgraph(g, "Proxy")
    sub.add_input("model", "MODEL")
    mult = add(sub, "UNetSelfAttentionMultiply", 1.1, 1.0, 1.0, 1.0)
    sub.feed("model", mult, "model")
    sub.add_output("MODEL", "MODEL", mult)
    instance = g.instance(sub, proxy=[[str(mult), "q"], [str(mult), "out"]], values={"q": 1.4, "out": 0.9})
    g.insert(ids["sampler"], "model", instance, "model")
    assert factors(imported(tmp_path, g.workflow()).recipe, "unet.self") == [{"q": 1.4, "out": 0.9}]
    g.node(instance)["widgets_values"] = []              # as the official templates save them: no host values
    assert factors(imported(tmp_path, g.workflow()).recipe, "unet.self") == [{"q": 1.1}]


# --- switches ----------------------------------------------------------------------------------------------

def switched(switch_value):
    g = Graph()
    ids = sd15_graph(g)
    cross = add(g, "UNetCrossAttentionMultiply", 1.0, 1.0, 1.2, 1.0)
    switch = add(g, "ComfySwitchNode", switch_value, title="Switch (Model)")
    g.insert(ids["sampler"], "model", switch, "on_false")
    g.connect(ids["loader"], 0, cross, "model")
    g.connect(cross, 0, switch, "on_true")
    return g, switch


def test_a_switch_is_followed_through_its_active_input(tmp_path):
    g, switch = switched(True)
    result = imported(tmp_path, g.workflow(), ignore_other_patches=True)
    assert factors(result.recipe, "unet.cross") == [{"v": 1.2}]
    assert f'node {switch} (ComfySwitchNode "Switch (Model)"): switch = true, followed on_true' in result.text
    g, _ = switched(False)
    refused(tmp_path, g.workflow(), "nothing to import")


def test_a_switch_set_by_a_value_node_or_at_run_time(tmp_path):
    g, switch = switched(False)
    flag = add(g, "PrimitiveBoolean", True)
    socket(g, switch, "switch", "BOOLEAN")
    g.connect(flag, 0, switch, "switch")
    assert factors(imported(tmp_path, g.workflow()).recipe, "unet.cross") == [{"v": 1.2}]
    g.node(flag)["type"] = "StringCompare"               # a value computed when the workflow runs
    refused(tmp_path, g.workflow(), f"node {switch} (ComfySwitchNode \"Switch (Model)\") selects on_true or on_false "
                                    f"by its 'switch' input, which comes from node {flag} at run time")


def test_a_switch_inside_a_subgraph_with_its_value_promoted(tmp_path):
    g = Graph()
    ids = sd15_graph(g)
    sub = Subgraph(g, "Turbo")
    sub.add_input("model", "MODEL")
    sub.add_input("switch", "BOOLEAN")
    cross = add(sub, "UNetCrossAttentionMultiply", 1.0, 1.0, 1.2, 1.0)
    switch = add(sub, "ComfySwitchNode", False)          # stale: the instance shows true
    socket(sub, switch, "switch", "BOOLEAN")
    sub.feed("model", cross, "model")
    sub.feed("model", switch, "on_false")
    sub.feed("switch", switch, "switch")
    sub.connect(cross, 0, switch, "on_true")
    sub.add_output("MODEL", "MODEL", switch)
    instance = g.instance(sub, values={"switch": True})
    g.insert(ids["sampler"], "model", instance, "model")
    assert factors(imported(tmp_path, g.workflow()).recipe, "unet.cross") == [{"v": 1.2}]


# --- legacy group nodes ----------------------------------------------------------------------------------------

def group_workflow(values, kind="workflow>Attention"):
    """A 2024 group node: UNetSelfAttentionMultiply → SAG packed as "Attention", saved with its inner nodes'
    values at creation and the instance's own values now."""
    g = Graph()
    ids = sd15_graph(g)
    instance = g.add(kind, values, [("model", "MODEL")], [("MODEL", "MODEL")])
    g.insert(ids["sampler"], "model", instance, "model")
    inner = [
        {"type": "UNetSelfAttentionMultiply", "pos": [0, 0], "size": [270, 130], "flags": {}, "order": 0, "mode": 0,
         "inputs": [{"name": "model", "type": "MODEL", "link": None}],
         "outputs": [{"name": "MODEL", "type": "MODEL", "links": [], "shape": 3}],
         "properties": {"Node name for S&R": "UNetSelfAttentionMultiply"}, "widgets_values": [1.0, 1.0, 1.0, 1.0],
         "index": 0},
        {"type": "SelfAttentionGuidance", "pos": [300, 0], "size": [270, 82], "flags": {}, "order": 1, "mode": 0,
         "inputs": [{"name": "model", "type": "MODEL", "link": None}],
         "outputs": [{"name": "MODEL", "type": "MODEL", "links": [], "shape": 3}],
         "properties": {"Node name for S&R": "SelfAttentionGuidance"}, "widgets_values": [0.5, 2.0], "index": 1},
    ]
    return g.workflow(groupNodes={"Attention": {"nodes": inner, "links": [[0, 0, 1, 0, 5, "MODEL"]], "external": []}}), \
        instance


@pytest.mark.parametrize("kind", ["workflow>Attention", "workflow/Attention"])
def test_a_legacy_group_node_is_expanded_with_the_instance_values(tmp_path, kind):
    data, instance = group_workflow([1.3, 1.1, 1.0, 1.0, 0.7, 1.5], kind)
    result = imported(tmp_path, data)
    assert factors(result.recipe, "unet.self") == [{"q": 1.3, "k": 1.1}]
    assert (result.recipe.sag.scale, result.recipe.sag.blur_sigma) == (0.7, 1.5)
    assert f"node {instance}:0 (UNetSelfAttentionMultiply)" in result.text


def test_a_group_node_whose_values_do_not_line_up_is_refused(tmp_path):
    data, instance = group_workflow([1.3, 1.1, 1.0])
    refused(tmp_path, data, f"group node {instance} (workflow>Attention) holds a UNetSelfAttentionMultiply node, but "
                            "its widget values cannot be lined up")


# --- what the walk follows ---------------------------------------------------------------------------------------

def two_stage():
    """Stage 1: SD 1.5 with a CLIP multiply; stage 2: SVD conditioned on stage 1's decoded image."""
    g = Graph()
    ids = sd15_graph(g)
    clip = add(g, "CLIPAttentionMultiply", 1.0, 1.0, 1.0, 0.9)
    g.insert(ids["pos"], "clip", clip, "clip")
    g.node(ids["neg"])["inputs"][0]["link"] = None
    g.links = [l for l in g.links if not (l[3] == ids["neg"] and l[4] == 0)]
    g.connect(clip, 0, ids["neg"], "clip")
    svd = add(g, "ImageOnlyCheckpointLoader", "svd_xt.safetensors")
    guidance = add(g, "VideoLinearCFGGuidance", 1.0)
    temporal = add(g, "UNetTemporalAttentionMultiply", 1.0, 1.2, 1.0, 1.0)
    cond = add(g, "SVD_img2vid_Conditioning", 1024, 576, 14, 127, 6, 0.0)
    sampler = add(g, "KSampler", 1, "fixed", 20, 2.5, "euler", "karras", 1.0)
    g.connect(svd, 0, guidance, "model")
    g.connect(guidance, 0, temporal, "model")
    g.connect(temporal, 0, sampler, "model")
    g.connect(svd, 1, cond, "clip_vision")
    g.connect(ids["decode"], 0, cond, "init_image")
    g.connect(svd, 2, cond, "vae")
    g.connect(cond, 0, sampler, "positive")
    g.connect(cond, 1, sampler, "negative")
    g.connect(cond, 2, sampler, "latent_image")
    return g, ids, sampler, guidance


def test_the_conditioning_walk_does_not_cross_into_an_earlier_stage(tmp_path):
    g, ids, sampler, guidance = two_stage()
    result = imported(tmp_path, g.workflow(), sampler=str(sampler))
    assert dict(result.recipe.multipliers) == {"unet.temporal": result.recipe.multipliers["unet.temporal"]}
    assert factors(result.recipe, "unet.temporal") == [{"self_temporal": 1.2}]
    assert f"# kept in the workflow (changes sampling only, nothing a recipe holds): node {guidance} " \
           "(VideoLinearCFGGuidance)" in result.text
    assert factors(imported(tmp_path, g.workflow(), sampler=str(ids["sampler"])).recipe, "clip") == [{"out": 0.9}]
    refused(tmp_path, g.workflow(), "2 samplers use different model/CLIP chains")


def test_prompt_writers_and_zeroed_conditioning_are_not_text_encoders(tmp_path):
    g = Graph()
    ids = sd15_graph(g)
    clip = add(g, "CLIPAttentionMultiply", 1.0, 1.0, 1.0, 0.9)
    g.insert(ids["pos"], "clip", clip, "clip")
    llm = add(g, "CLIPLoader", "qwen_3_4b.safetensors", "stable_diffusion", "default")
    writer = add(g, "TextGenerate", "a lake", 256)
    g.connect(llm, 0, writer, "clip")
    socket(g, ids["pos"], "text", "STRING")
    g.connect(writer, 0, ids["pos"], "text")
    zero = add(g, "ConditioningZeroOut")                 # the negative: unpatched CLIP, zeroed
    g.insert(ids["sampler"], "negative", zero, "conditioning")
    assert factors(imported(tmp_path, g.workflow()).recipe, "clip") == [{"out": 0.9}]


def test_loaders_ckptbend_does_not_know_are_loaders_not_patches(tmp_path):
    g = Graph()
    ids = sd15_graph(g)
    loader = g.add("FancyUnetLoader", ["fancy.gguf", "auto"], [], [("MODEL", "MODEL")])
    g.insert(ids["sampler"], "model", add(g, "UNetSelfAttentionMultiply", 1.1, 1.0, 1.0, 1.0), "model")
    g.links = [l for l in g.links if not (l[1] == ids["loader"] and l[2] == 0)]
    mult = next(n for n in g.nodes if n["type"] == "UNetSelfAttentionMultiply")["id"]
    g.connect(loader, 0, mult, "model")
    result = imported(tmp_path, g.workflow())
    assert f"# model: node {loader} (FancyUnetLoader) loads 'fancy.gguf' (a loader ckptbend does not know)" in result.text
    assert f"# CLIP: node {ids['loader']} (CheckpointLoaderSimple) loads 'sd15.safetensors'" in result.text


def test_nothing_to_import_is_said_in_one_line(tmp_path):
    g = Graph()
    ids = sd15_graph(g)
    message = refused(tmp_path, g.workflow(), "nothing to import")
    assert f"node {ids['sampler']} (KSampler)" in message and "CLIPAttentionMultiply" in message
    sampling = add(g, "ModelSamplingSD3", 3.0)
    g.insert(ids["sampler"], "model", sampling, "model")
    refused(tmp_path, g.workflow(), "(only nodes that change sampling: ModelSamplingSD3)")


def test_sampling_only_nodes_do_not_block_the_attention_nodes_beside_them(tmp_path):
    g = Graph()
    ids = sd15_graph(g)
    for kind, values in (("ModelSamplingSD3", (3.0,)), ("UNetSelfAttentionMultiply", (1.1, 1.0, 1.0, 1.0)),
                         ("CFGNorm", (1.0,))):
        g.insert(ids["sampler"], "model", add(g, kind, *values), "model")
    result = imported(tmp_path, g.workflow())
    assert factors(result.recipe, "unet.self") == [{"q": 1.1}]
    assert result.text.count("# kept in the workflow (changes sampling only") == 2
