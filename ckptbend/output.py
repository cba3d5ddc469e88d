"""Where a command may write, and how: every rule about targets, temporaries beside the target, atomic
replace, durability. Used by bake, the sweep, emit, maps and synth; the one place that decides what may be
replaced.

- `check_targets` checks every target of a command (outputs, companion folders) against the disk,
  against the command's inputs and against each other, before anything is written.
- `--force` replaces only a regular file, or a folder that is recognisably a model folder
  (`model_index.json`), a ckptbend companion (`companion.json`) or a ckptbend-baked folder; never a
  device, FIFO, socket or unrelated folder.
- Every output is written to a temporary beside the target and renamed into place when complete.
  Without `--force` the rename refuses to replace a target that appeared meanwhile
  (`renameat2(RENAME_NOREPLACE)`, or `os.link` + unlink where the kernel or file system lacks it).
- A temporary's name carries its writer's PID, so a later run can tell a killed run's leftovers from
  a running one's; every dead run's temporary in an output folder is swept.
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import re
import shutil
import stat
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from .errors import CkptbendError

TMP_SUFFIX = ".ckptbend-tmp"
NAME_KEPT = 32   # characters of the target's name kept in its temporary's name (names near NAME_MAX fit)
TEMPORARY = re.compile(r"\..*\.(\d+)\.[A-Za-z0-9_]+" + re.escape(TMP_SUFFIX))


@dataclass(frozen=True)
class Target:
    path: Path
    is_dir: bool
    what: str = "output"   # how messages name it: "output", "companion folder"

    @property
    def absolute(self) -> Path:
        return Path(os.path.abspath(self.path))


# --- checks ----------------------------------------------------------------------------------------
def check_targets(targets: list[Target], inputs, force: bool, new_folder: Path | None = None) -> None:
    """Every rule for where a command may write, for all its targets, before any is written.

    inputs: every file or folder the command reads (checkpoint, recipes); none may be replaced.
    new_folder: a folder the command will create to hold the targets (it need not exist yet)."""
    if new_folder is not None:
        _check_new_folder(Path(new_folder))
    seen: dict[Path, Target] = {}
    for t in targets:
        _check_target(t, [Path(i) for i in inputs], force, new_folder)
        other = seen.setdefault(t.absolute, t)
        if other is not t:
            raise CkptbendError(f"{t.path}: this command would write two things here ({other.what} and {t.what}); "
                                "give the recipes or outputs names that differ in letters or digits")


def _check_new_folder(folder: Path) -> None:
    if folder.exists() and not folder.is_dir():
        raise CkptbendError(f"{folder}: exists and is not a folder")
    existing = Path(os.path.abspath(folder))
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise CkptbendError(f"{existing}: no such folder")
    if not os.access(existing, os.W_OK):
        raise CkptbendError(f"{existing}: folder is not writable")


def _check_target(t: Target, inputs: list[Path], force: bool, new_folder: Path | None) -> None:
    dst = t.path.resolve()
    for inp in inputs:
        src = inp.resolve()
        if src == dst or (t.path.exists() and inp.exists() and os.path.samefile(inp, t.path)):
            raise CkptbendError(f"{t.path}: {t.what} would overwrite the input {inp.name}; choose another path")
        if inp.is_dir() and dst.is_relative_to(src):
            raise CkptbendError(f"{t.path}: {t.what} cannot be inside the input folder {inp}")
        if src.is_relative_to(dst):
            raise CkptbendError(f"{t.path}: contains the input {inp.name}; replacing it would destroy the input")
    parent = t.absolute.parent
    if new_folder is not None and parent == Path(os.path.abspath(new_folder)) and not parent.exists():
        return   # created by the command: nothing in it yet
    if not parent.is_dir():
        raise CkptbendError(f"{t.path.parent}: no such folder")
    if not os.access(parent, os.W_OK):
        raise CkptbendError(f"{t.path.parent}: folder is not writable")
    if os.path.lexists(t.path):
        if not force:
            raise CkptbendError(f"{t.path}: {t.what} already exists (use --force to replace it)")
        check_replaceable(t)


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISDIR, "folder"), (stat.S_ISREG, "file"), (stat.S_ISCHR, "character device"),
                       (stat.S_ISBLK, "block device"), (stat.S_ISFIFO, "FIFO"), (stat.S_ISSOCK, "socket"),
                       (stat.S_ISLNK, "broken symlink")):
        if test(mode):
            return name
    return "special file"


def check_replaceable(t: Target) -> None:
    """What --force may replace: a regular file (for a file output), a recognisable folder (for a folder)."""
    try:
        mode = os.stat(t.path).st_mode
    except FileNotFoundError:
        mode = os.lstat(t.path).st_mode     # a dangling symlink
    kind = _kind(mode)
    if kind not in ("file", "folder"):
        raise CkptbendError(f"{t.path}: is a {kind}, not a regular file or folder; refusing to replace it")
    if (kind == "folder") != t.is_dir:
        raise CkptbendError(f"{t.path}: exists and is a {kind}; refusing to replace it with the other kind "
                            f"({t.what})")
    if kind == "folder" and not _recognised_folder(t.path):
        raise CkptbendError(f"{t.path}: is a folder but not a model folder (model_index.json), a ckptbend companion "
                            "or a ckptbend output; refusing to replace it")


def _recognised_folder(folder: Path) -> bool:
    if (folder / "model_index.json").is_file():
        return True
    try:
        manifest = json.loads((folder / "companion.json").read_text(encoding="utf-8"))
        if isinstance(manifest, dict) and {"ckptbend_version", "recipe_sha256"} <= manifest.keys():
            return True
    except (OSError, ValueError, RecursionError):
        pass
    from .safetensors_io import read_header   # a diffusers folder baked by ckptbend, without model_index.json
    for weights in folder.glob("*/*.safetensors"):
        try:
            if "ckptbend.recipe_sha256" in read_header(weights).metadata:
                return True
        except CkptbendError:
            continue
    return False


# --- temporaries -----------------------------------------------------------------------------------
def temp_prefix(target: Path) -> str:
    # The PID in the name lets a later run tell a dead run's leftovers from a running run's file.
    return f".{target.name[:NAME_KEPT]}.{os.getpid()}."


@contextmanager
def temporary_folder(beside: Path):
    """A scratch folder beside `beside` (removed afterwards; a killed run's is swept like any temporary)."""
    with tempfile.TemporaryDirectory(dir=Path(os.path.abspath(beside)).parent, prefix=temp_prefix(beside),
                                     suffix=TMP_SUFFIX) as tmp:
        yield Path(tmp)


def remove_stale_temporaries(folder: Path, keep=()) -> list[Path]:
    """Delete the temporaries that killed runs (dead PIDs) left in `folder`; never anything in `keep`."""
    removed = []
    keep = [Path(k).resolve() for k in keep]
    for p in Path(folder).glob(f".*{TMP_SUFFIX}"):
        m = TEMPORARY.fullmatch(p.name)
        if not m or _alive(int(m.group(1))) or any(k.is_relative_to(p.resolve()) for k in keep):
            continue
        shutil.rmtree(p, ignore_errors=True) if p.is_dir() and not p.is_symlink() else p.unlink(missing_ok=True)
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
    except (PermissionError, OverflowError):
        return True
    return True


def permissions_of(path: Path) -> int:
    """The permission bits an output copied from `path` gets (like cp: the source's, less the umask)."""
    return stat.S_IMODE(os.stat(path).st_mode) & ~_umask()


# --- the final rename ------------------------------------------------------------------------------
AT_FDCWD, RENAME_NOREPLACE = -100, 1
_renameat2 = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)


def rename_noreplace(src: Path, dst: Path) -> None:
    """Rename `src` to `dst` unless `dst` exists (FileExistsError), atomically: renameat2 with
    RENAME_NOREPLACE; where the kernel or file system lacks it, os.link + unlink (a file) or an
    exclusive mkdir then a rename onto that empty folder (a folder)."""
    if _renameat2 is not None:
        if _renameat2(AT_FDCWD, os.fsencode(src), AT_FDCWD, os.fsencode(dst), RENAME_NOREPLACE) == 0:
            return
        err = ctypes.get_errno()
        if err not in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
            raise OSError(err, os.strerror(err), str(dst))
    rename_noreplace_portable(src, dst)


def rename_noreplace_portable(src: Path, dst: Path) -> None:
    """The fallback: a hard link fails if `dst` exists (a file); an exclusive mkdir claims `dst`, then
    the folder is renamed onto that empty folder (a folder)."""
    if Path(src).is_dir():
        os.mkdir(dst)
        os.replace(src, dst)
    else:
        os.link(src, dst)
        os.unlink(src)


def _put_in_place(tmp: Path, target: Target, force: bool, prefix: str) -> None:
    if not force or not os.path.lexists(target.path):
        try:
            rename_noreplace(tmp, target.absolute)
        except FileExistsError:
            raise CkptbendError(f"{target.path}: appeared while this command was writing (another run?); "
                                "left as it is, nothing written (use --force to replace it)") from None
        return
    check_replaceable(target)    # again: it may have changed since the command's checks
    if target.is_dir:
        old = Path(tempfile.mkdtemp(dir=target.absolute.parent, prefix=prefix, suffix=TMP_SUFFIX))
        os.replace(target.absolute, old / "old")
        os.replace(tmp, target.absolute)
        shutil.rmtree(old)
    else:
        os.replace(tmp, target.absolute)


@contextmanager
def atomic_output(target: Target, force: bool, mode: int | None = None):
    """Yield a temporary path beside `target`; put it in place only if the block completes (without
    `force`, only if nothing has appeared at the target meanwhile). `mode`: permission bits."""
    prefix, parent = temp_prefix(target.absolute), target.absolute.parent
    if target.is_dir:
        tmp = Path(tempfile.mkdtemp(dir=parent, prefix=prefix, suffix=TMP_SUFFIX))
    else:
        fd, name = tempfile.mkstemp(dir=parent, prefix=prefix, suffix=TMP_SUFFIX)
        os.close(fd)
        tmp = Path(name)
    default = (0o777 if target.is_dir else 0o666) & ~_umask()   # as a plain open() would have made it
    os.chmod(tmp, default if mode is None else mode)
    try:
        yield tmp
        _put_in_place(tmp, target, force, prefix)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True) if target.is_dir else tmp.unlink(missing_ok=True)
        raise


def fsync_path(path: Path):
    """fsync a file or a folder (a folder's entries: the rename into place)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# sync_file_range(2) (Linux; not in the os module): start writing a range to disk without waiting, so a
# durable bake's disk writes overlap its copying and the final fsync finds little left to do.
SYNC_FILE_RANGE_WRITE = 2
_sync_file_range = getattr(ctypes.CDLL(None, use_errno=True), "sync_file_range", None)
if _sync_file_range is not None:
    _sync_file_range.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]


def start_writeback(fd: int, offset: int, count: int) -> None:
    """Ask the kernel to start writing [offset, offset + count) of `fd` to disk now (a hint: no-op where
    unsupported; durability still comes from fsync)."""
    if _sync_file_range is not None and count > 0:
        _sync_file_range(fd, offset, count, SYNC_FILE_RANGE_WRITE)
