"""Helpers shared by several test modules."""

import ast


def fresh(model):
    """A new, untrained instance of the same class and config (weights to be loaded)."""
    cls = type(model)
    return cls.from_config(model.config) if hasattr(cls, "from_config") else cls(model.config)


def load_strict(model, state):
    result = model.load_state_dict(state, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    return model.eval()


def imported_roots(path):
    """Top-level names a module imports (the runtime modules are copied verbatim into companions and
    a ComfyUI node: only torch, math and the standard library are allowed)."""
    roots = set()
    for node in ast.walk(ast.parse(open(path).read())):
        if isinstance(node, ast.Import):
            roots |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            roots.add("." if node.level else node.module.split(".")[0])
    return roots


def translate_entry(layers, token: str = "sunset") -> dict:
    """The bending entry the DiT node tests move a word's map with: half a width to the right, row-renormalised."""
    return {"token": token, "mode": "translate", "strength": 1.0, "translate_x": 0.5, "translate_y": 0.0,
            "apply_to_timesteps": None, "apply_to_layers": layers, "renormalize": "row"}


def gain_entry(layers, factor: float = 40.0, token: str = "kiss") -> dict:
    """The bending entry that scales a word's column by `factor` (large, so a wrong column shows), renormalised."""
    return {"token": token, "mode": "scale", "strength": 1.0, "scale_factor": factor, "apply_to_timesteps": None,
            "apply_to_layers": layers, "renormalize": "column"}


def assert_bent_on_positive_rows(call, plain, entries, step, explicit, columns) -> float:
    """One attention call the ComfyUI node recorded (a batch of two rows): its positive rows equal explicit(call,
    rows, the entries acting at this step and layer, columns, step), its other rows are the host's own output
    `plain` bit for bit. Returns how far the call moved from plain."""
    import torch
    from torch.testing import assert_close

    from ckptbend.runtime import bending, comfy_host

    rows = comfy_host.common.chunk_rows(call["cond_or_uncond"], 0, 2)
    active = [e for e in entries if bending.entry_active(e, step, call["layer"])]
    assert_close(call["out"], explicit(call, rows, active, columns, step), rtol=1e-4, atol=1e-5)
    others = [r for r in range(2) if r not in rows]
    assert torch.equal(call["out"][others], plain[others])
    return float((call["out"] - plain).abs().max())


def bending_node(model, clip, entries, prompt, **values):
    """The recipe's bending node as ComfyUI runs it: the class comfy_host.node_class_mappings gives, its FUNCTION on
    the stand-in's ModelPatcher of `model`, with bending_clip, bending_prompt and any other input; the patched MODEL
    (its first output; the second, model_2, is the one wired there, if any)."""
    import comfy_standin as cs
    from ckptbend.runtime import comfy_host

    (cls,) = comfy_host.node_class_mappings({"bending": entries}, "bend", "ab" * 32)[0].values()
    return getattr(cls(), cls.FUNCTION)(model=cs.ModelPatcher(model), bending_clip=clip, bending_prompt=prompt,
                                        **values)[0]
