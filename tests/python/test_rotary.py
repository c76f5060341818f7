"""bpt.rotary against Hugging Face's apply_rotary_pos_emb expression (rotate_half layout)."""

import pytest
import torch

import bpt


def rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def reference(x, cos, sin):
    if cos.dim() == 3:  # [B, T, D] -> [B, 1, T, D], as transformers' unsqueeze_dim=1
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return x * cos + rotate_half(x) * sin


def tables(batch, T, D, dtype, theta=10000.0):
    """cos/sin as transformers' LlamaRotaryEmbedding builds them (fp32, then cast)."""
    inv_freq = 1.0 / theta ** (torch.arange(0, D, 2, dtype=torch.int64).float() / D)
    pos = torch.arange(T).float() + torch.arange(batch).float()[:, None] * 3  # differs per row
    emb = torch.cat([pos[..., None] * inv_freq] * 2, dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


@pytest.mark.parametrize("B,H,T,D", [(1, 1, 1, 2), (2, 3, 7, 64), (1, 8, 33, 128), (2, 2, 5, 80)])
@pytest.mark.parametrize("batched", [False, True])
def test_matches_expression_fp32(B, H, T, D, batched):
    x = torch.randn(B, H, T, D)
    cos, sin = tables(B, T, D, torch.float32)
    if not batched:
        cos, sin = cos[0], sin[0]
    torch.testing.assert_close(bpt.rotary(x, cos, sin), reference(x, cos, sin), rtol=1e-6, atol=1e-6)


def test_matches_expression_bf16():
    x = torch.randn(2, 4, 17, 64, dtype=torch.bfloat16)
    cos, sin = tables(2, 17, 64, torch.bfloat16)
    # bpt rounds once (fp32 math); the expression rounds each product: within 1 bf16 ulp or so.
    torch.testing.assert_close(bpt.rotary(x, cos, sin), reference(x, cos, sin), rtol=1.6e-2, atol=1.6e-2)


def test_non_contiguous_input():
    x = torch.randn(2, 9, 4, 16).transpose(1, 2)  # [B, H, T, D] view of [B, T, H, D]
    assert not x.is_contiguous()
    cos, sin = tables(2, 9, 16, torch.float32)
    torch.testing.assert_close(bpt.rotary(x, cos, sin), reference(x, cos, sin))


def test_gradcheck_fp64_all_inputs():
    x = torch.randn(2, 2, 3, 6, dtype=torch.float64, requires_grad=True)
    cos = torch.randn(2, 3, 6, dtype=torch.float64, requires_grad=True)
    sin = torch.randn(2, 3, 6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(torch.ops.bpt.rotary, (x, cos, sin))
    cos2 = torch.randn(3, 6, dtype=torch.float64, requires_grad=True)
    sin2 = torch.randn(3, 6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(torch.ops.bpt.rotary, (x, cos2, sin2))


def test_opcheck():
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.randn(2, 3, 5, 8, dtype=dtype, requires_grad=True)
        cos, sin = tables(2, 5, 8, dtype)
        torch.library.opcheck(torch.ops.bpt.rotary.default, (x, cos, sin))
        torch.library.opcheck(torch.ops.bpt.rotary.default, (x, cos[0], sin[0]))


def test_torch_compile_with_backward():
    def f(x, cos, sin):
        return (torch.ops.bpt.rotary(x, cos, sin) ** 2).sum()

    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    x = torch.randn(1, 2, 6, 8, requires_grad=True)
    cos, sin = tables(1, 6, 8, torch.float32)
    (got,) = torch.autograd.grad(compiled(x, cos, sin), (x,))
    (want,) = torch.autograd.grad(f(x, cos, sin), (x,))
    torch.testing.assert_close(got, want)


@pytest.mark.parametrize(
    "x, cos, message",
    [
        (torch.randn(1, 2, 4, 8), torch.randn(4, 6), "cos must be 8"),
        (torch.randn(1, 2, 4, 8), torch.randn(3, 8), "the sequence length T"),
        (torch.randn(2, 4, 8), torch.randn(4, 8), r"x must be \[B, H, T, D\]"),
        (torch.randn(1, 2, 4, 7), torch.randn(4, 7), "must be even"),
        (torch.randn(2, 2, 4, 8), torch.randn(3, 4, 8), r"cos.size\(0\) must be 1 or x.size\(0\) = 2"),
        (torch.randn(1, 2, 4, 8), torch.randn(4, 8, dtype=torch.float64), "cos must have the dtype of x"),
    ],
)
def test_bad_arguments_name_the_problem(x, cos, message):
    with pytest.raises(RuntimeError, match=message):
        torch.ops.bpt.rotary(x, cos, cos.clone())
