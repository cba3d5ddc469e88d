"""The byte engine: write one output safetensors file from its input in one pass.

The output header equals the input's tensor table (dtype and shape never change), so its length is
known first; it is written last, once it can record the source file's SHA-256 (computed beside the copy,
or remembered from an earlier bake) and, only when the input carries ModelSpec metadata, the output data
section's SHA-256 (hashed by a worker right behind the writer). Untouched runs of tensors are copied by
the kernel; edited tensors are read and scaled (arithmetic.scale_bytes) ahead by a worker, and written in
turn. A durable bake starts each written range's writeback at once, so the disk works while the copy
goes on.
"""

from __future__ import annotations

import errno
import hashlib
import mmap
import os
import queue
import threading
import time
from pathlib import Path

from . import hash_cache, interrupts, profile
from .arithmetic import scale_bytes
from .errors import CkptbendError
from .hash_cache import HASH_CHUNK
from .output import start_writeback
from .plan import Edit
from .provenance import final_metadata
from .safetensors_io import Header, retabled

CHUNK = 16 * 1024 * 1024
COPY_STEP = 64 * 1024 * 1024    # bytes per copy_file_range call: large, but progress and writeback move


def output_table(header: Header, edits: dict[str, Edit]):
    """The output's tensor table: the input's, but for tensors whose edit changes their shape."""
    shapes = {name: e.out_shape for name, e in edits.items() if e.out_shape is not None}
    return retabled(header.tensors, shapes) if shapes else header.tensors


def _edited(raw, t, edit: Edit):
    """A tensor's new bytes: its format's operation (a quantised layer's tensor), or the float rule."""
    if edit.op is not None:
        return edit.op.apply(raw, t.shape)[0]
    return scale_bytes(raw, t.dtype, t.shape, edit.segments)


def _in_place(edit: Edit) -> bool:
    """A format's operation that changes a few bytes of its tensor where they lie (GGUF's block scales): the tensor
    is copied by the kernel with the rest and patched in the output, never read into this process."""
    return getattr(edit.op, "in_place", False)


def _patch(fd: int, offset: int, t, edit: Edit) -> None:
    """Run an in-place operation on a tensor already copied to [offset, offset + t.nbytes) of the output."""
    start, failure = offset - offset % mmap.ALLOCATIONGRANULARITY, None
    with mmap.mmap(fd, offset - start + t.nbytes, offset=start) as mapped:
        view = memoryview(mapped)[offset - start:]
        try:
            edit.op.apply(view, t.shape)       # its views of the mapping are gone when it returns
        except BaseException as e:             # ... or when its frames go: the mapping closes only after them
            failure = e.with_traceback(None)
        view.release()
    if failure is not None:
        raise failure


def _patch_behind(cancelled, fd: int, offset: int, t, edit: Edit, durable: bool) -> None:
    """`_patch` on the other core, while the main thread copies what follows (a patch is short: not cancelled)."""
    _patch(fd, offset, t, edit)
    if durable:
        start_writeback(fd, offset, t.end - t.begin)


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
            yield _edited(raw, t, edit)


class ShrankError(OSError):
    """A read came back short: the file was truncated under us (the caller names the file)."""


def _hash_range(h, cancelled: threading.Event, fd: int, start: int, stop: int) -> bool:
    """Feed bytes [start, stop) of an open file to h, read with pread (no shared file position) through a
    cache-sized buffer; False if cancelled first."""
    buf = memoryview(bytearray(HASH_CHUNK))
    while start < stop:
        if cancelled.is_set():
            return False
        n = os.preadv(fd, [buf[:min(HASH_CHUNK, stop - start)]], start)
        if not n:
            raise ShrankError()
        h.update(buf[:n])   # hashlib releases the GIL here, so this runs beside the copy
        start += n
    return True


def _sha256_of(cancelled: threading.Event, fd: int, start: int, stop: int) -> str | None:
    """SHA-256 of bytes [start, stop) of an open file; None if cancelled."""
    h = hashlib.sha256()
    return h.hexdigest() if _hash_range(h, cancelled, fd, start, stop) else None


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
        while self._thread.is_alive():
            self._thread.join(interrupts.POLL)
            interrupts.check()
        if isinstance(self._outcome, BaseException):
            raise self._outcome
        return self._outcome

    def cancel(self):
        self._cancelled.set()
        self._thread.join()


def _runs(header: Header, edits: dict[str, Edit]):
    """(tensor to scale, or None for a run of untouched tensors, begin, end, its first tensor's name) in data
    order."""
    start = first = None
    for t in header.tensors:
        if t.name in edits:
            if start is not None:
                yield None, start, t.begin, first
                start = None
            yield t, t.begin, t.end, t.name
        elif start is None:
            start, first = t.begin, t.name
    if start is not None:
        yield None, start, header.tensors[-1].end, first


def _copy_range(src_fd: int, dst_fd: int, src_off: int, dst_off: int, count: int, progress, durable: bool):
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
        if durable:
            start_writeback(dst_fd, dst_off, n)
        src_off, dst_off, count = src_off + n, dst_off + n, count - n
        progress.update(n)
        interrupts.check()


def _pwrite_all(fd: int, data: bytes, offset: int):
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view, offset)
        view, offset = view[n:], offset + n


class _ScaledAhead:
    """Reads and scales the edited tensors in data order on a worker thread, at most DEPTH tensors ahead;
    the main thread takes and writes them. One writer per file: two threads writing the same file
    contend for its lock, which cost more than the scaling saved (bin/bench --profile)."""

    DEPTH = 2

    def __init__(self, src_fd: int, edited):
        size = max((t.nbytes for t, *_ in edited), default=0)
        # Reused buffers: fresh gigabytes of allocations cost page faults.
        self._free = queue.Queue()
        for _ in range(min(self.DEPTH, len(edited))):
            self._free.put(bytearray(size))
        self._ready = queue.Queue()
        self._worker = _Background(self._run, src_fd, edited)

    def _run(self, cancelled: threading.Event, src_fd: int, edited):
        try:
            for t, edit, src_off, _ in edited:
                buf = self._free.get()          # None: cancelled
                if buf is None or cancelled.is_set():
                    return
                raw = memoryview(buf)[:t.nbytes]
                with profile.phase("edited tensors: read (worker)"):
                    if os.preadv(src_fd, [raw], src_off) != t.nbytes:
                        raise ShrankError()
                with profile.phase("edited tensors: scale (worker)"):
                    self._ready.put((buf, _edited(raw, t, edit)))
        except BaseException as e:
            self._ready.put(e)      # the main thread waits on _ready: hand it the failure
            raise

    def write_next(self, dst_fd: int, dst_off: int, durable: bool) -> int:
        """Write the next scaled tensor at dst_off; returns its size."""
        with profile.phase("waiting for the edited tensors"):
            item = _get_interruptibly(self._ready)
        if isinstance(item, BaseException):
            raise item
        buf, scaled = item
        with profile.phase("edited tensors: write"):
            _pwrite_all(dst_fd, scaled, dst_off)
            if durable:
                start_writeback(dst_fd, dst_off, len(scaled))
        self._free.put(buf)
        return len(scaled)

    def cancel(self):
        self._free.put(None)                # wakes a worker waiting for a free buffer
        self._worker.cancel()


def _get_interruptibly(q: queue.Queue):
    while True:
        try:
            return q.get(timeout=interrupts.POLL)
        except queue.Empty:
            interrupts.check()


class _HashBehind:
    """SHA-256 of the output's data section, hashed on a worker as the main thread writes it (in order):
    `update(n)` says n more bytes are written; the worker reads them back from the page cache. ModelSpec's
    hash_sha256 then costs another core instead of a second pass after the copy."""

    def __init__(self, fd: int, start: int):
        self._position, self._written = start, queue.Queue()
        self._worker = _Background(self._run, fd, start)

    def update(self, n: int):
        self._position += n
        self._written.put(self._position)

    def _run(self, cancelled: threading.Event, fd: int, start: int):
        h, done, busy = hashlib.sha256(), start, 0.0
        while (upto := self._written.get()) is not None:
            began = time.perf_counter()
            try:
                if not _hash_range(h, cancelled, fd, done, upto):
                    return None
            except ShrankError:     # our own output read back short: not the source's doing
                raise OSError(errno.EIO, "the output read back short") from None
            done, busy = upto, busy + time.perf_counter() - began
        profile.add("output data hash (worker)", busy)
        return h.hexdigest()

    def result(self) -> str:
        self._written.put(None)
        return self._worker.result()

    def cancel(self):
        self._written.put(None)
        self._worker.cancel()


class _Uncounted:
    """Progress that counts nothing (a range is counted once it is final)."""

    @staticmethod
    def update(n: int):
        pass


class _Written:
    """Progress of the output's data section: the bar, and the hash behind the writer if there is one."""

    def __init__(self, progress, behind: _HashBehind | None):
        self._progress, self._behind = progress, behind

    def update(self, n: int):
        self._progress.update(n)
        if self._behind is not None:
            self._behind.update(n)


def _timed_sha256(cancelled, fd: int, start: int, stop: int):
    with profile.phase("source hash (worker)"):
        return _sha256_of(cancelled, fd, start, stop)


def rewrite_file(src_path: Path, header: Header, edits: dict[str, Edit], meta: dict[str, str], out, progress,
                 source_sha256: str | None = None, durable: bool = False):
    """Write one output file to `out` (readable and writable, empty). Returns (source_sha256, data_sha256 or None).
    `source_sha256`: record this as the source's hash instead of hashing `src_path` (a converted pickle).
    `durable`: start writing each range to disk as soon as it is written (the caller still fsyncs).

    The main thread writes every byte: untouched runs of tensors copied by the kernel, and the edited
    tensors that a worker thread reads and scales ahead; another worker hashes the source (unless its
    hash is cached), and, for a file with ModelSpec's hash_sha256, one more hashes the output's data as it
    is written. `data_chunks` is the
    straightforward equivalent (used by verify), so every verify also checks this path byte for byte.
    """
    tensors = output_table(header, edits)
    header_size = len(header.to_bytes(meta, tensors))   # the final header has the same length
    dst_fd, base = out.fileno(), header_size
    at = {t.name: t.begin for t in tensors}          # where each tensor goes in the output's data
    runs = list(_runs(header, edits))
    # Worker threads and queues from here on: Ctrl-C is handled only between steps (interrupts.py).
    with open(src_path, "rb") as src, interrupts.deferred():
        src_fd = src.fileno()
        before = os.fstat(src_fd)
        if before.st_size != header.file_size:
            raise CkptbendError(f"{src_path}: file changed since its header was read")
        cached = source_sha256 or hash_cache.lookup(before)
        hasher = None if cached else _Background(_timed_sha256, src_fd, 0, before.st_size)
        # The scaling (numpy and pread release the GIL) hides behind the kernel copy on a second core.
        edited = [(t, edits[t.name], header.data_start + begin, base + at[t.name])
                  for t, begin, _, _ in runs if t is not None and not _in_place(edits[t.name])]
        scaler = _ScaledAhead(src_fd, edited)
        # ModelSpec's hash covers the output's data section: hashed only when the file carries one.
        behind = _HashBehind(dst_fd, base) if "modelspec.hash_sha256" in meta else None
        written = _Written(progress, behind)
        patching = None       # the last in-place tensor's patch, running while the next bytes are copied
        try:
            for t, begin, end, first in runs:
                interrupts.check()
                if t is None:
                    with profile.phase("kernel copy of untouched tensors"):
                        _copy_range(src_fd, dst_fd, header.data_start + begin, base + at[first], end - begin, written,
                                    durable)
                elif _in_place(edits[t.name]):
                    with profile.phase("edited tensors: kernel copy"):
                        _copy_range(src_fd, dst_fd, header.data_start + begin, base + at[t.name], end - begin,
                                    _Uncounted, False)
                    with profile.phase("waiting for the previous patch"):
                        if patching is not None:
                            patching.result()
                    patching = _Background(_patch_behind, dst_fd, base + at[t.name], t, edits[t.name], durable)
                    if behind is not None:     # the output's hash reads what is counted written: patched bytes only
                        patching.result()
                    written.update(end - begin)
                else:
                    written.update(scaler.write_next(dst_fd, base + at[t.name], durable))
            with profile.phase("waiting for the last patch"):
                if patching is not None:
                    patching.result()
            with profile.phase("waiting for the source hash"):
                source_sha256 = cached or hasher.result()
            with profile.phase("waiting for the output data hash"):
                data_sha256 = behind.result() if behind else None
        except ShrankError:
            raise CkptbendError(f"{src_path}: file shrank while being read; output discarded") from None
        finally:
            scaler.cancel()
            for worker in (hasher, behind, patching):
                if worker:
                    worker.cancel()
        after = os.fstat(src_fd)
        # ctime too: an edit whose mtime was set back still moves ctime (which no user can set).
        if (after.st_size, after.st_mtime_ns, after.st_ctime_ns) != (before.st_size, before.st_mtime_ns,
                                                                     before.st_ctime_ns):
            raise CkptbendError(f"{src_path}: file changed while being read; output discarded")
        if not cached:
            hash_cache.remember(after, source_sha256)
        progress.update(header.data_start)
    with profile.phase("final header"):
        # Written once, last: no page is dirtied twice, and a torn file has no valid-looking header.
        final = header.to_bytes(final_metadata(meta, source_sha256, data_sha256), tensors)
        assert len(final) == header_size
        _pwrite_all(dst_fd, final, 0)
    return source_sha256, data_sha256
