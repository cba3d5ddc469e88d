"""Recompute a bake from the recipe recorded in its output and confirm the output matches, byte for byte."""

from __future__ import annotations

import bisect
import filecmp
import hashlib
from pathlib import Path

from .provenance import final_metadata, output_metadata
from .writer import data_chunks, output_table
from .errors import CkptbendError
from .layouts import detect
from .plan import make_plan
from .recipe import parse_recipe


def recorded_recipe(ckpt):
    """The recipe recorded in a baked checkpoint, or None if it was not baked by ckptbend."""
    texts = {f.header.metadata.get("ckptbend.recipe") for f in ckpt.files}
    if texts == {None}:
        return None
    if len(texts) != 1 or None in texts:
        raise CkptbendError(f"{ckpt.path}: its files record different ckptbend recipes")
    return parse_recipe(texts.pop(), f"{ckpt.path} (recorded recipe)", allow_out_of_range=True)


def _compare_data(src_file, out_file, header, edits, source_hash) -> str | None:
    tensors = output_table(header, edits)
    begins = [t.begin for t in tensors]
    position = 0
    for chunk in data_chunks(src_file, header, edits, source_hash):
        got = out_file.read(len(chunk))
        if got != chunk:
            t = tensors[bisect.bisect_right(begins, position) - 1]
            return f"tensor {t.name!r} differs"
        position += len(chunk)
    return None


def verify(output_path, source_path, source_sha256: str | None = None) -> list[str]:
    """Return the list of problems found (empty: the output is exactly the recorded bake of the source).
    `source_sha256`: the hash the source is recorded under, if not its own (a converted pickle's)."""
    out_ckpt, src_ckpt = detect(output_path), detect(source_path)
    recipe = recorded_recipe(out_ckpt)
    if recipe is None:
        raise CkptbendError(f"{output_path}: no ckptbend recipe recorded; not a ckptbend output")
    plan = make_plan(recipe, src_ckpt, allow_missing=True)
    out_files = {f.rel: f for f in out_ckpt.files}
    problems = []
    for cf in src_ckpt.files:
        out_cf = out_files.get(cf.rel) if src_ckpt.kind == "diffusers-folder" else out_ckpt.files[0]
        if out_cf is None:
            problems.append(f"{cf.rel}: missing from the output")
            continue
        recorded = out_cf.header.metadata
        meta = output_metadata(cf.header.metadata, recipe, recorded.get("ckptbend.source", ""))
        meta["ckptbend.version"] = recorded.get("ckptbend.version", "")
        source_hash, data_hash = hashlib.sha256(), hashlib.sha256()
        src_path = src_ckpt.path / cf.rel if src_ckpt.kind == "diffusers-folder" else src_ckpt.path
        out_path = out_ckpt.path / cf.rel if out_ckpt.kind == "diffusers-folder" else out_ckpt.path
        with open(src_path, "rb") as src, open(out_path, "rb") as out:
            source_hash.update(src.read(cf.header.data_start))
            out.seek(out_cf.header.data_start)
            if out_cf.header.names != cf.header.names:
                problems.append(f"{cf.rel}: tensor table differs from the source's")
                continue
            edits = plan.edits_for(cf.rel)
            hashing_out = _Tee(out, data_hash)
            mismatch = _compare_data(src, hashing_out, cf.header, edits, source_hash)
            if mismatch:
                problems.append(f"{cf.rel}: {mismatch}")
                continue
            source_digest = source_sha256 or source_hash.hexdigest()
            if source_digest != recorded.get("ckptbend.source_sha256"):
                problems.append(f"{cf.rel}: the source's SHA-256 is not the one recorded in the output "
                                "(a different source file?)")
            out.seek(0)
            data_sha256 = data_hash.hexdigest() if "modelspec.hash_sha256" in meta else None
            expected = cf.header.to_bytes(final_metadata(meta, source_digest, data_sha256),
                                          output_table(cf.header, edits))
            if out.read(len(expected)) != expected:
                problems.append(f"{cf.rel}: header or metadata differs from the recomputed bake")
    if src_ckpt.kind == "diffusers-folder":
        rewritten = {f.rel for f in src_ckpt.files}
        source_files = _files(src_ckpt.path)
        for rel in sorted(source_files - rewritten):
            q = Path(output_path) / rel
            if not q.is_file() or not filecmp.cmp(src_ckpt.path / rel, q, shallow=False):
                problems.append(f"{rel}: not copied unchanged")
        for rel in sorted(_files(Path(output_path)) - source_files):
            problems.append(f"{rel}: only in the output (the source has no such file)")
    return problems


def _files(folder: Path) -> set[str]:
    """Every entry under a folder that is not a folder (files, links, anything else), relative."""
    return {p.relative_to(folder).as_posix() for p in folder.rglob("*") if not p.is_dir() or p.is_symlink()}


class _Tee:
    """Reads from a file while hashing what was read."""

    def __init__(self, f, h):
        self.f, self.h = f, h

    def read(self, n):
        data = self.f.read(n)
        self.h.update(data)
        return data
