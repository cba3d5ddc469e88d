"""A tiny smoke run of bin/bench keeps the benchmark script working (the figures come from full sizes)."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_bench_smoke_run(tmp_path):
    r = subprocess.run([sys.executable, ROOT / "bin" / "bench", "--size", "tiny", "--runs", "1", "--dir", tmp_path],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    for line in ("ckptbend bake", "naive load/scale/save", "ratio ckptbend bake / cp:", "sweep of 4 outputs"):
        assert line in r.stdout
    assert list(tmp_path.iterdir()) == [], "the temporary folder must be cleaned up"


def test_runtime_bench_smoke_run():
    r = subprocess.run([sys.executable, ROOT / "bin" / "bench-runtime", "--model", "tiny", "--size", "64",
                        "--steps", "2", "--runs", "1", "--device", "cpu"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    for line in ("plain CFG", "SAG (scale 0.5, blur 2.0)", "bending (translate 'sunset')", "Slothful (defaults)"):
        assert line in r.stdout


def test_runtime_bench_wan_smoke_run():
    r = subprocess.run([sys.executable, ROOT / "bin" / "bench-runtime", "--model", "wan", "--size", "64", "--frames", "5",
                        "--steps", "2", "--runs", "1", "--device", "cpu"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "plain CFG" in r.stdout and "bending (translate 'sunset')" in r.stdout and "SAG" not in r.stdout


def test_wan_attention_bench_smoke_run():
    r = subprocess.run([sys.executable, ROOT / "bin" / "bench-wan-attention", "--frames", "1", "--width", "64",
                        "--height", "64", "--runs", "1", "--device", "cpu"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "16 video tokens" in r.stdout and "extra memory of bending" in r.stdout


@pytest.mark.parametrize("extra", [["--path", "diffusers"], ["--path", "diffusers-explicit"], ["--compare"]])
def test_wan_attention_bench_diffusers_paths(extra):
    r = subprocess.run([sys.executable, ROOT / "bin" / "bench-wan-attention", "--frames", "1", "--width", "64",
                        "--height", "64", "--runs", "1", "--device", "cpu", *extra], capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr
    assert ("max |lean − explicit|" if extra == ["--compare"] else "bent attention call") in r.stdout


@pytest.mark.parametrize("model", ["sdxl", "wan-1.3b"])
def test_runtime_bench_gpu_models_run_tiny_on_cpu(model):
    """The GPU timing models (SDXL, Wan 1.3B) at --size tiny: the script runs end to end on CPU."""
    r = subprocess.run([sys.executable, ROOT / "bin" / "bench-runtime", "--model", model, "--size", "tiny", "--steps",
                        "2", "--runs", "1", "--device", "cpu"], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    assert "(tiny stand-in)" in r.stdout and "peak GiB" in r.stdout and "bending (translate 'sunset')" in r.stdout
