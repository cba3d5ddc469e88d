"""Execute a Plan: one pass over each input file, untouched bytes copied, edited tensors scaled.

Every output is written to a temporary path beside the target and renamed into place only when
complete. The output header equals the input's tensor table (dtype and shape never change), so it is
written first, with fixed-width placeholders for the hashes it records: the source file's SHA-256
(computed beside the copy, or remembered from an earlier bake) and, only when the input carries
ModelSpec metadata, the output data section's SHA-256 (read back once written).
"""

from __future__ import annotations

import errno
import glob
import hashlib
import json
import os
import re
import shutil
import sys
import tempfile
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from . import __version__, hash_cache
from .arithmetic import scale_bytes
from .companion import check_target, emit, folder_for
from .errors import CkptbendError
from .layouts import Checkpoint, detect
from .plan import Edit, Plan, make_plan
from .safetensors_io import Header, header_bytes

CHUNK = 16 * 1024 * 1024
COPY_STEP = 256 * 1024 * 1024   # bytes per copy_file_range call: large, but progress still moves
TMP_SUFFIX = ".ckptbend-tmp"
HEX_PLACEHOLDER = "0" * 64
PROVENANCE_KEYS = ("ckptbend.version", "ckptbend.recipe", "ckptbend.recipe_sha256",
                   "ckptbend.source", "ckptbend.source_sha256")



# --- metadata ---------------------------------------------------------------------------------------
def output_metadata(source_meta: dict[str, str], recipe, source_name: str) -> dict[str, str]:
    """The input's metadata, minus hashes that would lie, plus provenance (hashes as placeholders)."""
    meta = {k: v for k, v in source_meta.items()
            if not k.startswith("sshs_") and k not in PROVENANCE_KEYS and k != "ckptbend.history"}
    if "ckptbend.recipe_sha256" in source_meta:   # baked before: keep the chain visible
        history = _history(source_meta.get("ckptbend.history", "[]"))
        history.append({k.removeprefix("ckptbend."): source_meta.get(k, "") for k in PROVENANCE_KEYS})
        meta["ckptbend.history"] = json.dumps(history, separators=(",", ":"), sort_keys=True)
    if "modelspec.hash_sha256" in meta:            # ModelSpec asks tools that modify weights to recompute it
        meta["modelspec.hash_sha256"] = "0x" + HEX_PLACEHOLDER
    meta.update({
        "ckptbend.version": __version__,
        "ckptbend.recipe": recipe.canonical(),
        "ckptbend.recipe_sha256": recipe.sha256,
        "ckptbend.source": source_name,
        "ckptbend.source_sha256": HEX_PLACEHOLDER,
    })
    return meta


def _history(text: str) -> list:
    """Earlier bakes recorded in the input; a damaged record is kept as text rather than trusted."""
    try:
        history = json.loads(text)
    except (ValueError, RecursionError):
        return [{"unreadable": text}]
    return history if isinstance(history, list) else [{"unreadable": text}]


def final_metadata(meta: dict[str, str], source_sha256: str, data_sha256: str | None) -> dict[str, str]:
    meta = dict(meta, **{"ckptbend.source_sha256": source_sha256})
    if data_sha256 is not None:
        meta["modelspec.hash_sha256"] = "0x" + data_sha256
    return meta


# --- tensors ----------------------------------------------------------------------------------------
def data_chunks(src, header: Header, edits: dict[str, Edit], source_hash):
    """Yield the output data section piece by piece, reading `src` once from the data start."""
    buf = bytearray(CHUNK)
    view = memoryview(buf)
    for t in header.tensors:
        edit = edits.get(t.name)
        if edit is None:
            remaining = t.nbytes
            while remaining:
                n = src.readinto(view[:min(remaining, CHUNK)])
                if not n:
                    raise CkptbendError(f"{header.path}: file shrank while being read")
                source_hash.update(view[:n])
                yield view[:n]
                remaining -= n
        else:
            raw = bytearray(src.read(t.nbytes))
            if len(raw) != t.nbytes:
                raise CkptbendError(f"{header.path}: file shrank while being read")
            source_hash.update(raw)
            yield scale_bytes(raw, t.dtype, t.shape, edit.segments)


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


class ShrankError(OSError):
    """A read came back short: the file was truncated under us (the caller names the file)."""


def _sha256_of(cancelled: threading.Event | None, fd: int, start: int, stop: int) -> str | None:
    """SHA-256 of bytes [start, stop) of an open file, read with pread (no shared file position)."""
    h = hashlib.sha256()
    buf = memoryview(bytearray(CHUNK))
    while start < stop:
        if cancelled is not None and cancelled.is_set():
            return None
        n = os.preadv(fd, [buf[:min(CHUNK, stop - start)]], start)
        if not n:
            raise ShrankError()
        h.update(buf[:n])   # hashlib releases the GIL here, so this runs beside the copy
        start += n
    return h.hexdigest()


class _Background:
    """Run `fn(cancelled, *args)` on the other core while the main thread copies; result() re-raises."""

    def __init__(self, fn, *args):
        self._cancelled = threading.Event()
        self._outcome = None
        self._thread = threading.Thread(target=self._run, args=(fn, args), daemon=True)
        self._thread.start()

    def _run(self, fn, args):
        try:
            self._outcome = fn(self._cancelled, *args)
        except BaseException as e:
            self._outcome = e

    def result(self):
        self._thread.join()
        if isinstance(self._outcome, BaseException):
            raise self._outcome
        return self._outcome

    def cancel(self):
        self._cancelled.set()
        self._thread.join()


def _runs(header: Header, edits: dict[str, Edit]):
    """(tensor to scale, or None for a run of untouched tensors, begin, end) in data order."""
    start = None
    for t in header.tensors:
        if t.name in edits:
            if start is not None:
                yield None, start, t.begin
                start = None
            yield t, t.begin, t.end
        elif start is None:
            start = t.begin
    if start is not None:
        yield None, start, header.tensors[-1].end


def _copy_range(src_fd: int, dst_fd: int, src_off: int, dst_off: int, count: int, progress):
    """Copy bytes between files inside the kernel (no decoding, no user-space buffer) where possible."""
    while count:
        step = min(count, COPY_STEP)
        try:
            n = os.copy_file_range(src_fd, dst_fd, step, src_off, dst_off)
        except OSError as e:
            if e.errno not in (errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
                raise
            data = os.pread(src_fd, step, src_off)
            n = len(data)
            _pwrite_all(dst_fd, data, dst_off)
        if not n:
            raise ShrankError()
        src_off, dst_off, count = src_off + n, dst_off + n, count - n
        progress.update(n)


def _pwrite_all(fd: int, data: bytes, offset: int):
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view, offset)
        view, offset = view[n:], offset + n


def _scale_tensors(cancelled: threading.Event, src_fd: int, dst_fd: int, edited, progress):
    """Read, scale and write each (tensor, segments, source offset, output offset) of `edited`."""
    # One buffer for every edited tensor: fresh gigabytes of allocations cost page faults.
    scratch = memoryview(bytearray(max((t.nbytes for t, *_ in edited), default=0)))
    for t, segments, src_off, dst_off in edited:
        if cancelled.is_set():
            return
        raw = scratch[:t.nbytes]
        if os.preadv(src_fd, [raw], src_off) != t.nbytes:
            raise ShrankError()
        _pwrite_all(dst_fd, scale_bytes(raw, t.dtype, t.shape, segments), dst_off)
        progress.update(t.nbytes)


def rewrite_file(src_path: Path, header: Header, edits: dict[str, Edit], meta: dict[str, str], out, progress):
    """Write one output file to `out` (readable and writable). Returns (source_sha256, data_sha256 or None).

    Untouched runs of tensors are copied by the kernel while a worker thread reads, scales and writes
    the edited tensors, and another hashes the source (unless its hash is cached). `data_chunks` is the
    straightforward equivalent (used by verify), so every verify also checks this path byte for byte.
    """
    placeholder = header_bytes(meta, header.tensors)
    out.write(placeholder)
    out.flush()
    dst_fd, base = out.fileno(), len(placeholder)
    runs = list(_runs(header, edits))
    with open(src_path, "rb") as src:
        src_fd = src.fileno()
        before = os.fstat(src_fd)
        if before.st_size != header.file_size:
            raise CkptbendError(f"{src_path}: file changed since its header was read")
        cached = hash_cache.lookup(before)
        hasher = None if cached else _Background(_sha256_of, src_fd, 0, before.st_size)
        # The kernel copies the untouched runs while a worker scales the edited tensors (numpy and
        # pread/pwrite release the GIL): the scaling hides behind the copy on a second core.
        edited = [(t, edits[t.name].segments, header.data_start + begin, base + begin)
                  for t, begin, _ in runs if t is not None]
        scaler = _Background(_scale_tensors, src_fd, dst_fd, edited, progress)
        try:
            for t, begin, end in runs:
                if t is None:
                    _copy_range(src_fd, dst_fd, header.data_start + begin, base + begin, end - begin, progress)
            scaler.result()
            source_sha256 = cached or hasher.result()
        except ShrankError:
            raise CkptbendError(f"{src_path}: file shrank while being read; output discarded") from None
        finally:
            scaler.cancel()
            if hasher:
                hasher.cancel()
        after = os.fstat(src_fd)
        if (after.st_size, after.st_mtime_ns) != (before.st_size, before.st_mtime_ns):
            raise CkptbendError(f"{src_path}: file changed while being read; output discarded")
        if not cached:
            hash_cache.remember(after, source_sha256)
    progress.update(header.data_start)
    # ModelSpec's hash covers the output's data section: hashed only when the file carries one.
    data_sha256 = _sha256_of(None, dst_fd, base, base + (header.tensors[-1].end if header.tensors else 0)) \
        if "modelspec.hash_sha256" in meta else None
    final = header_bytes(final_metadata(meta, source_sha256, data_sha256), header.tensors)
    assert len(final) == len(placeholder)
    _pwrite_all(dst_fd, final, 0)
    return source_sha256, data_sha256


# --- output paths -----------------------------------------------------------------------------------
def check_output_path(input_path: Path, output_path: Path, force: bool):
    src, dst = input_path.resolve(), output_path.resolve()
    if src == dst or (dst.exists() and os.path.samefile(src, dst)):
        raise CkptbendError(f"{output_path}: output would overwrite the input; choose another path")
    if input_path.is_dir() and dst.is_relative_to(src):
        raise CkptbendError(f"{output_path}: output cannot be inside the input folder")
    if src.is_relative_to(dst):
        raise CkptbendError(f"{output_path}: contains the input; replacing it would destroy the input")
    if output_path.exists() and not force:
        raise CkptbendError(f"{output_path}: already exists (use --force to replace it)")
    if output_path.exists() and output_path.is_dir() != input_path.is_dir():
        raise CkptbendError(f"{output_path}: exists and is a {'folder' if output_path.is_dir() else 'file'}; "
                            "refusing to replace it with the other kind")
    if not dst.parent.is_dir():
        raise CkptbendError(f"{output_path.parent}: no such folder")
    if not os.access(dst.parent, os.W_OK):
        raise CkptbendError(f"{output_path.parent}: folder is not writable")


def check_companion_path(recipe, input_path: Path, output_path: Path, force: bool) -> Path | None:
    """Where the companion of a recipe with sampling-time sections goes; refuses to replace one
    without `force`, and never a folder that holds the input."""
    if not recipe.has_dynamic:
        return None
    target = folder_for(output_path)
    if input_path.resolve().is_relative_to(target.resolve()):
        raise CkptbendError(f"{target}: the companion folder would replace the input; choose another output name")
    check_target(target, force)
    return target


def temp_prefix(target: Path) -> str:
    # The PID in the name lets a later run tell a dead bake's leftovers from a running bake's file.
    return f".{target.name}.{os.getpid()}."


def remove_stale_temporaries(target: Path, keep: Path) -> list[Path]:
    """Delete temporaries that interrupted bakes (killed processes) left beside `target`, never `keep`."""
    removed = []
    keep = keep.resolve()
    pattern = re.compile(re.escape(f".{target.name}.") + r"(\d+)\.[^./]+" + re.escape(TMP_SUFFIX))
    for p in target.parent.glob(f".{glob.escape(target.name)}.*{TMP_SUFFIX}"):
        m = pattern.fullmatch(p.name)
        if not m or _alive(int(m.group(1))) or keep.is_relative_to(p.resolve()):
            continue
        shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
        removed.append(p)
    return removed


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextmanager
def atomic_output(target: Path, is_dir: bool):
    """Yield a temporary path beside `target`; rename it into place only if the block completes."""
    prefix = temp_prefix(target)
    if is_dir:
        tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=prefix, suffix=TMP_SUFFIX))
    else:
        fd, name = tempfile.mkstemp(dir=target.parent, prefix=prefix, suffix=TMP_SUFFIX)
        os.close(fd)
        tmp = Path(name)
    os.chmod(tmp, (0o777 if is_dir else 0o666) & ~_umask())   # as a plain open() would have made it
    try:
        yield tmp
        if is_dir and target.exists():
            old = Path(tempfile.mkdtemp(dir=target.parent, prefix=prefix, suffix=TMP_SUFFIX))
            os.replace(target, old / "old")
            os.replace(tmp, target)
            shutil.rmtree(old)
        else:
            os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True) if is_dir else tmp.unlink(missing_ok=True)
        raise


def _fsync_file(path: Path):
    """fsync a file or a folder (a folder's entries: the rename into place)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


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
                    _fsync_file(dst)
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
            _fsync_file(output_path.resolve().parent)
    except OSError as e:
        raise CkptbendError(f"{output_path}: cannot write output: {e.strerror or e}") from None
    finally:
        bar.close()
    return BakeResult(output_path, plan, digests, tuple(stale), companion_dir)
