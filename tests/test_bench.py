"""A tiny smoke run of bin/bench keeps the benchmark script working (the figures come from full sizes)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_bench_smoke_run(tmp_path):
    r = subprocess.run([sys.executable, ROOT / "bin" / "bench", "--size", "tiny", "--runs", "1", "--profile",
                        "--dir", tmp_path], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    for line in ("ckptbend bake", "naive load/scale/save", "ratio ckptbend bake / cp:", "sweep of 4 outputs",
                 "ratio ckptbend bake, source hash not cached / cp beside hashlib sha256:",
                 "ratio ckptbend bake (default: fsync) / cp + sync:", "profile: seconds per phase"):
        assert line in r.stdout
    table = r.stdout.split("profile: seconds per phase")[1]
    rows = {line[:44].strip(): line[44:].split() for line in table.splitlines()[2:] if line.strip()}
    # warm, first, durable, cp+sync: each phase only where it happens
    assert len(rows["kernel copy of untouched tensors"]) == 3 and len(rows["wall time of the process"]) == 4
    assert len(rows["source hash (worker)"]) == 1 and len(rows["fsync of the output"]) == 1
    assert len(rows["sync (fsync of the copy)"]) == 1
    assert list(tmp_path.iterdir()) == [], "the temporary folder must be cleaned up"


def test_bench_gguf_smoke_run(tmp_path):
    """The GGUF case (a Q8_0 Flux file; full size is generated streaming) at its tiny size."""
    r = subprocess.run([sys.executable, ROOT / "bin" / "bench", "--size", "gguf-tiny", "--runs", "1", "--no-sweep",
                        "--dir", tmp_path], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    for line in ("generated gguf-tiny.gguf", "ckptbend bake", "ratio ckptbend bake / cp:",
                 "ratio ckptbend bake (default: fsync) / cp + sync:"):
        assert line in r.stdout
    assert "naive" not in r.stdout
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


def test_profile_is_printed_only_when_asked(tmp_path):
    """CKPTBEND_PROFILE=1 makes a bake print its phases (one tab-separated line each) to stderr; without
    it, a bake prints none."""
    from ckptbend.synth import write_checkpoint
    import torch

    src = write_checkpoint(tmp_path / "in.safetensors", "sd1", size="tiny", dtype=torch.float16)
    recipe = tmp_path / "r.toml"
    recipe.write_text('schema = 1\nname = "r"\n[unet.self]\nq = 1.1\n')
    env = dict(os.environ, CKPTBEND_CACHE_DIR=str(tmp_path / "cache"), CKPTBEND_PROFILE="1")
    cmd = [sys.executable, "-m", "ckptbend.cli", "bake", recipe, src, "-q"]
    r = subprocess.run(cmd + ["-o", tmp_path / "a.safetensors"], capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr
    phases = dict(line.split("\t")[1:] for line in r.stderr.splitlines() if line.startswith("profile\t"))
    for name in ("kernel copy of untouched tensors", "edited tensors: scale (worker)", "source hash (worker)",
                 "fsync of the output", "fsync of the folder", "total"):
        assert float(phases[name]) >= 0
    env["CKPTBEND_PROFILE"] = "0"
    r = subprocess.run(cmd + ["-o", tmp_path / "b.safetensors"], capture_output=True, text=True, env=env)
    assert r.returncode == 0 and "profile" not in r.stderr


def test_check_comfyui_wants_a_comfyui_checkout(tmp_path):
    """bin/check-comfyui runs against a real ComfyUI (never in CI, which cannot fetch one): without one it
    says how to call it, and the script at least compiles."""
    r = subprocess.run([sys.executable, ROOT / "bin" / "check-comfyui", tmp_path], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode != 0 and "usage: bin/check-comfyui PATH/TO/ComfyUI" in r.stderr
