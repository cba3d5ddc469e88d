"""`diff` and the q·k warning on diffusion transformers: `diff` cuts a fused tensor by the plan's own ranges
and reports each range's factor; the q·k warning is computed per attention, over the queries and keys that
meet in one softmax, whatever the file's naming. Tiny synthetic checkpoints (fp32, so factors read back
exactly) with real key names."""

import pytest

from _dit import recipe, run
from ckptbend.layouts import detect
from ckptbend.plan import make_plan


@pytest.mark.parametrize("arch,body,expected", [
    ("flux_dev", "[dit.joint]\nv = 1.5\nout = 0.5\n", [
        "double_blocks.0.img_attn.qkv.weight rows 64:96 (v): ×1.5 scaled",
        "double_blocks.0.img_attn.qkv.bias rows 64:96 (v): ×1.5 scaled",
        "single_blocks.0.linear1.weight rows 64:96 (v): ×1.5 scaled",
        "single_blocks.0.linear2.weight columns 0:32 (out): ×0.5 scaled",
        "double_blocks.0.img_attn.proj.weight: ×0.5 scaled"]),
    ("sd3_medium", "[dit.joint]\nq = 1.25\nk = 0.8\nv = 1.5\n", [
        "joint_blocks.0.x_block.attn.qkv.weight rows 0:32 (q): ×1.25 scaled",
        "joint_blocks.0.x_block.attn.qkv.weight rows 32:64 (k): ×0.8 scaled",
        "joint_blocks.0.x_block.attn.qkv.weight rows 64:96 (v): ×1.5 scaled"]),
    ("hunyuan_video", "[dit.joint]\nv = 1.5\n", ["double_blocks.0.img_attn_qkv.weight rows 64:96 (v): ×1.5 scaled"]),
])
def test_diff_reports_each_range_of_a_fused_tensor(tmp_path, synth_file, arch, body, expected):
    (tmp_path / "r.toml").write_text('schema = 1\nname = "r"\n' + body)
    src, out = synth_file(arch), tmp_path / "o.safetensors"
    assert run("bake", tmp_path / "r.toml", src, "-o", out).returncode == 0
    lines = run("diff", src, out).stdout.splitlines()
    assert not any("not a pure scale" in line for line in lines), lines    # was "×1.15692 changed"
    for want in expected:
        assert any(line.startswith(want) for line in lines), (want, lines)
    assert not any("(other)" in line for line in lines)                    # rows and columns not scaled: unchanged


QK = "entries combine to q x k"


@pytest.mark.parametrize("arch,layout,section", [
    ("flux_dev", "transformer_diffusers", "dit.joint"),   # four norm weights under one `attn.`: warned "5.06"
    ("sd35_medium", "transformer_diffusers", "dit.joint"),
    ("qwen_image", "single", "dit.joint"),
    ("wan21_i2v", "single", "dit.cross"),                 # norm_k and norm_k_img: the same queries, two key sets
    ("wan21_i2v", "transformer_diffusers", "dit.cross"),
])
def test_no_qk_warning_where_no_query_meets_a_key_scaled_past_4(synth_file, arch, layout, section):
    plan = make_plan(recipe(f"[{section}]\nq = 1.5\nk = 1.5\n"), detect(synth_file(arch, layout)))
    assert not [w for w in plan.warnings if QK in w]


@pytest.mark.parametrize("arch,layout", [("flux_dev", "single"), ("sd3_medium", "single"),
                                         ("flux_dev", "transformer_diffusers"), ("hunyuan_video", "single")])
def test_an_image_query_meeting_a_text_key_past_4_is_warned(synth_file, arch, layout):
    """q (image) × k (text) = 2.5 × 2 = 5 in every joint attention: no one entry exceeds 4."""
    body = '[[dit.joint]]\nstream = "image"\nq = 2.5\n[[dit.joint]]\nstream = "text"\nk = 2.0\n'
    plan = make_plan(recipe(body), detect(synth_file(arch, layout)))
    [warning] = [w for w in plan.warnings if QK in w]
    assert "up to 5 (> 4) in 2 attention(s)" in warning or "up to 5 (> 4) in 3 attention(s)" in warning, warning
