"""bpt.chunked_lm_loss against naive fp64 cross-entropy over full logits."""

import pytest
import torch

import reference

loss_op = torch.ops.bpt.chunked_lm_loss


def problem(N=23, D=16, V=50, dtype=torch.float64, pad=5):
    h = torch.randn(N, D, dtype=dtype, requires_grad=True)
    w = (torch.randn(V, D, dtype=dtype) / D**0.5).requires_grad_()
    t = torch.randint(0, V, (N,))
    t[torch.randperm(N)[:pad]] = -100  # padding
    return h, w, t


@pytest.mark.parametrize("chunk", [-1, 1, 4, 23, 100], ids=lambda c: f"chunk={c}")
@pytest.mark.parametrize("z_loss", [0.0, 1e-2])
def test_matches_reference_with_padding(chunk, z_loss):
    h, w, t = problem()
    loss, n_tokens, n_correct = loss_op(h, w, t, chunk=chunk, z_loss=z_loss)
    ref, ref_n, ref_correct = reference.lm_loss(h, w, t, z_loss=z_loss)
    torch.testing.assert_close(loss, ref, rtol=1e-12, atol=1e-12)
    assert (n_tokens.item(), n_correct.item()) == (ref_n, ref_correct) and ref_n == 18
    got = torch.autograd.grad(loss, (h, w))
    want = torch.autograd.grad(ref, (h, w))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_batched_shape_custom_ignore_index_and_padding_rows_get_no_gradient():
    h = torch.randn(2, 6, 8, dtype=torch.float64, requires_grad=True)
    w = torch.randn(30, 8, dtype=torch.float64, requires_grad=True)
    t = torch.randint(0, 30, (2, 6))
    t[1, 3:] = 0  # index 0 is the padding here
    loss, n, _ = loss_op(h, w, t, chunk=5, ignore_index=0)
    ref, ref_n, _ = reference.lm_loss(h, w, t, ignore_index=0)
    torch.testing.assert_close(loss, ref)
    assert n.item() == ref_n
    (dh,) = torch.autograd.grad(loss, (h,))
    assert torch.all(dh[1, 3:] == 0)


def test_correct_count_on_a_head_that_predicts_the_target():
    D = V = 12
    h = torch.eye(V, dtype=torch.float64)[:10] * 10  # token i's hidden state points at word i
    w = torch.eye(V, D, dtype=torch.float64)
    t = torch.arange(10)
    t[7:] = (t[7:] + 1) % V  # three wrong targets
    _, n, n_correct = loss_op(h, w, t, chunk=3)
    assert (n.item(), n_correct.item()) == (10, 7)


def test_all_ignored_gives_zero_loss_and_zero_gradients():
    h, w, t = problem(N=6, pad=6)
    loss, n, n_correct = loss_op(h, w, t, chunk=4)
    assert loss.item() == 0 and n.item() == 0 and n_correct.item() == 0
    dh, dw = torch.autograd.grad(loss, (h, w))
    assert dh.abs().max() == 0 and dw.abs().max() == 0


def test_bf16_within_tolerance_and_float32_logits_flag():
    h, w, t = problem(N=64, D=32, V=300, dtype=torch.bfloat16)
    ref, _, _ = reference.lm_loss(h, w, t)
    ref_dh, ref_dw = torch.autograd.grad(ref, (h, w))
    for f32, tol in [(True, 2e-2), (False, 5e-2)]:
        loss, _, _ = loss_op(h, w, t, chunk=16, float32_logits=f32)
        assert loss.dtype == torch.float32
        torch.testing.assert_close(loss.double(), ref, rtol=tol, atol=tol)
        dh, dw = torch.autograd.grad(loss, (h, w))
        assert dh.dtype == dw.dtype == torch.bfloat16
        for a, b in ((dh, ref_dh), (dw, ref_dw)):
            assert (a.double() - b.double()).abs().max() <= 5e-2 * b.abs().max()


def test_gradcheck_fp64():
    h, w, t = problem(N=7, D=4, V=9, pad=2)
    assert torch.autograd.gradcheck(lambda a, b: loss_op(a, b, t, chunk=3, z_loss=0.1)[0], (h, w))


def test_opcheck():
    h, w, t = problem(N=10, D=8, V=20, dtype=torch.float32)
    torch.library.opcheck(loss_op.default, (h, w, t), {"chunk": 4})
    t3 = torch.where(t == -100, 3, t)
    torch.library.opcheck(loss_op.default, (h, w, t3), {"chunk": -1, "z_loss": 1e-3, "ignore_index": 3})


@pytest.mark.parametrize("z_loss", [0.0, 1e-2])
def test_with_grad_equals_loss_and_the_recomputing_backward(z_loss):
    """The fused op (what autograd's forward runs) against the plain op and the backward op."""
    h, w, t = problem()
    h, w = h.detach(), w.detach()
    loss, n, correct, dh, dw = torch.ops.bpt.chunked_lm_loss_with_grad(h, w, t, chunk=4, z_loss=z_loss)
    ref_loss, ref_n, ref_correct = loss_op(h, w, t, chunk=4, z_loss=z_loss)
    assert torch.equal(loss, ref_loss) and n == ref_n and correct == ref_correct
    ref_dh, ref_dw = torch.ops.bpt.chunked_lm_loss_backward(torch.tensor(1.0, dtype=h.dtype), h, w, t, chunk=4,
                                                            z_loss=z_loss)
    torch.testing.assert_close(dh, ref_dh, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(dw, ref_dw, rtol=1e-12, atol=1e-14)


def test_opcheck_with_grad():
    h, w, t = problem(N=10, D=8, V=20, dtype=torch.float32)
    torch.library.opcheck(torch.ops.bpt.chunked_lm_loss_with_grad.default, (h.detach(), w.detach(), t), {"chunk": 4})


def test_no_grad_forward_computes_no_gradients():
    h, w, t = problem(dtype=torch.float32)

    def ops_called(grad):
        with torch.set_grad_enabled(grad), torch.profiler.profile() as prof:
            loss, _, _ = loss_op(h, w, t, chunk=4)
        return loss, {e.name for e in prof.events()}

    loss, called = ops_called(False)
    assert loss.grad_fn is None
    assert "bpt::chunked_lm_loss_with_grad" not in called
    trained, called = ops_called(True)
    assert "bpt::chunked_lm_loss_with_grad" in called
    torch.testing.assert_close(loss, trained.detach())


def test_torch_compile_backward():
    h, w, t = problem(N=12, D=8, V=20, dtype=torch.float32)
    f = lambda a, b: loss_op(a, b, t, chunk=5)[0]  # noqa: E731
    got = torch.autograd.grad(torch.compile(f, backend="aot_eager")(h, w), (h, w))
    want = torch.autograd.grad(f(h, w), (h, w))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)


def test_bad_arguments_name_the_problem():
    h, w, t = problem(N=4, D=8, V=10, dtype=torch.float32, pad=0)
    with pytest.raises(RuntimeError, match=r"w_head.size\(1\) must be 8"):
        loss_op(h, torch.randn(10, 7), t, chunk=2)
    with pytest.raises(RuntimeError, match="targets must have h's shape without its last dim"):
        loss_op(h, w, t[:3], chunk=2)
    with pytest.raises(RuntimeError, match="targets must be int64 or int32"):
        loss_op(h, w, t.float(), chunk=2)
    with pytest.raises(RuntimeError, match="chunk must be a positive block size or -1"):
        loss_op(h, w, t, chunk=0)
    bad = t.clone()
    bad[2] = 10
    with pytest.raises(RuntimeError, match=r"targets\[2\] = 10 is outside the vocabulary \[0, 10\)"):
        loss_op(h, w, bad, chunk=2)


def test_ignore_index_outside_the_vocabulary():
    """An ignore_index at or past V (e.g. a pad id the head lacks) masks those rows."""
    h, w, t = problem(N=12, D=8, V=20, pad=0)
    t[[1, 5, 6]] = 20
    loss, n, _ = loss_op(h, w, t, chunk=5, ignore_index=20)
    ref, ref_n, _ = reference.lm_loss(h, w, t, ignore_index=20)
    torch.testing.assert_close(loss, ref)
    assert n.item() == ref_n == 9
    got = torch.autograd.grad(loss, (h, w))
    want = torch.autograd.grad(ref, (h, w))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)


def test_backward_rejects_a_non_scalar_grad_loss():
    h, w, t = problem(N=4, D=8, V=10, dtype=torch.float32, pad=0)
    with pytest.raises(RuntimeError, match="grad_loss must be a scalar"):
        torch.ops.bpt.chunked_lm_loss_backward(torch.ones(2), h, w, t, chunk=2)
