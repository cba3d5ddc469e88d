"""`recipe import` over every workflow of ComfyUI's official template package (PyPI
comfyui-workflow-templates-json, a test extra): each imports, or is refused in one line for a reason that is
true of it (checked against the file itself), never as "malformed"; and with an attention node wired in
before every sampler, as users wire them, each imports exactly that node's values or is refused for a true
reason."""

import collections
import json
from pathlib import Path

import pytest

from ckptbend.errors import CkptbendError
from ckptbend.importers import Options, import_recipe
from ckptbend.importers import nodes as N

templates = pytest.importorskip("comfyui_workflow_templates_json")
FOLDER = Path(templates.__file__).parent / "templates"
SAMPLERS = ("KSampler", "KSamplerAdvanced", "SamplerCustom", "SamplerCustomAdvanced")


def workflows():
    for path in sorted(FOLDER.glob("*.json")):
        data = json.loads(path.read_text(encoding="utf-8"))
        if isinstance(data, dict) and isinstance(data.get("nodes"), list):   # not the index files
            yield path, data


def graphs(data):
    yield data
    yield from (data.get("definitions") or {}).get("subgraphs", [])


def kinds(data) -> set[str]:
    return {n["type"] for g in graphs(data) for n in g["nodes"]}


def test_every_official_template_imports_or_is_refused_for_a_true_reason(capsys):
    counts = collections.Counter()
    for path, data in workflows():
        try:
            import_recipe(path, Options())
            counts["imported"] += 1
            continue
        except CkptbendError as e:
            message = str(e)
        assert "\n" not in message and "malformed" not in message, message
        if "no sampler node" in message:
            assert not kinds(data) & set(SAMPLERS), path.name
            counts["no sampler"] += 1
        elif "nothing to import" in message:
            assert not kinds(data) & set(N.PATCHES), path.name
            counts["nothing to import"] += 1
        elif "which ckptbend cannot follow (known guiders" in message:
            guider = message.split("from the guider node ")[1].split("(")[1].split(")")[0]
            assert guider in kinds(data) and guider not in N.GUIDERS, message
            counts["a guider ckptbend does not follow"] += 1
        else:
            pytest.fail(f"{path.name}: {message}")
    with capsys.disabled():
        print(f"\nofficial templates: {sum(counts.values())} workflows: {dict(counts)}")
    assert sum(counts.values()) > 600 and counts["imported"] >= 2


def lid(link):
    return link["id"] if isinstance(link, dict) else link[0]


def wire_in_attention(data) -> int:
    """A UNetSelfAttentionMultiply (q = 1.25) on the MODEL input of every sampler (or guider), at the sampler's
    own graph level, linked as the frontend links nodes there."""
    last = max([lid(l) for g in graphs(data) for l in g.get("links") or [] if l] + [0])
    wired = 0
    for g in graphs(data):
        for node in list(g["nodes"]):
            slot = next((s for s in node.get("inputs") or [] if s["name"] == "model"), None)
            if node["type"] not in SAMPLERS + tuple(N.GUIDERS) or not slot or slot.get("link") is None:
                continue
            last, ident = last + 1, max(n["id"] for n in g["nodes"]) + 1
            g["nodes"].append({"id": ident, "type": "UNetSelfAttentionMultiply", "mode": 0, "flags": {},
                               "inputs": [{"name": "model", "type": "MODEL", "link": slot["link"]}],
                               "outputs": [{"name": "MODEL", "type": "MODEL", "links": [last]}],
                               "widgets_values": [1.25, 1, 1, 1]})
            for link in g["links"]:
                if link and lid(link) == slot["link"]:
                    if isinstance(link, dict):
                        link.update(target_id=ident, target_slot=0)
                    else:
                        link[3:5] = [ident, 0]
            slot["link"], index = last, node["inputs"].index(slot)
            g["links"].append({"id": last, "origin_id": ident, "origin_slot": 0, "target_id": node["id"],
                               "target_slot": index, "type": "MODEL"} if g is not data else
                              [last, ident, 0, node["id"], index, "MODEL"])
            wired += 1
    return wired


def test_an_attention_node_wired_into_every_official_template(tmp_path, capsys):
    counts = collections.Counter()
    for path, data in workflows():
        if path.name.startswith("api_") or not wire_in_attention(data):
            continue
        copy = tmp_path / path.name
        copy.write_text(json.dumps(data))
        try:
            recipe = import_recipe(copy, Options()).recipe
        except CkptbendError as e:
            message = str(e)
            assert "\n" not in message, message
            if "samplers use different model/CLIP chains" in message:
                counts["several chains: --sampler"] += 1
            else:
                assert "cannot be expressed in a recipe" in message, f"{path.name}: {message}"
                named = [part.split("(")[1].split(")")[0].split(" ")[0] for part in message.split("; node ")]
                assert not set(named) & (set(N.PATCHES) | set(N.SAMPLING_ONLY["model"])), message
                counts["other patches (LoRA, ...)"] += 1
            continue
        assert [dict(e.factors) for e in recipe.multipliers["unet.self"]] in ([{"q": 1.25}], [{"q": 1.25}] * 2), path.name
        counts["imported q = 1.25"] += 1
    with capsys.disabled():
        print(f"\nofficial templates with an attention node before each sampler: {dict(counts)}")
    assert counts["imported q = 1.25"] > 100
