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
