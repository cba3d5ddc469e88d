"""Bake a recipe into a checkpoint: detect the layout, plan the edits, check every target, then write
each file through the byte engine (writer) into an atomic output, and the companion beside it.
"""

from __future__ import annotations

import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

from . import profile
from .companion import emit, folder_for
from .errors import CkptbendError
from .layouts import Checkpoint, detect
from .output import Target, atomic_output, check_targets, fsync_path, permissions_of, remove_stale_temporaries
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


def jobs_for(recipes, input: Path, output: str, many: bool) -> tuple[list, bool]:
    """([(recipe, output path)], whether OUTPUT is a folder): several recipes, or `-o DIR/` (a trailing slash
    always names a folder) with a file input, write DIR/INPUT-STEM.RECIPE-NAME.SUFFIX each."""
    from .pickle_input import is_pickle

    into_folder = many or (output.endswith(("/", os.sep)) and not input.is_dir())
    if not into_folder:
        return [(recipes[0], Path(output))], False
    stem, suffix = (input.stem, input.suffix) if input.is_file() else (input.name, "")
    suffix = ".safetensors" if is_pickle(input) else suffix       # a pickle's bake is safetensors
    return [(r, Path(output) / f"{stem}.{r.name}{suffix}") for r in recipes], True


def targets_of(jobs, input_is_dir: bool) -> list[Target]:
    """Every path a bake of (recipe, output) jobs writes: each output, and each companion folder."""
    found = []
    for recipe, output in jobs:
        found.append(Target(Path(output), input_is_dir))
        if recipe.has_dynamic:
            found.append(Target(folder_for(Path(output)), True, "companion folder"))
    return found


@dataclass(frozen=True)
class BakeResult:
    output: Path
    plan: Plan
    source_sha256: dict[str, str]   # file (relative) → SHA-256 of the input file
    removed_stale: tuple[Path, ...] = ()
    companion: Path | None = None   # the companion folder written beside the output, if any


def _bake_into(plan: Plan, recipe, ckpt: Checkpoint, tmp: Path, progress, source_name, source_sha256,
               durable) -> dict[str, str]:
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
                os.chmod(dst, permissions_of(p))
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
        os.chmod(dst, permissions_of(src))
        with open(dst, "r+b") as out:
            # keyed as recorded: a file of the folder, or the single file under the name the user gave
            key = rel if ckpt.kind == "diffusers-folder" else source_name
            digests[key], _ = rewrite_file(src, cf.header, plan.edits_for(rel), meta, out, progress, source_sha256,
                                           durable)
            if durable:
                with profile.phase("fsync of the output"):
                    os.fsync(out.fileno())
    return digests


def bake(recipe, input_path, output_path, *, force=False, allow_missing=False, progress=None,
         source_name: str | None = None, source_sha256: str | None = None, durable: bool = True,
         inputs=()) -> BakeResult:
    """Bake `recipe` into the checkpoint at `input_path`, writing `output_path` atomically.

    A recipe with sampling-time sections also gets its companion folder beside the output
    (companion.folder_for), written just before the output is put in place.

    `source_name` / `source_sha256`: what is recorded as the source (default: the input's name, and
    its SHA-256; a converted pickle passes the name and hash of the file the user gave).
    `inputs`: the command's other inputs (recipe files), which no target may replace.
    `durable` flushes the output to disk before it is renamed into place (like `cp` followed by
    `sync`), so a power cut cannot leave a complete-looking file with missing data.
    """
    input_path, output_path = Path(input_path), Path(output_path)
    with profile.phase("header, plan and target checks"):
        ckpt = detect(input_path)
        plan = make_plan(recipe, ckpt, allow_missing=allow_missing)
        targets = targets_of([(recipe, output_path)], ckpt.kind == "diffusers-folder")
        check_targets(targets, [input_path, *inputs], force)
    out, companion = targets[0], (targets[1] if len(targets) > 1 else None)
    stale = remove_stale_temporaries(out.absolute.parent, keep=[input_path, *inputs])
    if ckpt.kind == "diffusers-folder":
        total = sum(p.stat().st_size for p in ckpt.path.rglob("*") if p.is_file())
    else:
        total = ckpt.path.stat().st_size
    bar = _Progress(total, sys.stderr.isatty() if progress is None else progress)
    companion_new, companion_placed = companion is not None and not os.path.lexists(companion.path), False
    try:
        with atomic_output(out, force, permissions_of(input_path)) as tmp:
            name = source_name or input_path.name
            digests = _bake_into(plan, recipe, ckpt, tmp, bar, name, source_sha256, durable)
            if companion is not None:
                emit(recipe, companion.path, force=force, checkpoint={
                    "file": output_path.name, "architecture": ckpt.architecture, "kind": ckpt.kind,
                    "source": name, "source_sha256": digests})
                companion_placed = companion_new
        if durable:
            with profile.phase("fsync of the folder"):
                fsync_path(out.absolute.parent)
    except BaseException as e:
        if companion_placed:     # the output could not be put in place: take back the new companion too
            shutil.rmtree(companion.path, ignore_errors=True)
        if isinstance(e, OSError):
            raise CkptbendError(f"{output_path}: cannot write output: {e.strerror or e}") from None
        raise
    finally:
        bar.close()
    return BakeResult(output_path, plan, digests, tuple(stale), companion.path if companion else None)
