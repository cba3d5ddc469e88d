"""Where a command may write, and how: path checks, temporaries beside the target, atomic replace,
durability. Used by bake, emit and the sweep; the one place that decides what may be replaced.

Every output is written to a temporary path beside the target and renamed into place only when
complete; a temporary's name carries its writer's PID, so a later run can tell a killed run's
leftovers from a running one's.
"""

from __future__ import annotations

import glob
import os
import re
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

from .errors import CkptbendError

TMP_SUFFIX = ".ckptbend-tmp"


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


def check_folder_target(target: Path, force: bool, what: str = "companion folder") -> None:
    """The one rule for where a generated folder (a companion) may be written."""
    if not target.parent.is_dir():
        raise CkptbendError(f"{target.parent}: no such folder")
    if target.exists() and not target.is_dir():
        raise CkptbendError(f"{target}: exists and is not a folder; refusing to replace it with a {what}")
    if target.exists() and not force:
        raise CkptbendError(f"{target}: {what} already exists (use --force to replace it)")


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


def fsync_path(path: Path):
    """fsync a file or a folder (a folder's entries: the rename into place)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
