"""A machine whose torchvision was built for another torch (the classic mismatch after `pip install torch==…`
replaced the torch it came with): transformers imports torchvision whenever it is installed, so every diffusers
model class fails to import. The CLI says so in one line instead of a 150-line traceback."""

import subprocess
import sys
from pathlib import Path

import pytest

from ckptbend.errors import broken_install_message

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def broken_torchvision(tmp_path):
    """A torchvision package that fails at import the way a mismatched build does, with the metadata that makes
    transformers believe it is installed; first on the path of the processes the test starts."""
    pkg = tmp_path / "torchvision"
    pkg.mkdir()
    (pkg / "__init__.py").write_text('raise RuntimeError("operator torchvision::nms does not exist")\n')
    info = tmp_path / "torchvision-0.29.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: torchvision\nVersion: 0.29.1\n")
    return tmp_path


def test_synth_with_a_mismatched_torchvision_is_one_line(broken_torchvision, tmp_path):
    out = tmp_path / "sd1.safetensors"
    env = {"PYTHONPATH": f"{broken_torchvision}:{ROOT}", "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, str(ROOT / "bin" / "ckptbend"), "synth", "sd1", str(out)],
                       capture_output=True, text=True, env=env)
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr
    [line] = r.stderr.strip().splitlines()
    assert line.startswith("error: the installed torchvision 0.29.1 was not built for torch ")
    assert "pip uninstall torchvision" in line
    assert {p.name for p in tmp_path.iterdir()} == {"torchvision", "torchvision-0.29.1.dist-info"}   # no output


def _chained(*messages):
    """Exceptions raised inside each other's handlers, innermost first, as lazy importers chain them."""
    exc = None
    for i, message in enumerate(messages):
        try:
            try:
                if exc is not None:
                    raise exc
                raise (ModuleNotFoundError if i == 0 else RuntimeError)(message)
            except BaseException as inner:
                if inner.args[0] == message:
                    raise
                raise RuntimeError(message) from inner
        except BaseException as e:
            exc = e
    return exc


def test_other_import_failures_name_their_root_cause():
    exc = _chained("No module named 'sentencepiece'", "Could not import module 'T5Tokenizer'",
                   "Failed to import diffusers.pipelines.flux")
    message = broken_install_message(exc)
    assert message.startswith("diffusers/transformers could not import their own modules")
    assert "ModuleNotFoundError: No module named 'sentencepiece'" in message


def test_an_ordinary_runtime_error_stays_a_bug():
    assert broken_install_message(RuntimeError("shape mismatch")) is None
    assert broken_install_message(_chained("shape mismatch", "while baking")) is None
