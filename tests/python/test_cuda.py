"""bpt on CUDA (issue 12), marked `cuda`: every op's CUDA output and gradients against the CPU
op and the fp64 reference; the tiled attention kernels; opcheck, torch.compile and a CUDA
graph capture on CUDA; the ternary kernels bit for bit against the CPU op; bpt-train on one
GPU against the CPU, its GPU memory peaks, a resumed GPU run's dropout masks (gpu_rng), and
FSDP over NCCL on two GPUs. Skipped, with the reason, where torch has no CUDA device (this
build machine); run them on a GPU machine with the CUDA torch and a `make build-cuda` build:
`BPT_REQUIRE_CUDA=1 pytest -m cuda` (with it set, a missing GPU fails the tests instead: a
driver too old for the torch build looks the same). tools/gpu_kit.sh runs them where the
build's Debian packages are missing."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import bpt
import reference

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available() and os.environ.get("BPT_REQUIRE_CUDA") != "1",
                       reason="no CUDA device (torch.cuda.is_available() is False)"),
]

# The apps beside the op library this torch loads (build-cuda/ under a CUDA torch); not
# llama_helpers, whose transformers import a GPU machine may lack.
BUILD = bpt.library_path().parent
ROOT = Path(__file__).resolve().parents[2]


def run_app(name: str, *args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([str(BUILD / f"bpt-{name}"), *map(str, args)], capture_output=True, text=True,
                          timeout=timeout)

ops = torch.ops.bpt


def both(*tensors, requires_grad=True):
    """The same values on the CPU and on the GPU, as leaves."""
    cpu = [t.clone().requires_grad_(requires_grad and t.is_floating_point()) for t in tensors]
    gpu = [t.detach().cuda().requires_grad_(requires_grad and t.is_floating_point()) for t in tensors]
    return cpu, gpu


def assert_same(gpu, cpu, rtol, atol):
    torch.testing.assert_close(gpu.detach().cpu(), cpu.detach(), rtol=rtol, atol=atol)


def check_backward(cpu_out, gpu_out, cpu_in, gpu_in, rtol, atol):
    grad = torch.randn_like(cpu_out)
    cpu_out.backward(grad)
    gpu_out.backward(grad.cuda())
    for c, g in zip(cpu_in, gpu_in):
        if c.requires_grad:
            assert_same(g.grad, c.grad, rtol, atol)


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 2e-4), (torch.bfloat16, 3e-2)])
@pytest.mark.parametrize("group, D", [(1, 64), (4, 128), (8, 64)])
@pytest.mark.parametrize("segments, kv_offset", [(False, 0), (True, 0), (True, 6)])
def test_attention_against_cpu_and_reference(dtype, tol, group, D, segments, kv_offset):
    B, Hkv, T, S = 2, 2, 37, 43
    T = S - kv_offset if kv_offset else T
    q = torch.randn(B, Hkv * group, T, D, dtype=dtype)
    k, v = (torch.randn(B, Hkv, S, D, dtype=dtype) for _ in range(2))
    seg = (torch.arange(S) >= S // 3).long().repeat(B, 1) if segments else None
    kw = dict(causal=True, q_chunk=16, k_chunk=16, segment_ids=seg, kv_offset=kv_offset)
    (qc, kc, vc), (qg, kg, vg) = both(q, k, v)
    out_c, lse_c = ops.blockwise_attention(qc, kc, vc, **kw)
    out_g, lse_g = ops.blockwise_attention(qg, kg, vg, **{**kw, "segment_ids": None if seg is None else seg.cuda()})
    assert_same(out_g, out_c, tol, tol)
    assert_same(lse_g, lse_c, tol, tol)
    want, _ = reference.attention(q, k, v, True, seg, kv_offset=kv_offset)
    assert_same(out_g.double(), want, tol, tol)
    check_backward(out_c, out_g, (qc, kc, vc), (qg, kg, vg), tol, tol)


TILED_CHECK = """
import torch, bpt, reference
from torch.profiler import ProfilerActivity, profile
ops = torch.ops.bpt
# Cards that give a block less shared memory than D = 128's backward tiles take (sm_86/89: 99 KB)
# run the generic blocks there (attention_backward.cuh's backward_shared_bytes<128>).
optin = getattr(torch.cuda.get_device_properties(0), "shared_memory_per_block_optin", None)
BACKWARD_D128_SHARED_BYTES = 123904  # attention_backward.cuh's backward_shared_bytes<128>(2)
for dtype in (torch.bfloat16, torch.float16):
    for causal, group, D, T, S, kv_offset, segments in [
            (True, 1, 64, 37, 37, 0, False), (True, 4, 128, 100, 130, 30, True), (True, 8, 64, 1, 65, 64, False),
            (True, 2, 128, 200, 200, 0, True), (False, 4, 128, 100, 130, 30, False), (False, 1, 64, 70, 70, 0, True),
            (True, 2, 128, 40, 200, 20, True),  # key tiles after the last query: seen by none
            (False, 2, 64, 50, 90, 40, True), (True, 1, 64, 128, 128, 0, True)]:  # whole 64-tiles
        q = torch.randn(2, 2 * group, T, D, dtype=dtype)
        k, v = (torch.randn(2, 2, S, D, dtype=dtype) for _ in range(2))
        # Each batch row its own documents (so a wrong row of segment ids shows).
        seg = torch.stack([torch.arange(S) >= S // 3, torch.arange(S) >= S // 2]).long() if segments else None
        tiled = D == 64 or optin is None or optin >= BACKWARD_D128_SHARED_BYTES
        kw = dict(causal=causal, q_chunk=-1, k_chunk=-1, kv_offset=kv_offset)
        cpu = [t.clone().requires_grad_() for t in (q, k, v)]
        gpu = [t.cuda().requires_grad_() for t in (q, k, v)]
        out, lse = ops.blockwise_attention(*cpu, segment_ids=seg, **kw)
        with profile(activities=[ProfilerActivity.CUDA]) as trace:
            got, got_lse = ops.blockwise_attention(*gpu, segment_ids=None if seg is None else seg.cuda(), **kw)
            torch.cuda.synchronize()
        ran = any("attention_forward_tiled" in e.name for e in trace.events())
        assert ran or not tiled, "the tiled forward did not run"
        torch.testing.assert_close(got.detach().cpu(), out.detach(), rtol=3e-2, atol=3e-2)
        torch.testing.assert_close(got_lse.detach().cpu(), lse.detach(), rtol=1e-2, atol=1e-2)
        # The tiled backward, through out and through lse (its gradient folds into delta), against
        # the CPU op and against fp64 math on the same inputs.
        grad, grad_lse = torch.randn_like(out), torch.randn_like(lse)
        ((out * grad).sum() + (lse * grad_lse).sum()).backward()
        with profile(activities=[ProfilerActivity.CUDA]) as trace:
            ((got * grad.cuda()).sum() + (got_lse * grad_lse.cuda()).sum()).backward()
            torch.cuda.synchronize()
        ran = any("attention_backward_tiled" in e.name for e in trace.events())
        assert ran or not tiled, "the tiled backward did not run"
        exact = [t.double().requires_grad_() for t in (q, k, v)]
        want, want_lse = reference.attention(*exact, causal, seg, kv_offset=kv_offset)
        ((want * grad.double()).sum() + (want_lse * grad_lse.double()).sum()).backward()
        for c, g, e in zip(cpu, gpu, exact):
            torch.testing.assert_close(g.grad.cpu(), c.grad, rtol=5e-2, atol=5e-2)
            torch.testing.assert_close(g.grad.cpu().double(), e.grad, rtol=5e-2, atol=5e-2)
# A q whose data starts 2 bytes into its storage (contiguous, not 16-byte aligned): the tiled
# kernels' vector loads would fault, so the generic blocks run, with the same results.
q, k, v = (torch.randn(1, 2, 64, 64, dtype=torch.bfloat16) for _ in range(3))
shifted = torch.empty(q.numel() + 1, dtype=q.dtype, device="cuda")[1:].view(q.shape)
shifted.copy_(q.cuda())
kw = dict(causal=True, q_chunk=-1, k_chunk=-1)
with profile(activities=[ProfilerActivity.CUDA]) as trace:
    got = ops.blockwise_attention(shifted, k.cuda(), v.cuda(), **kw)[0]
    torch.cuda.synchronize()
assert not any("attention_forward_tiled" in e.name for e in trace.events()), "the tiled forward ran unaligned"
torch.testing.assert_close(got.cpu(), ops.blockwise_attention(q, k, v, **kw)[0], rtol=3e-2, atol=3e-2)
print("tiled ok")
"""


def test_tiled_attention_against_cpu_and_reference():
    # The tiled kernels are opt-in (BPT_CUDA_ATTENTION=tiled, read once per process): a process
    # of its own, importing bpt from the checkout and the tests' fp64 reference.
    env = {**os.environ, "BPT_CUDA_ATTENTION": "tiled",
           "PYTHONPATH": os.pathsep.join([str(ROOT / "python"), str(ROOT / "tests" / "python")])}
    result = subprocess.run([sys.executable, "-c", TILED_CHECK], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0 and "tiled ok" in result.stdout, result.stderr


def test_rms_norm_and_rotary_against_cpu():
    x, w = torch.randn(4, 33, 96), torch.randn(96)
    (xc, wc), (xg, wg) = both(x, w)
    out_c, out_g = ops.rms_norm(xc, wc, 1e-6), ops.rms_norm(xg, wg, 1e-6)
    assert_same(out_g, out_c, 1e-5, 1e-5)
    check_backward(out_c, out_g, (xc, wc), (xg, wg), 1e-4, 1e-4)
    h, angles = torch.randn(2, 4, 33, 64), torch.randn(33, 32)
    cos, sin = torch.cat([angles, angles], -1).cos(), torch.cat([angles, angles], -1).sin()
    (hc,), (hg,) = both(h)
    out_c, out_g = ops.rotary(hc, cos, sin), ops.rotary(hg, cos.cuda(), sin.cuda())
    assert_same(out_g, out_c, 1e-5, 1e-5)
    check_backward(out_c, out_g, (hc,), (hg,), 1e-5, 1e-5)


def test_ffn_loss_bitlinear_and_moe_against_cpu():
    x, wg, wu, wd = torch.randn(70, 64), torch.randn(96, 64) * 0.1, torch.randn(96, 64) * 0.1, torch.randn(64, 96) * 0.1
    cpu, gpu = both(x, wg, wu, wd)
    out_c, out_g = ops.blockwise_ffn(*cpu, chunk=32), ops.blockwise_ffn(*gpu, chunk=32)
    assert_same(out_g, out_c, 1e-4, 1e-4)
    check_backward(out_c, out_g, cpu, gpu, 1e-4, 1e-4)

    h, head, targets = torch.randn(2, 30, 64), torch.randn(500, 64) * 0.1, torch.randint(0, 500, (2, 30))
    (hc, wc), (hg, wgpu) = both(h, head)
    loss_c = ops.chunked_lm_loss(hc, wc, targets, chunk=16)[0]
    loss_g = ops.chunked_lm_loss(hg, wgpu, targets.cuda(), chunk=16)[0]
    assert_same(loss_g, loss_c, 1e-5, 1e-5)
    check_backward(loss_c, loss_g, (hc, wc), (hg, wgpu), 1e-4, 1e-5)

    (xc, wc), (xg, wgpu) = both(torch.randn(5, 64), torch.randn(32, 64))
    out_c, out_g = ops.bitlinear(xc, wc), ops.bitlinear(xg, wgpu)
    assert_same(out_g, out_c, 1e-4, 1e-4)
    check_backward(out_c, out_g, (xc, wc), (xg, wgpu), 1e-4, 1e-4)

    index, weight = torch.randint(0, 9, (20,)), torch.rand(20)
    (xc, wc), (xg, wgpu) = both(torch.randn(9, 16), weight)
    slots_c, slots_g = ops.moe_dispatch(xc, index), ops.moe_dispatch(xg, index.cuda())
    assert_same(slots_g, slots_c, 0, 0)
    out_c = ops.moe_combine(slots_c * 2, index, wc, 9)
    out_g = ops.moe_combine(slots_g * 2, index.cuda(), wgpu, 9)
    assert_same(out_g, out_c, 1e-6, 1e-6)
    check_backward(out_c, out_g, (xc, wc), (xg, wgpu), 1e-5, 1e-5)


@pytest.mark.parametrize("m, n, k", [(1, 64, 4096), (1, 100, 1000), (8, 256, 1024), (17, 33, 65)])
def test_ternary_linear_against_cpu_kernel(m, n, k):
    weight = torch.randn(n, k)
    packed, scale = ops.ternary_pack(weight)
    packed_gpu, scale_gpu = ops.ternary_pack(weight.cuda())
    assert torch.equal(packed_gpu.cpu(), packed) and torch.equal(scale_gpu.cpu(), scale)
    x = torch.randn(m, k)
    # Exact int32 sums of the same products, then the same fp32 scaling: the same bits.
    assert_same_bits(ops.ternary_linear(x.cuda(), packed_gpu, scale_gpu, k), ops.ternary_linear(x, packed, scale, k))
    with torch.cuda.stream(torch.cuda.Stream()):  # on a stream of its own: the kernels follow it
        got = ops.ternary_linear(x.cuda(), packed_gpu, scale_gpu, k)
    torch.cuda.synchronize()
    assert_same_bits(got, ops.ternary_linear(x, packed, scale, k))


def ternary_weight(n, k):
    """A random weight's (packed, scale) on the CPU and on the GPU."""
    packed, scale = ops.ternary_pack(torch.randn(n, k))
    return (packed, scale), (packed.cuda(), scale.cuda())


def assert_same_bits(got, want):
    """The GPU's output is the CPU op's bit for bit; NaN where it has NaN (any payload)."""
    got = got.cpu()
    assert got.dtype == want.dtype and got.shape == want.shape
    nan = want.isnan()
    assert torch.equal(got.isnan(), nan)
    bits = {2: torch.int16, 4: torch.int32, 8: torch.int64}[want.element_size()]
    assert torch.equal(got[~nan].view(bits), want[~nan].view(bits))


# M = 1 runs the GEMV, M >= 2 tiles of 8 tokens plus the rest (2, 4 or 8 wide); K a multiple of
# 64 reads codes as 16-byte vectors, any other K byte by byte; 2048 and 4096 fill whole groups
# of 32 chunks of the activation layout, 4096 + 4 and + 64 end in a partial one. N = 37: a
# partial warp and block of rows. M = 3, 10, 11: a 4-wide rest with a padding token, a 2-wide
# and a 4-wide rest after a full tile.
@pytest.mark.parametrize("k", [1, 3, 4, 15, 16, 17, 63, 64, 100, 2048, 4096, 4096 + 4, 4096 + 64])
@pytest.mark.parametrize("m", [1, 2, 3, 7, 8, 9, 10, 11, 33, 100])
def test_ternary_linear_equals_the_cpu_op_bit_for_bit(m, k):
    cpu, gpu = ternary_weight(37, k)
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        x = torch.randn(m, k).to(dtype)
        assert_same_bits(ops.ternary_linear(x.cuda(), *gpu, k), ops.ternary_linear(x, *cpu, k))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_ternary_linear_non_finite_zero_and_strided_tokens(dtype):
    k = 192
    cpu, gpu = ternary_weight(21, k)
    x = torch.randn(k, 3, 5).to(dtype).permute(1, 2, 0)  # [3, 5, k], not contiguous
    x[0, 1, 7] = float("nan")
    x[1, 2, 0] = float("inf")
    x[2, 0, -1] = float("-inf")
    x[2, 3] = 0  # a zero token: scale 127 / 1e-5, outputs 0
    x[1, 4, 5] = 1e4  # one large value: the rest of its token rounds to 0
    got = ops.ternary_linear(x.cuda(), *gpu, k)
    want = ops.ternary_linear(x, *cpu, k)
    assert want[0, 1].isnan().all() and want[1, 2].isnan().all() and not want[0, 0].isnan().any()
    assert_same_bits(got, want)


@pytest.mark.parametrize("m", [1, 8, 13])
def test_ternary_linear_reads_packed_weights_that_are_not_16_byte_aligned(m):
    # A view one byte into its storage: rows a multiple of 16 bytes, but the byte path.
    n, k = 19, 4096
    cpu, (packed, scale) = ternary_weight(n, k)
    storage = torch.zeros(packed.numel() + 1, dtype=torch.uint8, device="cuda")
    shifted = storage[1:].view(packed.shape)
    shifted.copy_(packed)
    assert shifted.data_ptr() % 16 != 0
    x = torch.randn(m, k)
    assert_same_bits(ops.ternary_linear(x.cuda(), shifted, scale, k), ops.ternary_linear(x, *cpu, k))


@pytest.mark.parametrize("m, n, k", [(0, 5, 64), (3, 0, 64), (4, 7, 0), (0, 0, 0)])
def test_ternary_linear_empty_shapes(m, n, k):
    cpu, gpu = ternary_weight(n, k)
    x = torch.randn(m, k)
    assert_same_bits(ops.ternary_linear(x.cuda(), *gpu, k), ops.ternary_linear(x, *cpu, k))


def test_ternary_linear_more_token_tiles_than_a_grid_row():
    # 65536 tiles of 8 tokens, plus 3: grid.y (at most 65535) wraps around.
    m, n, k = 8 * 65536 + 3, 5, 20
    cpu, gpu = ternary_weight(n, k)
    x = torch.randn(m, k)
    assert_same_bits(ops.ternary_linear(x.cuda(), *gpu, k), ops.ternary_linear(x, *cpu, k))


def test_opcheck_on_cuda():
    q, k, v = (torch.randn(1, 4, 9, 16, device="cuda", requires_grad=True) for _ in range(3))
    torch.library.opcheck(ops.blockwise_attention.default, (q, k, v), {"causal": True, "q_chunk": 4, "k_chunk": 4})
    x, w = torch.randn(3, 8, device="cuda", requires_grad=True), torch.randn(8, device="cuda", requires_grad=True)
    torch.library.opcheck(ops.rms_norm.default, (x, w, 1e-6))
    h = torch.randn(1, 2, 5, 8, device="cuda", requires_grad=True)
    cos, sin = torch.randn(5, 8, device="cuda"), torch.randn(5, 8, device="cuda")
    torch.library.opcheck(ops.rotary.default, (h, cos, sin))


def test_torch_compile_over_the_ops_on_cuda():
    def f(x, w, cos, sin, k, v):
        q = ops.rotary(ops.rms_norm(x, w, 1e-6), cos, sin)
        out, lse = ops.blockwise_attention(q, k, v, causal=True, q_chunk=8, k_chunk=8)
        return out.square().sum() + lse.sum()

    x = torch.randn(1, 4, 24, 16, device="cuda", requires_grad=True)
    w = torch.randn(16, device="cuda", requires_grad=True)
    cos, sin = torch.randn(24, 16, device="cuda"), torch.randn(24, 16, device="cuda")
    k, v = (torch.randn(1, 2, 24, 16, device="cuda", requires_grad=True) for _ in range(2))
    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    got = torch.autograd.grad(compiled(x, w, cos, sin, k, v), (x, w, k, v))
    want = torch.autograd.grad(f(x, w, cos, sin, k, v), (x, w, k, v))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)


def test_cuda_graph_replays_attention_forward_and_backward():
    # No host synchronisation in the op or its backward: a captured step replays on new inputs
    # copied into the captured ones, and gives what an eager step gives on them.
    q = torch.randn(1, 4, 40, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    k, v = (torch.randn(1, 2, 40, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(2))
    grad = torch.randn_like(q)

    def step():
        out, _ = ops.blockwise_attention(q, k, v, causal=True, q_chunk=16, k_chunk=16)
        return torch.autograd.grad(out, (q, k, v), grad)

    side = torch.cuda.Stream()  # warm-up on a side stream, as torch.cuda.graph asks
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = step()
    with torch.no_grad():
        for t in (q, k, v, grad):
            t.copy_(torch.randn_like(t))
    graph.replay()
    torch.cuda.synchronize()
    for got, want in zip(captured, step()):
        torch.testing.assert_close(got, want)


TINY = ["--load_llama_config=tiny", "--train_dataset.type=synthetic", "--train_dataset.json_dataset.seq_length=64",
        "--train_dataset.json_dataset.batch_size=4", "--total_steps=5", "--log_freq=1", "--progress=never"]


def losses(out) -> list[float]:
    return [r["loss"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


def test_training_on_one_gpu_follows_the_cpu(tmp_path):
    cpu = run_app("train", *TINY, f"--logger.output_dir={tmp_path / 'cpu'}")
    assert cpu.returncode == 0, cpu.stderr
    gpu = run_app("train", *TINY, "--device=cuda", f"--logger.output_dir={tmp_path / 'gpu'}")
    assert gpu.returncode == 0, gpu.stderr
    # fp32 on both; the GPU sums in other orders.
    assert losses(tmp_path / "gpu") == pytest.approx(losses(tmp_path / "cpu"), abs=1e-4)


def test_gpu_metrics_carry_the_gpus_peak_memory(tmp_path):
    result = run_app("train", *TINY, "--device=cuda", f"--logger.output_dir={tmp_path}")
    assert result.returncode == 0, result.stderr
    records = [r for r in map(json.loads, (tmp_path / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
    assert len(records) == 5
    total_mb = torch.cuda.get_device_properties(0).total_memory / 2**20  # LOCAL_RANK unset: GPU 0
    for r in records:
        # Each step's peak holds the parameters, their gradients and AdamW's moments, all on the GPU.
        state_mb = r["state_mb"] * 1e6 / 2**20
        assert state_mb <= r["gpu_peak_allocated_mb"] <= r["gpu_peak_reserved_mb"] <= total_mb, r


def test_a_resumed_gpu_run_draws_the_dropout_masks_of_an_uninterrupted_one(tmp_path):
    base = run_app("train", *TINY, "--total_steps=1", f"--logger.output_dir={tmp_path / 'base'}")
    assert base.returncode == 0, base.stderr
    # LoRA dropout on GPU tensors draws from the GPU's generator (the checkpoint's gpu_rng).
    lora = [*TINY, "--device=cuda", f"--load_checkpoint=params::{tmp_path / 'base' / 'checkpoint'}",
            "--finetune.mode=lora", "--finetune.lora_dropout=0.1", "--optimizer.adamw_optimizer.lr=1e-2",
            "--optimizer.adamw_optimizer.lr_warmup_steps=0"]

    def train(out: str, steps: int, *extra) -> None:
        result = run_app("train", *lora, f"--total_steps={steps}", f"--logger.output_dir={tmp_path / out}", *extra)
        assert result.returncode == 0, result.stderr

    train("straight", 8)
    for out in ("resumed", "reseeded"):
        train(out, 4)
    assert json.loads((tmp_path / "resumed" / "checkpoint" / "trainer_state.json").read_text())["gpu_rng"]
    train("resumed", 8, "--autoresume")
    assert losses(tmp_path / "resumed") == pytest.approx(losses(tmp_path / "straight"), abs=1e-5)
    # A checkpoint without gpu_rng (as before it was saved) resumes, with other masks: the check
    # above is real.
    state = tmp_path / "reseeded" / "checkpoint" / "trainer_state.json"
    state.write_text(json.dumps({k: v for k, v in json.loads(state.read_text()).items() if k != "gpu_rng"}))
    train("reseeded", 8, "--autoresume")
    assert losses(tmp_path / "reseeded")[4:] != pytest.approx(losses(tmp_path / "straight")[4:], abs=1e-4)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="FSDP over NCCL needs two GPUs")
def test_fsdp_over_nccl_follows_one_gpu(tmp_path):
    one = run_app("train", *TINY, "--device=cuda", f"--logger.output_dir={tmp_path / 'one'}")
    assert one.returncode == 0, one.stderr
    two = subprocess.run([str(ROOT / "tools" / "launch"), "--nproc", "2", str(BUILD / "bpt-train"), *TINY,
                          "--device=cuda", f"--logger.output_dir={tmp_path / 'two'}"],
                         capture_output=True, text=True, timeout=600)
    assert two.returncode == 0, two.stderr
    assert losses(tmp_path / "two") == pytest.approx(losses(tmp_path / "one"), abs=1e-4)
