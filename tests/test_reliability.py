"""Reliability: malformed inputs, faults mid-write and hostile files never lose data or crash.

`CASES` is the table: one row per case, each driving the real `ckptbend` command (a subprocess, like a
user runs it) against files in a fresh sandbox folder. For every row the harness checks:

- the exit code: 2 for an error, 130 for SIGINT/SIGTERM, 0 where the row expects success;
- an error is one clear line: the last stderr line starts with "error: " and names the problem;
- no "Traceback" anywhere on stderr;
- the sandbox afterwards holds exactly what it held before, byte for byte: no output, no temporary
  (`.<output>.<pid>.<random>.ckptbend-tmp`), an existing output untouched; only the files a
  succeeding row creates may appear;
- the input's SHA-256 is unchanged (asserted explicitly in every row).

Below the table: a property-based test of the header reader (`bin/fuzz` runs the same property for
10,000+ examples and reports accepted / rejected / crashes).
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import os
import pickle
import resource
import shutil
import signal
import stat
import struct
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from math import prod
from pathlib import Path
from typing import Callable

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))   # bin/fuzz imports this module from a checkout

from ckptbend.errors import CkptbendError  # noqa: E402
from ckptbend.safetensors_io import DTYPE_BITS, header_bytes, read_header  # noqa: E402

CLI = ROOT / "bin" / "ckptbend"
RECIPE = "schema = 1\nname = \"r\"\n[unet.self]\nq = 1.1\n"
TMP_SUFFIX = ".ckptbend-tmp"
BIG_MIN_WRITTEN = 16 << 20     # a mid-write fault is injected once this much of the output exists
DEAD_PID = 4194399             # above Linux's largest pid_max: never a live process


# --- files ----------------------------------------------------------------------------------------
def st_file(header, data=b"", length=None) -> bytes:
    """A safetensors-shaped byte string: 8-byte length, header (dict → JSON, or raw bytes), data."""
    body = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(body) if length is None else length) + body + data


def entry(dtype="F32", shape=(2,), offsets=(0, 8)):
    return {"dtype": dtype, "shape": list(shape), "data_offsets": list(offsets)}


def split(blob: bytes):
    """(header as a dict in file order, data section) of a valid safetensors byte string."""
    (n,) = struct.unpack("<Q", blob[:8])
    return json.loads(blob[8:8 + n]), blob[8 + n:]


def with_length(blob: bytes, change) -> bytes:
    (n,) = struct.unpack("<Q", blob[:8])
    return struct.pack("<Q", change(n, len(blob))) + blob[8:]


def edited(blob: bytes, edit) -> bytes:
    """Apply `edit(header_dict)` to a real file's header and keep its data section."""
    doc, data = split(blob)
    edit(doc)
    return st_file(doc, data)


def first_f16(doc) -> str:
    return next(k for k in doc if k != "__metadata__" and doc[k]["dtype"] == "F16")


def sha256_file(path, memo=None) -> str:
    st_ = os.stat(path)
    key = (st_.st_dev, st_.st_ino, st_.st_size, st_.st_mtime_ns)
    if memo is not None and key in memo:
        return memo[key]
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(8 << 20):
            h.update(chunk)
    if memo is not None:
        memo[key] = h.hexdigest()
    return h.hexdigest()


def snapshot(root: Path, memo=None) -> dict[str, str]:
    """Every entry under `root`: files by SHA-256, symlinks by target (never followed), folders."""
    state = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath, name)
            rel = p.relative_to(root).as_posix()
            if p.is_symlink():
                state[rel] = "symlink → " + os.readlink(p)
            elif p.is_dir():
                state[rel] = "folder"
            elif not p.is_file():   # a FIFO, socket or device: never opened (a FIFO would block)
                state[rel] = f"special file, mode {oct(p.lstat().st_mode)}"
            else:
                state[rel] = sha256_file(p, memo)
    return state


# --- shared inputs, generated once per module -------------------------------------------------------
class Assets:
    """Checkpoints the rows copy into their sandboxes; built on first use, removed after the module."""

    def __init__(self, root: Path):
        self.root = root
        self.memo = {}      # (dev, ino, size, mtime) → sha256: "before" snapshots of big files
        self._made = {}

    def _once(self, name, make):
        if name not in self._made:
            self._made[name] = make()
        return self._made[name]

    def sd1(self) -> bytes:
        def make():
            import torch

            from ckptbend.synth import write_checkpoint
            return write_checkpoint(self.root / "sd1.safetensors", "sd1", dtype=torch.float16).read_bytes()
        return self._once("sd1", make)

    def unet(self) -> bytes:
        def make():
            import torch

            from ckptbend.synth import write_checkpoint
            return write_checkpoint(self.root / "unet.safetensors", "sd1", layout="unet",
                                    dtype=torch.float16).read_bytes()
        return self._once("unet", make)

    def diffusers(self) -> Path:
        def make():
            import torch

            from ckptbend.synth import write_checkpoint
            return write_checkpoint(self.root / "diffusers", "sd1", layout="diffusers", dtype=torch.float16)
        return self._once("diffusers", make)

    def sharded(self) -> Path:
        """The diffusers folder with its UNet split into two shards and an index, as large models ship."""
        def make():
            from safetensors.torch import load_file, save_file
            root = self.root / "sharded"
            shutil.copytree(self.diffusers(), root)
            unet = root / "unet"
            tensors = load_file(unet / "diffusion_pytorch_model.safetensors")
            (unet / "diffusion_pytorch_model.safetensors").unlink()
            names = list(tensors)
            weight_map = {}
            for i, part in enumerate((names[:len(names) // 2], names[len(names) // 2:]), 1):
                shard = f"diffusion_pytorch_model-0000{i}-of-00002.safetensors"
                save_file({n: tensors[n] for n in part}, unet / shard)
                weight_map.update(dict.fromkeys(part, shard))
            (unet / "diffusion_pytorch_model.safetensors.index.json").write_text(
                json.dumps({"metadata": {}, "weight_map": weight_map}))
            return root
        return self._once("sharded", make)

    def big(self) -> tuple[Path, str]:
        """A ~135 MB SD 1.x file (real key names; 16 large attn1.to_q to scale, 16 large to_v to copy):
        slow enough to bake (about a second) that a fault can be injected mid-write."""
        def make():
            import numpy as np
            import torch
            from safetensors.torch import load_file

            from ckptbend.synth import write_safetensors
            self.sd1()
            tensors = load_file(self.root / "sd1.safetensors")
            for k in tensors:
                if k.startswith("model.diffusion_model.") and k.endswith(("attn1.to_q.weight", "attn1.to_v.weight")):
                    tensors[k] = torch.empty((2048, 1024), dtype=torch.float16, device="meta")
            path = write_safetensors(self.root / "big.safetensors", tensors, dtype=torch.float16,
                                     generator=np.random.default_rng(0))
            return path, sha256_file(path, self.memo)
        return self._once("big", make)


@pytest.fixture(scope="module")
def assets():
    root = Path(tempfile.mkdtemp(prefix="ckptbend-reliability-"))
    try:
        yield Assets(root)
    finally:
        shutil.rmtree(root, ignore_errors=True)


# --- the sandbox a row runs in ------------------------------------------------------------------------
@dataclass
class Result:
    args: list
    code: int
    stdout: str
    stderr: str

    @property
    def last_line(self) -> str:
        lines = self.stderr.strip().splitlines()
        return lines[-1] if lines else ""


def cli_args(*args) -> list[str]:
    return [sys.executable, str(CLI), *map(str, args)]


class Sandbox:
    def __init__(self, root: Path, assets: Assets):
        self.root, self.assets = root, assets
        self.inp, self.out = root / "in", root / "out"
        self.inp.mkdir()
        self.out.mkdir()
        self.input: Path | None = None
        self.before: dict[str, str] | None = None
        self.input_sha: str | None = None
        self.removed: set[str] = set()        # entries the row itself deletes
        self.changed: dict[str, str] = {}     # entries the row itself rewrites → expected sha256
        self.input_kept: Path | None = None   # where the input's bytes live if the row deletes the input
        self.cleanups: list[Callable] = []

    # setup
    def put(self, rel: str, data: bytes) -> Path:
        p = self.root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
        return p

    def recipe(self, body: str = RECIPE) -> Path:
        return self.put("in/r.toml", body.encode() if isinstance(body, str) else body)

    def start(self, input: Path):
        """Setup done: remember the sandbox and the input's SHA-256; the faults start now."""
        self.input = input
        self.before = snapshot(self.root, self.assets.memo)
        self.input_sha = self.before.get(self.rel(input)) if input.exists() else None

    def rel(self, p: Path) -> str:
        return Path(os.path.abspath(p)).relative_to(self.root).as_posix()

    # running
    def cli(self, *args, cwd=None, preexec_fn=None, timeout=120) -> Result:
        r = subprocess.run(cli_args(*args), capture_output=True, text=True, cwd=cwd, preexec_fn=preexec_fn,
                           timeout=timeout, env=dict(os.environ, PYTHONDONTWRITEBYTECODE="1"))
        return Result(list(args), r.returncode, r.stdout, r.stderr)

    def cli_together(self, *commands) -> list[Result]:
        """Run several commands at once (the machine has 2 cores; startup dominates these rows)."""
        procs = [subprocess.Popen(cli_args(*c), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                 for c in commands]
        results = []
        try:
            for c, p in zip(commands, procs):
                out, err = p.communicate(timeout=120)
                results.append(Result(list(c), p.returncode, out, err))
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
                    p.wait()
        return results

    def bake_with_fault(self, args, fault: Callable[[subprocess.Popen, Path], None], output="o.safetensors") -> Result:
        """Start a bake; once its temporary holds BIG_MIN_WRITTEN bytes, call fault(proc, temporary)."""
        proc = subprocess.Popen(cli_args(*args), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            tmp = wait_until_writing(proc, self.out, output)
            fault(proc, tmp)
            out, err = proc.communicate(timeout=120)
            return Result(list(args), proc.returncode, out, err)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def wait_until_writing(proc: subprocess.Popen, folder: Path, output: str, timeout=60) -> Path:
    """The bake's temporary, once it exists and has grown past BIG_MIN_WRITTEN bytes."""
    pattern = f".{output}.{proc.pid}.*{TMP_SUFFIX}"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"the bake ended (exit {proc.returncode}) before the fault could be injected: "
                        f"{proc.stderr.read()}")
        for tmp in folder.glob(pattern):
            try:
                written = tmp.stat().st_blocks * 512
            except FileNotFoundError:
                continue
            if written >= BIG_MIN_WRITTEN:
                return tmp
        time.sleep(0.002)
    pytest.fail("the bake's temporary never grew")


# --- the expected outcomes ------------------------------------------------------------------------------
@dataclass(frozen=True)
class Fails:
    """Exit `code`, the last stderr line is "error: …" containing `fragment` (or one of a tuple of
    fragments, where more than one wording is right); nothing written."""
    fragment: str | tuple[str, ...]
    code: int = 2

    @property
    def fragments(self) -> tuple[str, ...]:
        return self.fragment if isinstance(self.fragment, tuple) else (self.fragment,)

    def __str__(self):
        return f"exit {self.code}, error: …{' | '.join(self.fragments)}…"


@dataclass(frozen=True)
class Succeeds:
    """Exit 0; exactly the entries `creates` (relative to the sandbox) appear, nothing else changes."""
    creates: tuple[str, ...] = ()

    def __str__(self):
        return f"exit 0, creates {', '.join(self.creates) or 'nothing'}"


@dataclass(frozen=True)
class Either:
    """Two behaviours are right (e.g. refuse a damaged record, or keep it as text and go on); which one
    happened is read from the exit codes, and then held to its own checks."""
    error: Fails
    ok: Succeeds

    def pick(self, results) -> Fails | Succeeds:
        return self.ok if all(r.code == 0 for r in results) else self.error

    def __str__(self):
        return f"{self.error}  OR  {self.ok}"


@dataclass(frozen=True)
class Case:
    id: str
    run: Callable[[Sandbox], list[Result]]
    expect: Fails | Succeeds | Either
    notes: str = ""


def check_result(r: Result, expect):
    where = f"ckptbend {' '.join(map(str, r.args))}\nstderr:\n{r.stderr}"
    assert "Traceback" not in r.stderr, where
    assert r.code == (expect.code if isinstance(expect, Fails) else 0), where
    if isinstance(expect, Fails):
        assert r.last_line.startswith("error: "), where
        assert any(f in r.last_line for f in expect.fragments), where


# --- rows: malformed safetensors, through `inspect` and `bake` -------------------------------------------
def _add_surrogate_tensor(doc):
    end = max(e["data_offsets"][1] for k, e in doc.items() if k != "__metadata__")
    doc["model.diffusion_model.extra\udc00"] = entry(dtype="F16", shape=(0,), offsets=(end, end))


def _deep_json(depth=100_000) -> bytes:
    return b'{"a":' + b"[" * depth + b"]" * depth + b"}"


INVALID = "not a valid safetensors file"

# (name, file content or assets → content, fragment of the error line)
MALFORMED = [
    ("empty file", b"", "shorter than the 8-byte"),
    ("header length beyond the file", st_file({}, length=1000), "larger than the file"),
    ("header length beyond the 100 MB cap", struct.pack("<Q", 100_000_001) + b"{}" + b" " * 6, "exceeds"),
    ("header length 0", b"\0" * 8, "does not start with '{'"),
    ("header not JSON", st_file(b"{not json}"), "not valid JSON"),
    ("header a JSON array", st_file(b"[1, 2]  "), "does not start with '{'"),
    ("header not UTF-8", st_file(b'{"\xff\xfe": 1}'), "UTF-8"),
    ("header JSON nested 100000 deep", st_file(_deep_json()), INVALID),
    ("__metadata__ value not a string", st_file({"__metadata__": {"a": 1}}), "strings to strings"),
    ("__metadata__ twice", st_file(b'{"__metadata__": {}, "__metadata__": {}}'), "duplicate"),
    ("unknown dtype", st_file({"t": entry(dtype="F12")}, b"\0" * 8), "unknown dtype"),
    ("dtype a JSON array", st_file({"t": entry(dtype=["F32"])}, b"\0" * 8), "dtype"),
    ("shape not a list", st_file({"t": {"dtype": "F32", "shape": 2, "data_offsets": [0, 8]}}, b"\0" * 8), "shape"),
    ("boolean dimension", st_file({"t": entry(shape=(True, 2))}, b"\0" * 8), "shape"),
    ("shape/dtype vs byte range", st_file({"t": entry(shape=(3,))}, b"\0" * 8), "needs 12 bytes"),
    ("sub-byte dtype, odd count", st_file({"t": entry(dtype="F4", shape=(3,), offsets=(0, 2))}, b"\0" * 2),
     "whole number of bytes"),
    ("data_offsets reversed", st_file({"t": entry(offsets=(8, 0))}, b"\0" * 8), "data_offsets"),
    ("extra field", st_file({"t": dict(entry(), extra=1)}, b"\0" * 8), "exactly dtype"),
    ("duplicate tensor names", st_file(b'{"a":' + json.dumps(entry()).encode() + b',"a":' +
                                       json.dumps(entry()).encode() + b"}", b"\0" * 8), "duplicate"),
    ("overlapping tensors", st_file({"a": entry(), "b": entry(offsets=(4, 12))}, b"\0" * 12), "overlaps"),
    ("gap between tensors", st_file({"a": entry(), "b": entry(offsets=(12, 20))}, b"\0" * 20), "gap"),
    ("out of order with a gap", st_file({"b": entry(offsets=(12, 20)), "a": entry()}, b"\0" * 20), "gap"),
    ("tensor out of bounds", st_file({"a": entry(), "b": entry(offsets=(8, 16))}, b"\0" * 8), "truncated"),
    ("trailing bytes", st_file({"a": entry()}, b"\0" * 9), "trailing"),
    # the same faults on a real SD 1.x file
    ("SD file cut mid-tensor", lambda a: a.sd1()[:-1000], "truncated"),
    ("SD file, header length +1", lambda a: with_length(a.sd1(), lambda n, size: n + 1), INVALID),
    ("SD file, an F16 tensor declared F32",
     lambda a: edited(a.sd1(), lambda d: d[first_f16(d)].update(dtype="F32")), "needs"),
    # JSON escapes of lone UTF-16 surrogates ("\\ud800") decode to str that cannot be encoded again;
    # the reference reader (serde_json) rejects them
    ("SD file, lone surrogate escape in metadata",
     lambda a: edited(a.sd1(), lambda d: d["__metadata__"].update(note="\ud800")), INVALID),
    ("SD file, lone surrogate escape in a tensor name", lambda a: edited(a.sd1(), _add_surrogate_tensor), INVALID),
]


def _content(maker, assets):
    return maker(assets) if callable(maker) else maker


def malformed_row(name, maker, fragment):
    def run(sb: Sandbox):
        src = sb.put("in/m.safetensors", _content(maker, sb.assets))
        recipe = sb.recipe()
        sb.start(src)
        return sb.cli_together(["inspect", src], ["bake", recipe, src, "-o", sb.out / "o.safetensors"])
    return Case(f"safetensors/{name} (inspect, bake)", run, Fails(fragment))


def metadata_row(name, meta: dict, expect, command="bake", shows=None):
    """A real SD file whose (string-valued, well-formed) metadata is hostile to what reads it next.
    A bake that goes on must give an output that `ckptbend verify` (which rebuilds the metadata) accepts;
    an inspect that goes on prints `shows` and no control character."""
    def run(sb: Sandbox):
        doc, data = split(sb.assets.sd1())
        doc["__metadata__"] = meta
        src, recipe, out = sb.put("in/m.safetensors", st_file(doc, data)), sb.recipe(), sb.out / "o.safetensors"
        sb.start(src)
        if command == "inspect":
            r = sb.cli("inspect", src)
            if r.code == 0:
                assert shows in r.stdout and not any(ord(c) < 32 and c != "\n" or 0x7f <= ord(c) < 0xa0
                                                     for c in r.stdout), r.stdout
            return [r]
        r = sb.cli("bake", recipe, src, "-o", out)
        if r.code == 0:
            v = sb.cli("verify", out, "--source", src)
            assert v.code == 0 and "ok" in v.stdout, v.stderr
        return [r]
    return Case(f"metadata/{name} ({command})", run, expect)


def zero_d_norm_row():
    """A bare text encoder whose final_layer_norm (read for the encoder's width) is 0-d. Rejecting the
    file and baking nothing are both right: this UNet recipe matches nothing in a text encoder."""
    def run(sb):
        src = sb.put("in/m.safetensors", st_file(
            {"text_model.final_layer_norm.weight": entry(shape=(), offsets=(0, 4)),
             "text_model.encoder.layers.0.self_attn.q_proj.weight": entry(shape=(1,), offsets=(4, 8))}, b"\0" * 8))
        recipe = sb.recipe()
        sb.start(src)
        return [sb.cli("bake", recipe, src, "-o", sb.out / "o.safetensors")]
    return Case("semantics/bare text encoder with a 0-d final_layer_norm (bake)", run, Fails("m.safetensors"))


def int_attention_row():
    def run(sb):
        doc, data = split(sb.assets.sd1())
        key = next(k for k in doc if k.endswith("attn1.to_q.weight"))
        doc[key]["dtype"] = "I16"       # same byte size as F16: the header stays valid
        src, recipe = sb.put("in/m.safetensors", st_file(doc, data)), sb.recipe()
        sb.start(src)
        return [sb.cli("bake", recipe, src, "-o", sb.out / "o.safetensors")]
    return Case("semantics/attention weight stored as I16 (bake)", run, Fails("cannot be scaled"))


def diffusers_row(name, damage, expect, commands=("inspect", "bake")):
    def run(sb):
        model = sb.inp / "model"
        shutil.copytree(sb.assets.diffusers(), model)
        damage(model)
        recipe = sb.recipe()
        sb.start(model)
        argv = {"inspect": ["inspect", model], "bake": ["bake", recipe, model, "-o", sb.out / "o"]}
        return sb.cli_together(*(argv[c] for c in commands))
    return Case(f"diffusers/{name} ({', '.join(commands)})", run, expect)


def _write(rel, data):
    return lambda model: (model / rel).write_bytes(data)


def _truncate_weights(model):
    w = model / "unet" / "diffusion_pytorch_model.safetensors"
    w.write_bytes(w.read_bytes()[:-100])


MALFORMED_ROWS = [malformed_row(*m) for m in MALFORMED] + [
    # a damaged bake history may be refused, or kept as text and baked over
    metadata_row("ckptbend.history not JSON", {"ckptbend.recipe_sha256": "0" * 64, "ckptbend.history": "{oops"},
                 Either(Fails("ckptbend.history"), Succeeds(("out/o.safetensors",)))),
    metadata_row("ckptbend.history JSON but not a list", {"ckptbend.recipe_sha256": "0" * 64,
                                                          "ckptbend.history": "{}"},
                 Either(Fails("ckptbend.history"), Succeeds(("out/o.safetensors",)))),
    metadata_row("ckptbend.recipe not TOML", {"ckptbend.recipe": "[unet.self", "ckptbend.recipe_sha256": "0" * 64},
                 Succeeds(), command="inspect", shows="the recorded recipe is unreadable: "),
    metadata_row("terminal escape sequences", {"note\x1b[1m": "\x1b[2J\x1b]0;pwned\x07\x9b31m\r"}, Succeeds(),
                 command="inspect", shows="\\x1b[2J\\x1b]0;pwned\\x07\\x9b31m\\r"),
    int_attention_row(),
    zero_d_norm_row(),
    diffusers_row("unet weights cut short", _truncate_weights, Fails("truncated")),
    diffusers_row("text_encoder/config.json not JSON", _write("text_encoder/config.json", b"{"), Fails("config.json")),
    diffusers_row("text_encoder/config.json a JSON list", _write("text_encoder/config.json", b"[1]"),
                  Fails("config.json")),
    # unet/config.json only tells SVD apart: refusing a damaged one and ignoring it are both right
    diffusers_row("unet/config.json a JSON list", _write("unet/config.json", b"[1]"),
                  Either(Fails("config.json"), Succeeds()), ("inspect",)),
]


# --- rows: hostile pickles ------------------------------------------------------------------------------
class _Exec:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('pwned')",))


class _System:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch '{self.marker}'",))


def _legacy_pickle(payload) -> bytes:
    return pickle.dumps({"state_dict": {"w": payload}}, protocol=2)


def _torch_save(obj, legacy=False) -> bytes:
    import io

    import torch
    buf = io.BytesIO()
    torch.save(obj, buf, _use_new_zipfile_serialization=not legacy)
    return buf.getvalue()


def _torch_zip(payload) -> bytes:
    return _torch_save({"state_dict": {"w": payload}})


def _torch_legacy(payload) -> bytes:
    """The pre-1.6 torch.save format most old .ckpt files use."""
    return _torch_save({"state_dict": {"w": payload}}, legacy=True)


def pickle_row(name, filename, make, args, fragment, commands=("bake",)):
    def run(sb: Sandbox):
        marker = sb.root / "pwned"
        src = sb.put(f"in/{filename}", make(marker))
        recipe = sb.recipe()
        sb.start(src)
        argv = {"bake": ["bake", recipe, src, "-o", sb.out / "o.safetensors", *args], "inspect": ["inspect", src]}
        results = sb.cli_together(*(argv[c] for c in commands))
        assert not marker.exists(), "the pickle's payload ran"
        for r in results:   # one line: no torch warnings, no advice to load with weights_only=False
            assert len(r.stderr.strip().splitlines()) == 1 and "weights_only" not in r.stderr, r.stderr
        return results
    label = " ".join(args) or "no --allow-pickle"
    return Case(f"pickle/{name} ({', '.join(commands)}; {label})", run, Fails(fragment))


PICKLE_ROWS = [
    pickle_row("exec payload .ckpt", "evil.ckpt", lambda m: _legacy_pickle(_Exec(str(m))), [], "--allow-pickle"),
    pickle_row("exec payload .ckpt (legacy torch.save)", "evil.ckpt", lambda m: _torch_legacy(_Exec(str(m))),
               ["--allow-pickle"], "weights-only: it references exec, which is not an allowed global"),
    pickle_row("os.system payload .pt (torch.save zip)", "evil.pt", lambda m: _torch_zip(_System(str(m))),
               ["--allow-pickle"], "weights-only: it references posix.system, which is not an allowed global"),
    pickle_row("os.system payload .bin", "evil.bin", lambda m: _legacy_pickle(_System(str(m))),
               ["--allow-pickle"], "weights-only: it references posix.system, which is not an allowed global"),
    pickle_row("exec payload pickle renamed .safetensors", "evil.safetensors",
               lambda m: _legacy_pickle(_Exec(str(m))), ["--allow-pickle"], INVALID, ("inspect", "bake")),
    pickle_row("os.system payload torch.save zip renamed .safetensors", "evil.safetensors",
               lambda m: _torch_zip(_System(str(m))), ["--allow-pickle"], INVALID, ("inspect", "bake")),
]


# --- rows: outputs that resolve to the input ------------------------------------------------------------
OVERWRITE = "output would overwrite the input"


def single_path_row(name, make_output, expect=Fails(OVERWRITE), force=True, cwd_in=False):
    """make_output(sb, src) → the -o argument (may create links first)."""
    def run(sb: Sandbox):
        src = sb.put("in/m.safetensors", sb.assets.sd1())
        recipe = sb.recipe()
        output = make_output(sb, src)
        sb.start(src)
        return [sb.cli("bake", recipe, src if not cwd_in else "m.safetensors", "-o", output,
                       *(["--force"] if force else []), cwd=sb.inp if cwd_in else None)]
    return Case(f"paths/{name}", run, expect)


def folder_path_row(name, make_output, expect, force=True):
    def run(sb: Sandbox):
        model = sb.inp / "model"
        shutil.copytree(sb.assets.diffusers(), model)
        recipe = sb.recipe()
        output = make_output(sb, model)
        sb.start(model)
        return [sb.cli("bake", recipe, model, "-o", output, *(["--force"] if force else []))]
    return Case(f"paths/diffusers: {name}", run, expect)


def _symlink(link: Path, target: Path) -> Path:
    link.symlink_to(target)
    return link


def _hardlink(link: Path, target: Path) -> Path:
    os.link(target, link)
    return link


def _stale_named_input(sb: Sandbox):
    # An input whose name has the shape of a temporary left by a dead bake of the output.
    src = sb.put(f"in/.o.safetensors.{DEAD_PID}.x{TMP_SUFFIX}", sb.assets.sd1())
    recipe = sb.recipe()
    sb.start(src)
    return [sb.cli("bake", recipe, src, "-o", sb.inp / "o.safetensors")]


PATH_ROWS = [
    single_path_row("same path", lambda sb, src: src, force=False),
    single_path_row("same path, --force", lambda sb, src: src),
    single_path_row("./d/../m.safetensors spelling, --force",
                    lambda sb, src: (sb.inp / "d").mkdir() or "./d/../m.safetensors", cwd_in=True),
    single_path_row("symlink to the input (relative target), --force",
                    lambda sb, src: _symlink(sb.out / "link.safetensors", Path("../in/m.safetensors"))),
    single_path_row("inside a symlinked folder, --force",
                    lambda sb, src: _symlink(sb.out / "dir", sb.inp) / "m.safetensors"),
    single_path_row("hard link to the input, --force",
                    lambda sb, src: _hardlink(sb.out / "hard.safetensors", src)),
    single_path_row("the folder that holds the input, --force", lambda sb, src: sb.inp,
                    expect=Fails(("refusing to replace it with the other kind", "the input"))),
    Case("paths/input named like a stale temporary of the output", _stale_named_input,
         Succeeds(("in/o.safetensors",)),
         notes="the stale-temporary sweep must never delete the input"),
    folder_path_row("same folder, --force", lambda sb, m: m, Fails(OVERWRITE)),
    folder_path_row("symlink to the input folder, --force", lambda sb, m: _symlink(sb.out / "link", m),
                    Fails(OVERWRITE)),
    folder_path_row("output inside the input folder", lambda sb, m: m / "baked",
                    Fails("output cannot be inside the input folder"), force=False),
    folder_path_row("output inside the input's unet/", lambda sb, m: m / "unet" / "baked",
                    Fails("output cannot be inside the input folder"), force=False),
    folder_path_row("output is the folder that holds the input, --force", lambda sb, m: sb.inp,
                    Fails("the input")),
]


# --- rows: recipe errors ---------------------------------------------------------------------------------
def recipe_row(name, body, fragment, input="sd1", extra=()):
    def run(sb: Sandbox):
        src = sb.put("in/m.safetensors", getattr(sb.assets, input)())
        recipe = sb.recipe(body) if body is not None else sb.inp / "missing.toml"
        sb.start(src)
        return [sb.cli("bake", recipe, src, "-o", sb.out / "o.safetensors", *extra)]
    return Case(f"recipe/{name}", run, Fails(fragment))


def _head(body: str) -> str:
    return 'schema = 1\nname = "r"\n' + body


def _clip_on_unet_allowed(sb: Sandbox):
    src = sb.put("in/unet.safetensors", sb.assets.unet())
    recipe = sb.recipe(_head("[clip]\nq = 1.1\n[unet.self]\nk = 0.9\n"))
    out = sb.out / "o.safetensors"
    sb.start(src)
    r = sb.cli("bake", recipe, src, "-o", out, "--allow-missing")
    assert "warning: [clip]: q = 1.1 matches no tensor" in r.stderr, r.stderr
    v = sb.cli("verify", out, "--source", src)
    assert v.code == 0 and "ok" in v.stdout, v.stderr
    return [r]


RECIPE_ROWS = [
    recipe_row("unknown key", _head("[unet.self]\nqq = 1.1\n"), "unknown key 'qq' (did you mean 'q'?)"),
    recipe_row("unknown section", _head("[unet.slef]\nq = 1.1\n"), "did you mean [unet.self]?"),
    recipe_row("string value", _head('[unet.self]\nq = "high"\n'), "must be a number, not a string"),
    recipe_row("boolean value", _head("[unet.cross]\nv = true\n"), "must be a number, not a boolean"),
    recipe_row("nan", _head("[unet.self]\nq = nan\n"), "is not a finite number"),
    recipe_row("inf", _head("[unet.self]\nk = inf\n"), "is not a finite number"),
    recipe_row("negative", _head("[unet.cross]\nk = -0.5\n"), "must be >= 0"),
    recipe_row("above ComfyUI's 10", _head("[unet.self]\nout = 11\n"), "--allow-out-of-range"),
    recipe_row("block selector matching nothing", _head('[[unet.self]]\nblocks = ["IN03"]\nq = 1.1\n'),
               "has no block IN03 with [unet.self] attention"),
    recipe_row("encoder selector matching nothing", _head('[clip]\nencoders = ["clip_g"]\nq = 1.1\n'),
               "selector matches no attention"),
    recipe_row("[unet.temporal] on an image UNet", _head("[unet.temporal]\nself_temporal = 1.2\n"),
               "--allow-missing"),
    recipe_row("[clip] on a UNet-only file", _head("[clip]\nq = 1.1\n"), "--allow-missing", input="unet"),
    Case("recipe/[clip] on a UNet-only file, --allow-missing", _clip_on_unet_allowed,
         Succeeds(("out/o.safetensors",))),
    recipe_row("invalid TOML", _head("[unet.self\nq = 1.1\n"), "invalid TOML"),
    recipe_row("missing recipe file", None, "no such recipe file"),
]


# --- rows: faults during the write -------------------------------------------------------------------------
def _big_input(sb: Sandbox, copy=False) -> Path:
    big, sha = sb.assets.big()
    dst = sb.inp / "big.safetensors"
    if copy:    # the row modifies the input: a real copy
        shutil.copyfile(big, dst)
        st_ = dst.stat()
        sb.assets.memo[(st_.st_dev, st_.st_ino, st_.st_size, st_.st_mtime_ns)] = sha
    else:       # the row only reads it: a hard link costs nothing
        os.link(big, dst)
    return dst


def _sigkill_then_rebake(sb: Sandbox):
    src, out, recipe = _big_input(sb), sb.out / "o.safetensors", sb.recipe()
    sb.start(src)
    killed = {}

    def kill(proc, tmp):
        killed["tmp"] = tmp
        proc.kill()

    r = sb.bake_with_fault(["bake", recipe, src, "-o", out], kill)
    assert r.code == -signal.SIGKILL
    assert not out.exists(), "a killed bake left an output"
    assert killed["tmp"].exists(), "expected the killed bake's temporary to be left behind"
    assert killed["tmp"].stat().st_blocks * 512 < src.stat().st_size, "killed after the data was written"
    assert sha256_file(src) == sb.input_sha
    again = sb.cli("bake", recipe, src, "-o", out, "--no-fsync")   # durability is not under test here
    assert f"note: removed {killed['tmp'].name}, left by an interrupted run" in again.stderr, again.stderr
    assert not killed["tmp"].exists()
    v = sb.cli("verify", out, "--source", src)
    assert v.code == 0 and "ok" in v.stdout, v.stderr
    return [again]


def _signal_row(signum):
    def run(sb: Sandbox):
        src, recipe = _big_input(sb), sb.recipe()
        sb.start(src)
        return [sb.bake_with_fault(["bake", recipe, src, "-o", sb.out / "o.safetensors"],
                                   lambda proc, tmp: proc.send_signal(signum))]
    return run


def _fsize_limit(limit):
    return lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))


def _disk_full_fsize(force: bool):
    def run(sb: Sandbox):
        src, recipe, out = sb.put("in/m.safetensors", sb.assets.sd1()), sb.recipe(), sb.out / "o.safetensors"
        if force:
            sb.put("out/o.safetensors", b"the previous output, which must survive " * 1000)
        sb.start(src)
        limit = len(sb.assets.sd1()) // 2
        return [sb.cli("bake", recipe, src, "-o", out, *(["--force"] if force else []),
                       preexec_fn=_fsize_limit(limit))]
    return run


def _in_private_mount_namespace(sb: Sandbox, mount_script: str, folder: Path, bake_args, after_script=""):
    """Run `sh -c` in a private mount namespace (mounts vanish with it): mount, bake, then after_script."""
    if shutil.which("unshare") is None:
        pytest.skip("unshare(1) is not available")
    script = f'd="$1"; shift; {mount_script} || exit 97; "$@"; rc=$?; {after_script} exit $rc'
    r = subprocess.run(["unshare", "-m", "--propagation", "private", "sh", "-c", script, "sh", str(folder),
                        *cli_args(*bake_args)], capture_output=True, text=True, timeout=120)
    if r.returncode == 97 or r.stderr.startswith("unshare:"):
        pytest.skip(f"cannot mount in a private namespace here: {r.stderr.strip()}")
    return Result(list(bake_args), r.returncode, r.stdout, r.stderr)


def _enospc(force: bool):
    def run(sb: Sandbox):
        src, recipe, out = sb.put("in/m.safetensors", sb.assets.sd1()), sb.recipe(), sb.out / "o.safetensors"
        sb.start(src)
        previous = 'printf "previous output" > "$d/o.safetensors" &&' if force else ""
        r = _in_private_mount_namespace(
            sb, f'mount -t tmpfs -o size=256k ckptbend-test "$d" && {previous} true', sb.out,
            ["bake", recipe, src, "-o", out, *(["--force"] if force else [])],
            after_script='ls -A "$d"; [ -f "$d/o.safetensors" ] && cat "$d/o.safetensors";')
        # what the full filesystem held when the bake had ended (it is gone with the namespace)
        assert r.stdout == ("o.safetensors\nprevious output" if force else ""), r.stdout
        return [r]
    return run


def _read_only_bind(sb: Sandbox):
    src, recipe = sb.put("in/m.safetensors", sb.assets.sd1()), sb.recipe()
    sb.start(src)
    return [_in_private_mount_namespace(sb, 'mount --bind "$d" "$d" && mount -o remount,bind,ro "$d"', sb.out,
                                       ["bake", recipe, src, "-o", sb.out / "o.safetensors"])]


_libc = ctypes.CDLL(None, use_errno=True)
PR_CAPBSET_DROP, CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH, CAP_FOWNER = 24, 1, 2, 3


def _drop_dac_capabilities():
    """preexec_fn: as root, leave the capabilities that bypass file permissions out of the child."""
    for cap in (CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH, CAP_FOWNER):
        if _libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP)")


def _chmod_555(sb: Sandbox):
    src, recipe = sb.put("in/m.safetensors", sb.assets.sd1()), sb.recipe()
    sb.out.chmod(0o555)
    sb.cleanups.append(lambda: sb.out.chmod(0o755))
    sb.start(src)
    # Root ignores permission bits: run the bake without the DAC capabilities so that 0o555 bites.
    try:
        return [sb.cli("bake", recipe, src, "-o", sb.out / "o.safetensors",
                       preexec_fn=_drop_dac_capabilities if os.geteuid() == 0 else None)]
    except subprocess.SubprocessError as e:
        pytest.skip(f"running as root and cannot drop CAP_DAC_OVERRIDE: {e}")


def _simple_bake(make_output):
    def run(sb: Sandbox):
        src, recipe = sb.put("in/m.safetensors", sb.assets.sd1()), sb.recipe()
        output = make_output(sb)
        sb.start(src)
        return [sb.cli("bake", recipe, src, "-o", output, "--force")]
    return run


def _input_deleted(sb: Sandbox):   # unlinking changes the inode's ctime: refusing is right too
    src, recipe, out = _big_input(sb), sb.recipe(), sb.out / "o.safetensors"
    sb.start(src)
    sb.removed.add(sb.rel(src))
    sb.input_kept = sb.assets.big()[0]   # the same inode, through the other link
    r = sb.bake_with_fault(["bake", recipe, src, "-o", out, "--no-fsync"], lambda proc, tmp: src.unlink())
    if r.code == 0:   # Linux keeps an open file readable: the output must be complete
        v = sb.cli("verify", out, "--source", sb.input_kept)
        assert v.code == 0 and "ok" in v.stdout, v.stderr
    return [r]


def _input_truncated(sb: Sandbox):
    src, recipe = _big_input(sb, copy=True), sb.recipe()
    sb.start(src)
    half = src.stat().st_size // 2
    with open(sb.assets.big()[0], "rb") as f:
        sb.changed[sb.rel(src)] = hashlib.sha256(f.read(half)).hexdigest()
    return [sb.bake_with_fault(["bake", recipe, src, "-o", sb.out / "o.safetensors"],
                               lambda proc, tmp: os.truncate(src, half))]


def _input_appended(sb: Sandbox):
    src, recipe = _big_input(sb, copy=True), sb.recipe()
    sb.start(src)
    tail = b"\0" * 4096
    h = hashlib.sha256()
    with open(sb.assets.big()[0], "rb") as f:
        while chunk := f.read(8 << 20):
            h.update(chunk)
    h.update(tail)
    sb.changed[sb.rel(src)] = h.hexdigest()

    def append(proc, tmp):
        with open(src, "ab") as f:
            f.write(tail)
    return [sb.bake_with_fault(["bake", recipe, src, "-o", sb.out / "o.safetensors"], append)]


FAULT_ROWS = [
    Case("fault/SIGKILL mid-write, then bake again", _sigkill_then_rebake, Succeeds(("out/o.safetensors",)),
         notes="the killed bake leaves its temporary; the next bake removes it and the output verifies"),
    Case("fault/SIGINT mid-write", _signal_row(signal.SIGINT), Fails("interrupted; no output was written", 130)),
    Case("fault/SIGTERM mid-write", _signal_row(signal.SIGTERM), Fails("interrupted; no output was written", 130)),
    Case("fault/file size limit (RLIMIT_FSIZE) below the output", _disk_full_fsize(False), Fails("File too large")),
    Case("fault/file size limit, --force over an existing output", _disk_full_fsize(True), Fails("File too large")),
    Case("fault/disk full (256 KiB tmpfs)", _enospc(False), Fails("No space left on device")),
    Case("fault/disk full, --force over an existing output", _enospc(True), Fails("No space left on device")),
    Case("fault/output folder mode 0o555", _chmod_555, Fails("folder is not writable")),
    Case("fault/output folder on a read-only mount", _read_only_bind, Fails("folder is not writable")),
    Case("fault/output's parent is a regular file",
         _simple_bake(lambda sb: sb.put("out/file", b"x") / "o.safetensors"), Fails("no such folder")),
    Case("fault/output's parent does not exist",
         _simple_bake(lambda sb: sb.out / "missing" / "o.safetensors"), Fails("no such folder")),
    Case("fault/output exists and is a folder",
         _simple_bake(lambda sb: (sb.out / "o.safetensors").mkdir() or sb.out / "o.safetensors"),
         Fails("exists and is a folder")),
    Case("fault/input deleted mid-read", _input_deleted,
         Either(Fails("changed while being read"), Succeeds(("out/o.safetensors",))),
         notes="an unlinked open file stays readable: the output is complete and verifies, or the bake "
               "refuses because the input's ctime moved"),
    Case("fault/input truncated mid-read", _input_truncated, Fails("while being read")),
    Case("fault/input appended to mid-read", _input_appended, Fails("changed while being read")),
]

# --- rows, round 2 (issue 13): --force, races, verify, provenance, companions, shards, tracebacks -------
SAG_RECIPE = RECIPE + "[sag]\nscale = 0.6\n"
NOT_REPLACEABLE = "not a model folder (model_index.json), a ckptbend companion or a ckptbend output"


def _precious(sb: Sandbox, rel="out/precious") -> Path:
    """A folder of the user's that is no model and no ckptbend output."""
    sb.put(f"{rel}/thesis.txt", b"four years of work")
    return sb.root / rel


def _bake_file_to(make_target, recipe=RECIPE, force=True, cwd=None):
    def run(sb: Sandbox):
        src, r = sb.put("in/m.safetensors", sb.assets.sd1()), sb.recipe(recipe)
        target = make_target(sb)
        sb.start(src)
        return [sb.cli("bake", r, src, "-o", target, *(["--force"] if force else []), cwd=cwd)]
    return run


def _bake_folder_to(make_target):
    def run(sb: Sandbox):
        model = sb.inp / "model"
        shutil.copytree(sb.assets.diffusers(), model)
        recipe, target = sb.recipe(), make_target(sb)
        sb.start(model)
        return [sb.cli("bake", recipe, model, "-o", target, "--force")]
    return run


def _emit_to(make_target, cwd_out=False):
    def run(sb: Sandbox):
        recipe, target = sb.recipe(SAG_RECIPE), make_target(sb)
        sb.start(recipe)
        return [sb.cli("emit", recipe, "-o", target, "--force", cwd=sb.out if cwd_out else None)]
    return run


def _synth_over_precious(sb: Sandbox):
    folder = _precious(sb)
    sb.start(folder / "thesis.txt")
    return [sb.cli("synth", "sd1", folder, "--layout", "diffusers", "--force")]


def _fifo(sb: Sandbox) -> Path:
    os.mkfifo(sb.out / "o.safetensors")
    return sb.out / "o.safetensors"


def _output_appears_mid_write(sb: Sandbox):
    src, recipe, out = _big_input(sb), sb.recipe(), sb.out / "o.safetensors"
    sb.start(src)
    theirs = b"another run's output, written while this bake ran"
    sb.changed[sb.rel(out)] = hashlib.sha256(theirs).hexdigest()
    return [sb.bake_with_fault(["bake", recipe, src, "-o", out, "--no-fsync"],
                               lambda proc, tmp: out.write_bytes(theirs))]


def _two_bakes_at_once(sb: Sandbox):
    src, recipe, out = _big_input(sb), sb.recipe(), sb.out / "o.safetensors"
    sb.start(src)
    results = sb.cli_together(*[["bake", recipe, src, "-o", out, "--no-fsync"]] * 2)
    ok, failed = [r for r in results if r.code == 0], [r for r in results if r.code != 0]
    assert len(ok) == 1 and len(failed) == 1, [(r.code, r.stderr) for r in results]
    check_result(failed[0], Fails(("appeared while this command was writing", "already exists")))
    v = sb.cli("verify", out, "--source", src)
    assert v.code == 0 and "ok" in v.stdout, v.stderr
    return ok


def _verify_with_extra(rel: str):
    def run(sb: Sandbox):
        model, recipe, out = sb.inp / "model", sb.recipe(), sb.out / "o"
        shutil.copytree(sb.assets.diffusers(), model)
        assert sb.cli("bake", recipe, model, "-o", out).code == 0
        sb.put(f"out/o/{rel}", b"import os  # not part of the bake\n")
        sb.start(model)
        r = sb.cli("verify", out, "--source", model)
        assert f"{rel}: only in the output" in r.stderr and r.stderr.count("\n") == 1, r.stderr
        return [r]
    return run


def _pickle_source_recorded(sb: Sandbox):
    from safetensors.torch import load_file

    from ckptbend.safetensors_io import read_header
    sb.assets.sd1()
    src = sb.put("in/good.ckpt", _torch_save({"state_dict": load_file(sb.assets.root / "sd1.safetensors")}))
    recipe, out = sb.recipe(SAG_RECIPE), sb.out / "o.safetensors"
    sb.start(src)
    r = sb.cli("bake", recipe, src, "-o", out, "--allow-pickle")
    assert r.code == 0, r.stderr
    meta = read_header(out).metadata
    assert (meta["ckptbend.source"], meta["ckptbend.source_sha256"]) == ("good.ckpt", sb.input_sha)
    manifest = json.loads((sb.out / "o_ckptbend" / "companion.json").read_text())
    assert manifest["checkpoint"]["source"] == "good.ckpt"
    assert manifest["checkpoint"]["source_sha256"] == {"good.ckpt": sb.input_sha}
    shutil.rmtree(sb.out / "o_ckptbend")      # checked; the row's expected outcome is the output alone
    refused = sb.cli("verify", out, "--source", src)
    assert refused.code == 2 and "--allow-pickle" in refused.last_line, refused.stderr
    return [r, sb.cli("verify", out, "--source", src, "--allow-pickle")]


def _named(name: str, body: str = "[sag]\nscale = 0.6\n") -> str:
    return f'schema = 1\nname = "{name}"\n{body}'


def _colliding_companions(sb: Sandbox):
    src = sb.put("in/m.safetensors", sb.assets.sd1())
    a, b = sb.put("in/a.toml", _named("sag.strong").encode()), sb.put("in/b.toml", _named("sag_strong").encode())
    sb.start(src)
    return [sb.cli("bake", a, b, src, "-o", sb.out, "--force")]


def _second_companion_exists(sb: Sandbox):
    src = sb.put("in/m.safetensors", sb.assets.sd1())
    a, b = sb.put("in/a.toml", _named("first").encode()), sb.put("in/b.toml", _named("second").encode())
    sb.put("out/m_second_ckptbend/companion.json", b'{"ckptbend_version": "0", "recipe_sha256": "0"}')
    sb.start(src)
    return [sb.cli("bake", a, b, src, "-o", sb.out)]


def sharded_row(name, damage, fragment):
    def run(sb: Sandbox):
        model = sb.inp / "model"
        shutil.copytree(sb.assets.sharded(), model)
        damage(model)
        recipe = sb.recipe()
        sb.start(model)
        return sb.cli_together(["inspect", model], ["bake", recipe, model, "-o", sb.out / "o"])
    return Case(f"shards/{name} (inspect, bake)", run, Fails(fragment))


SHARD_INDEX = "unet/diffusion_pytorch_model.safetensors.index.json"


def _edit_index(edit):
    def damage(model: Path):
        doc = json.loads((model / SHARD_INDEX).read_text())
        edit(doc["weight_map"])
        (model / SHARD_INDEX).write_text(json.dumps(doc))
    return damage


def _move_first_tensor(weight_map):
    first = next(iter(weight_map))
    weight_map[first] = next(v for v in weight_map.values() if v != weight_map[first])


def _link_outside(model: Path):
    (model.parent / "secret.txt").write_bytes(b"not part of the model")
    (model / "text_encoder" / "notes.txt").symlink_to(model.parent / "secret.txt")


def _intact_shards(sb: Sandbox):
    model = sb.inp / "model"
    shutil.copytree(sb.assets.sharded(), model)
    recipe = sb.recipe()
    sb.start(model)
    r = sb.cli("bake", recipe, model, "-o", sb.out / "o", "--dry-run")
    assert r.stdout.count("attn1.to_q.weight") == 16, r.stdout   # every shard's attention, none lost
    return [r]


def _zero_element_attention(sb: Sandbox):
    import torch
    from safetensors.torch import load_file, save
    sb.assets.sd1()
    tensors = load_file(sb.assets.root / "sd1.safetensors")
    tensors[next(k for k in tensors if k.endswith("attn1.to_q.weight"))] = torch.zeros((0, 4), dtype=torch.float16)
    src, recipe, out = sb.put("in/m.safetensors", save(tensors)), sb.recipe(), sb.out / "o.safetensors"
    sb.start(src)
    r = sb.cli("bake", recipe, src, "-o", out)
    v = sb.cli("verify", out, "--source", src)
    assert v.code == 0 and "ok" in v.stdout, v.stderr
    return [r]


def _inspect_content(content: bytes):
    def run(sb: Sandbox):
        src = sb.put("in/m.safetensors", content)
        sb.start(src)
        return [sb.cli("inspect", src)]
    return run


def _maps_file(records="[{\"token\": \"sun\", \"layer\": 0, \"step\": 0}]", edit=lambda doc: None,
               data=struct.pack("<8f", *range(8))) -> bytes:
    doc = {"__metadata__": {"format": "ckptbend.maps/1", "records": records},
           "0.original": entry(shape=(2, 2), offsets=(0, 16)), "0.bent": entry(shape=(2, 2), offsets=(16, 32))}
    edit(doc)
    return st_file(doc, data)


def maps_row(name, content: bytes, expect=Fails("maps.safetensors: not a ckptbend maps file")):
    def run(sb: Sandbox):
        src = sb.put("in/maps.safetensors", content)
        sb.start(src)
        return [sb.cli("maps", src, "-o", sb.out / "png")]
    return Case(f"maps/{name}", run, expect)


def _maps_image_exists(sb: Sandbox):
    src = sb.put("in/maps.safetensors", _maps_file())
    sb.put("out/png/sun.png", b"an image rendered before")
    sb.start(src)
    return [sb.cli("maps", src, "-o", sb.out / "png")]


def _matches_on_foreign_files(sb: Sandbox):
    recipe = sb.recipe(SAG_RECIPE)
    assert sb.cli("emit", recipe, "-o", sb.out / "comp").code == 0
    files = {"random.bin": os.urandom(64), "huge-length.safetensors": struct.pack("<Q", 2**62) + b"{}" * 4,
             "short": b"abc", "a-json-list.safetensors": st_file(b"[1, 2]  "),
             "metadata-a-list.safetensors": st_file({"__metadata__": [1]}),
             "deep.safetensors": st_file(_deep_json())}
    paths = [sb.put(f"in/{name}", data) for name, data in files.items()] + [sb.inp / "missing", sb.inp]
    sb.start(recipe)
    code = "import sys; sys.path.insert(0, sys.argv[1]); import comp; print([comp.matches(p) for p in sys.argv[2:]])"
    p = subprocess.run([sys.executable, "-B", "-c", code, str(sb.out), *map(str, paths)], capture_output=True,
                       text=True, timeout=120)
    assert p.stdout.strip() == str([False] * len(paths)), p.stdout + p.stderr
    return [Result(["companion.matches"], p.returncode, p.stdout, p.stderr)]


def _qk_overlap_warning(sb: Sandbox):
    entries = '[[unet.self]]\nq = 2.0\nk = 1.9\n[[unet.self]]\nblocks = ["IN01"]\nq = 2.0\nk = 1.9\n'
    src, recipe = sb.put("in/m.safetensors", sb.assets.sd1()), sb.recipe(_head(entries))
    sb.start(src)
    r = sb.cli("bake", recipe, src, "-o", sb.out / "o.safetensors", "--dry-run")
    assert "entries combine to q x k up to 14.44 (> 4) in 1 attention(s)" in r.stderr, r.stderr
    return [r]


def _labels_read_for(sb: Sandbox):
    body = 'schema = 1\nname = "r"\narchitecture = "sd1"\n[[unet.self]]\nblocks = ["IN04"]\nq = 1.1\n'
    src, recipe = sb.put("in/m.safetensors", sb.assets.sd1()), sb.recipe(body)
    sb.start(src)
    r = sb.cli("bake", recipe, src, "-o", sb.out / "o.safetensors", "--dry-run")
    assert "block labels read for sd1 (detected; the recipe is for sd1)" in r.stderr, r.stderr
    return [r]


def _stale_temporaries_of_other_outputs(sb: Sandbox):
    src, recipe = sb.put("in/m.safetensors", sb.assets.sd1()), sb.recipe()
    dead_file = sb.put(f"out/.other.safetensors.{DEAD_PID}.abc123{TMP_SUFFIX}", b"left by a killed bake")
    dead_dir = sb.put(f"out/.model.{DEAD_PID}.xyz789{TMP_SUFFIX}/unet/w.safetensors", b"killed") .parent.parent
    sb.put(f"out/.other.safetensors.{os.getpid()}.abc123{TMP_SUFFIX}", b"a live run's, kept")
    sb.start(src)
    sb.removed |= {sb.rel(dead_file), sb.rel(dead_dir), sb.rel(dead_dir / "unet"), sb.rel(dead_dir / "unet/w.safetensors")}
    r = sb.cli("bake", recipe, src, "-o", sb.out / "o.safetensors")
    assert f"note: removed {dead_file.name}" in r.stderr and f"note: removed {dead_dir.name}" in r.stderr, r.stderr
    return [r]


LONG_NAME = "m" * 243 + ".safetensors"   # 255 bytes: the longest name ext4 takes


def _mode_follows_input(sb: Sandbox):
    src, recipe, out = sb.put("in/m.safetensors", sb.assets.sd1()), sb.recipe(), sb.out / "o.safetensors"
    src.chmod(0o640)
    sb.start(src)
    r = sb.cli("bake", recipe, src, "-o", out)
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(out.stat().st_mode) == 0o640 & ~umask, oct(out.stat().st_mode)
    return [r]


def _emit_disk_full(sb: Sandbox):
    recipe = sb.recipe(SAG_RECIPE)
    sb.start(recipe)
    r = _in_private_mount_namespace(sb, 'mount -t tmpfs -o size=32k ckptbend-test "$d"', sb.out,
                                    ["emit", recipe, "-o", sb.out / "comp"], after_script='ls -A "$d";')
    assert r.stdout == "", f"left in the full folder: {r.stdout}"
    return [r]


def _hash_cache_disk_full(sb: Sandbox):
    src, recipe = sb.put("in/m.safetensors", sb.assets.sd1()), sb.recipe()
    cache = sb.root / "cache"
    cache.mkdir()
    sb.start(src)
    r = _in_private_mount_namespace(
        sb, 'mount -t tmpfs -o size=64k ckptbend-test "$d" && { cat /dev/zero > "$d/fill" 2>/dev/null; '
            'export CKPTBEND_CACHE_DIR="$d" CKPTBEND_HASH_CACHE=1; }', cache,
        ["bake", recipe, src, "-o", sb.out / "o.safetensors", "-q"], after_script='ls -A "$d";')
    assert r.stdout == "fill\n", f"left in the cache folder: {r.stdout!r}"
    return [r]


def _input_edited_mtime_restored(sb: Sandbox):
    src, recipe = _big_input(sb, copy=True), sb.recipe()
    sb.start(src)
    st_ = src.stat()
    pos = st_.st_size - 4096      # inside the last tensor: read at the very end
    data = bytearray(src.read_bytes())
    data[pos] ^= 0xFF
    sb.changed[sb.rel(src)] = hashlib.sha256(data).hexdigest()
    del data

    def edit(proc, tmp):
        with open(src, "r+b") as f:
            f.seek(pos)
            byte = f.read(1)
            f.seek(pos)
            f.write(bytes([byte[0] ^ 0xFF]))
        os.utime(src, ns=(st_.st_atime_ns, st_.st_mtime_ns))   # size and mtime as before
    return [sb.bake_with_fault(["bake", recipe, src, "-o", sb.out / "o.safetensors"], edit)]


def _arch(body: str, arch: str) -> str:
    return f'schema = 1\nname = "r"\narchitecture = {arch}\n{body}'


ROUND2_ROWS = [
    # 1. --force replaces only what ckptbend may replace
    Case("force/--force over a FIFO", _bake_file_to(_fifo), Fails("is a FIFO, not a regular file or folder")),
    Case("force/--force over a symlink to /dev/null",
         _bake_file_to(lambda sb: _symlink(sb.out / "o.safetensors", Path("/dev/null"))),
         Fails("is a character device, not a regular file or folder")),
    Case("force/diffusers bake --force over an unrelated folder", _bake_folder_to(_precious), Fails(NOT_REPLACEABLE)),
    Case("force/emit --force over an unrelated folder", _emit_to(_precious), Fails(NOT_REPLACEABLE)),
    Case("force/emit -o . --force in an unrelated folder",
         _emit_to(lambda sb: _precious(sb, "out") and ".", cwd_out=True), Fails(NOT_REPLACEABLE)),
    Case("force/synth --force over an unrelated folder", _synth_over_precious, Fails(NOT_REPLACEABLE)),
    Case("force/-o RECIPE --force (an input of the same command)", _bake_file_to(lambda sb: sb.inp / "r.toml"),
         Fails("output would overwrite the input r.toml")),
    Case("force/-o DIR/ (trailing slash) with a file input", _bake_file_to(lambda sb: f"{sb.out / 'dir'}/", force=False),
         Succeeds(("out/dir", "out/dir/m.r.safetensors")),
         notes="a trailing slash names a folder: the output goes inside it, never a file named 'dir'"),
    Case("force/-o DIR/ where DIR is a file", _bake_file_to(lambda sb: f"{sb.put('out/dir', b'x')}/"),
         Fails("exists and is not a folder")),
    # 2. no race between runs
    Case("race/output created by someone else mid-write", _output_appears_mid_write,
         Fails("appeared while this command was writing")),
    Case("race/two bakes to one output at once", _two_bakes_at_once, Succeeds(("out/o.safetensors",)),
         notes="exactly one wins; the other fails and replaces nothing"),
    # 3. verify sees every file
    Case("verify/extra pipeline.py only in a diffusers output", _verify_with_extra("pipeline.py"),
         Fails("does not match the recorded bake", code=1)),
    Case("verify/extra config only in a diffusers output", _verify_with_extra("unet/extra_config.json"),
         Fails("does not match the recorded bake", code=1)),
    # 4. provenance of a pickle source
    Case("provenance/pickle source: recorded name and hash, verify --allow-pickle", _pickle_source_recorded,
         Succeeds(("out/o.safetensors",))),
    # 5. every target checked against the disk and each other first
    Case("companion/two recipes whose companions share a folder name", _colliding_companions,
         Fails("would write two things here")),
    Case("companion/the second recipe's companion exists (no --force)", _second_companion_exists,
         Fails("companion folder already exists")),
    # 6. sharded weights
    sharded_row("a shard deleted", lambda m: (m / "unet/diffusion_pytorch_model-00002-of-00002.safetensors").unlink(),
                "which is missing from"),
    sharded_row("index puts a tensor in the wrong shard", _edit_index(_move_first_tensor), "disagree"),
    sharded_row("index leaves a tensor out", _edit_index(lambda wm: wm.pop(next(iter(wm)))), "disagree"),
    sharded_row("index names a shard outside the folder",
                _edit_index(lambda wm: wm.update(dict.fromkeys(wm, "../../secret.safetensors"))),
                "outside its folder"),
    sharded_row("index not JSON", lambda m: (m / SHARD_INDEX).write_text("{"), "not a readable JSON file"),
    sharded_row("a symlink out of the model folder", _link_outside, "outside the model folder"),
    Case("shards/intact sharded UNet (dry run)", _intact_shards, Succeeds()),
    # tracebacks that are one line now
    recipe_row("TOML nested 600 deep", "x = " + "[" * 600 + "]" * 600, "invalid TOML"),
    recipe_row("a value nested 300 deep", _head("[unet.self]\nq = " + "[" * 300 + "]" * 300 + "\n"),
               "must be a number, not an array"),
    Case("semantics/zero-element attention tensor [0, 4] (bake, verify)", _zero_element_attention,
         Succeeds(("out/o.safetensors",))),
    Case("semantics/text encoder key without layers.N (inspect)", _inspect_content(st_file(
        {"text_model.embeddings.token_embedding.weight": entry(shape=(2, 2), offsets=(0, 16)),
         "text_model.final_layer_norm.weight": entry(offsets=(16, 24)),
         "self_attn.q_proj.weight": entry(shape=(2, 2), offsets=(24, 40))}, b"\0" * 40)), Succeeds()),
    maps_row("records not a list", _maps_file(records="{}")),
    maps_row("records not JSON", _maps_file(records="[")),
    maps_row("a record not an object", _maps_file(records="[1]")),
    maps_row("a record without token", _maps_file(records='[{"layer": 0, "step": 0}]')),
    maps_row("step a string", _maps_file(records='[{"token": "sun", "layer": 0, "step": "1"}]')),
    maps_row("layer a boolean", _maps_file(records='[{"token": "sun", "layer": true, "step": 1}]')),
    maps_row("map without data_offsets", _maps_file(edit=lambda d: d["0.bent"].pop("data_offsets"))),
    maps_row("zero-element map", _maps_file(edit=lambda d: d["0.bent"].update(shape=[0, 2], data_offsets=[16, 16]),
                                            data=b"\0" * 16)),
    maps_row("shape far larger than the data", _maps_file(edit=lambda d: d["0.bent"].update(shape=[2**40, 2**40]))),
    maps_row("data_offsets beyond the file", _maps_file(edit=lambda d: d["0.bent"].update(data_offsets=[16, 4096]))),
    maps_row("header length beyond the file", with_length(_maps_file(), lambda n, size: size)),
    maps_row("a model checkpoint, not maps", st_file({"w": entry()}, b"\0" * 8)),
    maps_row("NaN and inf values (rendered)", _maps_file(data=struct.pack("<8f", *[float("nan"), float("inf")] * 4)),
             Succeeds(("out/png", "out/png/sun.png"))),
    Case("maps/the image exists (no --force)", _maps_image_exists, Fails("already exists (use --force")),
    Case("companion/matches() on foreign, damaged and missing files", _matches_on_foreign_files, Succeeds()),
    # wrong results without an error
    recipe_row("--grid key given twice", RECIPE, "is given twice",
               extra=("--grid", "unet.self.q=1.1,1.2", "--grid", "unet.self.q=1.3")),
    recipe_row("--grid on a selector", RECIPE, "selectors such as blocks cannot be swept",
               extra=("--grid", "unet.self.blocks=1,2")),
    Case("plan/overlapping entries: q x k warned per site", _qk_overlap_warning, Succeeds()),
    recipe_row("architecture = sdxl on an SD 1.x file", _arch('[[unet.self]]\nblocks = ["IN04"]\nq = 1.1\n', '"sdxl"'),
               "is written for sdxl, but m.safetensors is sd1"),
    recipe_row("architecture unknown", _arch("", '"sdxl-turbo"'), 'architecture = "sdxl-turbo" is not valid'),
    Case("plan/--dry-run says which architecture block labels are read for", _labels_read_for, Succeeds()),
    Case("output/stale temporaries of other outputs swept", _stale_temporaries_of_other_outputs,
         Succeeds(("out/o.safetensors",))),
    # smaller
    Case("output/a 255-byte output name", _bake_file_to(lambda sb: sb.out / LONG_NAME, force=False),
         Succeeds((f"out/{LONG_NAME}",))),
    Case("output/permission bits follow the input's", _mode_follows_input, Succeeds(("out/o.safetensors",))),
    Case("fault/disk full during emit", _emit_disk_full, Fails("comp: cannot write the companion folder")),
    Case("fault/hash cache on a full disk", _hash_cache_disk_full, Succeeds(("out/o.safetensors",))),
    Case("fault/input edited mid-read, mtime restored", _input_edited_mtime_restored,
         Fails("changed while being read")),
]

CASES = MALFORMED_ROWS + PICKLE_ROWS + PATH_ROWS + RECIPE_ROWS + FAULT_ROWS + ROUND2_ROWS


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_case(case: Case, assets, tmp_path):
    sb = Sandbox(tmp_path, assets)
    try:
        results = case.run(sb)
        assert sb.before is not None, "the row must call sb.start(input) once its setup is done"
        if os.environ.get("CKPTBEND_RELIABILITY_LOG"):   # one JSON line per row: what each command did
            with open(os.environ["CKPTBEND_RELIABILITY_LOG"], "a") as log:
                log.write(json.dumps({"id": case.id, "expect": str(case.expect),
                                      "got": [[r.args[0], r.code, r.last_line, "Traceback" in r.stderr]
                                              for r in results]}) + "\n")
        expect = case.expect.pick(results) if isinstance(case.expect, Either) else case.expect
        for r in results:
            check_result(r, expect)

        after = snapshot(sb.root)
        expected = {k: v for k, v in sb.before.items() if k not in sb.removed}
        expected.update(sb.changed)
        creates = expect.creates if isinstance(expect, Succeeds) else ()
        for rel in creates:
            assert rel in after, f"{rel} was not created"
        leftover = {k: v for k, v in after.items() if k not in creates}
        assert leftover == expected, "the sandbox changed (an output, a temporary or a modified file)"

        # The input's bytes, explicitly.
        input_rel = sb.rel(sb.input)
        if input_rel in sb.removed:
            assert sha256_file(sb.input_kept) == sb.assets.big()[1]
        elif sb.input.is_file():
            assert sha256_file(sb.input) == sb.changed.get(input_rel, sb.input_sha)
        else:   # a folder: every file in it
            assert {k: v for k, v in after.items() if k.startswith(input_rel + "/")} == \
                   {k: v for k, v in expected.items() if k.startswith(input_rel + "/")}
    finally:
        for undo in sb.cleanups:
            undo()
        for p in list(sb.root.rglob("*")):   # free the disk at once: big copies are 135 MB each
            if p.is_file() and not p.is_symlink() and p.stat().st_size > (8 << 20):
                p.unlink()


def test_the_table_is_large_enough():
    assert len({c.id for c in CASES}) == len(CASES), "row ids must be unique"
    assert len(MALFORMED) >= 20
    groups = {c.id.split("/")[0] for c in CASES}
    assert {"safetensors", "pickle", "paths", "recipe", "fault", "force", "race", "verify", "provenance",
            "companion", "shards", "maps", "plan", "output"} <= groups


# --- property: the header reader on mutated headers ---------------------------------------------------------
REAL_NAMES = [
    "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight",
    "model.diffusion_model.middle_block.1.transformer_blocks.0.attn2.to_out.0.bias",
    "cond_stage_model.transformer.text_model.encoder.layers.0.self_attn.k_proj.weight",
    "first_stage_model.decoder.conv_in.weight", "a", "b", "w", "__metadata__x",
]
TEXT = st.text(st.characters(exclude_categories=()) | st.sampled_from(["\ud800", "\udfff", "\0", "é", "\""]),
               max_size=8)
NAMES = st.sampled_from(REAL_NAMES) | TEXT.filter(lambda s: s != "__metadata__")
DTYPE_NAMES = sorted(DTYPE_BITS)
JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats() | TEXT | st.sampled_from(DTYPE_NAMES),
    lambda kids: st.lists(kids, max_size=3) | st.dictionaries(TEXT, kids, max_size=3),
    max_leaves=6)
INDEX = st.integers(0, 7)
JSON_EDITS = st.one_of(
    st.tuples(st.just("dtype"), INDEX, st.sampled_from(DTYPE_NAMES) | TEXT | JSON),
    st.tuples(st.just("shape"), INDEX, st.lists(st.integers(-2, 2**66), max_size=4) | JSON),
    st.tuples(st.just("data_offsets"), INDEX, st.lists(st.integers(-8, 2**66), max_size=3) | JSON),
    st.tuples(st.just("shift"), INDEX, st.integers(0, 1), st.integers(-16, 16)),
    st.tuples(st.just("metadata"), TEXT, TEXT | JSON),
    st.tuples(st.just("drop"), INDEX, st.sampled_from(["dtype", "shape", "data_offsets"])),
    st.tuples(st.just("extra"), INDEX, TEXT, JSON),
    st.tuples(st.just("entry"), INDEX, JSON),
    st.tuples(st.just("rename"), INDEX, NAMES),
    st.tuples(st.just("duplicate"), INDEX),
    st.tuples(st.just("remove"), INDEX),
)
BYTE_EDITS = st.one_of(
    st.tuples(st.just("flip"), st.integers(0, 1 << 20), st.integers(1, 255)),
    st.tuples(st.just("length"), st.integers(0, 2**64 - 1)),
    st.tuples(st.just("length_delta"), st.integers(-16, 16)),
    st.tuples(st.just("truncate"), st.integers(0, 1 << 20)),
    st.tuples(st.just("append"), st.binary(min_size=1, max_size=16)),
    st.tuples(st.just("insert"), st.integers(0, 1 << 20), st.binary(min_size=1, max_size=4)),
)


def _apply_json_edit(pairs: list, edit):
    tensors = [i for i, (k, _) in enumerate(pairs) if k != "__metadata__"]
    kind = edit[0]
    if kind == "metadata":
        meta = next((v for k, v in pairs if k == "__metadata__"), None)
        if not isinstance(meta, dict):
            meta = {}
            pairs.insert(0, ["__metadata__", meta])
        meta[edit[1]] = edit[2]
        return
    if not tensors:
        return
    i = tensors[edit[1] % len(tensors)]
    value = pairs[i][1]
    if kind in ("dtype", "shape", "data_offsets") and isinstance(value, dict):
        value[kind] = edit[2]
    elif kind == "shift" and isinstance(value, dict) and isinstance(value.get("data_offsets"), list) \
            and len(value["data_offsets"]) == 2 and type(value["data_offsets"][edit[2]]) is int:
        value["data_offsets"][edit[2]] += edit[3]
    elif kind == "drop" and isinstance(value, dict):
        value.pop(edit[2], None)
    elif kind == "extra" and isinstance(value, dict):
        value[edit[2]] = edit[3]
    elif kind == "entry":
        pairs[i][1] = edit[2]
    elif kind == "rename":
        pairs[i][0] = edit[2]
    elif kind == "duplicate":
        pairs.append([pairs[i][0], json.loads(json.dumps(pairs[i][1]))])
    elif kind == "remove":
        del pairs[i]


def _apply_byte_edit(blob: bytearray, edit) -> bytearray:
    kind = edit[0]
    if kind == "flip" and blob:
        blob[edit[1] % len(blob)] ^= edit[2]
    elif kind == "length" and len(blob) >= 8:
        blob[:8] = struct.pack("<Q", edit[1])
    elif kind == "length_delta" and len(blob) >= 8:
        blob[:8] = struct.pack("<Q", min(2**64 - 1, max(0, struct.unpack("<Q", blob[:8])[0] + edit[1])))
    elif kind == "truncate" and blob:
        del blob[edit[1] % len(blob):]
    elif kind == "append":
        blob += edit[1]
    elif kind == "insert":
        pos = edit[1] % (len(blob) + 1)
        blob[pos:pos] = edit[2]
    return blob


@st.composite
def mutated_files(draw) -> bytes:
    """A valid safetensors file (a few small tensors, shuffled key order, maybe metadata) after
    0-3 edits of its header JSON and 0-3 byte-level edits; about one in five stays untouched."""
    pairs, offset = [], 0
    for _ in range(draw(st.integers(0, 4))):
        dtype = draw(st.sampled_from(DTYPE_NAMES))
        shape = draw(st.lists(st.integers(0, 4), max_size=3))
        if prod(shape) * DTYPE_BITS[dtype] % 8:
            shape.append(8)
        nbytes = prod(shape) * DTYPE_BITS[dtype] // 8
        pairs.append([draw(NAMES), {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + nbytes]}])
        offset += nbytes
    pairs = draw(st.permutations(pairs))
    if draw(st.booleans()):
        pairs.insert(draw(st.integers(0, len(pairs))),
                     ["__metadata__", draw(st.dictionaries(TEXT, TEXT, max_size=3))])
    pairs = [list(p) for p in pairs]
    untouched = draw(st.integers(0, 4)) == 0
    for edit in ([] if untouched else draw(st.lists(JSON_EDITS, max_size=3))):
        _apply_json_edit(pairs, edit)
    ascii_only = draw(st.booleans())
    text = "{" + ",".join(json.dumps(k, ensure_ascii=ascii_only) + ":" + json.dumps(v, ensure_ascii=ascii_only)
                          for k, v in pairs) + "}"
    body = text.encode("utf-8", "surrogatepass")
    body += b" " * draw(st.sampled_from([-len(body) % 8, 0, 1, 7]))
    blob = bytearray(struct.pack("<Q", len(body)) + body + draw(st.sampled_from([b"\0", b"\x7f"])) * offset)
    for edit in ([] if untouched else draw(st.lists(BYTE_EDITS, max_size=3))):
        blob = _apply_byte_edit(blob, edit)
    return bytes(blob)


def check_read_header(path: Path) -> str:
    """The property: read_header either rejects the file with one CkptbendError line ("rejected"), or
    returns a Header whose tensors tile the data section exactly and that writes back and reads again
    identically ("accepted"). Anything else raises."""
    try:
        h = read_header(path)
    except CkptbendError as e:
        assert e.message and "\n" not in e.message, repr(e.message)
        return "rejected"
    size = path.stat().st_size
    assert h.file_size == size and 8 + h.header_len <= size
    position = 0
    for t in h.tensors:
        assert isinstance(t.dtype, str) and t.dtype in DTYPE_BITS, t
        assert t.begin == position, f"{t.name!r} does not start where the previous tensor ends"
        assert prod(t.shape) * DTYPE_BITS[t.dtype] == 8 * t.nbytes, t
        position = t.end
    assert position == size - 8 - h.header_len, "the tensors do not cover the data section exactly"
    assert all(isinstance(k, str) and isinstance(v, str) for k, v in h.metadata.items())
    # Whatever is accepted must survive what a bake does with it: writing the header back out.
    again = path.with_name(path.name + ".again")
    with open(path, "rb") as f:
        f.seek(h.data_start)
        again.write_bytes(header_bytes(h.metadata, h.tensors) + f.read())
    h2 = read_header(again)
    assert (h2.metadata, [(t.name, t.dtype, t.shape, t.begin, t.end) for t in h2.tensors]) == \
           (h.metadata, [(t.name, t.dtype, t.shape, t.begin, t.end) for t in h.tensors])
    return "accepted"


def scratch_dir() -> str | None:
    """Where fuzzing writes its many small files: RAM (/dev/shm) if there is one. On ext4, a file
    truncated and rewritten is flushed to disk on close, which makes thousands of examples crawl."""
    return "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None


@pytest.fixture(scope="module")
def fuzz_file():
    with tempfile.TemporaryDirectory(prefix="ckptbend-fuzz-", dir=scratch_dir()) as tmp:
        yield Path(tmp) / "f.safetensors"


@settings(max_examples=300, deadline=None, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(blob=mutated_files())
def test_read_header_accepts_exact_tilings_and_rejects_everything_else_cleanly(blob, fuzz_file):
    fuzz_file.write_bytes(blob)
    check_read_header(fuzz_file)


# --- the final rename: never over a target that appeared meanwhile ------------------------------------------
@pytest.mark.parametrize("how", ["renameat2", "portable"])
@pytest.mark.parametrize("is_dir", [False, True])
def test_rename_noreplace_refuses_an_existing_target_and_moves_otherwise(tmp_path, how, is_dir):
    from ckptbend import output
    rename = output.rename_noreplace if how == "renameat2" else output.rename_noreplace_portable
    if how == "renameat2" and output._renameat2 is None:
        pytest.skip("this C library has no renameat2")

    def make(p: Path, text: str) -> Path:
        if is_dir:
            p.mkdir()
            (p / "f").write_text(text)
        else:
            p.write_text(text)
        return p

    def text(p: Path) -> str:
        return (p / "f" if is_dir else p).read_text()

    theirs, mine = make(tmp_path / "target", "theirs"), make(tmp_path / "mine", "mine")
    with pytest.raises(FileExistsError):
        rename(mine, theirs)
    assert text(theirs) == "theirs" and text(mine) == "mine"
    rename(mine, tmp_path / "free")
    assert text(tmp_path / "free") == "mine" and not mine.exists()


# --- property: the recipe reader on recipes mutated in their TOML structure -----------------------------------
BASE_RECIPES = [p.read_text(encoding="utf-8") for p in sorted((ROOT / "recipes").glob("*.toml"))]
RECIPE_WORDS = ["schema", "name", "description", "architecture", "unet", "self", "cross", "temporal", "clip",
                "sag", "slothful", "bending", "q", "k", "v", "out", "blocks", "depth", "encoders", "token", "mode",
                "strength", "scale", "blur_sigma", "simple", "region", "renormalize", "apply_to_layers",
                "apply_to_timesteps", "self_temporal", "kernel_size", "filter", "cutoff", "in_mode"]
RECIPE_KEYS = st.sampled_from(RECIPE_WORDS) | TEXT
TOML_SCALARS = (st.booleans() | st.integers(-2**70, 2**70) | st.floats() | TEXT | st.datetimes() | st.dates()
                | st.sampled_from(["IN04", "M00", "OUT11", "input", "sdxl", "sd1", "clip_g", "all", "row", "2D_AVG",
                                   "translate", "regional_mask", "lowpass", "sunset", "r", 1.1, 0.0, 10.5, -1]))
TOML_VALUES = st.recursive(TOML_SCALARS, lambda kids: st.lists(kids, max_size=3) | st.dictionaries(RECIPE_KEYS, kids,
                                                                                                    max_size=3),
                           max_leaves=8)
SLOT = st.integers(0, 63)
RECIPE_EDITS = st.one_of(
    st.tuples(st.just("set"), SLOT, RECIPE_KEYS, TOML_VALUES),     # a key (new or not) of some table
    st.tuples(st.just("delete"), SLOT),
    st.tuples(st.just("wrap"), SLOT),                              # value → [value]: a table becomes an array
    st.tuples(st.just("unwrap"), SLOT),                            # [x, …] → x, {k: x, …} → x
    st.tuples(st.just("deepen"), SLOT, st.integers(1, 250)),       # value → [[[…value…]]]: up to 750 deep
    st.tuples(st.just("move"), SLOT, SLOT),                        # a key into another table
    st.tuples(st.just("replace"), SLOT, TOML_VALUES),
)
TEXT_EDITS = st.one_of(
    st.tuples(st.just("drop_line"), SLOT),
    st.tuples(st.just("dup_line"), SLOT),
    st.tuples(st.just("swap_lines"), SLOT, SLOT),
    st.tuples(st.just("insert"), st.integers(0, 4096), st.sampled_from(
        ["[", "]", "=", '"', "\n", "'''", "\\", "#", ",", "[[unet.self]]\n", "[unet]\n", "[unet.self]\n", "[sag]\n",
         "q = 1.1\n", "x.y = 1\n", "unet.self.q = 2\n", "[[bending]]\n", "{", "}"])),
    st.tuples(st.just("truncate"), st.integers(0, 4096)),
)


def _slots(doc) -> list[tuple]:
    """(container, key) of every value in a parsed TOML document, depth first."""
    found = []

    def walk(container):
        keys = range(len(container)) if isinstance(container, list) else list(container)
        for k in keys:
            found.append((container, k))
            if isinstance(container[k], (dict, list)):
                walk(container[k])
    walk(doc)
    return found


def _apply_recipe_edit(doc: dict, edit) -> None:
    slots = _slots(doc)
    tables = [doc] + [c[k] for c, k in slots if isinstance(c[k], dict)]
    kind = edit[0]
    if kind == "set":
        tables[edit[1] % len(tables)][edit[2]] = edit[3]
        return
    if not slots:
        return
    container, key = slots[edit[1] % len(slots)]
    value = container[key]
    if kind == "delete":
        del container[key]
    elif kind == "wrap":
        container[key] = [value]
    elif kind == "unwrap" and isinstance(value, (list, dict)) and value:
        container[key] = value[0] if isinstance(value, list) else next(iter(value.values()))
    elif kind == "deepen":
        for _ in range(edit[2]):
            value = [value]
        container[key] = value
    elif kind == "move" and isinstance(container, dict):
        target = tables[edit[2] % len(tables)]
        if target is not container and not any(t is target for t in _descendants(value)):
            target[key] = container.pop(key)
    elif kind == "replace":
        container[key] = edit[2]


def _descendants(value):
    yield value
    if isinstance(value, dict):
        for v in value.values():
            yield from _descendants(v)
    elif isinstance(value, list):
        for v in value:
            yield from _descendants(v)


def toml_value(v) -> str:
    """Any parsed TOML value as an inline TOML literal (nested tables inline)."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float):
        return "nan" if v != v else ("inf" if v == float("inf") else "-inf" if v == float("-inf") else repr(v))
    if isinstance(v, int):
        return str(v)
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, list):
        depth = 0         # [[[…x…]]] (a value nested hundreds deep) without recursing per level
        while len(v) == 1 and isinstance(v[0], list):
            v, depth = v[0], depth + 1
        return "[" * depth + "[" + ", ".join(map(toml_value, v)) + "]" + "]" * depth
    if isinstance(v, dict):
        return "{" + ", ".join(f"{json.dumps(k)} = {toml_value(x)}" for k, x in v.items()) + "}"
    return v.isoformat()


def toml_text(doc: dict, headers: bool) -> str:
    """A document as TOML: every table inline, or (headers) top-level tables as [table] / [[table]] sections."""
    lines, sections = [], []
    for k, v in doc.items():
        if headers and isinstance(v, dict):
            sections += [f"[{json.dumps(k)}]"] + [f"{json.dumps(kk)} = {toml_value(vv)}" for kk, vv in v.items()]
        elif headers and isinstance(v, list) and v and all(isinstance(e, dict) for e in v):
            for e in v:
                sections += [f"[[{json.dumps(k)}]]"] + [f"{json.dumps(kk)} = {toml_value(vv)}" for kk, vv in e.items()]
        else:
            lines.append(f"{json.dumps(k)} = {toml_value(v)}")
    return "\n".join(lines + sections) + "\n"


def _apply_text_edit(text: str, edit) -> str:
    lines = text.split("\n")
    kind = edit[0]
    if kind == "drop_line":
        del lines[edit[1] % len(lines)]
    elif kind == "dup_line":
        i = edit[1] % len(lines)
        lines.insert(i, lines[i])
    elif kind == "swap_lines":
        i, j = edit[1] % len(lines), edit[2] % len(lines)
        lines[i], lines[j] = lines[j], lines[i]
    elif kind == "insert":
        pos = edit[1] % (len(text) + 1)
        return text[:pos] + edit[2] + text[pos:]
    elif kind == "truncate":
        return text[:edit[1] % (len(text) + 1)]
    return "\n".join(lines)


@st.composite
def mutated_recipes(draw) -> str:
    """A shipped recipe, as written or parsed and re-serialised (inline or with section headers), after
    0-3 structural edits of its TOML tree and 0-2 edits of its text; about one in five untouched."""
    import tomllib
    text = draw(st.sampled_from(BASE_RECIPES))
    if draw(st.integers(0, 4)) == 0:
        return text
    doc = tomllib.loads(text)
    for edit in draw(st.lists(RECIPE_EDITS, max_size=3)):
        _apply_recipe_edit(doc, edit)
    text = toml_text(doc, headers=draw(st.booleans()))
    for edit in draw(st.lists(TEXT_EDITS, max_size=2)):
        text = _apply_text_edit(text, edit)
    return text


def check_parse_recipe(text: str) -> str:
    """The property: parse_recipe rejects the text with one CkptbendError line naming the file
    ("rejected"), or returns a Recipe whose canonical text reads back to the same recipe and the same
    text ("accepted"). Anything else raises."""
    from ckptbend.recipe import parse_recipe
    try:
        r = parse_recipe(text, "fuzz.toml", allow_out_of_range=True)
    except CkptbendError as e:
        assert e.message.startswith("fuzz.toml: ") and "\n" not in e.message and len(e.message) < 1000, e.message
        return "rejected"
    again = parse_recipe(r.canonical(), "canonical", allow_out_of_range=True)
    assert again == r and again.canonical() == r.canonical() and again.sha256 == r.sha256
    return "accepted"


@settings(max_examples=300, deadline=None, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(text=mutated_recipes())
def test_parse_recipe_accepts_canonical_recipes_and_rejects_everything_else_cleanly(text):
    check_parse_recipe(text)


# --- property: the maps reader and renderer on mutated maps files ---------------------------------------------
MAP_EDITS = st.one_of(
    st.tuples(st.just("records"), JSON),                               # the whole records value
    st.tuples(st.just("record"), INDEX, JSON),                         # one record
    st.tuples(st.just("field"), INDEX, st.sampled_from(["token", "layer", "step", "site", "x"]), JSON),
    st.tuples(st.just("drop_field"), INDEX, st.sampled_from(["token", "layer", "step"])),
    st.tuples(st.just("format"), JSON),
)


def _maps_tensors(maps) -> tuple[list, bytes]:
    """A maps file as runtime/maps.py writes it (its layout: tensors <i>.original / <i>.bent)."""
    pairs, data, offset = [], b"", 0
    for i, m in enumerate(maps):
        for kind in ("original", "bent"):
            raw = struct.pack(f"<{prod(m)}f", *[(i + j) % 7 / 7 for j in range(prod(m))])
            pairs.append([f"{i}.{kind}", {"dtype": "F32", "shape": list(m), "data_offsets": [offset, offset + len(raw)]}])
            data, offset = data + raw, offset + len(raw)
    return pairs, data


@st.composite
def mutated_maps(draw) -> bytes:
    """A valid maps file (1-3 records, [h, w] or [frames, h, w] maps), then 0-3 edits of its records,
    0-3 edits of its tensor table and 0-2 byte edits; about one in five untouched."""
    n = draw(st.integers(1, 3))
    records = [{"token": draw(st.sampled_from(["sun", "a lake", "é", "x/y"])), "layer": draw(st.integers(0, 4)),
                "step": draw(st.none() | st.integers(0, 9))} for _ in range(n)]
    shapes = [tuple(draw(st.lists(st.integers(1, 4), min_size=2, max_size=3))) for _ in range(n)]
    pairs, data = _maps_tensors(shapes)
    meta = {"format": "ckptbend.maps/1"}
    untouched = draw(st.integers(0, 4)) == 0
    for edit in ([] if untouched else draw(st.lists(MAP_EDITS, max_size=3))):
        kind = edit[0]
        if kind == "records":
            records = edit[1]
        elif isinstance(records, list) and records and kind != "format":
            i = edit[1] % len(records)
            if kind == "record":
                records[i] = edit[2]
            elif isinstance(records[i], dict) and kind == "field":
                records[i][edit[2]] = edit[3]
            elif isinstance(records[i], dict) and kind == "drop_field":
                records[i].pop(edit[2], None)
        elif kind == "format":
            meta["format"] = edit[1]
    meta["records"] = json.dumps(records)
    pairs.insert(0, ["__metadata__", meta])
    for edit in ([] if untouched else draw(st.lists(JSON_EDITS, max_size=3))):
        _apply_json_edit(pairs, edit)
    body = ("{" + ",".join(json.dumps(k) + ":" + json.dumps(v) for k, v in pairs) + "}").encode("utf-8", "surrogatepass")
    blob = bytearray(struct.pack("<Q", len(body)) + body + data)
    for edit in ([] if untouched else draw(st.lists(BYTE_EDITS, max_size=2))):
        blob = _apply_byte_edit(blob, edit)
    return bytes(blob)


def check_render_maps(path: Path, out_dir: Path) -> str:
    """The property: `ckptbend maps`' library call either rejects the file with one CkptbendError line
    naming it ("rejected"), or renders one PNG per token ("accepted"). Anything else raises."""
    from ckptbend.maps_render import render_file
    try:
        written = render_file(path, out_dir, force=True)
    except CkptbendError as e:
        assert e.message.startswith(str(path)) and "\n" not in e.message, e.message
        return "rejected"
    assert written and all(p.is_file() and p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in written)
    return "accepted"


@pytest.fixture(scope="module")
def fuzz_dir():
    with tempfile.TemporaryDirectory(prefix="ckptbend-fuzz-", dir=scratch_dir()) as tmp:
        yield Path(tmp)


@settings(max_examples=150, deadline=None, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(blob=mutated_maps())
def test_maps_render_or_reject_cleanly(blob, fuzz_dir):
    (fuzz_dir / "maps.safetensors").write_bytes(blob)
    check_render_maps(fuzz_dir / "maps.safetensors", fuzz_dir / "png")
