"""Slothful Attention core (ckptbend/runtime/slothful.py) against docs/slothful.md's formulas, computed here."""

import math

import pytest
import torch
import torch.nn.functional as F

from ckptbend.runtime import slothful as sl
from _helpers import imported_roots

START = 20.0          # ln 20 = 3.0 > 2.8, so progress t = 1 (the start of sampling)


def hidden(n, c=4, b=2, seed=0):
    return torch.randn(b, n, c, generator=torch.Generator().manual_seed(seed))


def test_defaults_ranges_and_simple_expansion():
    assert sl.DEFAULTS["time_decay"] == 1.0 and sl.DEFAULTS["keep_middle"] is True
    assert sl.DEFAULTS["in_strength"] == 6.0 and sl.DEFAULTS["out_strength"] == 4.0
    assert sl.DEFAULTS["in_mode"] == sl.DEFAULTS["out_mode"] == "2D_AVG"
    assert all(sl.DEFAULTS[f"{s}_{kv}_blend"] == 0.0 for s in ("in", "out") for kv in ("k", "v"))
    assert sl.RANGES["in_depth_decay"] == (-2.0, 4.0) and sl.RANGES["out_strength"] == (0.0, 50.0)
    assert sl.RANGES["time_decay"] == (0.0, 4.0)
    p = sl.simple_params(time_decay=0.5, depth_decay=-1.0, in_mode="1D_MAX", in_strength=3.0, in_blend=0.25,
                         out_mode="2D_MAX", out_strength=2.0, out_blend=0.75)
    assert p == {"time_decay": 0.5, "keep_middle": True,
                 "in_mode": "1D_MAX", "in_depth_decay": -1.0, "in_strength": 3.0, "in_k_blend": 0.25,
                 "in_v_blend": 0.25, "out_mode": "2D_MAX", "out_depth_decay": -1.0, "out_strength": 2.0,
                 "out_k_blend": 0.75, "out_v_blend": 0.75}
    assert sl.simple_params() == sl.DEFAULTS
    with pytest.raises(ValueError, match="in_blend"):
        sl.resolve_params({"in_blend": 0.5})
    with pytest.raises(ValueError, match="out_mode"):
        sl.resolve_params({"out_mode": "3D_AVG"})


@pytest.mark.parametrize("sigma", [0.01, math.exp(-2.2), 0.5, 1.0, 5.0, math.exp(2.8), 30.0])
def test_progress(sigma):
    expected = min(1.0, max(0.0, (math.log(sigma) + 2.2) / 5))
    assert sl.progress(sigma) == pytest.approx(expected, abs=1e-12)
    assert sl.progress(torch.tensor(sigma)) == pytest.approx(expected, abs=1e-6)


def test_progress_ends():
    assert sl.progress(100.0) == 1.0 and sl.progress(0.05) == 0.0 and sl.progress(0.0) == 0.0
    assert sl.progress(1.0) == pytest.approx(0.44)


def test_sd_vs_sdxl_rule():
    assert not sl.is_sdxl_family(8)
    assert sl.is_sdxl_family(10) and sl.is_sdxl_family(20)
    assert sl.is_sdxl_family(5)          # the quirk: SD 2.x heads count as SDXL


@pytest.mark.parametrize("sdxl", [False, True])
@pytest.mark.parametrize("depth_decay", [2.0, 1.0, 0.5, 0.0, -0.5, -1.0, -2.0])
@pytest.mark.parametrize("n", [4096, 1024, 256, 64])
def test_stride_formula(sdxl, depth_decay, n):
    sigma, strength, time_decay = 1.0, 6.0, 1.5
    latent = (64, 64)
    N = 64 * 64
    t = (math.log(sigma) + 2.2) / 5
    if depth_decay >= 0:
        r = (4 * n / N) if sdxl else (n / N)
    else:
        r = (N / n / 16) if sdxl else (N / n / 64)
    expected = strength * r ** (abs(depth_decay) / 2) * t ** time_decay
    assert sl.stride_for(n, latent, sigma, strength, depth_decay, time_decay, sdxl) == pytest.approx(expected)


def test_stride_depth_anchors():
    # positive depth decay: full strength at the top attention level (SD: n = N; SDXL: n = N/4)
    assert sl.stride_for(4096, (64, 64), START, 6.0, 2.0, 1.0, False) == pytest.approx(6.0)
    assert sl.stride_for(1024, (64, 64), START, 6.0, 2.0, 1.0, True) == pytest.approx(6.0)
    # negative: full strength at the deepest level (SD: n = N/64; SDXL: n = N/16)
    assert sl.stride_for(64, (64, 64), START, 6.0, -2.0, 1.0, False) == pytest.approx(6.0)
    assert sl.stride_for(256, (64, 64), START, 6.0, -2.0, 1.0, True) == pytest.approx(6.0)
    # time_decay 0: no fading even at the end of sampling (0.0 ** 0 == 1)
    assert sl.stride_for(4096, (64, 64), 0.01, 6.0, 1.0, 0.0, False) == pytest.approx(6.0)


def test_identity_returns_the_same_tensors():
    k, v = hidden(256), hidden(256, seed=1)
    kw = dict(sigma=START, n_heads=8, latent_hw=(16, 16))
    out = sl.slothful_kv(k, v, "input", params={"in_strength": 0.0}, **kw)
    assert out[0] is k and out[1] is v
    out = sl.slothful_kv(k, v, "input", params={"in_strength": 1.0}, **kw)      # stride exactly 1
    assert out[0] is k and out[1] is v
    out = sl.slothful_kv(k, v, "input", sigma=0.05, n_heads=8, latent_hw=(16, 16))   # t = 0 at the end
    assert out[0] is k and out[1] is v
    out = sl.slothful_kv(k, v, "middle", params={"in_strength": 50.0}, **kw)    # keep_middle
    assert out[0] is k and out[1] is v


def test_block_kind_picks_parameters():
    k = hidden(256)
    kw = dict(sigma=START, n_heads=8, latent_hw=(16, 16))
    params = {"in_mode": "1D_AVG", "in_strength": 4.0, "out_mode": "1D_AVG", "out_strength": 8.0}
    assert sl.slothful_kv(k, k, "input", params=params, **kw)[0].shape[1] == 256 // 4
    assert sl.slothful_kv(k, k, "output", params=params, **kw)[0].shape[1] == 256 // 8
    middle = sl.slothful_kv(k, k, "middle", params={**params, "keep_middle": False}, **kw)
    assert middle[0].shape[1] == 256 // 4           # the middle block uses the input parameters


@pytest.mark.parametrize("mode", ["1D_AVG", "1D_MAX"])
@pytest.mark.parametrize("stride", [2.0, 3.5, 5.0, 7.2])
def test_1d_token_count_and_values(mode, stride):
    n = 256
    x = hidden(n)
    s = math.ceil(stride)
    pooled = n // s                              # pooling without padding
    pool_fn = F.avg_pool1d if mode == "1D_AVG" else F.max_pool1d
    pool = pool_fn(x.transpose(1, 2), s, s).transpose(1, 2)
    one = x[:, ::s][:, :pooled]
    for blend in (0.0, 0.3, 1.0):
        out = sl.reduce_tokens(x, stride, mode, blend)
        assert out.shape == (2, pooled, 4)
        torch.testing.assert_close(out, one * (1 - blend) + pool * blend)


@pytest.mark.parametrize("mode", ["2D_AVG", "2D_MAX"])
@pytest.mark.parametrize("stride", [2.0, 3.0, 5.0, 8.5])
def test_2d_token_count_and_values(mode, stride):
    h, w = 12, 20
    x = hidden(h * w)
    sty = math.ceil(math.sqrt(stride))
    stx = math.ceil(stride / sty)
    grid = x.transpose(1, 2).reshape(2, 4, h, w)
    pool_fn = F.avg_pool2d if mode == "2D_AVG" else F.max_pool2d
    pool = pool_fn(grid, (stx, sty), (stx, sty))                 # stx rows by sty columns
    assert pool.shape[-2:] == (h // stx, w // sty)
    one = grid[:, :, ::stx, ::sty][:, :, :h // stx, :w // sty]
    for blend in (0.0, 0.6, 1.0):
        out = sl.reduce_tokens(x, stride, mode, blend, (h, w))
        assert out.shape == (2, (h // stx) * (w // sty), 4)
        expected = (one * (1 - blend) + pool * blend).flatten(2).transpose(1, 2)
        torch.testing.assert_close(out, expected)


def test_recover_grid():
    assert sl.recover_grid(4096, (64, 64)) == (64, 64)
    assert sl.recover_grid(1024, (64, 64)) == (32, 32)
    assert sl.recover_grid(52 * 76, (104, 152)) == (52, 76)        # SDXL 832×1216, level 1
    assert sl.recover_grid(26 * 38, (104, 152)) == (26, 38)
    assert sl.recover_grid(38 * 51, (75, 101)) == (38, 51)         # odd sizes: ceil halving


def test_2d_avg_blend_one_is_average_pooling_of_the_hidden_states():
    latent = (24, 40)                    # level 1: n = 12·20 = 240 of N = 960
    n = 240
    x = hidden(n, c=8)
    strength, depth_decay = 10.0, 1.0
    stride = strength * (n / 960) ** (depth_decay / 2)            # t = 1 at START → 5.0
    h = n // round(40 * math.sqrt(n / 960))
    w = n // h
    sty = math.ceil(math.sqrt(stride))
    stx = math.ceil(stride / sty)
    expected = F.avg_pool2d(x.transpose(1, 2).reshape(2, 8, h, w), (stx, sty)).flatten(2).transpose(1, 2)
    params = {"in_strength": strength, "in_depth_decay": depth_decay, "in_k_blend": 1.0, "in_v_blend": 1.0}
    k, v = sl.slothful_kv(x, x, "input", START, 8, latent, params, reference_blend_quirk=False)
    torch.testing.assert_close(k, expected)
    torch.testing.assert_close(v, expected)


def test_reference_quirk_at_64x64():
    # SD1.5 input level 0: n = N = 4096, r = 1; at t = 1 the stride is the strength. The doc's 704 vs 672:
    # a 64×64 grid pooled by (a rows, b cols) has floor(64/a)·floor(64/b) = 672 and the uncropped
    # subsample ceil(64/a)·ceil(64/b) = 704 → {a, b} = {2, 3}. Find a strength whose window is that.
    def window(stride):
        sty = math.ceil(math.sqrt(stride))
        return math.ceil(stride / sty), sty

    strength = next(s / 10 for s in range(11, 500) if sorted(window(s / 10)) == [2, 3])
    stx, sty = window(strength)
    assert (64 // stx) * (64 // sty) == 672 and math.ceil(64 / stx) * math.ceil(64 / sty) == 704
    x = hidden(4096, c=2, b=1)
    both_one = {"in_strength": strength, "in_k_blend": 1.0, "in_v_blend": 1.0}
    k, v = sl.slothful_kv(x, x, "input", START, 8, (64, 64), both_one)
    assert k.shape[1] == v.shape[1] == 704
    grid = x.transpose(1, 2).reshape(1, 2, 64, 64)
    torch.testing.assert_close(k, grid[:, :, ::stx, ::sty].flatten(2).transpose(1, 2))
    # with the flag off, or a blend just below 1, the pooled grid
    k, v = sl.slothful_kv(x, x, "input", START, 8, (64, 64), both_one, reference_blend_quirk=False)
    assert k.shape[1] == v.shape[1] == 672
    k, v = sl.slothful_kv(x, x, "input", START, 8, (64, 64), {**both_one, "in_v_blend": 0.99})
    assert k.shape[1] == v.shape[1] == 672


def test_reference_quirk_1d_is_untrimmed():
    x = hidden(250)
    params = {"in_mode": "1D_AVG", "in_strength": 4.0, "in_k_blend": 1.0, "in_v_blend": 1.0}
    k, _ = sl.slothful_kv(x, x, "input", START, 8, (10, 25), params)
    assert k.shape[1] == math.ceil(250 / 4)                        # 63, pooled would be 62
    torch.testing.assert_close(k, x[:, ::4])


def test_k_and_v_blends_are_independent():
    x = hidden(256)
    stride = 4.0                                                   # strength at t = 1, n = N
    grid = x.transpose(1, 2).reshape(2, 4, 16, 16)
    pool = F.avg_pool2d(grid, (2, 2)).flatten(2).transpose(1, 2)  # sty = 2, stx = 2
    one = grid[:, :, ::2, ::2].flatten(2).transpose(1, 2)
    params = {"in_strength": stride, "in_k_blend": 0.0, "in_v_blend": 1.0}
    k, v = sl.slothful_kv(x, x, "input", START, 8, (16, 16), params)
    torch.testing.assert_close(k, one)
    torch.testing.assert_close(v, pool)
    params = {"in_strength": stride, "in_k_blend": 0.25, "in_v_blend": 0.5}
    k, v = sl.slothful_kv(x, x, "input", START, 8, (16, 16), params)
    torch.testing.assert_close(k, 0.75 * one + 0.25 * pool)
    torch.testing.assert_close(v, 0.5 * one + 0.5 * pool)


def test_sdxl_heads_change_the_stride():
    x = hidden(256)
    params = {"in_mode": "1D_AVG", "in_strength": 8.0}
    # n = 256 of N = 1024: SD r = 1/4 → stride 8·½ = 4; SDXL r = 1 → stride 8
    assert sl.slothful_kv(x, x, "input", START, 8, (32, 32), params)[0].shape[1] == 256 // 4
    assert sl.slothful_kv(x, x, "input", START, 10, (32, 32), params)[0].shape[1] == 256 // 8




def test_slothful_imports_only_torch_stdlib_and_the_runtime():
    import sys
    assert imported_roots(sl.__file__) - {"torch", "."} <= set(sys.stdlib_module_names)
