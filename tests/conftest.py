"""Test-wide settings."""

import importlib.util
import os
import sys

import pytest

# The tests' models are tiny: torch's intra-op threads only add synchronisation (3x the CPU time of the
# SAG/bending tests on the 2-core machine), here and in the CLIs and scripts the tests start. A value
# already set wins.
if "OMP_NUM_THREADS" not in os.environ:
    os.environ["OMP_NUM_THREADS"] = "1"
    if "torch" in sys.modules:      # imported before this file (by a plugin): the variable comes too late
        sys.modules["torch"].set_num_threads(1)


def _refuse_unusable_torchvision():
    # A torchvision built for another torch fails every transformers import: one line, not 65 collection errors.
    if importlib.util.find_spec("torchvision") is None:
        return
    try:
        import torchvision  # noqa: F401
    except Exception as e:
        pytest.exit(f"the installed torchvision cannot import beside this torch ({e}); `pip uninstall torchvision` "
                    "(the tests do not use it) or install the one made for this torch", returncode=4)


@pytest.fixture(autouse=True)
def private_hash_cache(tmp_path_factory, monkeypatch):
    # Keep the source-hash cache out of the user's ~/.cache and independent between tests.
    monkeypatch.setenv("CKPTBEND_CACHE_DIR", str(tmp_path_factory.mktemp("cache")))


@pytest.fixture(scope="module")
def one_thread_no_grad():
    # Tiny tensors: threads only add overhead, and the CI machine is shared. Inference only.
    import torch

    n, grad = torch.get_num_threads(), torch.is_grad_enabled()
    torch.set_num_threads(1)
    torch.set_grad_enabled(False)
    yield
    torch.set_num_threads(n)
    torch.set_grad_enabled(grad)


@pytest.fixture
def comfy(monkeypatch):
    """The stand-in ComfyUI host's `comfy` package (tests/comfy_standin.py) for the test's duration."""
    import comfy_standin

    return comfy_standin.install_comfy(monkeypatch)


@pytest.fixture(scope="session")
def synth_file(tmp_path_factory):
    """synth_file(arch, layout="single", dtype=None): a tiny synthetic checkpoint (real key names) written
    once per session. Read it; copy it into tmp_path to change it."""
    from ckptbend.synth import write_checkpoint

    root, made = tmp_path_factory.mktemp("synth"), {}

    def get(arch, layout="single", dtype=None):
        if (arch, layout, dtype) not in made:
            suffix = "" if layout == "diffusers" else ".safetensors"
            name = f"{arch}-{layout}-{str(dtype).rpartition('.')[2]}{suffix}"
            made[arch, layout, dtype] = write_checkpoint(root / name, arch, layout=layout, dtype=dtype)
        return made[arch, layout, dtype]
    return get


def pytest_configure(config):
    # A shell without job control starts background commands with SIGINT ignored, and that is inherited
    # (by this process and every CLI it starts). The Ctrl-C tests need Python's usual handler.
    import signal

    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)


# --- Cost per module: CKPTBEND_TEST_RSS=1 python3 -m pytest prints, after the run, each module's wall and CPU
# seconds (this process and the commands it started) and the resident memory after it and the peak so far
# (what stays alive between modules is what adds up). docs/benchmarks.md holds a measured table.

_COSTS, _MARK = [], []


def _now():
    import resource
    import time

    used = sum(resource.getrusage(who).ru_utime + resource.getrusage(who).ru_stime
               for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN))
    try:
        with open("/proc/self/statm") as f:
            rss = int(f.read().split()[1]) * resource.getpagesize() >> 20
    except OSError:                 # not Linux: the peak only
        rss = None
    return time.monotonic(), used, rss, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss >> 10


def _record(name):
    if os.environ.get("CKPTBEND_TEST_RSS") == "1":
        now = _now()
        if _MARK:
            _COSTS.append((name, now[0] - _MARK[0][0], now[1] - _MARK[0][1], *now[2:]))
        _MARK[:] = [now]


def pytest_sessionstart(session):
    _refuse_unusable_torchvision()
    _record(None)


def pytest_collection_finish(session):
    _record("(collection: imports)")


def _release_memory():
    # A module's models are often in reference cycles (hooks, pipelines): collect them now, not whenever
    # the collector next runs, and hand the freed heap back (glibc keeps it otherwise).
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):   # not glibc
        pass


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    yield
    if nextitem is None or nextitem.path != item.path:     # the module's fixtures are torn down by now
        _release_memory()
        _record(item.path.name)


def pytest_terminal_summary(terminalreporter):
    if _COSTS:
        terminalreporter.section("cost of each module: wall s, CPU s, resident MiB after it, peak MiB so far")
        for name, wall, cpu, rss, peak in _COSTS:
            terminalreporter.write_line(f"{name:<40} {wall:7.1f} {cpu:7.1f} {rss if rss is not None else '?':>7} "
                                        f"{peak:>7}")
