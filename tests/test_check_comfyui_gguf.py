"""bin/check-comfyui's `gguf` check runs only against a real ComfyUI and ComfyUI-GGUF (CI cannot fetch them):
here, that its module compiles and that the script asks for ComfyUI-GGUF in one line when it is missing."""

import py_compile
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_gguf_check_module_compiles():
    py_compile.compile(str(ROOT / "tests" / "_comfy_gguf.py"), doraise=True)


def test_gguf_check_wants_comfyui_gguf(tmp_path):
    (tmp_path / "comfy").mkdir()                        # looks like a ComfyUI checkout; no custom_nodes/ComfyUI-GGUF
    r = subprocess.run([sys.executable, ROOT / "bin" / "check-comfyui", tmp_path, "gguf"], capture_output=True,
                       text=True, timeout=60)
    assert r.returncode != 0 and "no ComfyUI-GGUF at" in r.stderr and "--gguf-nodes" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    r = subprocess.run([sys.executable, ROOT / "bin" / "check-comfyui", tmp_path, "--gguf-nodes", tmp_path / "none",
                        "gguf"], capture_output=True, text=True, timeout=60)
    assert r.returncode != 0 and f"no ComfyUI-GGUF at {tmp_path / 'none'}" in r.stderr
