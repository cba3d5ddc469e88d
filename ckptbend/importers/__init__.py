"""`ckptbend recipe import`: the recipe that reproduces settings tuned elsewhere.

Sources, told apart by content (and the .yaml/.yml suffix):
- ComfyUI workflows, API or UI format (comfy.py), or a PNG/WebP image ComfyUI saved (images.py);
- the original Attention Bending YAML configs (bending_yaml.py);
- a checkpoint baked by ckptbend: the recipe recorded in it.

Each importer fills a Draft (draft.py); its TOML text, with comments saying where every part came
from, is read back by ckptbend.recipe, which validates it and gives the canonical form and hash.
Everything read from a source goes through limits.py's bounds.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ckptbend.errors import CkptbendError
from ckptbend.gguf_io import is_gguf

from .comfy import Options, workflow_draft
from .draft import Draft
from .images import embedded_texts, is_image
from .limits import load_json
from .workflow import read_graph


@dataclass(frozen=True)
class Imported:
    text: str            # the recipe TOML, with comments
    recipe: object       # ckptbend.recipe.Recipe, as the reader reads `text`
    warnings: tuple[str, ...]


def import_recipe(source: Path, opts: Options = Options()) -> Imported:
    source = Path(source)
    if not source.exists():
        raise CkptbendError(f"{source}: no such file")
    if source.is_dir() or source.suffix == ".safetensors" or is_gguf(source):
        draft = _checkpoint_draft(source, opts.name)
    else:
        with open(source, "rb") as f:
            head = f.read(16)
        if is_image(head):
            draft = _image_draft(source, opts)
        elif source.suffix.lower() in (".yaml", ".yml"):
            from .bending_yaml import bending_draft
            draft = bending_draft(_text(source), source, opts.name)
        else:
            label = str(source)
            draft = workflow_draft(read_graph(load_json(_text(source), label), label), source, opts)
    recipe = draft.recipe(opts.allow_out_of_range)
    return Imported(draft.text(), recipe, tuple(draft.warnings) + recipe.warnings)


def _image_draft(source: Path, opts: Options) -> Draft:
    """The image's `prompt` (what ComfyUI ran); its `workflow` if the prompt cannot be read as one."""
    failed = None
    for key, text in embedded_texts(source).items():
        where = f" ('{key}' metadata)"
        try:
            read = read_graph(load_json(text, f"{source}{where}"), f"{source}{where}")
        except CkptbendError as e:
            failed = failed or e
            continue
        draft = workflow_draft(read, source, opts, where)
        if failed is not None:
            draft.warnings.append(f"{failed}; imported the image's 'workflow' metadata instead")
        return draft
    raise failed


def _text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise CkptbendError(f"{path}: not UTF-8 text (invalid byte at offset {e.start})") from None


def _checkpoint_draft(path: Path, name: str | None) -> Draft:
    from ckptbend.layouts import detect
    from ckptbend.verify import recorded_recipe

    ckpt = detect(path)
    recipe = recorded_recipe(ckpt)
    if recipe is None:
        raise CkptbendError(f"{path}: no ckptbend recipe recorded; it was not baked by ckptbend")
    meta = ckpt.files[0].header.metadata
    draft = Draft(str(path), name or recipe.name, recipe.description)
    draft.notes.append(f"Imported by `ckptbend recipe import`: the recipe recorded in {path.name} "
                       f"(ckptbend {meta.get('ckptbend.version', '?')})")
    draft.notes.append(f"baked from {meta.get('ckptbend.source', '?')!r} (sha256 {meta.get('ckptbend.source_sha256', '?')}): "
                       "bake this recipe into that file")
    draft.add_recipe(recipe, f"recorded in {path.name}")
    return draft


def write_output(text: str, output: Path, source: Path, force: bool) -> None:
    """Write the recipe atomically, by output.py's one rule for where a command may write (an existing
    file needs `force`; the source is never replaced)."""
    from ckptbend.output import Target, atomic_output, check_targets

    if output.is_dir():   # `-o ""` reaches here as "."
        raise CkptbendError(f"{output}: is a folder; -o takes the recipe file's path (e.g. {output / 'recipe.toml'})")
    target = Target(output, is_dir=False, what="recipe")
    check_targets([target], [source], force)
    with atomic_output(target, force) as tmp:
        tmp.write_text(text, encoding="utf-8")


__all__ = ["Imported", "Options", "import_recipe", "write_output"]
