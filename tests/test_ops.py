"""The compiled ops against the reference: masks bit-identical, surgered images exact."""

import math
import subprocess
import sys
import warnings

import pytest
import torch

import pssr.ops as ops
from pssr.ops import reference

pytestmark = pytest.mark.skipif(not ops.EXTENSION_LOADED, reason="compiled extension not built")

SHAPES = [
    (1, 1, 1, 1),
    (2, 3, 1, 7),
    (3, 1, 9, 1),
    (257, 1, 5, 3),
    (256, 1, 28, 28),
    (64, 3, 32, 32),
    (1, 3, 13, 17),
    (5, 2, 6, 6),  # a channel count without a specialised loop
    (2, 3, 224, 224),
]


def gen(seed):
    return torch.Generator().manual_seed(seed)


def random_pair(shape, dtype, device, seed=0, kind="normal"):
    g = gen(seed)
    x = torch.rand(shape, generator=g, dtype=torch.float64)
    if kind == "normal":
        grad = torch.randn(shape, generator=g, dtype=torch.float64) * 1e-3
    elif kind == "integer":  # many exact ties, and scores exactly at tau
        grad = torch.randint(-3, 4, shape, generator=g).double()
    elif kind == "wide":  # scores spread over many binades (exercises every radix digit)
        grad = torch.randn(shape, generator=g, dtype=torch.float64) * torch.exp2(torch.randint(-60, 60, shape, generator=g).double())
    else:
        raise ValueError(kind)
    return x.to(device=device, dtype=dtype), grad.to(device=device, dtype=dtype)


def assert_matches_reference(x, grad, **kw):
    x_s, m = ops.pixel_surgery(x, grad, **kw)
    r_s, r_m = reference.pixel_surgery(x, grad, **kw)
    assert m.dtype == torch.bool and m.shape == (x.shape[0], 1, *x.shape[2:])
    assert torch.equal(m, r_m), f"mask differs at {(m != r_m).nonzero()[:5].tolist()}"
    assert x_s.dtype == x.dtype and x_s.shape == x.shape
    torch.testing.assert_close(x_s, r_s, rtol=0, atol=0, equal_nan=True)
    return m


def float_dtypes(device):
    return [torch.float32, torch.float64] + ([torch.float16, torch.bfloat16] if device.type == "cuda" else [])


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("mode", ["mean", "topk"])
@pytest.mark.parametrize("reduce", ["max", "sum"])
def test_matches_reference_on_random_inputs(device, shape, mode, reduce):
    for dtype in float_dtypes(device):
        for kind in ("normal", "integer"):
            x, grad = random_pair(shape, dtype, device, seed=sum(shape), kind=kind)
            assert_matches_reference(x, grad, mode=mode, reduce=reduce, alpha=1.0, ratio=0.2)


@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0, 1.5, 3.0])
@pytest.mark.parametrize("ratio", [0.0, 0.001, 0.2, 0.5, 0.999, 1.0])
def test_matches_reference_across_knobs(device, alpha, ratio):
    x, grad = random_pair((8, 3, 17, 19), torch.float32, device, seed=7, kind="integer")
    assert_matches_reference(x, grad, mode="mean", alpha=alpha, fill=0.5)
    m = assert_matches_reference(x, grad, mode="topk", ratio=ratio, fill=-1.0)
    assert (m.flatten(1).sum(1) == ops.topk_count(ratio, 17, 19)).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_topk_radix_select_on_wide_and_special_values(device, dtype):
    # scores over 120 binades, plus zeros, subnormals, infinities and NaN: every digit of the
    # radix select and every branch of the tie rule
    x, grad = random_pair((16, 3, 31, 33), dtype, device, seed=3, kind="wide")
    grad[0] = 0.0
    grad[1, :, :4] = torch.finfo(dtype).tiny / 4  # subnormal
    grad[2, 0, 5, :] = math.inf
    grad[3, 1, ::3, ::5] = math.nan
    grad[4] = -0.0
    grad[5, :, :, :16] = 1.0  # a wide tie straddling k
    for ratio in (0.0, 0.01, 0.3, 0.7, 1.0):
        assert_matches_reference(x, grad, mode="topk", ratio=ratio)
    assert_matches_reference(x, grad, mode="mean")


def test_values_exactly_at_and_next_to_the_threshold(device):
    # Scores [t, t+u, t-u, t] have mean exactly t; alpha just above/below 1 moves tau by less
    # than one float32 ulp: only a float64 compare gets every pixel right.
    for t in (1.7, 0.3, 7.5e-5, 3.0e20):  # not powers of two: equal ulps above and below
        t32 = torch.tensor(t, dtype=torch.float32)
        up = torch.nextafter(t32, torch.tensor(math.inf))
        down = torch.nextafter(t32, torch.tensor(0.0))
        assert up - t32 == t32 - down
        s = torch.stack([t32, up, down, t32])
        grad = s.reshape(1, 1, 1, 4).to(device)
        x = torch.ones_like(grad)
        expected = {1.0: [False, True, False, False], 1 + 2**-30: [False, True, False, False], 1 - 2**-30: [True, True, False, True]}
        for alpha, want in expected.items():
            m = assert_matches_reference(x, grad, alpha=alpha)
            assert m.flatten().tolist() == want, (t, alpha)


def test_zero_constant_and_nonfinite_gradients(device):
    x = torch.rand(4, 3, 10, 10, device=device)
    for g in (torch.zeros_like(x), torch.full_like(x, 0.25)):
        assert not assert_matches_reference(x, g).any()
        assert (assert_matches_reference(x, g, mode="topk", ratio=0.3).flatten(1).sum(1) == 30).all()
    g = torch.randn_like(x)
    g[0, 1, 2, 3] = math.nan
    g[1, 0, 0, 0] = -math.inf
    g[2] = math.nan  # no finite score: the whole image goes
    m = assert_matches_reference(x, g)
    assert m[0, 0, 2, 3] and m[1, 0, 0, 0] and m[2].all()
    assert_matches_reference(x, g, mode="topk", ratio=0.1)


def test_noncontiguous_and_channels_last_inputs(device):
    x, grad = random_pair((6, 3, 20, 24), torch.float32, device, seed=11)
    assert_matches_reference(x[:, :, ::2, 1::2], grad[:, :, ::2, 1::2])
    assert_matches_reference(x.transpose(2, 3), grad.transpose(2, 3), mode="topk")
    cl = dict(memory_format=torch.channels_last)
    assert_matches_reference(x.contiguous(**cl), grad.contiguous(**cl))
    assert_matches_reference(x[::2], grad.contiguous(**cl)[::2], mode="topk")


def test_empty_batches(device):
    for shape in [(0, 3, 4, 4), (2, 3, 0, 5)]:
        x = torch.rand(shape, device=device)
        for mode in ("mean", "topk"):
            x_s, m = ops.pixel_surgery(x, x, mode=mode)
            assert x_s.shape == shape and m.shape == (shape[0], 1, *shape[2:])
    no_channels = torch.rand(2, 0, 4, 4, device=device)
    with pytest.raises(ValueError, match="at least one channel"):
        ops.pixel_surgery(no_channels, no_channels)
    with pytest.raises(RuntimeError, match="at least one channel"):
        torch.ops.pssr.saliency_score(no_channels, "max")


def test_threshold_overflow_to_infinity(device):
    # alpha * mean overflows float64: tau = +Inf and nothing is strictly above it, +Inf included
    grad = torch.tensor([100.0, math.inf, 1.0, 3.0]).reshape(1, 1, 1, 4)
    for dtype in float_dtypes(device):
        g = grad.to(device=device, dtype=dtype)
        assert not assert_matches_reference(torch.ones_like(g), g, alpha=1e307).any()
        # tau finite but above float32's largest value: only the +Inf pixel goes
        m = assert_matches_reference(torch.ones_like(g), g, alpha=3.0e38 / 26.0)
        assert m.flatten().tolist() == [False, True, False, False]


@pytest.mark.parametrize("reduce", ["max", "sum"])
def test_saliency_score_matches_reference(device, reduce):
    for dtype in float_dtypes(device):
        _, grad = random_pair((9, 3, 15, 16), dtype, device, seed=5, kind="wide")
        grad[0, 0, 0, 0] = math.nan
        s = ops.saliency_score(grad, reduce)
        r = reference.saliency_score(grad, reduce)
        assert s.dtype == r.dtype == (torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype)
        torch.testing.assert_close(s, r, rtol=0, atol=0)


def test_gradient_is_one_minus_mask(device):
    x, grad = random_pair((3, 3, 6, 7), torch.float64, device, seed=2)
    x.requires_grad_()
    grad.requires_grad_()
    for mode in ("mean", "topk"):
        assert torch.autograd.gradcheck(lambda t: ops.pixel_surgery(t, grad, mode=mode)[0], (x,))
        x_s, m = ops.pixel_surgery(x, grad, mode=mode)
        gx, gg = torch.autograd.grad((x_s * 2).sum(), (x, grad), allow_unused=True)
        assert torch.equal(gx, 2.0 * (~m).expand_as(x).double())
        assert gg is None


def test_opcheck(device):
    x, grad = random_pair((4, 3, 8, 9), torch.float32, device, seed=4)
    x.requires_grad_()
    for mode, k in (("mean", 0), ("topk", 14)):
        torch.library.opcheck(torch.ops.pssr.pixel_surgery.default, (x, grad, 1.0, k, 0.0, mode, "max"))
    torch.library.opcheck(torch.ops.pssr.saliency_score.default, (grad, "sum"))


def test_meta_tensors_and_torch_compile():
    x = torch.empty(4, 3, 8, 8, device="meta")
    x_s, m = ops.pixel_surgery(x, x, mode="topk")
    assert x_s.shape == x.shape and m.shape == (4, 1, 8, 8) and m.dtype == torch.bool
    assert ops.saliency_score(x).shape == (4, 8, 8)

    def surgery(a, b):
        return ops.pixel_surgery(a, b, alpha=1.2)

    compiled = torch.compile(surgery, fullgraph=True)
    a, b = random_pair((5, 3, 12, 12), torch.float32, "cpu", seed=9)
    for got, want in zip(compiled(a, b), surgery(a, b)):
        assert torch.equal(got, want)


def test_bad_inputs_raise_clear_errors():
    x = torch.rand(2, 3, 4, 4)
    with pytest.raises(ValueError, match="shape"):
        ops.pixel_surgery(x, x[:, :1])
    with pytest.raises(ValueError, match=r"\(B, C, H, W\)"):
        ops.pixel_surgery(x[0], x[0])
    with pytest.raises(TypeError, match="dtype"):
        ops.pixel_surgery(x, x.double())
    with pytest.raises(TypeError, match="floating"):
        ops.pixel_surgery(x.int(), x.int())
    with pytest.raises(ValueError, match="same device"):
        ops.pixel_surgery(x, x.to("meta"))
    with pytest.raises(ValueError, match="mode"):
        ops.pixel_surgery(x, x, mode="median")
    # the op itself checks its arguments when called directly
    with pytest.raises(RuntimeError, match="k must be in"):
        torch.ops.pssr.pixel_surgery(x, x, 1.0, 17, 0.0, "topk", "max")
    with pytest.raises(RuntimeError, match="reduce must be"):
        torch.ops.pssr.saliency_score(x, "min")
    with pytest.raises(RuntimeError, match="alpha must be"):
        torch.ops.pssr.pixel_surgery(x, x, -1.0, 0, 0.0, "mean", "max")


def test_reference_fallback_warns_once(monkeypatch):
    from pssr.ops import _extension

    monkeypatch.setattr(_extension, "_warned", set())
    monkeypatch.setattr(ops, "has_kernel", lambda op, device: False)
    x, grad = random_pair((2, 3, 5, 5), torch.float32, "cpu", seed=1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = ops.pixel_surgery(x, grad)
        ops.pixel_surgery(x, grad)
        ops.saliency_score(grad)
    assert len([w for w in caught if "reference ops" in str(w.message)]) == 1
    assert torch.equal(got[1], reference.pixel_surgery(x, grad)[1])


def test_missing_extension_falls_back_in_a_fresh_process():
    code = (
        "import sys, warnings, torch; sys.modules['pssr._C'] = None\n"
        "import pssr.ops as ops\n"
        "assert not ops.EXTENSION_LOADED\n"
        "with warnings.catch_warnings(record=True) as w:\n"
        "    warnings.simplefilter('always')\n"
        "    x_s, m = ops.pixel_surgery(torch.rand(2, 1, 4, 4), torch.randn(2, 1, 4, 4), mode='topk')\n"
        "assert m.sum() == 8 and len(w) == 1, (m.sum(), [str(i.message) for i in w])\n"
        "print(w[0].message)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "could not be loaded" in out.stdout
