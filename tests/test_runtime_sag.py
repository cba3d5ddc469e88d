"""SAG core (ckptbend/runtime/sag.py) against the formulas of docs/sag.md, computed here independently."""

import math

import pytest
import torch
import torch.nn.functional as F

from ckptbend.runtime import sag
from _helpers import imported_roots


def formula_kernel(sigma):
    taps = [math.exp(-x * x / (2 * sigma * sigma)) for x in range(-4, 5)]   # linspace(−4, 4, 9)
    total = sum(taps)
    return torch.tensor([t / total for t in taps], dtype=torch.float64)


def test_defaults_and_ranges():
    assert sag.SAG_DEFAULTS == {"scale": 0.5, "blur_sigma": 2.0}
    assert sag.SAG_RANGES == {"scale": (-2.0, 5.0), "blur_sigma": (0.0, 10.0)}
    assert sag.SAG_THRESHOLD == 1.0


@pytest.mark.parametrize("sigma", [0.5, 1.0, 2.0, 10.0])
def test_blur_kernel_sums_to_one_and_matches_formula(sigma):
    k1 = sag.gaussian_kernel_1d(sigma, 9)
    assert k1.shape == (9,)
    assert float(k1.sum()) == pytest.approx(1.0, abs=1e-6)
    torch.testing.assert_close(k1.double(), formula_kernel(sigma), atol=1e-7, rtol=0)


def test_blur_of_an_impulse_is_the_outer_product_kernel_per_channel():
    x = torch.zeros(1, 2, 17, 17)
    x[0, 0, 8, 8] = 1.0          # channel 0: impulse; channel 1 stays zero (depthwise: no mixing)
    out = sag.gaussian_blur_2d(x, 2.0)
    k = formula_kernel(2.0)
    expected = torch.zeros(17, 17, dtype=torch.float64)
    expected[4:13, 4:13] = torch.outer(k, k)
    torch.testing.assert_close(out[0, 0].double(), expected, atol=1e-7, rtol=0)
    assert torch.count_nonzero(out[0, 1]) == 0


def test_blur_uses_reflect_padding():
    # reflect padding: padded row −r holds row r. An impulse at (1, 1) is also seen at −1 by
    # out[0, 0] = Σ k[a]·k[b]·x[a − 4, b − 4], so out[0, 0] = (k[3] + k[5])² (zero padding: k[5]²).
    x = torch.zeros(1, 1, 9, 9)
    x[0, 0, 1, 1] = 1.0
    k = formula_kernel(1.0)
    out = sag.gaussian_blur_2d(x, 1.0)
    assert float(out[0, 0, 0, 0]) == pytest.approx(float((k[3] + k[5]) ** 2), abs=1e-7)
    ones = torch.ones(1, 1, 9, 9)                     # no dark rim at the borders
    torch.testing.assert_close(sag.gaussian_blur_2d(ones, 1.0), ones)


def test_blur_sigma_zero_is_no_blur_and_never_nan():
    x = torch.randn(1, 4, 8, 8)
    assert sag.gaussian_blur_2d(x, 0.0) is x
    mask = torch.ones(1, 1, 8, 8)
    out = sag.degrade(x, mask, 0.0)
    assert not torch.isnan(out).any()
    torch.testing.assert_close(out, x)


def test_guess_mid_grid_doc_examples():
    assert sag.guess_mid_grid(64, 64, 64) == (8, 8)            # SD1.5, 64×64 latent
    assert sag.guess_mid_grid(4 * 6, 32, 48) == (4, 6)         # 32×48 latent
    assert sag.guess_mid_grid(26 * 38, 104, 152) == (26, 38)   # SDXL at 104×152


def test_guess_mid_grid_searches_up_then_down():
    # n = 24, square: x = round(sqrt(24)) = 5 (no), then 6 divides → 6 × 4
    assert sag.guess_mid_grid(24, 64, 64) == (6, 4)
    # n = 14, square: x = round(3.74) = 4; 4 no; 5 no, 3 no; 6 no, 2 yes → 2 × 7 (found going down)
    assert sag.guess_mid_grid(14, 64, 64) == (2, 7)
    # n = 2: ComfyUI's search range(floor(sqrt(2)/2)) is empty and it fails; x = round(1.41) = 1 divides
    assert sag.guess_mid_grid(2, 8, 8) == (1, 2)
    # very wide latent: x = round(sqrt(1/16 · 6)) = round(0.61) = 1
    assert sag.guess_mid_grid(6, 8, 128) == (1, 6)


def test_mask_marks_keys_with_more_than_average_attention():
    b, heads, n = 1, 2, 4           # mid grid 2×2, latent 4×4
    probs = torch.zeros(b * heads, n, n)
    probs[0, :, 0] = 1.0             # head 0: every query attends to key 0
    probs[1] = 1.0 / n               # head 1: uniform
    # per key: sum over queries of the head mean → key 0: 4·(1 + ¼)/2 = 2.5; others 4·(0 + ¼)/2 = 0.5
    mask = sag.attention_mask_from_probs(probs, b, heads, 4, 4)
    expected = torch.zeros(1, 1, 4, 4)
    expected[0, 0, :2, :2] = 1.0     # key 0 = mid cell (0, 0) → nearest upsampling to the top-left 2×2
    assert mask.dtype == torch.float32
    torch.testing.assert_close(mask, expected)


def test_mask_threshold_is_strict_and_batches_are_separate():
    heads, n = 2, 4
    uniform = torch.full((heads, n, n), 1.0 / n)     # every key gets exactly 1.0 → not > 1.0
    peaked = torch.zeros(heads, n, n)
    peaked[:, :, 3] = 1.0                             # both heads: all attention on key 3 → 4.0
    probs = torch.cat([uniform, peaked])              # batch-major: item 0's heads, then item 1's
    mask = sag.attention_mask_from_probs(probs, 2, heads, 4, 8, mid_hw=(2, 2))
    assert mask.shape == (2, 1, 4, 8)
    assert torch.count_nonzero(mask[0]) == 0
    expected = torch.zeros(4, 8)
    expected[2:, 4:] = 1.0                            # key 3 = cell (1, 1) → bottom-right 2×4 block
    torch.testing.assert_close(mask[1, 0], expected)


def test_degrade_blends_blur_by_mask():
    x0 = torch.randn(1, 2, 8, 8)
    mask = torch.zeros(1, 1, 8, 8)
    mask[..., :, 4:] = 1.0
    out = sag.degrade(x0, mask, 1.5)
    blurred = sag.gaussian_blur_2d(x0, 1.5)
    torch.testing.assert_close(out[..., 4:], blurred[..., 4:])
    torch.testing.assert_close(out[..., :4], x0[..., :4])


def _step_inputs(h=8, w=8, b=1, heads=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, 4, h, w, generator=g)
    x0_u = torch.randn(b, 4, h, w, generator=g)
    cfg = torch.randn(b, 4, h, w, generator=g)
    n = math.ceil(h / 8) * math.ceil(w / 8) * 4
    probs = torch.softmax(torch.randn(b * heads, n, n, generator=g) * 3, dim=-1)
    return x, cfg, x0_u, probs


def test_sag_step_follows_the_doc():
    x, cfg, x0_u, probs = _step_inputs()
    seen = []

    def uncond_x0_at(x_deg):          # stand-in for the extra UNet call
        seen.append(x_deg)
        return 0.5 * x_deg + 0.1

    out = sag.sag_step(x, cfg, x0_u, probs, heads=2, uncond_x0_at=uncond_x0_at, scale=0.7, blur_sigma=2.0)
    # steps 2–5 by hand
    per_key = probs.reshape(1, 2, 4, 4).mean(1).sum(1) > 1.0
    mask = F.interpolate(per_key.reshape(1, 1, 2, 2).float(), size=(8, 8), mode="nearest")
    degraded = sag.gaussian_blur_2d(x0_u, 2.0) * mask + x0_u * (1 - mask)
    torch.testing.assert_close(seen[0], degraded + x - x0_u)
    torch.testing.assert_close(out, cfg + 0.7 * (degraded - (0.5 * seen[0] + 0.1)))


def test_skip_for_latents_of_four_pixels_or_fewer():
    assert not sag.sag_applies(4, 64) and not sag.sag_applies(64, 4) and sag.sag_applies(5, 5)
    x, cfg, x0_u, probs = _step_inputs(h=4, w=16)

    def never(_):
        raise AssertionError("no extra model call for a skipped step")

    assert sag.sag_step(x, cfg, x0_u, probs, 2, never, scale=1.0) is cfg
    x, cfg, x0_u, probs = _step_inputs(h=5, w=5)       # 5 px: applied (reflect padding 4 fits)
    assert not torch.equal(sag.sag_step(x, cfg, x0_u, probs, 2, lambda t: t * 0, scale=1.0), cfg)


def test_scale_zero_returns_cfg_result_exactly():
    x, cfg, x0_u, probs = _step_inputs()
    out = sag.sag_step(x, cfg, x0_u, probs, 2, lambda t: t + 1.0, scale=0.0)
    assert torch.equal(out, cfg)
    # and the formula itself with scale 0 gives the same values
    assert torch.equal(sag.guide(cfg, x0_u, x, 0.0), cfg)


def test_blur_sigma_zero_step_has_no_nan():
    x, cfg, x0_u, probs = _step_inputs()
    out = sag.sag_step(x, cfg, x0_u, probs, 2, lambda t: 0.9 * t, scale=1.0, blur_sigma=0.0)
    assert torch.isfinite(out).all()
    # no blur: degraded = x0_u, so x_deg = x and the correction is x0_u − 0.9·x
    torch.testing.assert_close(out, cfg + (x0_u - 0.9 * x))


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_prediction_conversions_round_trip(prediction_type):
    g = torch.Generator().manual_seed(1)
    x, x0 = torch.randn(2, 4, 6, 6, generator=g), torch.randn(2, 4, 6, 6, generator=g)
    a = 0.3
    sa, s1 = math.sqrt(a), math.sqrt(1 - a)
    eps = (x - sa * x0) / s1
    v = sa * eps - s1 * x0
    torch.testing.assert_close(sag.eps_from_x0(x, x0, a), eps)
    torch.testing.assert_close(sag.v_from_x0(x, x0, a), v)
    pred = {"epsilon": eps, "v_prediction": v, "sample": x0}[prediction_type]
    torch.testing.assert_close(sag.to_x0(x, pred, a, prediction_type), x0)
    d = torch.randn(2, 4, 6, 6, generator=g)
    # the delta moves x0 by d at fixed x
    moved = sag.to_x0(x, pred + sag.prediction_delta(d, a, prediction_type), a, prediction_type)
    torch.testing.assert_close(moved, x0 + d, atol=1e-5, rtol=1e-5)


def test_same_delta_on_both_halves_shifts_cfg_by_delta():
    g = torch.Generator().manual_seed(2)
    u, c, d = (torch.randn(1, 4, 6, 6, generator=g) for _ in range(3))
    for guidance in (1.0, 3.5, 7.5, -2.0):
        torch.testing.assert_close((u + d) + guidance * ((c + d) - (u + d)), u + guidance * (c - u) + d)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_vp_delta_equals_the_k_diffusion_step(prediction_type):
    """A diffusers-style model (eps or v from the VP input) wrapped as a k-diffusion denoiser: SAG via
    sag_prediction_delta added to the CFG prediction gives sag_step's x0."""
    g = torch.Generator().manual_seed(3)
    sigma = 1.7
    a = 1 / (1 + sigma ** 2)                  # ᾱ of that sigma
    sa, s1 = math.sqrt(a), math.sqrt(1 - a)
    w_u, w_c = torch.randn(4, 4, generator=g) * 0.3, torch.randn(4, 4, generator=g) * 0.3

    def model(x_vp, weight):                   # an arbitrary prediction, mixing channels
        return torch.einsum("oc,bchw->bohw", weight, x_vp) + 0.05

    def to_x0(x_vp, pred):                     # independent of sag.to_x0
        return (x_vp - s1 * pred) / sa if prediction_type == "epsilon" else sa * x_vp - s1 * pred

    x_k = torch.randn(1, 4, 16, 16, generator=g) * math.sqrt(1 + sigma ** 2)
    x_vp = x_k * sa
    heads, n = 2, 4
    probs = torch.softmax(torch.randn(heads, n, n, generator=g) * 4, dim=-1)
    guidance, scale, blur = 5.0, 0.8, 2.0
    p_u, p_c = model(x_vp, w_u), model(x_vp, w_c)
    p_cfg = p_u + guidance * (p_c - p_u)

    # k-diffusion side: D(x_k) = x0 of the model on x_k·sqrt(ᾱ)
    x0_u, x0_cfg = to_x0(x_vp, p_u), to_x0(x_vp, p_cfg)
    expected = sag.sag_step(x_k, x0_cfg, x0_u, probs, heads, lambda xd: to_x0(xd * sa, model(xd * sa, w_u)),
                            scale=scale, blur_sigma=blur)
    delta = sag.sag_prediction_delta(x_vp, p_u, probs, heads, lambda xd: model(xd, w_u), a, scale=scale,
                                     blur_sigma=blur, prediction_type=prediction_type)
    got = to_x0(x_vp, (p_u + delta) + guidance * ((p_c + delta) - (p_u + delta)))
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(expected, x0_cfg)      # the correction did something
    assert sag.sag_prediction_delta(x_vp, p_u, probs, heads, lambda xd: xd, a, scale=0.0) is None




def test_sag_imports_only_torch_stdlib_and_the_runtime():
    import sys
    assert imported_roots(sag.__file__) - {"torch", "."} <= set(sys.stdlib_module_names)
