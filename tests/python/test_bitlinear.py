"""bpt.bitlinear (BitNet b1.58 fake quantization for training) against a reference written
here from BitNet's recipe: values, straight-through gradients, dtypes, opcheck.

The quantizers are step functions, so gradcheck's finite differences do not apply; the
gradients are checked against autograd through the reference's straight-through form.
"""

import pytest
import torch

from reference import activation_quant, weight_quant

bitlinear = torch.ops.bpt.bitlinear


def reference(x, w):
    """BitNet's straight-through form: values of the quantized, gradients of the identity."""
    xf, wf = x.float() if x.dtype != torch.float64 else x, w.float() if w.dtype != torch.float64 else w
    x_q = x + (activation_quant(xf).to(x.dtype) - x).detach()
    w_q = w + (weight_quant(wf).to(w.dtype) - w).detach()
    return x_q @ w_q.t()


@pytest.mark.parametrize("shape", [(7, 16), (2, 5, 33), (1, 1)])
def test_matches_reference_values_and_gradients(shape):
    x = torch.randn(*shape, dtype=torch.float64, requires_grad=True)
    w = torch.randn(9, shape[-1], dtype=torch.float64, requires_grad=True)
    y = bitlinear(x, w)
    ref = reference(x, w)
    torch.testing.assert_close(y, ref, rtol=1e-12, atol=1e-12)
    g = torch.randn_like(y)
    got = torch.autograd.grad((y * g).sum(), (x, w))
    want = torch.autograd.grad((ref * g).sum(), (x, w))
    for name, a, b in zip(["x", "weight"], got, want):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12, msg=lambda m: f"grad_{name}: {m}")


def test_values_are_ternary_weights_times_int8_activations():
    x, w = torch.randn(4, 32, dtype=torch.float64), torch.randn(6, 32, dtype=torch.float64)
    w_scale = w.abs().mean()
    x_scale = 127 / x.abs().amax(-1, keepdim=True)
    levels = torch.round(x * x_scale) @ torch.round(w / w_scale).clamp(-1, 1).t()  # integers
    torch.testing.assert_close(bitlinear(x, w) * x_scale / w_scale, levels, rtol=1e-12, atol=1e-9)
    assert torch.equal(levels, levels.round())


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 3e-2)])
def test_lower_precision(dtype, tol):
    x = torch.randn(12, 64, dtype=dtype, requires_grad=True)
    w = torch.randn(24, 64, dtype=dtype, requires_grad=True)
    y = bitlinear(x, w)
    assert y.dtype == dtype
    ref = reference(x, w)
    torch.testing.assert_close(y.double(), ref.double(), rtol=tol, atol=tol * ref.abs().max().item())
    g = torch.randn_like(y)
    for a, b in zip(torch.autograd.grad((y * g).sum(), (x, w)), torch.autograd.grad((ref * g).sum(), (x, w))):
        assert a.dtype == dtype
        assert (a.double() - b.double()).abs().max() <= tol * max(1.0, b.abs().max().item())


def test_zero_input_does_not_divide_by_zero():
    x = torch.zeros(3, 8, requires_grad=True)
    w = torch.zeros(4, 8, requires_grad=True)
    y = bitlinear(x, w)
    assert torch.equal(y, torch.zeros(3, 4))
    y.sum().backward()
    assert torch.isfinite(x.grad).all() and torch.isfinite(w.grad).all()


def test_opcheck():
    x = torch.randn(2, 5, 8, requires_grad=True)
    w = torch.randn(6, 8, requires_grad=True)
    torch.library.opcheck(bitlinear.default, (x, w))


def test_bad_arguments_are_named():
    with pytest.raises(RuntimeError, match=r"x.size\(-1\).*in_features K"):
        bitlinear(torch.randn(3, 8), torch.randn(4, 9))
    with pytest.raises(RuntimeError, match="weight"):
        bitlinear(torch.randn(3, 8), torch.randn(4, 8, dtype=torch.float64))
    with pytest.raises(RuntimeError, match=r"\[N, K\]"):
        bitlinear(torch.randn(3, 8), torch.randn(8))


def test_fp16_does_not_overflow_where_the_integer_sums_exceed_its_range():
    """K = 8192 with every activation at its int8 maximum: the level sums pass fp16's 65504."""
    x = torch.ones(2, 8192, dtype=torch.float16) * 4
    w = torch.ones(3, 8192, dtype=torch.float16) / 100
    y = bitlinear(x, w)
    assert torch.isfinite(y).all()
    torch.testing.assert_close(y.float(), bitlinear(x.float(), w.float()), rtol=1e-3, atol=0)
