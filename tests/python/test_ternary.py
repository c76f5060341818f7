"""bpt::ternary_pack / bpt::ternary_linear (BitNet b1.58 inference) against a pure-PyTorch
reference of b1.58 written here after BitNet's weight_quant / activation_quant: the packed
format, values, dtypes, odd shapes, opcheck, errors.

One deliberate difference from BitNet's code: the activation scale is 127 / amax as a true
division. Python's `127.0 / tensor` is `tensor.reciprocal() * 127`, which rounds differently
in the last bit and can move a rounding tie; the C++ ops (bitlinear, ternary_linear) divide.
"""

import pytest
import torch

import bpt  # noqa: F401  (loads the op library)

pack = torch.ops.bpt.ternary_pack
linear = torch.ops.bpt.ternary_linear


def weight_quant(w):
    """Per tensor, absmean to {-1, 0, 1}: (w_q, scale), in fp32."""
    w = w.float()
    scale = w.abs().mean().clamp(min=1e-5)
    return (w / scale).round().clamp(-1, 1), scale


def activation_quant(x):
    """Per token, absmax to int8 levels: (x_q, s) with x ~ x_q / s, in fp32."""
    x = x.float()
    s = torch.full((), 127.0) / x.abs().amax(dim=-1, keepdim=True).clamp(min=1e-5)
    return (x * s).round().clamp(-128, 127), s


def reference(x, w):
    """b1.58's forward in fp64 from the fp32 quantized levels, in x's dtype."""
    x_q, s = activation_quant(x)
    w_q, scale = weight_quant(w)
    return ((x_q.double() / s.double()) @ (w_q.double() * scale.double()).t()).to(x.dtype)


def unpack(packed, k):
    """uint8 [N, ceil(k / 4)] -> w_q [N, k]: element k at byte k // 4, bits 2 (k % 4)."""
    shifts = torch.arange(0, 8, 2, dtype=torch.uint8)
    codes = (packed.unsqueeze(-1) >> shifts) & 3
    return codes.reshape(packed.shape[0], -1)[:, :k].to(torch.int8) - 1


@pytest.mark.parametrize("k", [1, 3, 4, 5, 63, 65, 127, 129, 1000])
def test_pack_layout_and_scale(k):
    w = torch.randn(9, k)
    packed, scale = pack(w)
    assert packed.dtype == torch.uint8 and packed.shape == (9, (k + 3) // 4)
    assert scale.dtype == torch.float32 and scale.dim() == 0
    w_q, want_scale = weight_quant(w)
    assert scale.item() == want_scale.item()
    assert torch.equal(unpack(packed, k), w_q.to(torch.int8))
    # Padding in the last byte encodes 0 (0b01); no byte holds the unused code 0b11.
    pad = (packed.unsqueeze(-1) >> torch.arange(0, 8, 2, dtype=torch.uint8)) & 3
    assert torch.all(pad.reshape(9, -1)[:, k:] == 1)
    assert not torch.any(pad == 3)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_pack_quantizes_other_dtypes_in_fp32(dtype):
    w = torch.randn(5, 37).to(dtype)
    packed, scale = pack(w)
    w_q, want_scale = weight_quant(w)
    assert scale.item() == want_scale.item()
    assert torch.equal(unpack(packed, 37), w_q.to(torch.int8))


@pytest.mark.parametrize("m", [1, 3, 17])
@pytest.mark.parametrize("n, k", [(1, 1), (7, 3), (5, 5), (33, 63), (8, 65), (3, 127), (17, 129), (31, 1000)])
def test_linear_matches_reference(m, n, k):
    x, w = torch.randn(m, k), torch.randn(n, k)
    packed, scale = pack(w)
    y = linear(x, packed, scale, k)
    assert y.dtype == torch.float32 and y.shape == (m, n)
    torch.testing.assert_close(y.double(), reference(x.double(), w), rtol=1e-4, atol=1e-6)


def test_linear_keeps_leading_dims_and_takes_non_contiguous_x():
    w = torch.randn(19, 70)
    packed, scale = pack(w)
    x = torch.randn(2, 3, 70)
    y = linear(x, packed, scale, 70)
    assert y.shape == (2, 3, 19)
    torch.testing.assert_close(y.double(), reference(x.double(), w), rtol=1e-4, atol=1e-6)
    xt = torch.randn(70, 4).t()
    torch.testing.assert_close(linear(xt, packed, scale, 70).double(), reference(xt.double(), w), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("dtype, rtol", [(torch.bfloat16, 8e-3), (torch.float16, 2e-3)])
def test_linear_in_bf16_and_fp16(dtype, rtol):
    w = torch.randn(64, 300)
    packed, scale = pack(w)
    x = torch.randn(5, 300).to(dtype)
    y = linear(x, packed, scale, 300)
    assert y.dtype == dtype
    # Same levels as the fp32 reference on the upcast x; only the last rounding to dtype differs.
    torch.testing.assert_close(y, reference(x, w), rtol=rtol, atol=1e-3)


def test_linear_rounds_half_to_even():
    # Identity weight: w_q = I, scale = 1/7; max|x| = 127 makes s = 1, so y / scale = round(x).
    x = torch.tensor([[127.0, 0.5, 1.5, 2.5, -0.5, -3.5, -127.0]])
    packed, scale = pack(torch.eye(7))
    assert torch.equal((linear(x, packed, scale, 7) / scale).round(), torch.tensor([[127.0, 0, 2, 2, 0, -4, -127]]))


def test_zero_input_gives_zero():
    packed, scale = pack(torch.zeros(4, 8))
    assert scale.item() == pytest.approx(1e-5)
    assert torch.equal(linear(torch.zeros(3, 8), packed, scale, 8), torch.zeros(3, 4))


# No test_aot_dispatch_*: those run backward, which ternary_linear refuses (inference only).
OPCHECK_UTILS = ("test_schema", "test_autograd_registration", "test_faketensor")


def test_opcheck():
    w = torch.randn(6, 10, requires_grad=True)
    torch.library.opcheck(pack.default, (w,), test_utils=OPCHECK_UTILS)
    packed, scale = pack(w)
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.randn(2, 3, 10, dtype=dtype, requires_grad=True)
        torch.library.opcheck(linear.default, (x, packed, scale, 10), test_utils=OPCHECK_UTILS)


def test_fake_tensor_shapes():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        packed, scale = pack(torch.empty(11, 9))
        assert packed.shape == (11, 3) and packed.dtype == torch.uint8 and scale.shape == ()
        y = linear(torch.empty(2, 4, 9, dtype=torch.bfloat16), packed, scale, 9)
        assert y.shape == (2, 4, 11) and y.dtype == torch.bfloat16


def test_no_gradient():
    w = torch.randn(4, 8, requires_grad=True)
    packed, scale = pack(w)
    assert not scale.requires_grad
    x = torch.randn(2, 8, requires_grad=True)
    y = linear(x, packed, scale, 8)
    with pytest.raises(RuntimeError, match=r"has no gradient \(inference only\)"):
        y.sum().backward()


@pytest.mark.parametrize(
    "change, message",
    [
        ({"in_features": 13}, r"packed.size\(1\) must be 4"),
        ({"in_features": 9}, r"x.size\(-1\) must be 9"),
        ({"in_features": 2**23}, r"in_features must be < 2\^23 = 8388608, got 8388608 \(the int32 sums"),
        ({"packed": torch.zeros(6, 3, dtype=torch.int8)}, "packed must be uint8"),
        ({"packed": torch.zeros(18, dtype=torch.uint8)}, r"packed must be \[N, ceil\(in_features / 4\)\]"),
        ({"scale": torch.ones(2)}, "scale must hold one value"),
        ({"scale": torch.tensor(1)}, "scale must be float32"),
        ({"x": torch.ones(3, 10, dtype=torch.int32)}, "x must be float32"),
    ],
)
def test_bad_arguments_are_named(change, message):
    args = {"x": torch.randn(3, 10), "packed": torch.zeros(6, 3, dtype=torch.uint8), "scale": torch.tensor(1.0),
            "in_features": 10, **change}
    with pytest.raises(RuntimeError, match=message):
        linear(args["x"], args["packed"], args["scale"], args["in_features"])


def test_pack_rejects_non_matrix_weights():
    with pytest.raises(RuntimeError, match=r"weight must be \[N, K\]"):
        pack(torch.randn(10))
    with pytest.raises(RuntimeError, match="weight must be float32"):
        pack(torch.ones(2, 2, dtype=torch.int32))
