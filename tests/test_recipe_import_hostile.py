"""`recipe import` on broken and hostile sources: every one ends in one error line naming what is wrong (exit
2 from the CLI), in bounded work; a broken part off the sampler's path does not stop the import. Images:
only metadata is read (text after the image data, compressed text, no pixel-count limit, no warnings)."""

import copy
import json
import struct
import subprocess
import sys
import zlib

import pytest
from PIL import Image

from ckptbend.errors import CkptbendError
from ckptbend.importers import Options, import_recipe
from ckptbend.recipe import parse_recipe
from test_recipe_import import API, BASE, ROOT, UI, assert_clean_error, got, node, run, settings


def source(tmp_path, data, name="w.json"):
    path = tmp_path / name
    path.write_text(data if isinstance(data, str) else json.dumps(data))
    return path


def refused(path, fragment, **options):
    with pytest.raises(CkptbendError) as e:
        import_recipe(path, Options(**options))
    assert fragment in str(e.value) and "\n" not in str(e.value), str(e.value)


def chain_of(kind, mode, length=2000):
    """UI: `length` reroutes (or bypassed LoRA loaders) between the SAG node and the KSampler (Python's
    recursion limit, 1000, is what a recursive walk would hit)."""
    workflow, prev = copy.deepcopy(UI), 14
    for i in range(length):
        nid, lid = 1000 + i, 10000 + i
        workflow["nodes"].append({"id": nid, "type": kind, "mode": mode,
                                  "inputs": [{"name": "model", "type": "MODEL", "link": prev}],
                                  "outputs": [{"name": "MODEL", "type": "MODEL", "links": [lid]}]})
        next(link for link in workflow["links"] if link[0] == prev)[3:5] = [nid, 0]
        workflow["links"].append([lid, nid, 0, 3, 0, "MODEL"])
        prev = lid
    node(workflow, 3)["inputs"][0]["link"] = prev
    return workflow


def cycle_of(kind, mode):
    workflow = chain_of(kind, mode, length=2)
    next(link for link in workflow["links"] if link[0] == 14)[1] = 1001   # the first now feeds on the last
    return workflow


def fan_out(levels=24):
    """A 2 KB file whose subgraphs each hold two instances of the next: 2^24 nodes if expanded."""
    definitions = [{"id": f"sg{i}", "links": [], "inputs": [], "outputs": [],
                    "nodes": [{"id": k, "type": f"sg{i + 1}" if i < levels - 1 else "KSampler"} for k in (1, 2)]}
                   for i in range(levels)]
    return {"nodes": [{"id": 1, "type": "sg0"}], "links": [], "definitions": {"subgraphs": definitions}}


@pytest.mark.parametrize("make", [lambda: chain_of("Reroute", 0), lambda: chain_of("LoraLoaderModelOnly", 4)])
def test_long_chains_are_walked_without_recursion(tmp_path, make):
    assert got(import_recipe(source(tmp_path, make())).recipe) == settings(BASE)


def test_a_long_api_chain(tmp_path):
    workflow, prev = copy.deepcopy(API), "6"
    for i in range(3000):
        workflow[f"s{i}"] = {"class_type": "CFGNorm", "inputs": {"model": [prev, 0], "strength": 1.0}}
        prev = f"s{i}"
    workflow["3"]["inputs"]["model"] = [prev, 0]
    assert got(import_recipe(source(tmp_path, workflow)).recipe) == settings(BASE)


def api_cycle():
    workflow = copy.deepcopy(API)
    workflow["50"] = {"class_type": "LoraLoaderModelOnly", "inputs": {"model": ["51", 0], "lora_name": "x", "strength_model": 1}}
    workflow["51"] = {"class_type": "LoraLoaderModelOnly", "inputs": {"model": ["50", 0], "lora_name": "x", "strength_model": 1}}
    workflow["3"]["inputs"]["model"] = ["50", 0]
    return workflow


def self_containing():
    return {"nodes": [{"id": 1, "type": "sgX"}], "links": [],
            "definitions": {"subgraphs": [{"id": "sgX", "nodes": [{"id": 1, "type": "sgX"}], "links": []}]}}


def with_link(link, into=3):
    workflow = copy.deepcopy(UI)
    workflow["links"] = [l for l in workflow["links"] if l[0] != 14] + ([link] if link is not None else [None])
    node(workflow, into)["inputs"][0]["link"] = 14
    return workflow


def widgets_of(values):
    workflow = copy.deepcopy(UI)
    node(workflow, 5)["widgets_values"] = values
    return workflow


JSON_TEXT = json.dumps(API)
CASES = [
    (lambda: cycle_of("Reroute", 0), "node 3 (KSampler) input 'model' leads round in a cycle"),
    (lambda: cycle_of("LoraLoaderModelOnly", 4), "node 3 (KSampler) input 'model' leads round in a cycle"),
    (api_cycle, "the MODEL path of node 3 (KSampler) leads round in a cycle through node 50 (LoraLoaderModelOnly)"),
    (self_containing, "subgraphs nested more than 32 deep (a subgraph that contains itself?)"),
    (fan_out, "expands to more than 20000 nodes"),
    (lambda: with_link([14, 999, 0, 3, 0, "MODEL"]), "node 3 (KSampler) input 'model' comes from node 999, which is not in the workflow"),
    (lambda: with_link(None), "node 3 (KSampler) input 'model' comes through link 14, which is not in the workflow"),
    (lambda: with_link([14, 6, 0]), "node 3 (KSampler) input 'model' comes through link 14, which is malformed"),
    (lambda: widgets_of([1.1, None, 1, 1]), "node 5 (UNetSelfAttentionMultiply) widget 'k' is null, not a number"),
    (lambda: widgets_of(["abc", 1.1, 1, 1]), "node 5 (UNetSelfAttentionMultiply) widget 'q' is 'abc', not a number"),
    (lambda: widgets_of([1.1, 1.1]), "node 5 (UNetSelfAttentionMultiply) has 2 widget values; its widget 'v' (#3) has none"),
    (lambda: JSON_TEXT.replace('"q": 1.1', '"q": ' + "9" * 5000), "node 5 (UNetSelfAttentionMultiply) input 'q' is inf"),
    (lambda: JSON_TEXT.replace('"q": 1.1', '"q": ' + "9" * 300), "node 5 (UNetSelfAttentionMultiply) input 'q' is 999"),
    (lambda: JSON_TEXT.replace('"q": 1.1', '"q": "1.1"'), "node 5 (UNetSelfAttentionMultiply) input 'q' is '1.1', not a number"),
    (lambda: JSON_TEXT[:-1] + ', "99": {"class_type": "X", "inputs": {"v": ' + "[" * 900 + "]" * 900 + "}}}",
     "a value is nested more than 100 deep"),
    (lambda: "[" * 100_000 + "]" * 100_000, "nested more than 100 deep"),
]


@pytest.mark.parametrize("make, fragment", CASES, ids=[f[:40] for _, f in CASES])
def test_broken_and_hostile_workflows_are_one_line_errors(tmp_path, make, fragment):
    refused(source(tmp_path, make()), fragment)


def test_broken_parts_off_the_path_and_string_ids_do_not_matter(tmp_path):
    workflow = copy.deepcopy(UI)
    workflow["links"].append([88, 999, 0, 12, 0, "IMAGE"])          # SaveImage fed by a node that is gone
    node(workflow, 12)["inputs"][0]["link"] = 88
    for n in workflow["nodes"]:
        n["id"] = str(n["id"])
    api = JSON_TEXT.replace("156680208700286", "9" * 5000)              # a seed no int can hold
    for data in (workflow, api):
        assert got(import_recipe(source(tmp_path, data)).recipe) == settings(BASE)


def test_values_toml_or_a_weight_cannot_hold(tmp_path):
    for q, k, fragment in ((1.7e308, 1, "input 'q' is 1.7e+308: no weight or setting can take it"),
                           (10 ** 300, 1, "input 'q' is 1000000000000000000000000000000000000..."),
                           (1e30, 1e30, "[unet.self] q x k = 1e+30 x 1e+30 overflows")):
        workflow = copy.deepcopy(API)
        workflow["5"]["inputs"].update(q=q, k=k)
        refused(source(tmp_path, workflow), fragment, allow_out_of_range=True)
    workflow = copy.deepcopy(API)
    workflow["8"]["inputs"]["text"] = ["x"] * 10                     # off the recipe: fine
    workflow["30"] = {"class_type": "SelfAttentionGuidance", "inputs": {"scale": 2 ** 70, "blur_sigma": 2, "model": ["5", 0]}}
    workflow["6"]["inputs"]["model"] = ["30", 0]
    del workflow["30"]["inputs"]["scale"]
    workflow["30"]["inputs"]["scale"] = 2 ** 70
    refused(source(tmp_path, workflow), "two sources of [sag]")


BOMB = 'a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]\n' + "".join(
    f"{c}: &{c} [{', '.join([f'*{p}'] * 9)}]\n" for p, c in zip("abcdefghi", "bcdefghij")) + \
    "attention_bending:\n  configs:\n    - token: *j\n      mode: scale\n"


YAML_CASES = [
    ("attention_bending:\n  configs:\n    - token: a\n      mode: scale\n      scale_factor: " + "9" * 5000 + "\n",
     "line 5: an integer of 5000 digits"),
    ("attention_bending:\n  configs:\n    - token: " + "[" * 5000 + "]" * 5000 + "\n      mode: scale\n",
     "a value is nested more than 100 deep"),
    (BOMB, "expands to more than 100000 values (YAML aliases repeat what they name)"),
    ("attention_bending:\n  configs:\n    - token: &t [*t]\n      mode: scale\n", "a value is nested more than 100 deep"),
    ("attention_bending:\n  configs:\n    - token: " + "x" * 70_000 + "\n      mode: scale\n",
     "[bending] token: a value longer than 65536 characters cannot be a recipe value"),
]


@pytest.mark.parametrize("text, fragment", YAML_CASES, ids=[f[:40] for _, f in YAML_CASES])
def test_hostile_yaml(tmp_path, text, fragment):
    refused(source(tmp_path, text, "b.yaml"), fragment)


def test_bombs_stay_within_a_few_hundred_megabytes(tmp_path):
    """The CLI, its address space capped at 1 GiB: each bomb still ends in one error line."""
    for name, data in (("fan.json", json.dumps(fan_out())), ("bomb.yaml", BOMB)):
        path = source(tmp_path, data, name)
        script = (f"import resource, runpy, sys; resource.setrlimit(resource.RLIMIT_AS, ({1 << 30}, {1 << 30})); "
                  f"sys.argv = ['ckptbend', 'recipe', 'import', {str(path)!r}]; "
                  f"runpy.run_path({str(ROOT / 'bin' / 'ckptbend')!r}, run_name='__main__')")
        assert_clean_error(subprocess.run([sys.executable, "-c", script], capture_output=True, text=True),
                           "expands to more than")


# --- images ---------------------------------------------------------------------------------------------------

def chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png(path, before=(), after=(), size=(8, 8)):
    """A PNG written chunk by chunk: IHDR claiming `size`, the text chunks around one small IDAT."""
    header = struct.pack(">IIBBBBB", *size, 8, 2, 0, 0, 0)
    pixels = zlib.compress(b"".join(b"\0" + b"\0" * 24 for _ in range(8)))
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + b"".join(before) + chunk(b"IDAT", pixels)
                     + b"".join(after) + chunk(b"IEND", b""))
    return path


def text(key, value):
    return chunk(b"tEXt", key.encode() + b"\0" + (value if isinstance(value, str) else json.dumps(value)).encode())


def ztxt(key, value):
    return chunk(b"zTXt", key.encode() + b"\0\0" + zlib.compress(json.dumps(value).encode()))


def test_image_metadata_wherever_it_is(tmp_path):
    padded = copy.deepcopy(UI)
    padded["extra"]["notes"] = "x" * 3_000_000                       # past Pillow's 1 MB text-chunk limit
    for path in (png(tmp_path / "after.png", after=[text("prompt", API)]),          # written after the pixels
                 png(tmp_path / "z.png", before=[ztxt("workflow", padded)]),
                 png(tmp_path / "huge.png", before=[text("prompt", API)], size=(30000, 30000))):  # 900 MP claimed
        assert got(import_recipe(path).recipe) == settings(BASE), path.name


def test_an_unreadable_prompt_falls_back_to_the_workflow(tmp_path):
    result = import_recipe(png(tmp_path / "i.png", before=[text("prompt", '{"3": {x'), text("workflow", UI)]))
    assert got(result.recipe) == settings(BASE) and "('workflow' metadata)" in result.text
    assert any("('prompt' metadata): invalid JSON" in w and "imported the image's 'workflow'" in w for w in result.warnings)


def test_a_compressed_text_bomb_is_refused(tmp_path):
    deflate = zlib.compressobj()
    spaces = b"".join(deflate.compress(b" " * (1 << 20)) for _ in range(80)) + deflate.flush()   # 80 MiB, deflated
    bomb = chunk(b"zTXt", b"workflow\0\0" + spaces)
    refused(png(tmp_path / "b.png", before=[bomb]), "a compressed text chunk inflates to more than 64 MiB")


def exif_with_a_broken_tag(prompt: str) -> bytes:
    """TIFF-style EXIF: the prompt as tag 0x0110 (ASCII), and a UserComment whose data lies past the end
    (Pillow warns "Possibly corrupt EXIF data" and skips it)."""
    text_ = prompt.encode() + b"\0"
    entries = struct.pack("<HHII", 0x0110, 2, len(text_), 8 + 2 + 2 * 12 + 4) + struct.pack("<HHII", 0x9286, 7, 100, 0xFFFF)
    return b"II*\0" + struct.pack("<I", 8) + struct.pack("<H", 2) + entries + struct.pack("<I", 0) + text_


def test_corrupt_exif_prints_no_pillow_warning(tmp_path):
    Image.new("RGB", (8, 8)).save(tmp_path / "a.webp", exif=exif_with_a_broken_tag("prompt:" + json.dumps(API)))
    result = run("recipe", "import", tmp_path / "a.webp")
    assert result.returncode == 0 and result.stderr == "", result.stderr
    assert got(parse_recipe(result.stdout)) == settings(BASE)


# --- -o -----------------------------------------------------------------------------------------------------

def test_output_a_folder_or_nothing(tmp_path):
    path = source(tmp_path, API)
    (tmp_path / "out").mkdir()
    for output in (tmp_path / "out", ""):
        result = run("recipe", "import", path, "-o", output, "--force")
        assert_clean_error(result, "is a folder; -o takes the recipe file's path")
        assert "--force" not in result.stderr
