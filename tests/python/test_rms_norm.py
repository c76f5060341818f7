"""bpt.rms_norm against the plain PyTorch expression (Hugging Face's LlamaRMSNorm)."""

import pytest
import torch

import bpt


def reference(x, weight, eps):
    """LlamaRMSNorm: normalise in fp32, round to the input dtype, then scale."""
    xf = x.float() if x.dtype != torch.float64 else x
    normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * normed.to(x.dtype)


SHAPES = [(1,), (3, 7), (2, 5, 64), (4, 3, 1000), (2, 4097)]


@pytest.mark.parametrize("shape", SHAPES)
def test_matches_expression_fp32(shape):
    x = torch.randn(shape)
    w = torch.randn(shape[-1])
    torch.testing.assert_close(bpt.rms_norm(x, w, 1e-6), reference(x, w, 1e-6), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("shape", SHAPES)
def test_matches_expression_bf16(shape):
    x = torch.randn(shape, dtype=torch.bfloat16)
    w = torch.randn(shape[-1], dtype=torch.bfloat16)
    # Same two roundings as the expression; fp32 sums in another order can flip the last bit.
    torch.testing.assert_close(bpt.rms_norm(x, w, 1e-6), reference(x, w, 1e-6), rtol=1.6e-2, atol=1e-2)


def test_gradients_match_expression_in_fp32_and_bf16():
    for dtype, tol in [(torch.float32, 1e-5), (torch.bfloat16, 3e-2)]:
        x = torch.randn(6, 96, dtype=dtype, requires_grad=True)
        w = torch.randn(96, dtype=dtype, requires_grad=True)
        g = torch.randn(6, 96, dtype=dtype)
        got = torch.autograd.grad(bpt.rms_norm(x, w, 1e-5), (x, w), g)
        # Reference gradients from fp64 math, compared in the tested dtype.
        x64, w64 = x.detach().double().requires_grad_(), w.detach().double().requires_grad_()
        want = torch.autograd.grad(reference(x64, w64, 1e-5), (x64, w64), g.double())
        for a, b in zip(got, want):
            assert a.dtype == dtype
            torch.testing.assert_close(a.double(), b, rtol=tol, atol=tol * 10)


def test_non_contiguous_input():
    x = torch.randn(8, 6, 32).transpose(0, 1)
    assert not x.is_contiguous()
    w = torch.randn(32)
    torch.testing.assert_close(bpt.rms_norm(x, w), reference(x, w, 1e-6))


def test_gradcheck_fp64():
    x = torch.randn(3, 4, 9, dtype=torch.float64, requires_grad=True)
    w = torch.randn(9, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: torch.ops.bpt.rms_norm(a, b, 1e-5), (x, w))


def test_opcheck():
    for dtype in (torch.float32, torch.float64, torch.bfloat16):
        x = torch.randn(4, 16, dtype=dtype, requires_grad=True)
        w = torch.randn(16, dtype=dtype, requires_grad=True)
        torch.library.opcheck(torch.ops.bpt.rms_norm.default, (x, w, 1e-6))


def test_fake_tensor_shapes():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        x = torch.empty(2, 3, 8)
        y = torch.ops.bpt.rms_norm(x, torch.empty(8), 1e-6)
        assert y.shape == (2, 3, 8) and y.dtype == torch.float32


def test_torch_compile_with_backward():
    def f(x, w):
        return torch.ops.bpt.rms_norm(x, w, 1e-6).sin().sum()

    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    x = torch.randn(5, 24, requires_grad=True)
    w = torch.randn(24, requires_grad=True)
    got = torch.autograd.grad(compiled(x, w), (x, w))
    want = torch.autograd.grad(f(x, w), (x, w))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize(
    "x, w, eps, message",
    [
        (torch.randn(4, 8), torch.ones(7), 1e-6, "weight.size(0) must be 8"),
        (torch.randn(4, 8), torch.ones(8, dtype=torch.float64), 1e-6, "weight must have the dtype of x"),
        (torch.randint(0, 3, (4, 8)), torch.ones(8), 1e-6, "x must be float32, float64, bfloat16 or float16"),
        (torch.randn(4, 8), torch.ones(2, 4), 1e-6, "weight must be 1-D"),
        (torch.randn(4, 8), torch.ones(8), -1.0, "eps must be >= 0"),
    ],
)
def test_bad_arguments_name_the_problem(x, w, eps, message):
    with pytest.raises(RuntimeError, match=message.replace("(", r"\(").replace(")", r"\)")):
        torch.ops.bpt.rms_norm(x, w, eps)


def test_backward_rejects_a_mismatched_grad_in_eager_and_fake_mode():
    from torch._subclasses.fake_tensor import FakeTensorMode

    def call():
        torch.ops.bpt.rms_norm_backward(torch.randn(4, 7), torch.randn(4, 8), torch.ones(8), 1e-6)

    with pytest.raises(RuntimeError, match="grad_out must have x's shape"):
        call()
    with pytest.raises(RuntimeError, match="grad_out must have x's shape"), FakeTensorMode():
        call()
