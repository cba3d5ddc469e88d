"""Test-wide settings."""

import pytest


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
