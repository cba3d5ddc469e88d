"""End-to-end: the `ckptbend` command as a user runs it (a real subprocess, real files)."""

import json
import os
import pickle
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ckptbend.safetensors_io import read_header
from ckptbend.synth import write_checkpoint

ROOT = Path(__file__).resolve().parent.parent
RECIPES = ROOT / "recipes"


def run(*args, cwd=None):
    return subprocess.run([sys.executable, str(ROOT / "bin" / "ckptbend"), *map(str, args)],
                          capture_output=True, text=True, cwd=cwd)


def assert_clean_error(result, fragment, code=2):
    assert result.returncode == code, result.stderr
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert lines[-1].startswith("error: ") and fragment in lines[-1], result.stderr


@pytest.fixture(scope="module")
def sd1(tmp_path_factory):
    return write_checkpoint(tmp_path_factory.mktemp("cli") / "sd1.safetensors", "sd1", dtype=torch.float16)


def test_bake_inspect_verify_diff(sd1, tmp_path):
    out = tmp_path / "sharp.safetensors"
    r = run("bake", RECIPES / "sharper-details.toml", sd1, "-o", out)
    assert r.returncode == 0, r.stderr
    assert "tensors scaled" in r.stderr

    r = run("inspect", out)
    assert r.returncode == 0 and "architecture: sd1" in r.stdout and "sharper-details" in r.stdout
    info = json.loads(run("inspect", out, "--json").stdout)
    assert info["architecture"] == "sd1" and info["layout"] == "single-file"
    assert set(info["attention_blocks"]) == {"IN01", "IN02", "IN04", "IN05", "IN07", "IN08", "M00",
                                            *(f"OUT{i:02d}" for i in range(3, 12))}
    assert info["recipe_sha256"] == read_header(out).metadata["ckptbend.recipe_sha256"]

    r = run("verify", out, "--source", sd1)
    assert r.returncode == 0 and "ok" in r.stdout
    r = run("diff", sd1, out)
    assert r.returncode == 0 and "attn1.to_q.weight: ×1.1" in r.stdout
    assert "attn2" not in r.stdout   # the recipe only touches self-attention


def test_dry_run_prints_the_plan_and_writes_nothing(sd1, tmp_path):
    out = tmp_path / "never.safetensors"
    r = run("bake", RECIPES / "sharper-details.toml", sd1, "-o", out, "--dry-run")
    assert r.returncode == 0 and not out.exists()
    lines = r.stdout.splitlines()
    assert len(lines) == 32   # q and k of the 16 self-attentions
    assert all(("attn1.to_q.weight" in x or "attn1.to_k.weight" in x) and "×1.1" in x for x in lines)


def test_recipe_commands(tmp_path):
    r = run("recipe", "validate", RECIPES / "prompt-adherence.toml")
    assert r.returncode == 0 and "ok" in r.stdout
    (tmp_path / "a.toml").write_text('schema = 1\nname = "x"\n[unet.self]\nq = 1.1\nk = 1\n')
    (tmp_path / "b.toml").write_text('# same recipe, other spelling\nname="x"\nschema=1\n[unet.self]\nk=1.0\nq=1.10\n')
    a, b = (run("recipe", "show", tmp_path / n).stdout for n in ("a.toml", "b.toml"))
    assert a == b and a.splitlines()[-1].startswith("# sha256 ")
    r = run("diff", RECIPES / "sharper-details.toml", RECIPES / "softer-composition.toml")
    assert r.returncode == 0 and "unet.self.q" in r.stdout


@pytest.mark.parametrize("args", [
    ["diff", "{sd1}", "{other}"],
    ["inspect", "{sd1}"],
    ["recipe", "show", str(RECIPES / "sag-and-bending.toml")],
    ["diff", str(RECIPES / "sharper-details.toml"), str(RECIPES / "softer-composition.toml")],
])
def test_output_into_a_closed_pipe_ends_quietly_as_sigpipe(sd1, tmp_path, args):
    """`ckptbend diff A B | head`: once the reader has gone, the command ends as coreutils and git do,
    killed by SIGPIPE (a shell shows 141), with nothing on stderr. The read end is closed before the
    command writes, so every run meets the closed pipe."""
    other = write_checkpoint(tmp_path / "other.safetensors", "sd1", dtype=torch.float16, seed=1)
    read_end, write_end = os.pipe()
    proc = subprocess.Popen([sys.executable, str(ROOT / "bin" / "ckptbend"),
                             *(a.format(sd1=sd1, other=other) for a in args)],
                            stdout=write_end, stderr=subprocess.PIPE, text=True)
    os.close(write_end)
    os.close(read_end)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == -signal.SIGPIPE and stderr == ""


def test_a_pipe_into_head_in_a_shell_is_quiet(sd1, tmp_path):
    """The same through a real shell pipeline: head's output is the command's first line, nothing else
    is printed, and the status is 0 (all written before head left) or 141 (SIGPIPE), never an error."""
    other = write_checkpoint(tmp_path / "other.safetensors", "sd1", dtype=torch.float16, seed=1)
    script = (f'"{sys.executable}" "{ROOT / "bin" / "ckptbend"}" diff "{sd1}" "{other}" | head -1; '
              'echo "status ${PIPESTATUS[0]}" >&2')
    r = subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=120)
    status = r.stderr.splitlines()
    assert len(r.stdout.splitlines()) == 1 and status in (["status 0"], ["status 141"]), r.stderr


@pytest.mark.parametrize("setup, args, fragment", [
    (lambda d: None, ["inspect", "{d}/missing.safetensors"], "no such file"),
    (lambda d: (d / "empty.safetensors").write_bytes(b""), ["inspect", "{d}/empty.safetensors"], "shorter than"),
    (lambda d: (d / "r.toml").write_text("schema = 1\nname='x'\n[unet.slef]\nq=1.1\n"),
     ["recipe", "validate", "{d}/r.toml"], "did you mean"),
    (lambda d: (d / "r.toml").write_text("schema = 2\nname='x'\n"), ["recipe", "validate", "{d}/r.toml"], "schema"),
    (lambda d: (d / "r.toml").write_text("schema = 1\nname='x'\n[clip]\nq=11.0\n"),
     ["recipe", "validate", "{d}/r.toml"], "10"),
])
def test_errors_are_one_line_with_exit_code_2(tmp_path, setup, args, fragment):
    setup(tmp_path)
    assert_clean_error(run(*[a.format(d=tmp_path) for a in args]), fragment)


def test_unet_only_file_refuses_clip_unless_allowed(tmp_path):
    unet = write_checkpoint(tmp_path / "unet.safetensors", "sd1", layout="unet")
    assert_clean_error(run("bake", RECIPES / "clip-calm.toml", unet, "-o", tmp_path / "o.safetensors"),
                       "--allow-missing")
    assert not (tmp_path / "o.safetensors").exists()
    r = run("bake", RECIPES / "clip-calm.toml", unet, "-o", tmp_path / "o.safetensors", "--allow-missing")
    assert r.returncode == 0 and "warning" in r.stderr


def test_existing_output_is_kept_without_force(sd1, tmp_path):
    out = tmp_path / "exists.safetensors"
    out.write_bytes(b"keep me")
    assert_clean_error(run("bake", RECIPES / "sharper-details.toml", sd1, "-o", out), "--force")
    assert out.read_bytes() == b"keep me"


def test_pickle_input_is_refused_by_default_and_loaded_weights_only_on_request(sd1, tmp_path):
    from safetensors.torch import load_file

    ckpt = tmp_path / "model.ckpt"
    torch.save({"state_dict": load_file(sd1), "global_step": 10}, ckpt)
    out = tmp_path / "from-ckpt.safetensors"
    assert_clean_error(run("bake", RECIPES / "sharper-details.toml", ckpt, "-o", out), "--allow-pickle")
    r = run("bake", RECIPES / "sharper-details.toml", ckpt, "-o", out, "--allow-pickle")
    assert r.returncode == 0, r.stderr
    assert read_header(out).metadata["ckptbend.source"] == "model.ckpt"
    baked_from_safetensors = tmp_path / "direct.safetensors"
    run("bake", RECIPES / "sharper-details.toml", sd1, "-o", baked_from_safetensors)
    a, b = load_file(out), load_file(baked_from_safetensors)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('pwned')",))


def test_hostile_pickle_never_runs(tmp_path):
    marker = tmp_path / "pwned"
    ckpt = tmp_path / "evil.ckpt"
    with open(ckpt, "wb") as f:
        pickle.dump({"state_dict": _Payload(str(marker))}, f)
    for extra in ([], ["--allow-pickle"]):
        r = run("bake", RECIPES / "sharper-details.toml", ckpt, "-o", tmp_path / "o.safetensors", *extra)
        assert r.returncode == 2 and "Traceback" not in r.stderr
        assert not marker.exists()
    assert not (tmp_path / "o.safetensors").exists()
