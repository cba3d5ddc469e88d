"""Bake a recipe into a checkpoint: detect the layout, plan the edits, check every target, then write
each file through the byte engine (writer) into an atomic output, and the companion beside it.
"""

from __future__ import annotations

import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

from .companion import emit, folder_for
from .errors import CkptbendError
from .layouts import Checkpoint, detect
from .output import atomic_output, check_folder_target, check_output_path, fsync_path, remove_stale_temporaries
from .plan import Plan, make_plan
from .provenance import output_metadata
from .writer import rewrite_file


class _Progress:
    def __init__(self, total: int, enabled: bool):
        self.bar = None
        if enabled:
            from tqdm import tqdm
            self.bar = tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc="baking")

    def update(self, n: int):
        if self.bar:
            self.bar.update(n)

    def close(self):
        if self.bar:
            self.bar.close()


def check_companion_path(recipe, input_path: Path, output_path: Path, force: bool) -> Path | None:
    """Where the companion of a recipe with sampling-time sections goes; refuses to replace one
    without `force`, and never a folder that holds the input."""
    if not recipe.has_dynamic:
        return None
    target = folder_for(output_path)
    if input_path.resolve().is_relative_to(target.resolve()):
        raise CkptbendError(f"{target}: the companion folder would replace the input; choose another output name")
    check_folder_target(target, force)
    return target


@dataclass(frozen=True)
class BakeResult:
    output: Path
    plan: Plan
    source_sha256: dict[str, str]   # file (relative) → SHA-256 of the input file
    removed_stale: tuple[Path, ...] = ()
    companion: Path | None = None   # the companion folder written beside the output, if any


def _bake_into(plan: Plan, recipe, ckpt: Checkpoint, tmp: Path, progress, source_name, durable) -> dict[str, str]:
    digests = {}
    rewritten = {f.rel: f for f in ckpt.files}
    if ckpt.kind == "diffusers-folder":
        sources = sorted(p for p in ckpt.path.rglob("*") if p.is_file())
        for p in sources:
            rel = p.relative_to(ckpt.path).as_posix()
            dst = tmp / rel
            dst.parent.mkdir(parents=True, exist_ok=True)
            if rel not in rewritten:
                shutil.copyfile(p, dst)
                if durable:
                    fsync_path(dst)
                progress.update(p.stat().st_size)
    for rel, cf in rewritten.items():
        src = ckpt.path / rel if ckpt.kind == "diffusers-folder" else ckpt.path
        dst = tmp / rel if ckpt.kind == "diffusers-folder" else tmp
        name = f"{source_name}/{rel}" if ckpt.kind == "diffusers-folder" else source_name
        meta = output_metadata(cf.header.metadata, recipe, name)
        # "r+b" on the empty temporary (never O_TRUNC): ext4 flushes files truncated then rewritten on close.
        dst.touch(exist_ok=True)
        with open(dst, "r+b") as out:
            digests[rel], _ = rewrite_file(src, cf.header, plan.edits_for(rel), meta, out, progress)
            if durable:
                os.fsync(out.fileno())
    return digests


def bake(recipe, input_path, output_path, *, force=False, allow_missing=False, progress=None,
         source_name: str | None = None, durable: bool = True) -> BakeResult:
    """Bake `recipe` into the checkpoint at `input_path`, writing `output_path` atomically.

    A recipe with sampling-time sections also gets its companion folder beside the output
    (companion.folder_for), written just before the output is renamed into place.

    `source_name` is the name recorded as the source (default: the input's file or folder name).
    `durable` flushes the output to disk before it is renamed into place (like `cp` followed by
    `sync`), so a power cut cannot leave a complete-looking file with missing data.
    """
    input_path, output_path = Path(input_path), Path(output_path)
    ckpt = detect(input_path)
    plan = make_plan(recipe, ckpt, allow_missing=allow_missing)
    check_output_path(input_path, output_path, force)
    companion_dir = check_companion_path(recipe, input_path, output_path, force)
    stale = remove_stale_temporaries(output_path, keep=input_path)
    if ckpt.kind == "diffusers-folder":
        total = sum(p.stat().st_size for p in ckpt.path.rglob("*") if p.is_file())
    else:
        total = ckpt.path.stat().st_size
    bar = _Progress(total, sys.stderr.isatty() if progress is None else progress)
    try:
        with atomic_output(output_path, ckpt.kind == "diffusers-folder") as tmp:
            name = source_name or input_path.name
            digests = _bake_into(plan, recipe, ckpt, tmp, bar, name, durable)
            if companion_dir is not None:
                emit(recipe, companion_dir, force=True, checkpoint={
                    "file": output_path.name, "source": name, "source_sha256": digests})
        if durable:
            fsync_path(output_path.resolve().parent)
    except OSError as e:
        raise CkptbendError(f"{output_path}: cannot write output: {e.strerror or e}") from None
    finally:
        bar.close()
    return BakeResult(output_path, plan, digests, tuple(stale), companion_dir)
