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
