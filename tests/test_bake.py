"""The bake on real safetensors files: byte identity, rounding per dtype, provenance, atomic output."""

import hashlib
import json
import os

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from ckptbend.bake import bake
from ckptbend.errors import CkptbendError
from ckptbend.layouts import detect
from ckptbend.recipe import parse_recipe
from ckptbend.safetensors_io import read_header
from ckptbend.synth import write_checkpoint
from ckptbend.verify import verify

RECIPE = parse_recipe("""
schema = 1
name = "mixed"
[unet.self]
q = 1.1
k = 0.9
[unet.cross]
v = 1.3
out = 0.7
[clip]
q = 1.2
v = 0.8
""")


def sha256(path):
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def raw_tensors(path):
    h = read_header(path)
    with open(path, "rb") as f:
        data = f.read()[h.data_start:]
    return {t.name: data[t.begin:t.end] for t in h.tensors}


@pytest.fixture(scope="module")
def sd1(tmp_path_factory):
    return write_checkpoint(tmp_path_factory.mktemp("sd1") / "sd1.safetensors", "sd1", dtype=torch.float16)


def test_untouched_tensors_are_copied_byte_for_byte(sd1, tmp_path):
    result = bake(RECIPE, sd1, tmp_path / "out.safetensors", progress=False)
    edited = {e.key for e in result.plan.edits}
    before, after = raw_tensors(sd1), raw_tensors(tmp_path / "out.safetensors")
    assert before.keys() == after.keys()
    assert edited, "the recipe must touch something"
    for name in before:
        assert (before[name] == after[name]) == (name not in edited), name
    # The tensor table is unchanged: same dtypes, shapes and offsets.
    assert read_header(sd1).tensors == read_header(tmp_path / "out.safetensors").tensors


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16,
                                   torch.float8_e4m3fn, torch.float8_e5m2])
def test_scaled_tensors_are_float32_products_rounded_to_the_stored_dtype(tmp_path, dtype):
    src = write_checkpoint(tmp_path / "in.safetensors", "sd1", dtype=dtype)
    recipe = parse_recipe('schema = 1\nname = "r"\n[unet.self]\nq = 1.37\n[unet.cross]\nout = 0.61\n')
    bake(recipe, src, tmp_path / "out.safetensors", progress=False)
    a, b = load_file(src), load_file(tmp_path / "out.safetensors")
    checked = 0
    for key, t in a.items():
        factor = 1.37 if key.endswith("attn1.to_q.weight") else 0.61 if ".attn2.to_out.0." in key else None
        expected = t if factor is None else (t.to(torch.float32) * factor).to(dtype)
        assert b[key].dtype == t.dtype
        assert torch.equal(b[key].view(torch.uint8), expected.view(torch.uint8)), key
        checked += factor is not None
    assert checked == 16 + 32   # 16 attn1 q weights; 16 attn2 out weights + biases (SD 1.x layout)


def test_same_input_and_recipe_give_identical_bytes(sd1, tmp_path):
    bake(RECIPE, sd1, tmp_path / "a.safetensors", progress=False)
    bake(RECIPE, sd1, tmp_path / "b.safetensors", progress=False)
    assert open(tmp_path / "a.safetensors", "rb").read() == open(tmp_path / "b.safetensors", "rb").read()


def test_metadata_is_kept_and_provenance_added(tmp_path):
    src = tmp_path / "in.safetensors"
    tensors = load_file(write_checkpoint(tmp_path / "base.safetensors", "sd1"))
    save_file(tensors, src, metadata={"format": "pt", "modelspec.title": "Mine", "modelspec.hash_sha256": "0xdead",
                                      "sshs_model_hash": "stale", "note": "ünïcode"})
    before = sha256(src)
    bake(RECIPE, src, tmp_path / "out.safetensors", progress=False)
    assert sha256(src) == before, "the input must never be modified"
    meta = read_header(tmp_path / "out.safetensors").metadata
    assert meta["modelspec.title"] == "Mine" and meta["note"] == "ünïcode" and meta["format"] == "pt"
    assert "sshs_model_hash" not in meta
    assert meta["ckptbend.source"] == "in.safetensors"
    assert meta["ckptbend.source_sha256"] == before
    assert parse_recipe(meta["ckptbend.recipe"]) == RECIPE
    assert meta["ckptbend.recipe_sha256"] == RECIPE.sha256
    h = read_header(tmp_path / "out.safetensors")
    data = open(tmp_path / "out.safetensors", "rb").read()[h.data_start:]
    assert meta["modelspec.hash_sha256"] == "0x" + hashlib.sha256(data).hexdigest()
    # The header starts with '{"' (A1111's check) and the data section is 8-byte aligned.
    raw = open(tmp_path / "out.safetensors", "rb").read(10)
    assert raw[8:10] == b'{"' and h.data_start % 8 == 0
    with safe_open(tmp_path / "out.safetensors", "pt") as f:   # the reference reader accepts it
        assert f.metadata()["ckptbend.recipe_sha256"] == RECIPE.sha256


def test_baking_a_baked_file_records_the_chain(sd1, tmp_path):
    bake(RECIPE, sd1, tmp_path / "once.safetensors", progress=False)
    second = parse_recipe('schema = 1\nname = "again"\n[unet.cross]\nq = 1.05\n')
    bake(second, tmp_path / "once.safetensors", tmp_path / "twice.safetensors", progress=False)
    meta = read_header(tmp_path / "twice.safetensors").metadata
    history = json.loads(meta["ckptbend.history"])
    assert [h["recipe_sha256"] for h in history] == [RECIPE.sha256]
    assert history[0]["source_sha256"] == sha256(sd1)
    assert meta["ckptbend.recipe_sha256"] == second.sha256


def test_verify_accepts_the_bake_and_catches_a_changed_byte(sd1, tmp_path):
    out = tmp_path / "out.safetensors"
    result = bake(RECIPE, sd1, out, progress=False)
    assert verify(out, sd1) == []
    h = read_header(out)
    edited = h.tensor(result.plan.edits[0].key)
    with open(out, "r+b") as f:
        f.seek(h.data_start + edited.begin)
        byte = f.read(1)
        f.seek(h.data_start + edited.begin)
        f.write(bytes([byte[0] ^ 1]))
    problems = verify(out, sd1)
    assert len(problems) == 1 and edited.name in problems[0]


def test_verify_rejects_a_different_source(sd1, tmp_path):
    other = write_checkpoint(tmp_path / "other.safetensors", "sd1", dtype=torch.float16, seed=1)
    bake(RECIPE, sd1, tmp_path / "out.safetensors", progress=False)
    assert verify(tmp_path / "out.safetensors", other)


def test_existing_output_needs_force_and_input_is_never_the_output(sd1, tmp_path):
    out = tmp_path / "out.safetensors"
    out.write_bytes(b"precious")
    with pytest.raises(CkptbendError, match="already exists"):
        bake(RECIPE, sd1, out, progress=False)
    assert out.read_bytes() == b"precious"
    bake(RECIPE, sd1, out, force=True, progress=False)
    assert verify(out, sd1) == []
    with pytest.raises(CkptbendError, match="overwrite the input"):
        bake(RECIPE, sd1, sd1, force=True, progress=False)
    link = tmp_path / "link.safetensors"
    os.symlink(sd1, link)
    with pytest.raises(CkptbendError, match="overwrite the input"):
        bake(RECIPE, sd1, link, force=True, progress=False)
    hard = tmp_path / "hard.safetensors"
    os.link(sd1, hard)
    with pytest.raises(CkptbendError, match="overwrite the input"):
        bake(RECIPE, sd1, hard, force=True, progress=False)
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".ckptbend-tmp")]


def test_diffusers_folder_with_shards(tmp_path):
    src = write_checkpoint(tmp_path / "model", "sdxl", layout="diffusers", shard_size="40KB")
    index = sorted(p.relative_to(src).as_posix() for p in src.rglob("*.index.json"))
    assert index, "the fixture must be sharded"
    out = tmp_path / "baked"
    result = bake(RECIPE, src, out, progress=False)
    ckpt = detect(out)
    assert ckpt.kind == "diffusers-folder" and ckpt.architecture == "sdxl-base"
    assert {e.file.split("/")[0] for e in result.plan.edits} == {"unet", "text_encoder", "text_encoder_2"}
    # Every other file is carried over unchanged.
    for p in src.rglob("*"):
        rel = p.relative_to(src)
        if p.is_file() and not p.name.endswith(".safetensors"):
            assert (out / rel).read_bytes() == p.read_bytes(), rel
    assert verify(out, src) == []


def test_source_hash_is_remembered_and_any_write_invalidates_it(sd1, tmp_path):
    from ckptbend import hash_cache

    src = tmp_path / "src.safetensors"
    src.write_bytes(sd1.read_bytes())
    bake(RECIPE, src, tmp_path / "a.safetensors", progress=False)
    assert hash_cache.lookup(os.stat(src)) == sha256(src)
    # Rewrite one byte of an untouched tensor, keeping size and mtime: ctime still moves.
    h = read_header(src)
    st = os.stat(src)
    with open(src, "r+b") as f:
        f.seek(h.data_start + h.tensors[0].begin)
        byte = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([byte[0] ^ 0xFF]))
    os.utime(src, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert hash_cache.lookup(os.stat(src)) is None
    bake(RECIPE, src, tmp_path / "b.safetensors", progress=False)
    assert read_header(tmp_path / "b.safetensors").metadata["ckptbend.source_sha256"] == sha256(src)
    assert verify(tmp_path / "b.safetensors", src) == []


def test_output_gets_the_usual_file_mode(sd1, tmp_path):
    mask = os.umask(0o022)
    try:
        bake(RECIPE, sd1, tmp_path / "out.safetensors", progress=False)
    finally:
        os.umask(mask)
    assert (os.stat(tmp_path / "out.safetensors").st_mode & 0o777) == 0o644


@pytest.mark.parametrize("cached", [False, True])
def test_a_source_that_shrinks_mid_bake_gives_one_error_and_no_output(tmp_path, monkeypatch, cached):
    """The source is truncated after the first bytes are written (from the progress callback, i.e. while
    the kernel copy, the scaling worker and the hash run): the writer stops with one CkptbendError, with
    or without a hash thread to notice (bake then discards the temporary)."""
    from ckptbend import writer
    from ckptbend.plan import make_plan

    monkeypatch.setenv("CKPTBEND_CACHE_DIR", str(tmp_path / "cache"))
    src = tmp_path / "in.safetensors"
    write_checkpoint(src, "sd1", size="tiny", dtype=torch.float16)
    if cached:
        writer.hash_cache.remember(os.stat(src), "0" * 64)    # no hash thread: the copy must notice alone
    ckpt = detect(src)
    header = ckpt.files[0].header
    edits = make_plan(RECIPE, ckpt).edits_for(ckpt.files[0].rel)

    class Truncating:
        def update(self, n):
            if os.path.getsize(src) > header.data_start:
                os.truncate(src, header.data_start + (os.path.getsize(src) - header.data_start) // 3)

    with open(tmp_path / "out", "w+b") as out, pytest.raises(CkptbendError, match="shrank|changed"):
        writer.rewrite_file(src, header, edits, dict(header.metadata), out, Truncating())
