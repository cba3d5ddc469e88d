"""SHA-256 of input files, remembered across runs.

Hashing a 7 GB checkpoint costs more CPU than copying it. Users bake the same source again and again
(sweeps, re-bakes), so the digest is remembered per file identity: device, inode, size, mtime and
ctime. ctime changes on every write and cannot be set by a user, so a changed file is never
mistaken for the one that was hashed. `ckptbend verify` never trusts the cache.

Set CKPTBEND_HASH_CACHE=0 to disable; CKPTBEND_CACHE_DIR moves it (default: $XDG_CACHE_HOME/ckptbend).
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

MAX_ENTRIES = 1000
# Hash through a buffer that stays in the core's own cache: SHA-256 then costs ~1.5× less CPU than through
# 1 MiB or 16 MiB buffers, above all while the other core copies (bin/bench --profile, "source hash").
HASH_CHUNK = 256 * 1024


def _enabled() -> bool:
    return os.environ.get("CKPTBEND_HASH_CACHE", "1") != "0"


def _cache_file() -> Path:
    base = os.environ.get("CKPTBEND_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "ckptbend")
    return Path(base) / "sha256.json"


def _identity(st: os.stat_result) -> str:
    return f"{st.st_dev}:{st.st_ino}:{st.st_size}:{st.st_mtime_ns}:{st.st_ctime_ns}"


def _load() -> dict[str, str]:
    try:
        data = json.loads(_cache_file().read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def lookup(st: os.stat_result) -> str | None:
    if not _enabled():
        return None
    digest = _load().get(_identity(st))
    return digest if isinstance(digest, str) and len(digest) == 64 else None


def remember(st: os.stat_result, digest: str) -> None:
    """Best effort: a cache that cannot be written is simply not used."""
    if not _enabled():
        return
    path = _cache_file()
    entries = _load()
    entries.pop(_identity(st), None)
    entries[_identity(st)] = digest
    entries = dict(list(entries.items())[-MAX_ENTRIES:])
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".sha256.", suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            json.dump(entries, f)
        os.replace(tmp, path)
    except OSError:
        if tmp is not None:          # e.g. a full disk: leave nothing behind
            Path(tmp).unlink(missing_ok=True)


def sha256_file(path, *, cached: bool = True) -> str:
    """SHA-256 of a whole file; remembered (unless `cached` is False, as verify wants)."""
    with open(path, "rb") as f:
        st = os.fstat(f.fileno())
        if cached and (digest := lookup(st)):
            return digest
        h = hashlib.sha256()
        buf = memoryview(bytearray(HASH_CHUNK))
        while n := f.readinto(buf):
            h.update(buf[:n])
    if cached:
        remember(st, h.hexdigest())
    return h.hexdigest()
