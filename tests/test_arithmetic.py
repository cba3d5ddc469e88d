"""The bake's arithmetic equals torch's `(t.float() * s).to(dtype)` byte for byte, edge values included."""

import pytest
import torch

from ckptbend.arithmetic import scale_bytes, to_float64
from ckptbend.plan import Segment

DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64,
          "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}


def edge_values(dtype):
    info = torch.finfo(dtype)
    special = [0.0, -0.0, info.tiny, -info.tiny, info.tiny / 4, info.max, -info.max, info.max / 1.5, 1.0, -1.0,
               info.eps, 1 + info.eps]
    if dtype.itemsize > 1:
        special += [float("inf"), float("-inf")]
    g = torch.Generator().manual_seed(0)
    values = torch.cat([torch.tensor(special, dtype=torch.float64),
                        torch.randn(4000, generator=g, dtype=torch.float64) * 0.05,
                        torch.randn(4000, generator=g, dtype=torch.float64) * 300])
    return values.to(dtype)


def torch_reference(t, factors, rows=None):
    work = t.to(torch.float64 if t.dtype == torch.float64 else torch.float32)
    part = work if rows is None else work[rows[0]:rows[1]]
    for f in factors:
        part.mul_(f)
    if t.dtype.itemsize == 1:
        info = torch.finfo(t.dtype)
        work.clamp_(info.min, info.max)
    return work.to(t.dtype)


@pytest.mark.parametrize("name", DTYPES)
@pytest.mark.parametrize("factors", [(1.1,), (0.37,), (2.0, 0.5), (1.3, 0.9, 1.7), (9.99,), (0.0,)])
def test_matches_torch_for_every_value(name, factors):
    t = edge_values(DTYPES[name])
    raw = bytearray(t.view(torch.uint8).numpy().tobytes())
    out = scale_bytes(raw, name, tuple(t.shape), [Segment(None, factors, ())])
    expected = torch_reference(t, factors)
    got = torch.frombuffer(out, dtype=t.dtype)
    same = got.view(torch.uint8).reshape(-1, t.dtype.itemsize) == expected.view(torch.uint8).reshape(-1, t.dtype.itemsize)
    both_nan = torch.isnan(got.float()) & torch.isnan(expected.float())
    assert bool((same.all(dim=1) | both_nan).all())


@pytest.mark.parametrize("name", DTYPES)
def test_row_segments_scale_only_their_rows(name):
    g = torch.Generator().manual_seed(1)
    t = (torch.randn(9, 4, generator=g) * 0.1).to(DTYPES[name])
    raw = bytearray(t.view(torch.uint8).numpy().tobytes())
    segments = [Segment((0, 3), (1.5,), ()), Segment((6, 9), (0.25, 3.0), ())]
    got = torch.frombuffer(scale_bytes(raw, name, (9, 4), segments), dtype=t.dtype).reshape(9, 4)
    expected = torch_reference(torch_reference(t, (1.5,), (0, 3)), (0.25, 3.0), (6, 9))
    assert torch.equal(got.view(torch.uint8), expected.view(torch.uint8))
    assert torch.equal(got[3:6].view(torch.uint8), t[3:6].view(torch.uint8))


@pytest.mark.parametrize("name", DTYPES)
def test_decoding_matches_torch(name):
    t = edge_values(DTYPES[name])
    decoded = to_float64(t.view(torch.uint8).numpy().tobytes(), name, tuple(t.shape))
    expected = t.to(torch.float64).numpy()
    assert ((decoded == expected) | (decoded != decoded) & (expected != expected)).all()


@pytest.mark.parametrize("name", DTYPES)
def test_column_segments_scale_only_their_columns(name):
    """Flux single blocks: only linear2's attention input columns are scaled; the MLP columns keep their bytes."""
    g = torch.Generator().manual_seed(2)
    t = (torch.randn(5, 12, generator=g) * 0.1).to(DTYPES[name])
    raw = bytearray(t.view(torch.uint8).numpy().tobytes())
    got = torch.frombuffer(scale_bytes(raw, name, (5, 12), [Segment(None, (1.7,), (), cols=(0, 4))]),
                           dtype=t.dtype).reshape(5, 12)
    expected = torch_reference(t.t().contiguous(), (1.7,), (0, 4)).t()
    assert torch.equal(got.view(torch.uint8), expected.contiguous().view(torch.uint8))
    assert torch.equal(got[:, 4:].view(torch.uint8), t[:, 4:].view(torch.uint8))


@pytest.mark.parametrize("name", ["F16", "BF16"])
def test_table_look_up_in_steps_covers_every_element(name):
    """16-bit tensors are looked up LOOKUP_STEP elements at a time: a tensor of several steps plus a
    remainder, cut by a row range that starts and ends inside steps, still equals torch everywhere."""
    from ckptbend.arithmetic import LOOKUP_STEP

    rows, cols = 7, LOOKUP_STEP // 3 + 5
    g = torch.Generator().manual_seed(2)
    t = (torch.randn(rows, cols, generator=g) * 3).to(DTYPES[name])
    raw = bytearray(t.view(torch.uint8).numpy().tobytes())
    got = torch.frombuffer(scale_bytes(raw, name, (rows, cols), [Segment((1, 6), (1.7,), ())]), dtype=t.dtype)
    expected = torch_reference(t, (1.7,), (1, 6))
    assert torch.equal(got.view(torch.uint8), expected.reshape(-1).view(torch.uint8))


@pytest.mark.parametrize("name", ["F32", "F16", "BF16", "F64", "F8_E4M3"])
def test_offset_scales_w_plus_offset(name):
    """A weight used as (w + 1) (Gemma 3's qk-norm): w' = f·(w + 1) − 1 in float32, then rounded once."""
    t = edge_values(DTYPES[name])[12:2000]            # finite values
    raw = bytearray(t.view(torch.uint8).numpy().tobytes())
    got = torch.frombuffer(scale_bytes(raw, name, tuple(t.shape), [Segment(None, (1.3, 0.9), (), None, 1.0)]),
                           dtype=t.dtype)
    work = t.to(torch.float64 if t.dtype == torch.float64 else torch.float32)
    expected = ((work + 1) * 1.3 * 0.9 - 1)
    if t.dtype.itemsize == 1:
        expected = expected.clamp(torch.finfo(t.dtype).min, torch.finfo(t.dtype).max)
    assert torch.equal(got.view(torch.uint8), expected.to(t.dtype).view(torch.uint8))
