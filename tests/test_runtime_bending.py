"""Attention Bending core (ckptbend/runtime/bending.py) against docs/bending.md's formulas, computed here."""

import math

import pytest
import torch

from ckptbend.runtime import bending as bd
from ckptbend.runtime import bent_attention as ba
from ckptbend.runtime import tokens as tk
from ckptbend.runtime.bending import BendSpec
from _helpers import imported_roots

BH, H, W, T = 3, 6, 6, 5          # batch·heads, grid, text tokens
TARGET = 2


def probs(h=H, w=W, bh=BH, t=T, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.softmax(torch.randn(bh, h * w, t, generator=g) * 2, dim=-1)


def target_maps(p, h=H, w=W, j=TARGET):
    return p[:, :, j].reshape(p.shape[0], h, w)


def bend_one(p, h=H, w=W, **entry):
    entry = {"token": "kiss", "renormalize": "none", **entry}
    return bd.bend_probs(p, {"kiss": [TARGET]}, (h, w), [entry])


def check_only_target_changed(p, out, expected_maps, h=H, w=W, atol=1e-6):
    torch.testing.assert_close(target_maps(out, h, w), expected_maps, atol=atol, rtol=1e-5)
    others = [j for j in range(p.shape[-1]) if j != TARGET]
    assert torch.equal(out[:, :, others], p[:, :, others])


def formula_kernel(k, sigma):
    xs = [i - k // 2 for i in range(k)]
    g = [math.exp(-x * x / (2 * sigma * sigma)) for x in xs]
    total = sum(g)
    return [[a / total * b / total for b in g] for a in g]


def conv_zero_padded(maps, kernel):
    """Direct 2-D correlation with zero padding k//2, by loops (independent of conv2d)."""
    k = len(kernel)
    r = k // 2
    n, h, w = maps.shape
    out = torch.zeros_like(maps, dtype=torch.float64)
    m = maps.double()
    for i in range(h):
        for j in range(w):
            for a in range(k):
                for b in range(k):
                    y, x = i + a - r, j + b - r
                    if 0 <= y < h and 0 <= x < w:
                        out[:, i, j] += kernel[a][b] * m[:, y, x]
    return out.to(maps.dtype)


def bilinear_border(maps, src_x, src_y):
    """Sample maps at normalised source coordinates (align_corners=False, border clamp), by hand."""
    n, h, w = maps.shape
    u = ((src_x + 1) * w - 1) / 2
    v = ((src_y + 1) * h - 1) / 2
    u, v = min(max(u, 0.0), w - 1), min(max(v, 0.0), h - 1)
    x0, y0 = int(math.floor(u)), int(math.floor(v))
    x1, y1 = min(x0 + 1, w - 1), min(y0 + 1, h - 1)
    fx, fy = u - x0, v - y0
    return ((1 - fx) * (1 - fy) * maps[:, y0, x0] + fx * (1 - fy) * maps[:, y0, x1]
            + (1 - fx) * fy * maps[:, y1, x0] + fx * fy * maps[:, y1, x1])


def affine_by_hand(maps, theta):
    n, h, w = maps.shape
    out = torch.empty_like(maps)
    for i in range(h):
        for j in range(w):
            x, y = (2 * j + 1) / w - 1, (2 * i + 1) / h - 1       # output pixel centre, normalised
            sx = theta[0][0] * x + theta[0][1] * y + theta[0][2]
            sy = theta[1][0] * x + theta[1][1] * y + theta[1][2]
            out[:, i, j] = bilinear_border(maps, sx, sy)
    return out


# --- entries -------------------------------------------------------------------------------------

def test_spec_from_dict_defaults_and_validation():
    s = BendSpec.from_dict({"token": "kiss", "mode": "rotate", "angle": 30, "apply_to_timesteps": [2, 5],
                            "apply_to_layers": [0, 3]})
    assert (s.strength, s.renormalize, s.apply_to_timesteps, s.apply_to_layers) == (1.0, "row", (2, 5), (0, 3))
    assert (s.scale_factor, s.zoom_factor, s.kernel_size, s.sigma, s.sharpen_amount, s.region_feather) == \
        (1.0, 1.0, 3, 1.0, 1.0, 0.1)
    assert BendSpec("a", "flip", renormalize=True).renormalize == "row"
    assert BendSpec("a", "flip", renormalize=False).renormalize == "none"
    with pytest.raises(ValueError, match="mode"):
        BendSpec("a", "twist")
    with pytest.raises(ValueError, match="angel"):
        BendSpec.from_dict({"token": "a", "mode": "rotate", "angel": 3})
    with pytest.raises(ValueError, match="renormalize"):
        BendSpec("a", "flip", renormalize="columns")


def test_strength_zero_is_bit_identical():
    p = probs()
    for mode in bd.MODES:
        for renorm in bd.RENORMALIZE:
            entry = {"token": "kiss", "mode": mode, "strength": 0.0, "renormalize": renorm, "scale_factor": 3.0}
            assert torch.equal(bd.bend_probs(p, {"kiss": [TARGET]}, (H, W), [entry]), p)
    q, k, v = (torch.randn(2, n, 16) for n in (36, 5, 5))
    plain = ba.attention_with_bending(q, k, v, heads=2)
    bent = ba.attention_with_bending(q, k, v, heads=2, entries=[{"token": "kiss", "mode": "flip", "strength": 0,
                                                                 "flip_horizontal": True}],
                                     token_indices={"kiss": [1]}, grid_hw=(6, 6))
    assert torch.equal(plain, bent)


# --- the nine modes ---------------------------------------------------------------------------------

def test_scale():
    p = probs()
    out = bend_one(p, mode="scale", scale_factor=2.5)
    check_only_target_changed(p, out, target_maps(p) * 2.5)


def test_scale_blended_by_strength():
    p = probs()
    out = bend_one(p, mode="scale", scale_factor=3.0, strength=0.25)
    check_only_target_changed(p, out, 0.75 * target_maps(p) + 0.25 * 3.0 * target_maps(p))


def test_flip():
    p = probs()
    check_only_target_changed(p, bend_one(p, mode="flip", flip_horizontal=True), torch.flip(target_maps(p), [2]))
    check_only_target_changed(p, bend_one(p, mode="flip", flip_vertical=True), torch.flip(target_maps(p), [1]))
    both = bend_one(p, mode="flip", flip_horizontal=True, flip_vertical=True)
    check_only_target_changed(p, both, torch.flip(target_maps(p), [1, 2]))


def test_translate_one_pixel():
    p = probs()
    m = target_maps(p)
    # tx = 2/W normalised = one pixel: output column j reads input column j + 1; the last repeats (border)
    out = bend_one(p, mode="translate", translate_x=2 / W)
    check_only_target_changed(p, out, torch.cat([m[:, :, 1:], m[:, :, -1:]], dim=2))
    out = bend_one(p, mode="translate", translate_y=-2 / H)        # content moves down by one row
    check_only_target_changed(p, out, torch.cat([m[:, :1], m[:, :-1]], dim=1))


def test_rotate():
    p = probs()
    m = target_maps(p)
    # output (x, y) reads input (cos a·x − sin a·y, sin a·x + cos a·y); a = 90° → input (−y, x):
    # out[i][j] = in[j][W−1−i], which is torch.rot90 from rows towards columns
    check_only_target_changed(p, bend_one(p, mode="rotate", angle=90.0), torch.rot90(m, 1, (1, 2)), atol=1e-5)
    check_only_target_changed(p, bend_one(p, mode="rotate", angle=180.0), torch.flip(m, [1, 2]), atol=1e-5)
    a = math.radians(30.0)
    theta = [[math.cos(a), -math.sin(a), 0.0], [math.sin(a), math.cos(a), 0.0]]
    check_only_target_changed(p, bend_one(p, mode="rotate", angle=30.0), affine_by_hand(m, theta), atol=1e-5)


def test_spatial_scale():
    p = probs()
    m = target_maps(p)
    check_only_target_changed(p, bend_one(p, mode="spatial_scale", zoom_factor=1.0), m, atol=1e-6)
    theta = [[1 / 2.0, 0.0, 0.0], [0.0, 1 / 2.0, 0.0]]
    check_only_target_changed(p, bend_one(p, mode="spatial_scale", zoom_factor=2.0), affine_by_hand(m, theta),
                              atol=1e-6)
    theta = [[1 / 0.6, 0.0, 0.0], [0.0, 1 / 0.6, 0.0]]      # zoom out: border padding fills the edges
    check_only_target_changed(p, bend_one(p, mode="spatial_scale", zoom_factor=0.6), affine_by_hand(m, theta),
                              atol=1e-6)


@pytest.mark.parametrize("kernel_size,used", [(3, 3), (4, 5), (5, 5)])
def test_blur(kernel_size, used):
    p = probs()
    out = bend_one(p, mode="blur", kernel_size=kernel_size, sigma=1.3)
    check_only_target_changed(p, out, conv_zero_padded(target_maps(p), formula_kernel(used, 1.3)))


def test_sharpen():
    p = probs()
    m = target_maps(p)
    out = bend_one(p, mode="sharpen", sharpen_amount=0.7, kernel_size=3, sigma=1.0)
    check_only_target_changed(p, out, m + 0.7 * (m - conv_zero_padded(m, formula_kernel(3, 1.0))))


def test_regional_mask_hard_and_feathered():
    h, w = 8, 10
    p = probs(h, w)
    m = target_maps(p, h, w)
    region = (0.25, 0.1, 0.75, 0.6)
    hard = torch.zeros(h, w)
    hard[int(0.1 * h):int(0.6 * h), int(0.25 * w):int(0.75 * w)] = 1.0       # rows 0:4, cols 2:7
    out = bend_one(p, h, w, mode="regional_mask", region=region, region_feather=0.0)
    check_only_target_changed(p, out, m * hard, h, w)
    f = max(1, int(0.3 * min(h, w)))                                           # 2 → kernel 5, σ = 1
    soft = conv_zero_padded(hard[None], formula_kernel(2 * f + 1, f / 2))[0]
    soft = soft / soft.max()
    out = bend_one(p, h, w, mode="regional_mask", region=region, region_feather=0.3)
    check_only_target_changed(p, out, m * soft, h, w)


def test_regional_mask_without_a_region_leaves_the_map_unchanged():
    p = probs()
    for feather in (0.0, 0.1, 0.5):
        out = bend_one(p, mode="regional_mask", region_feather=feather)
        assert torch.equal(out, p)
    # a full-frame region with a feather is not the same thing: the feather darkens the borders
    full = bend_one(p, mode="regional_mask", region=(0.0, 0.0, 1.0, 1.0), region_feather=0.3)
    assert (target_maps(full)[:, 0, 0] < target_maps(p)[:, 0, 0]).all()


def test_frequency_filter_fft():
    h, w = 8, 8
    jj = torch.arange(w, dtype=torch.float32)
    low = torch.cos(2 * math.pi * 1 * jj / w).expand(h, w)     # 1/8 cycle/px = 0.25 of Nyquist
    high = torch.cos(2 * math.pi * 3 * jj / w).expand(h, w)    # 3/8 = 0.75 of Nyquist
    base = 0.5 + 0.1 * (low + high)
    p = torch.full((1, h * w, 3), 0.25)
    p[0, :, TARGET] = base.reshape(-1)
    out = bend_one(p, h, w, mode="frequency_filter", filter="lowpass", cutoff=0.5)
    check_only_target_changed(p, out, (0.5 + 0.1 * low)[None], h, w, atol=1e-5)
    out = bend_one(p, h, w, mode="frequency_filter", filter="highpass", cutoff=0.5)
    check_only_target_changed(p, out, (0.1 * high)[None], h, w, atol=1e-5)
    # cutoff 0: lowpass keeps only the mean, highpass removes only the mean
    q = probs()
    m = target_maps(q)
    mean = m.mean(dim=(1, 2), keepdim=True)
    out = bend_one(q, mode="frequency_filter", filter="lowpass", cutoff=0.0)
    check_only_target_changed(q, out, mean.expand_as(m), atol=1e-6)
    out = bend_one(q, mode="frequency_filter", filter="highpass", cutoff=0.0)
    check_only_target_changed(q, out, m - mean, atol=1e-6)


def test_frequency_filter_placeholder():
    p = probs()
    m = target_maps(p)
    out = bend_one(p, mode="frequency_filter", sigma=0.5, sharpen_amount=1.0, kernel_size=3)   # sigma < 1: sharpen
    check_only_target_changed(p, out, m + (m - conv_zero_padded(m, formula_kernel(3, 0.5))))
    out = bend_one(p, mode="frequency_filter", sigma=1.5, kernel_size=5)                        # else: blur
    check_only_target_changed(p, out, conv_zero_padded(m, formula_kernel(5, 1.5)))


# --- renormalisation, filters, grid -------------------------------------------------------------------

def test_row_renormalisation():
    p = probs()
    out = bd.bend_probs(p, {"kiss": [TARGET]}, (H, W), [{"token": "kiss", "mode": "scale", "scale_factor": 4.0}])
    torch.testing.assert_close(out.sum(-1), torch.ones(BH, H * W))
    # the same as dividing the scaled P by its row sums
    scaled = p.clone()
    scaled[:, :, TARGET] *= 4.0
    torch.testing.assert_close(out, scaled / scaled.sum(-1, keepdim=True))


def test_row_renormalisation_once_after_all_entries():
    p = probs()
    entries = [{"token": "kiss", "mode": "scale", "scale_factor": 2.0, "renormalize": "none"},
               {"token": "sunset", "mode": "scale", "scale_factor": 3.0, "renormalize": "row"}]
    out = bd.bend_probs(p, {"kiss": [1], "sunset": [3]}, (H, W), entries)
    scaled = p.clone()
    scaled[:, :, 1] *= 2.0
    scaled[:, :, 3] *= 3.0
    torch.testing.assert_close(out, scaled / scaled.sum(-1, keepdim=True))


def test_column_renormalisation():
    p = probs()
    out = bend_one(p, mode="blur", renormalize="column")
    torch.testing.assert_close(out[:, :, TARGET].sum(-1), torch.ones(BH))
    blurred = conv_zero_padded(target_maps(p), formula_kernel(3, 1.0)).reshape(BH, -1)
    torch.testing.assert_close(out[:, :, TARGET], blurred / blurred.sum(-1, keepdim=True))
    others = [j for j in range(T) if j != TARGET]
    assert torch.equal(out[:, :, others], p[:, :, others])
    # a column that vanishes is left undivided (no NaN)
    gone = bend_one(p, mode="regional_mask", region=(0.5, 0.5, 0.5, 0.5), region_feather=0.0,
                    renormalize="column")
    assert torch.count_nonzero(gone[:, :, TARGET]) == 0 and torch.isfinite(gone).all()


def test_several_entries_apply_in_order_and_sub_tokens_each():
    p = probs()
    entries = [{"token": "sunset", "mode": "flip", "flip_horizontal": True, "renormalize": "none"},
               {"token": "sunset", "mode": "scale", "scale_factor": 2.0, "renormalize": "none"}]
    out = bd.bend_probs(p, {"sunset": [1, 2]}, (H, W), entries)
    for j in (1, 2):
        expected = torch.flip(p[:, :, j].reshape(BH, H, W), [2]) * 2.0
        torch.testing.assert_close(out[:, :, j].reshape(BH, H, W), expected)
    assert torch.equal(out[:, :, [0, 3, 4]], p[:, :, [0, 3, 4]])


def test_entry_filters():
    s = BendSpec("a", "flip", apply_to_timesteps=(2, 5), apply_to_layers=(0, 3))
    # both ends inclusive, as the original's start <= step <= end
    assert [bd.entry_active(s, step, 0) for step in range(7)] == [False, False, True, True, True, True, False]
    assert sum(bd.entry_active(BendSpec("a", "flip", apply_to_timesteps=(0, 25)), step) for step in range(50)) == 26
    assert [bd.entry_active(BendSpec("a", "flip", apply_to_timesteps=(3, 3)), step) for step in range(5)] == \
        [False, False, False, True, False]
    assert [bd.entry_active(s, 3, layer) for layer in range(5)] == [True, False, False, True, False]
    assert bd.entry_active(BendSpec("a", "flip"))
    with pytest.raises(ValueError, match="step index"):
        bd.entry_active(s, None, 0)
    p = probs()
    entry = {"token": "kiss", "mode": "flip", "flip_horizontal": True, "apply_to_timesteps": [1, 2],
             "apply_to_layers": [4]}
    assert bd.bend_probs(p, {"kiss": [TARGET]}, (H, W), [entry], step_index=0, layer_index=4) is p
    assert bd.bend_probs(p, {"kiss": [TARGET]}, (H, W), [entry], step_index=3, layer_index=4) is p
    assert bd.bend_probs(p, {"kiss": [TARGET]}, (H, W), [entry], step_index=1, layer_index=3) is p
    assert not torch.equal(bd.bend_probs(p, {"kiss": [TARGET]}, (H, W), [entry], step_index=1, layer_index=4), p)


def test_grid_for():
    assert bd.grid_for(4096, (64, 64)) == (64, 64)
    assert bd.grid_for(16 * 16, (64, 64)) == (16, 16)
    assert bd.grid_for(13 * 19, (100, 150)) == (13, 19)              # ceil halvings of an odd-sized latent
    assert bd.grid_for(2 * 30 * 52, (60, 104), frames=2) == (30, 52)  # video: per-frame grid, DiT patch 2
    # fallback: the most square factorisation, h ≤ w
    assert bd.grid_for(12) == (3, 4)
    assert bd.grid_for(36) == (6, 6)
    assert bd.grid_for(13) == (1, 13)
    assert bd.grid_for(24, (64, 64)) == (4, 6)                        # latent known but nothing fits
    with pytest.raises(ValueError):
        bd.grid_for(10, frames=3)


def test_video_frames_are_transformed_separately():
    frames, h, w = 2, 4, 4
    p = torch.softmax(torch.randn(2, frames * h * w, 3), dim=-1)
    out = bd.bend_probs(p, {"kiss": [1]}, (h, w),
                        [{"token": "kiss", "mode": "flip", "flip_horizontal": True, "renormalize": "none"}],
                        frames=frames)
    expected = torch.flip(p[:, :, 1].reshape(2, frames, h, w), [3]).reshape(2, -1)
    torch.testing.assert_close(out[:, :, 1], expected)


# --- attention and token targeting ---------------------------------------------------------------------

def test_attention_with_bending_matches_explicit_attention():
    g = torch.Generator().manual_seed(5)
    b, heads, d, S, n_text = 2, 2, 4, 16, 5
    q = torch.randn(b, S, heads * d, generator=g)
    k = torch.randn(b, n_text, heads * d, generator=g)
    v = torch.randn(b, n_text, heads * d, generator=g)
    ref = torch.nn.functional.scaled_dot_product_attention(
        *(t.reshape(b, -1, heads, d).transpose(1, 2) for t in (q, k, v))).transpose(1, 2).reshape(b, S, heads * d)
    torch.testing.assert_close(ba.attention_with_bending(q, k, v, heads), ref, atol=1e-5, rtol=1e-5)

    entry = {"token": "kiss", "mode": "flip", "flip_vertical": True, "renormalize": "none"}
    seen = []
    out = ba.attention_with_bending(q, k, v, heads, [entry], {"kiss": [2]}, (4, 4), bend_batch=[1],
                                    observe=lambda before, after: seen.append((before, after)))
    before, after = seen[0]
    per_item = before.view(b, heads, S, n_text)
    expected = per_item.clone()
    expected[1, :, :, 2] = torch.flip(per_item[1, :, :, 2].reshape(heads, 4, 4), [1]).reshape(heads, S)
    torch.testing.assert_close(after.view(b, heads, S, n_text), expected)
    vh = v.reshape(b, n_text, heads, d).transpose(1, 2)
    torch.testing.assert_close(out, (expected @ vh).transpose(1, 2).reshape(b, S, heads * d))
    assert torch.allclose(out[0], ref[0], atol=1e-5)               # item 0 (unconditional) untouched
    # phase 1: the bent maps are observed but not used
    shown = ba.attention_with_bending(q, k, v, heads, [entry], {"kiss": [2]}, (4, 4), apply=False)
    torch.testing.assert_close(shown, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("renormalize", ["row", "column", "none"])
@pytest.mark.parametrize("token", ["kiss", "ALL"])
def test_bent_output_equals_explicit_bent_attention(renormalize, token):
    """Host output + correction of the bent columns == softmax → bend_probs → ·V, for joint attention
    ([text; image] keys, image queries bent) with the logits computed in several query chunks."""
    g = torch.Generator().manual_seed(7)
    b, heads, d, n_text, h, w = 2, 3, 8, 5, 4, 6
    L = n_text + h * w
    q, k, v = (torch.randn(b, heads, L, d, generator=g) * 2 for _ in range(3))
    probs = torch.softmax(q @ k.transpose(-1, -2) * d ** -0.5, dim=-1)                  # [b, heads, L, L]
    out = probs @ v
    entries = [{"token": token, "mode": "translate", "translate_x": 0.5, "renormalize": "none"},
               {"token": token, "mode": "scale", "scale_factor": 3.0, "renormalize": renormalize}]
    image, text = slice(n_text, None), slice(0, n_text)
    block = probs[:, :, image, text].reshape(b * heads, h * w, n_text)
    bent_block = bd.bend_probs(block, {"kiss": [1, 3]}, (h, w), entries)
    expected = probs.clone()
    expected[:, :, image, text] = bent_block.view(b, heads, h * w, n_text)
    if renormalize == "row":               # bend_probs renormalised over the text keys; over all keys here
        expected[:, :, image, text] = bd.bend_probs(block, {"kiss": [1, 3]}, (h, w), entries[:1] + [
            {**entries[1], "renormalize": "none"}]).view(b, heads, h * w, n_text)
        expected[:, :, image] /= expected[:, :, image].sum(-1, keepdim=True)
    seen = []
    host = out.clone()
    got = ba.bent_output(host, q, k, v, entries, {"kiss": [1, 3]}, (h, w), text=text, queries=image,
                         chunk_elements=b * heads * L * 7, observe=lambda p, pb: seen.append((p, pb)))
    assert got is host                                                   # in place: no copy of the output
    torch.testing.assert_close(got, expected @ v, atol=1e-4, rtol=1e-4)      # |v| ~ 2: float32 rounding
    assert torch.equal(got[:, :, text], out[:, :, text])                 # text queries: the host's output
    columns = list(range(n_text)) if token == "ALL" else [1, 3]
    torch.testing.assert_close(seen[0][0], block[..., columns])          # the columns it saw
    # nothing active: the host's output itself
    assert ba.bent_output(out, q, k, v, [{**entries[0], "strength": 0}], {}, (h, w), text=text, queries=image) is out


def test_parse_marked_prompt():
    assert tk.parse_marked_prompt("a romantic {kiss} at {sunset}") == ("a romantic kiss at sunset", ["kiss", "sunset"])
    assert tk.parse_marked_prompt("a {red car} on a road") == ("a red car on a road", ["red car"])
    assert tk.parse_marked_prompt("no marks") == ("no marks", [])
    # emphasis is the host's: parentheses, weights and escapes pass through untouched
    assert tk.parse_marked_prompt("a (lake:1.2) at {(sunset:1.3)}, \\(b\\)") == \
        ("a (lake:1.2) at (sunset:1.3), \\(b\\)", ["(sunset:1.3)"])
    assert tk.parse_marked_prompt("a {red|blue} car") == ("a {red|blue} car", [])     # a dynamic-prompt choice


SUBWORDS = {"a": ["a</w>"], "romantic": ["romantic</w>"], "kiss": ["kiss</w>"], "at": ["at</w>"],
            "sunset": ["sun", "set</w>"], "dog": ["dog</w>"], "cat": ["cat</w>"]}


def fake_tokenize(text):
    return [piece for word in text.split() for piece in SUBWORDS[word]]


def test_token_indices_for_sub_tokens_and_errors():
    clean, words = tk.parse_marked_prompt("a romantic {kiss} at {sunset}")
    tokens = ["<|startoftext|>"] + fake_tokenize(clean) + ["<|endoftext|>"] * 3
    assert tk.token_indices_for("kiss", tokens, fake_tokenize) == [3]
    assert tk.token_indices_for("sunset", tokens, fake_tokenize) == [5, 6]
    assert tk.token_indices_for("sunset", tokens, fake_tokenize, first_only=True) == [5]
    assert tk.token_columns(words, tokens, fake_tokenize) == {"kiss": [3], "sunset": [5, 6]}
    with pytest.raises(ValueError, match=r"Token not found: 'dog'"):
        tk.token_indices_for("dog", tokens, fake_tokenize)
    # the first occurrence; ids work as well as strings
    ids = [49406, 320, 2102, 320, 49407]
    assert tk.token_indices_for("a", ids, lambda word: [320]) == [1]
    with pytest.raises(ValueError, match="Token not found"):
        bd.bend_probs(probs(), {}, (H, W), [{"token": "kiss", "mode": "flip"}])




def test_comma_groups_and_wildcards():
    tokens = ["<|startoftext|>"] + fake_tokenize("a romantic kiss at sunset") + ["<|endoftext|>"] * 3
    # a group: the members found in the prompt, each column bent by the one entry; missing members skipped
    assert tk.token_columns(["kiss, sunset, dog"], tokens, fake_tokenize) == {"kiss, sunset, dog": [3, 5, 6]}
    with pytest.raises(ValueError, match="Token not found: no word of the group 'dog, cat'"):
        tk.token_columns(["dog, cat"], tokens, fake_tokenize)
    # a wildcard needs no lookup: it is every key column of the call
    for wildcard in ("ALL", "*", "all", "AllTokens"):
        assert tk.token_columns([wildcard], tokens, fake_tokenize) == {}
        assert tk.columns_for(wildcard, {}, 9) == list(range(9))
    p = probs()
    group = bd.bend_probs(p, {"kiss, sunset": [1, 3]}, (H, W),
                          [{"token": "kiss, sunset", "mode": "flip", "flip_horizontal": True, "renormalize": "none"}])
    for j in range(T):
        expected = torch.flip(target_maps(p, j=j), [2]) if j in (1, 3) else target_maps(p, j=j)
        torch.testing.assert_close(target_maps(group, j=j), expected)
    every = bd.bend_probs(p, {}, (H, W), [{"token": "*", "mode": "scale", "scale_factor": 2.0, "renormalize": "none"}])
    torch.testing.assert_close(every, 2 * p)


def test_bending_imports_only_torch_stdlib_and_the_runtime():
    import sys
    assert imported_roots(bd.__file__) - {"torch", "."} <= set(sys.stdlib_module_names)
