"""Builds UI-format workflows shaped as ComfyUI's frontend (1.58) saves them, for the importer's tests:
- nodes with their input and output slots (`localized_name`; a widget socket carries `widget: {name}`) and
  `widgets_values` in widget order;
- links as arrays at the top level and as objects inside subgraph definitions;
- subgraph definitions with their input/output nodes (-10/-20), declared inputs (`linkIds`) and outputs;
- instances that list only their inputs that are linked, labelled or not widgets (the frontend drops the
  other widget sockets when it saves: compressWidgetInputSlots, which also renumbers the links' target
  slots), with the values promoted onto them in `widgets_values` (one per subgraph input feeding a widget,
  in declared order), or the legacy `properties.proxyWidgets` pairs;
- legacy group nodes: `extra.groupNodes[NAME]` = {nodes, links, external} and instances "workflow>NAME".
"""

import copy
import uuid

WIDGET_TYPES = ("INT", "FLOAT", "STRING", "BOOLEAN", "COMBO")


class Graph:
    """One graph level: the workflow itself, or (Subgraph) a subgraph definition."""

    def __init__(self):
        self.nodes, self.links = [], []
        self.subgraphs: list[Subgraph] = []

    def _link_id(self):
        root = self.root if isinstance(self, Subgraph) else self
        root.last_link = getattr(root, "last_link", 0) + 1
        return root.last_link

    def add(self, kind, widgets=(), inputs=(), outputs=(), *, mode=0, title=None, properties=None, id=None):
        """A node; `inputs`/`outputs` are (name, type) pairs, an input of a widget type being a widget socket."""
        ident = id if id is not None else max([n["id"] for n in self.nodes] + [0]) + 1
        node = {
            "id": ident, "type": kind, "pos": [100 * ident, 200], "size": [270, 130], "flags": {},
            "order": len(self.nodes), "mode": mode,
            "inputs": [{"localized_name": n, "name": n, "type": t, "link": None,
                        **({"widget": {"name": n}} if t in WIDGET_TYPES else {})} for n, t in inputs],
            "outputs": [{"localized_name": n, "name": n, "type": t, "links": []} for n, t in outputs],
            "properties": {"Node name for S&R": kind, "cnr_id": "comfy-core", "ver": "0.3.64", **(properties or {})},
            "widgets_values": list(widgets),
        }
        if title:
            node["title"] = title
        self.nodes.append(node)
        return ident

    def node(self, ident):
        return next(n for n in self.nodes if n["id"] == ident)

    def connect(self, origin, oslot, target, input_name):
        """Link output `oslot` of node `origin` to the input named `input_name` of node `target`."""
        lid = self._link_id()
        tnode = self.node(target)
        tslot = next(i for i, s in enumerate(tnode["inputs"]) if s["name"] == input_name)
        tnode["inputs"][tslot]["link"] = lid
        kind = tnode["inputs"][tslot]["type"]
        if origin not in (-10,):
            self.node(origin)["outputs"][oslot]["links"].append(lid)
        self._record(lid, origin, oslot, target, tslot, kind)
        return lid

    def _record(self, lid, origin, oslot, target, tslot, kind):
        self.links.append([lid, origin, oslot, target, tslot, kind])

    def insert(self, target, input_name, ident, node_input, oslot=0):
        """Put node `ident` on the link into `target`'s input: that link now ends at `ident`'s `node_input`."""
        slot = next(s for s in self.node(target)["inputs"] if s["name"] == input_name)
        link = next(l for l in self.links if (l["id"] if isinstance(l, dict) else l[0]) == slot["link"])
        tslot = next(i for i, s in enumerate(self.node(ident)["inputs"]) if s["name"] == node_input)
        self.node(ident)["inputs"][tslot]["link"] = slot["link"]
        if isinstance(link, dict):
            link.update(target_id=ident, target_slot=tslot)
        else:
            link[3:5] = [ident, tslot]
        slot["link"] = None
        self.connect(ident, oslot, target, input_name)

    def instance(self, sub, *, values=None, labels=(), proxy=None, mode=0, id=None):
        """A subgraph node: an input slot per declared input (widget-typed ones as widget sockets),
        `values` promoted onto those that feed a widget (widgets_values, declared order) or, with
        `proxy`, the legacy [[inner node id, widget], ...] pairs with values in the same order."""
        if sub not in self.subgraphs:
            self.subgraphs.append(sub)
        ident = self.add(sub.id, inputs=[(d["name"], d["type"]) for d in sub.inputs],
                         outputs=[(d["name"], d["type"]) for d in sub.outputs], mode=mode, id=id)
        node = self.node(ident)
        for slot in node["inputs"]:
            if slot["name"] in labels:
                slot["label"] = labels[slot["name"]]
        values = values or {}
        if proxy is not None:
            node["properties"]["proxyWidgets"] = [list(p) for p in proxy]
            node["widgets_values"] = [values[p[1]] for p in proxy if p[1] in values]
        else:
            node["widgets_values"] = [values[d["name"]] for d in sub.inputs if sub.feeds_widget(d) and d["name"] in values]
        return ident

    def _compress(self, nodes, links, as_dict):
        """compressWidgetInputSlots: drop unlinked, unlabelled widget sockets; renumber target slots."""
        for node in nodes:
            node["inputs"] = [s for s in node["inputs"] if not ("widget" in s and s["link"] is None and "label" not in s)]
            for index, slot in enumerate(node["inputs"]):
                for link in links:
                    if (link["id"] if as_dict else link[0]) == slot["link"]:
                        if as_dict:
                            link["target_slot"] = index
                        else:
                            link[4] = index

    def workflow(self, **extra) -> dict:
        nodes, links = copy.deepcopy(self.nodes), copy.deepcopy(self.links)
        self._compress(nodes, links, as_dict=False)
        subs, pending = [], list(self.subgraphs)
        while pending:
            sub = pending.pop(0)
            if sub.id not in [s["id"] for s in subs]:
                subs.append(sub.definition())
                pending += sub.subgraphs
        data = {"id": str(uuid.UUID(int=1)), "revision": 0, "last_node_id": max([n["id"] for n in nodes] + [0]),
                "last_link_id": getattr(self, "last_link", 0), "nodes": nodes, "links": links, "groups": [],
                "config": {}, "extra": {"ds": {"scale": 1, "offset": [0, 0]}, **extra}, "version": 0.4}
        if subs:
            data["definitions"] = {"subgraphs": subs}
        return data


class Subgraph(Graph):
    def __init__(self, root: Graph, name: str):
        super().__init__()
        self.root, self.name = root, name
        self.id = str(uuid.uuid5(uuid.NAMESPACE_URL, name))
        self.inputs, self.outputs = [], []

    def _record(self, lid, origin, oslot, target, tslot, kind):
        self.links.append({"id": lid, "origin_id": origin, "origin_slot": oslot, "target_id": target,
                           "target_slot": tslot, "type": kind})

    def add_input(self, name, kind):
        self.inputs.append({"id": str(uuid.uuid5(uuid.NAMESPACE_URL, self.name + name)), "name": name, "type": kind,
                            "linkIds": [], "pos": [0, 20 * len(self.inputs)]})

    def feed(self, input_name, target, target_input):
        """Link the subgraph input `input_name` (from the -10 node) to an inner node's input."""
        slot = next(i for i, d in enumerate(self.inputs) if d["name"] == input_name)
        self.inputs[slot]["linkIds"].append(self.connect(-10, slot, target, target_input))

    def add_output(self, name, kind, origin, oslot=0):
        lid = self._link_id()
        self.node(origin)["outputs"][oslot]["links"].append(lid)
        self.outputs.append({"id": str(uuid.uuid5(uuid.NAMESPACE_URL, self.name + "out" + name)), "name": name,
                             "type": kind, "linkIds": [lid], "pos": [900, 20 * len(self.outputs)]})
        self._record(lid, origin, oslot, -20, len(self.outputs) - 1, kind)

    def feeds_widget(self, declared) -> bool:
        return any("widget" in s for n in self.nodes for s in n["inputs"] if s["link"] in declared["linkIds"])

    def definition(self) -> dict:
        nodes, links = copy.deepcopy(self.nodes), copy.deepcopy(self.links)
        self._compress(nodes, links, as_dict=True)
        return {"id": self.id, "version": 1, "state": {"lastGroupId": 0, "lastNodeId": len(nodes),
                                                         "lastLinkId": self.root.last_link, "lastRerouteId": 0},
                "revision": 0, "config": {}, "name": self.name,
                "inputNode": {"id": -10, "bounding": [-300, 300, 120, 160]},
                "outputNode": {"id": -20, "bounding": [1200, 300, 120, 60]},
                "inputs": copy.deepcopy(self.inputs), "outputs": copy.deepcopy(self.outputs), "widgets": [],
                "nodes": nodes, "groups": [], "links": links, "extra": {}}


# --- the nodes the tests use, with ComfyUI's slots and widget order ---------------------------------------------

NODES = {
    "CheckpointLoaderSimple": ((), (("MODEL", "MODEL"), ("CLIP", "CLIP"), ("VAE", "VAE"))),
    "UNETLoader": ((), (("MODEL", "MODEL"),)),
    "CLIPLoader": ((), (("CLIP", "CLIP"),)),
    "DualCLIPLoader": ((), (("CLIP", "CLIP"),)),
    "QuadrupleCLIPLoader": ((), (("CLIP", "CLIP"),)),
    "LTXAVTextEncoderLoader": ((), (("CLIP", "CLIP"),)),
    "ImageOnlyCheckpointLoader": ((), (("MODEL", "MODEL"), ("CLIP_VISION", "CLIP_VISION"), ("VAE", "VAE"))),
    "UNetSelfAttentionMultiply": ((("model", "MODEL"),), (("MODEL", "MODEL"),)),
    "UNetCrossAttentionMultiply": ((("model", "MODEL"),), (("MODEL", "MODEL"),)),
    "UNetTemporalAttentionMultiply": ((("model", "MODEL"),), (("MODEL", "MODEL"),)),
    "CLIPAttentionMultiply": ((("clip", "CLIP"),), (("CLIP", "CLIP"),)),
    "SelfAttentionGuidance": ((("model", "MODEL"),), (("MODEL", "MODEL"),)),
    "ModelSamplingSD3": ((("model", "MODEL"),), (("MODEL", "MODEL"),)),
    "CFGNorm": ((("model", "MODEL"),), (("patched_model", "MODEL"),)),
    "VideoLinearCFGGuidance": ((("model", "MODEL"),), (("MODEL", "MODEL"),)),
    "LoraLoaderModelOnly": ((("model", "MODEL"),), (("MODEL", "MODEL"),)),
    "CLIPTextEncode": ((("clip", "CLIP"),), (("CONDITIONING", "CONDITIONING"),)),
    "ConditioningZeroOut": ((("conditioning", "CONDITIONING"),), (("CONDITIONING", "CONDITIONING"),)),
    "TextGenerate": ((("clip", "CLIP"), ("prompt", "STRING")), (("generated_text", "STRING"),)),
    "EmptyLatentImage": ((), (("LATENT", "LATENT"),)),
    "KSampler": ((("model", "MODEL"), ("positive", "CONDITIONING"), ("negative", "CONDITIONING"),
                  ("latent_image", "LATENT")), (("LATENT", "LATENT"),)),
    "VAEDecode": ((("samples", "LATENT"), ("vae", "VAE")), (("IMAGE", "IMAGE"),)),
    "SVD_img2vid_Conditioning": ((("clip_vision", "CLIP_VISION"), ("init_image", "IMAGE"), ("vae", "VAE")),
                                 (("positive", "CONDITIONING"), ("negative", "CONDITIONING"), ("latent", "LATENT"))),
    "ComfySwitchNode": ((("on_false", "MODEL"), ("on_true", "MODEL"), ("switch", "BOOLEAN")), (("output", "MODEL"),)),
    "PrimitiveBoolean": ((), (("BOOLEAN", "BOOLEAN"),)),
    "PrimitiveNode": ((), (("connect to widget input", "*"),)),
    "SaveImage": ((("images", "IMAGE"),), ()),
}


def add(graph: Graph, kind, *widgets, **options):
    inputs, outputs = NODES[kind]
    return graph.add(kind, widgets, inputs, outputs, **options)


def socket(graph: Graph, ident, name, kind="FLOAT"):
    """Turn a widget into a socket that something is (or will be) linked to."""
    graph.node(ident)["inputs"].append({"localized_name": name, "name": name, "type": kind, "widget": {"name": name},
                                        "link": None})


def sd15_graph(graph: Graph):
    """Loader → KSampler with two prompts, decode, save: the ids by role."""
    ids = {"loader": add(graph, "CheckpointLoaderSimple", "sd15.safetensors")}
    ids["pos"] = add(graph, "CLIPTextEncode", "a lake at sunset")
    ids["neg"] = add(graph, "CLIPTextEncode", "blurry")
    ids["latent"] = add(graph, "EmptyLatentImage", 512, 512, 1)
    ids["sampler"] = add(graph, "KSampler", 1, "fixed", 20, 7.0, "euler", "normal", 1.0)
    ids["decode"] = add(graph, "VAEDecode")
    ids["save"] = add(graph, "SaveImage", "ComfyUI")
    graph.connect(ids["loader"], 0, ids["sampler"], "model")
    graph.connect(ids["loader"], 1, ids["pos"], "clip")
    graph.connect(ids["loader"], 1, ids["neg"], "clip")
    graph.connect(ids["pos"], 0, ids["sampler"], "positive")
    graph.connect(ids["neg"], 0, ids["sampler"], "negative")
    graph.connect(ids["latent"], 0, ids["sampler"], "latent_image")
    graph.connect(ids["sampler"], 0, ids["decode"], "samples")
    graph.connect(ids["loader"], 2, ids["decode"], "vae")
    graph.connect(ids["decode"], 0, ids["save"], "images")
    return ids
