"""bpt.blockwise_attention against naive fp64 attention: values, lse and all gradients."""

import pytest
import torch

import reference

attn = torch.ops.bpt.blockwise_attention


def packed_segments(B, S, docs):
    """Sorted document ids [B, S] with `docs` documents of random lengths per row."""
    cuts = torch.stack([torch.randperm(S - 1)[: docs - 1].sort().values + 1 for _ in range(B)])
    ids = torch.zeros(B, S, dtype=torch.long)
    for b in range(B):
        for c in cuts[b]:
            ids[b, c:] += 1
    return ids


def inputs(B, Hq, Hkv, T, S, D, dtype=torch.float64):
    make = lambda *shape: torch.randn(*shape, dtype=dtype, requires_grad=True)  # noqa: E731
    return make(B, Hq, T, D), make(B, Hkv, S, D), make(B, Hkv, S, D)


def check_against_reference(q, k, v, tol, **kw):
    out, lse = attn(q, k, v, **kw)
    ref_kw = {n: kw[n] for n in ("causal", "segment_ids", "scale", "kv_offset") if n in kw}
    ref_out, ref_lse = reference.attention(q, k, v, **ref_kw)
    torch.testing.assert_close(out.double(), ref_out, rtol=tol, atol=tol)
    torch.testing.assert_close(lse.double(), ref_lse, rtol=tol, atol=tol)
    # Gradients of out and of lse (a loss may use either).
    g_out = torch.randn_like(ref_out)
    g_lse = torch.randn_like(ref_lse)
    got = torch.autograd.grad((out.double() * g_out).sum() + (lse.double() * g_lse).sum(), (q, k, v))
    want = torch.autograd.grad((ref_out * g_out).sum() + (ref_lse * g_lse).sum(), (q, k, v))
    for name, a, b in zip("qkv", got, want):
        torch.testing.assert_close(a.double(), b.double(), rtol=tol, atol=tol, msg=lambda m: f"grad_{name}: {m}")


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize(
    "T,q_chunk,k_chunk",
    [(37, 8, 16), (37, -1, -1), (20, 64, 128), (64, 16, 16), (50, 7, 13)],
    ids=["T%chunk!=0", "no-chunking", "chunk>T", "aligned", "odd-chunks"],
)
def test_chunking_matches_reference(causal, T, q_chunk, k_chunk):
    q, k, v = inputs(2, 4, 4, T, T, 16)
    check_against_reference(q, k, v, 1e-10, causal=causal, q_chunk=q_chunk, k_chunk=k_chunk)


@pytest.mark.parametrize("group", [1, 4, 8])
@pytest.mark.parametrize("D", [64, 80, 128])
def test_gqa_and_head_dims(group, D):
    q, k, v = inputs(1, 8, 8 // group, 33, 33, D)
    check_against_reference(q, k, v, 1e-10, causal=True, q_chunk=16, k_chunk=8)


@pytest.mark.parametrize("causal", [True, False])
def test_segment_ids_keep_documents_apart(causal):
    T = 48
    q, k, v = inputs(2, 4, 2, T, T, 32)
    seg = packed_segments(2, T, docs=4)
    check_against_reference(q, k, v, 1e-10, causal=causal, q_chunk=16, k_chunk=8, segment_ids=seg)


def test_segment_ids_unsorted_and_int32():
    q, k, v = inputs(1, 2, 2, 24, 24, 16)
    seg = torch.randint(0, 3, (1, 24), dtype=torch.int32)
    check_against_reference(q, k, v, 1e-10, causal=True, q_chunk=8, k_chunk=8, segment_ids=seg)


def test_documents_do_not_leak():
    """Changing one document's keys leaves the other documents' outputs untouched."""
    q, k, v = inputs(1, 2, 2, 32, 32, 16)
    seg = torch.tensor([[0] * 10 + [1] * 12 + [2] * 10])
    out1, _ = attn(q, k, v, causal=False, q_chunk=8, k_chunk=8, segment_ids=seg)
    k2, v2 = k.detach().clone(), v.detach().clone()
    k2[:, :, 10:22] += 5
    v2[:, :, 10:22] -= 3
    out2, _ = attn(q, k2, v2, causal=False, q_chunk=8, k_chunk=8, segment_ids=seg)
    keep = torch.cat([torch.arange(10), torch.arange(22, 32)])
    torch.testing.assert_close(out1[:, :, keep], out2[:, :, keep], rtol=0, atol=0)
    assert (out1[:, :, 10:22] - out2[:, :, 10:22]).abs().max() > 0.1


def test_causal_ignores_future_keys():
    q, k, v = inputs(1, 2, 2, 16, 16, 8)
    out1, _ = attn(q, k, v, causal=True, q_chunk=4, k_chunk=4)
    k2, v2 = k.detach().clone(), v.detach().clone()
    k2[:, :, 9:] = torch.randn_like(k2[:, :, 9:])
    v2[:, :, 9:] = torch.randn_like(v2[:, :, 9:])
    out2, _ = attn(q, k2, v2, causal=True, q_chunk=4, k_chunk=4)
    torch.testing.assert_close(out1[:, :, :9], out2[:, :, :9], rtol=0, atol=0)


@pytest.mark.parametrize("T", [1, 5])
def test_decoding_with_kv_offset(T):
    S = 40
    q, k, v = inputs(2, 8, 2, T, S, 64)
    check_against_reference(q, k, v, 1e-10, causal=True, q_chunk=4, k_chunk=16, kv_offset=S - T)


def test_decoding_equals_full_sequence_rows():
    """The last query of a full causal pass equals a T=1 decode step at kv_offset S-1."""
    q, k, v = inputs(1, 4, 2, 20, 20, 32)
    full, full_lse = attn(q, k, v, causal=True, q_chunk=8, k_chunk=8)
    step, step_lse = attn(q[:, :, -1:], k, v, causal=True, q_chunk=8, k_chunk=8, kv_offset=19)
    torch.testing.assert_close(step, full[:, :, -1:], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(step_lse, full_lse[:, :, -1:], rtol=1e-12, atol=1e-12)


def test_custom_scale():
    q, k, v = inputs(1, 2, 1, 9, 9, 16)
    check_against_reference(q, k, v, 1e-10, causal=True, q_chunk=4, k_chunk=4, scale=0.3)


def test_fp32_against_fp64_reference():
    q, k, v = inputs(1, 4, 2, 70, 70, 64, torch.float32)
    check_against_reference(q, k, v, 2e-4, causal=True, q_chunk=32, k_chunk=16)


def bf16_kernel_runs_here():
    """The AVX512-BF16 path runs where ATen uses AVX-512 and the CPU has avx512_bf16."""
    with open("/proc/cpuinfo") as f:
        has_flag = "avx512_bf16" in f.read()
    return has_flag and torch.backends.cpu.get_cpu_capability() == "AVX512"


def check_bf16_against_reference(q, k, v, **kw):
    """bf16 inputs, fp32 accumulation, bf16 output, on unit-scale data: out within 2e-2, lse
    (fp32) within 1e-3, gradients (bf16) within 3% of their largest value."""
    out, lse = attn(q, k, v, **kw)
    assert out.dtype == torch.bfloat16 and lse.dtype == torch.float32
    ref_kw = {n: kw[n] for n in ("causal", "segment_ids", "kv_offset") if n in kw}
    ref_out, ref_lse = reference.attention(q, k, v, **ref_kw)
    torch.testing.assert_close(out.double(), ref_out, rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(lse.double(), ref_lse, rtol=1e-3, atol=1e-3)
    g = torch.randn_like(ref_out)
    got = torch.autograd.grad((out.double() * g).sum(), (q, k, v))
    want = torch.autograd.grad((ref_out * g).sum(), (q, k, v))
    for a, b in zip(got, want):
        assert a.dtype == torch.bfloat16
        assert (a.double() - b.double()).abs().max() <= 3e-2 * max(1.0, b.abs().max().item())


@pytest.mark.parametrize("D", [33, 80])
def test_bf16_with_gqa_segments_and_kv_offset(D):
    """The bf16 path with every option: odd and padded head dims, ragged blocks."""
    S, T = 45, 30
    q, k, v = inputs(2, 8, 2, T, S, D, torch.bfloat16)
    seg = packed_segments(2, S, docs=3)
    check_bf16_against_reference(q, k, v, causal=True, q_chunk=16, k_chunk=9, segment_ids=seg, kv_offset=S - T)


def test_bf16_within_stated_tolerance():
    q, k, v = inputs(1, 4, 2, 64, 64, 64, torch.bfloat16)
    check_bf16_against_reference(q, k, v, causal=True, q_chunk=16, k_chunk=16)


def test_gradcheck_fp64():
    q, k, v = inputs(1, 4, 2, 6, 6, 4)
    seg = torch.tensor([[0, 0, 1, 1, 1, 2]])
    fn = lambda a, b, c: attn(a, b, c, causal=True, q_chunk=4, k_chunk=4, segment_ids=seg)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (q, k, v))
    fn_nc = lambda a, b, c: attn(a, b, c, causal=False, q_chunk=-1, k_chunk=3)  # noqa: E731
    assert torch.autograd.gradcheck(fn_nc, (q, k, v))


def test_opcheck():
    q, k, v = inputs(1, 4, 2, 10, 10, 8, torch.float32)
    seg = torch.tensor([[0] * 4 + [1] * 6])
    torch.library.opcheck(attn.default, (q, k, v), {"causal": True, "q_chunk": 4, "k_chunk": 4})
    torch.library.opcheck(
        attn.default, (q, k, v), {"causal": False, "q_chunk": -1, "k_chunk": 3, "segment_ids": seg, "scale": 0.5}
    )
    q1 = torch.randn(1, 4, 1, 8, requires_grad=True)
    torch.library.opcheck(attn.default, (q1, k, v), {"causal": True, "q_chunk": 4, "k_chunk": 4, "kv_offset": 9})


def test_torch_compile_forward_and_backward():
    def f(q, k, v):
        out, lse = attn(q, k, v, causal=True, q_chunk=8, k_chunk=8)
        return out.square().sum() + lse.sum()

    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    q, k, v = inputs(1, 4, 2, 24, 24, 16, torch.float32)
    got = torch.autograd.grad(compiled(q, k, v), (q, k, v))
    want = torch.autograd.grad(f(q, k, v), (q, k, v))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)


def test_torch_compile_inductor_forward():
    fn = torch.compile(lambda q, k, v: attn(q, k, v, causal=True, q_chunk=8, k_chunk=8)[0] * 2, fullgraph=True)
    q, k, v = inputs(1, 2, 2, 16, 16, 8, torch.float32)
    with torch.no_grad():
        torch.testing.assert_close(fn(q, k, v), attn(q, k, v, causal=True, q_chunk=8, k_chunk=8)[0] * 2)


@pytest.mark.parametrize(
    "shapes, kw, message",
    [
        (((1, 4, 8, 16), (1, 3, 8, 16), (1, 3, 8, 16)), {}, "must be a multiple of k's heads"),
        (((1, 4, 8, 16), (1, 2, 8, 8), (1, 2, 8, 8)), {}, r"k.size\(3\) must be 16"),
        (((1, 4, 8, 16), (1, 2, 8, 16), (1, 2, 9, 16)), {}, r"v.size\(2\) must be 8"),
        (((4, 8, 16), (1, 2, 8, 16), (1, 2, 8, 16)), {}, r"q must be \[B, Hq, T, D\]"),
        (((1, 4, 8, 16), (1, 2, 8, 16), (1, 2, 8, 16)), {"q_chunk": 0}, "q_chunk must be a positive block size or -1"),
        (((1, 4, 8, 16), (1, 2, 8, 16), (1, 2, 8, 16)), {"k_chunk": -2}, "k_chunk must be"),
        (((1, 4, 8, 16), (1, 2, 8, 16), (1, 2, 8, 16)), {"kv_offset": 1}, "kv_offset \\+ T = 1 \\+ 8 must be <= S = 8"),
        (((1, 4, 8, 16), (1, 2, 8, 16), (1, 2, 8, 16)), {"segment_ids": torch.zeros(1, 7, dtype=torch.long)},
         r"segment_ids.size\(1\) must be 8"),
        (((1, 4, 8, 16), (1, 2, 8, 16), (1, 2, 8, 16)), {"segment_ids": torch.zeros(1, 8)},
         "segment_ids must be int64 or int32"),
    ],
)
def test_bad_arguments_name_the_problem(shapes, kw, message):
    q, k, v = (torch.randn(s) for s in shapes)
    args = {"causal": True, "q_chunk": 4, "k_chunk": 4, **kw}
    with pytest.raises(RuntimeError, match=message):
        attn(q, k, v, **args)


def test_backward_checks_grad_lse_shape_in_eager_and_fake_mode():
    from torch._subclasses.fake_tensor import FakeTensorMode

    def call():
        q = torch.randn(1, 2, 4, 8)
        out, lse = attn(q, q, q, causal=True, q_chunk=2, k_chunk=2)
        torch.ops.bpt.blockwise_attention_backward(
            torch.ones_like(out), torch.ones(4), q, q, q, out, lse, causal=True, q_chunk=2, k_chunk=2
        )

    with pytest.raises(RuntimeError, match="grad_lse must have lse's shape"):
        call()
    with pytest.raises(RuntimeError, match="grad_lse must have lse's shape"), FakeTensorMode():
        call()


def test_mixed_dtypes_are_rejected():
    q = torch.randn(1, 2, 4, 8)
    with pytest.raises(RuntimeError, match="k must have the dtype of q"):
        attn(q, q.double(), q, causal=True, q_chunk=2, k_chunk=2)


@pytest.mark.skipif(not bf16_kernel_runs_here(), reason="no AVX512-BF16 here: only the fp32 path exists")
def test_bf16_kernel_agrees_with_the_fp32_fallback(tmp_path):
    """bf16 runs on AVX512-BF16 GEMMs where the CPU has them and in fp32 otherwise
    (ATEN_CPU_CAPABILITY=avx2 forces the latter): both paths agree within bf16 rounding."""
    import os
    import subprocess
    import sys

    script = (
        "import torch, bpt\n"
        "torch.manual_seed(0)\n"
        "q, k, v = (torch.randn(1, 4, 70, 64, dtype=torch.bfloat16, requires_grad=True) for _ in range(3))\n"
        "out, lse = torch.ops.bpt.blockwise_attention(q, k, v, causal=True, q_chunk=32, k_chunk=16)\n"
        "out.float().square().sum().backward()\n"
        f"torch.save([out, lse, q.grad, k.grad, v.grad], {str(tmp_path)!r} + '/' + __import__('sys').argv[1])\n"
    )
    for name, capability in [("native", None), ("fallback", "avx2")]:
        env = dict(os.environ)
        if capability:
            env["ATEN_CPU_CAPABILITY"] = capability
        subprocess.run([sys.executable, "-c", script, name], env=env, check=True, timeout=120)
    native = torch.load(tmp_path / "native")
    fallback = torch.load(tmp_path / "fallback")
    for a, b in zip(native, fallback):
        assert a.dtype == b.dtype
        # Within 1% of the tensor's scale: P and dS are rounded to bf16 on one path only.
        assert (a.float() - b.float()).abs().max() <= 1e-2 * max(1.0, b.float().abs().max().item())
