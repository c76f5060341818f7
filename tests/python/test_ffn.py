"""bpt.blockwise_ffn against the naive fp64 SwiGLU: values and all gradients."""

import pytest
import torch

import reference

ffn = torch.ops.bpt.blockwise_ffn


def weights(D, F, dtype=torch.float64):
    make = lambda *s: (torch.randn(*s, dtype=dtype) / s[-1] ** 0.5).requires_grad_()  # noqa: E731
    return make(F, D), make(F, D), make(D, F)


@pytest.mark.parametrize("chunk", [-1, 1, 5, 16, 1000], ids=lambda c: f"chunk={c}")
def test_matches_reference_values_and_gradients(chunk):
    x = torch.randn(3, 7, 16, dtype=torch.float64, requires_grad=True)  # 21 tokens: not a multiple of 5 or 16
    w = weights(16, 40)
    y = ffn(x, *w, chunk=chunk)
    ref = reference.swiglu(x, *w)
    torch.testing.assert_close(y, ref, rtol=1e-12, atol=1e-12)
    g = torch.randn_like(y)
    got = torch.autograd.grad((y * g).sum(), (x, *w))
    want = torch.autograd.grad((ref * g).sum(), (x, *w))
    for name, a, b in zip(["x", "w_gate", "w_up", "w_down"], got, want):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10, msg=lambda m: f"grad_{name}: {m}")


def test_fp32_and_bf16_within_tolerance():
    for dtype, tol in [(torch.float32, 1e-4), (torch.bfloat16, 5e-2)]:
        x = torch.randn(40, 64, dtype=dtype, requires_grad=True)
        w = weights(64, 96, dtype)
        y = ffn(x, *w, chunk=16)
        assert y.dtype == dtype
        ref = reference.swiglu(x, *w)
        torch.testing.assert_close(y.double(), ref, rtol=tol, atol=tol)
        g = torch.randn_like(ref)
        got = torch.autograd.grad((y.double() * g).sum(), (x, *w))
        want = torch.autograd.grad((ref * g).sum(), (x, *w))
        for a, b in zip(got, want):
            assert a.dtype == dtype
            # Relative to the gradient's scale: bf16 weight grads sum 40 rounded products.
            assert (a.double() - b.double()).abs().max() <= tol * max(1.0, b.abs().max().item())


def test_gradcheck_fp64():
    x = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    w = weights(4, 6)
    assert torch.autograd.gradcheck(lambda *a: ffn(*a, chunk=2), (x, *w))


def test_opcheck():
    x = torch.randn(2, 5, 8, requires_grad=True)
    torch.library.opcheck(ffn.default, (x, *weights(8, 12, torch.float32)), {"chunk": 3})


def test_torch_compile_backward():
    f = lambda x, a, b, c: ffn(x, a, b, c, chunk=4).sum()  # noqa: E731
    x = torch.randn(10, 8, requires_grad=True)
    w = weights(8, 12, torch.float32)
    got = torch.autograd.grad(torch.compile(f, backend="aot_eager", fullgraph=True)(x, *w), (x, *w))
    want = torch.autograd.grad(f(x, *w), (x, *w))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize(
    "x_shape, shapes, chunk, message",
    [
        ((4, 8), [(12, 7), (12, 8), (8, 12)], 2, r"w_gate.size\(1\) must be 8"),
        ((4, 8), [(12, 8), (11, 8), (8, 12)], 2, "w_up must have w_gate's shape"),
        ((4, 8), [(12, 8), (12, 8), (12, 8)], 2, r"w_down must be \[D, F\] = \[8, 12\]"),
        ((4, 8), [(12, 8), (12, 8), (8, 12)], 0, "chunk must be a positive block size or -1"),
        ((4, 8), [(12, 8), (12,), (8, 12)], 2, r"w_up must be \[F, D\]"),
    ],
)
def test_bad_arguments_name_the_problem(x_shape, shapes, chunk, message):
    with pytest.raises(RuntimeError, match=message):
        ffn(torch.randn(x_shape), *(torch.randn(s) for s in shapes), chunk=chunk)


def test_zero_model_dim_and_mismatched_grad_are_rejected():
    with pytest.raises(RuntimeError, match="D > 0"):
        ffn(torch.randn(4, 0), torch.randn(3, 0), torch.randn(3, 0), torch.randn(0, 3), chunk=2)
    x = torch.randn(4, 8)
    w = weights(8, 12, torch.float32)
    with pytest.raises(RuntimeError, match="grad_out must have x's shape"):
        torch.ops.bpt.blockwise_ffn_backward(torch.randn(4, 7), x, *w, chunk=2)
