"""moe: a mixture-of-experts layer's forward and forward+backward, bpt's ops vs a plain PyTorch
loop over the experts and vs a dense FFN of equal active FLOPs, at 8 and 64 experts, side by
side; bpt-train's tokens/s on a tiny GLaM vs a dense LLaMA of equal active parameters; and that
GLaM trained at world 2 with its experts FSDP-sharded vs placed by --expert_parallel.

task=layer: N=4096 tokens, C=512, expert intermediate I=1408, top-2, E in {8, 64}, fp32
(--quick: N=256, C=64, I=128). Random weights, scaled 1/sqrt(fan in), shared by the bpt and
torch-loop cases (the same seed); every expert is its own leaf tensor, as nn.Linear's are.

- bpt: csrc/nn/moe.cpp's MoELayer::forward rebuilt in Python from the same ops, dropless
  (capacity_factor 0), top-2: fp32 router logits, softmax, top-k renormalised to sum to 1,
  slots in priority order (every token's first choice, then its second) stably sorted by
  expert, torch.ops.bpt.moe_dispatch, each expert's SwiGLU by torch.ops.bpt.blockwise_ffn on
  its contiguous slice (chunk 2048, LLaMA's ffn_chunk_size, as the model passes it), cat, and
  torch.ops.bpt.moe_combine with the router weights;
- torch-loop: Hugging Face Mixtral's MixtralSparseMoeBlock loop: the same router, then for each
  expert hit, torch.where over its top-k mask, index the tokens, SwiGLU with F.linear, scale by
  the router weight and index_add_ into the output. The baseline of the ratios;
- dense-equal-flops: one dense SwiGLU FFN of intermediate k I (the FLOPs of a token's k
  experts), F.linear, no router.

Neither MoE computes the router's aux or z losses (Mixtral computes them outside the layer).
The fwdbwd phase backpropagates a fixed random output gradient into x and every weight
(router included). After timing, the bpt case's fwdbwd process checks its output and every
gradient against torch-loop on the same inputs (fp32, within 1e-4) and fails the case if they
differ. tokens_per_s is N over the fwdbwd time; the peaks are above the inputs and weights
(common.measure).

task=train: bpt-train on synthetic tokens, fp32, D=256, 4 layers, 4 heads (no GQA), vocab 256
(the tiny preset's), T=256, B=4 (--quick: D=64, I=160, 2 layers, T=64, B=2); 6 steps,
step_ms the median after two warm-up steps (from tokens_per_s in metrics.jsonl, as
finetune.py), step_peak_mb bpt-train's whole peak resident memory, remat nothing_saveable (its
default) in both.

- glam: --model=glam with --llama.num_local_experts=8, so make_glam keeps the experts' count
  but gives every other layer (moe_layer_freq 2) an MoE MLP, top-2, router losses 0.01 and
  1e-4; plus --llama.expert_activation=silu (SwiGLU experts, as the dense layers, not GLaM's
  two-matrix GELU) and --llama.capacity_factor=0 (dropless: every token gets both experts,
  so the active FLOPs are exactly k experts'). Each expert has intermediate I = 688 (160);
- llama-dense: --model=llama with intermediate (freq - 1 + k) / freq x I = 1.5 I = 1032 in every
  layer. bpt cannot mix MLP sizes per layer, so "equal active parameters" is over the whole
  model: GLaM's MLPs hold (L/2) 3 D I + (L/2) k 3 D I weights a token uses, the dense model's
  L 3 D (1.5 I), the same; the rest (attention, norms, embedding, head) is identical. GLaM's
  routers (D E per MoE layer) are the only difference in active parameters.

The train records carry state_mb (parameters, gradients and AdamW state, from metrics.jsonl),
and in the JSON alone total_params (counted in the checkpoint bpt-train saves) and
active_params (total less the (E - k) experts' weights a token does not use, per MoE layer).
report.py takes one baseline per benchmark, torch-loop, so the train rows show no ratios:
compare their tokens_per_s by eye. Each task's rows show "skipped" under the other tasks' phases.

task=ep: the same GLaM (task=train's sizes and flags) trained by bpt-train at world 2 under
tools/launch (FSDP over Gloo, each rank OMP_NUM_THREADS = cores / 2, B / 2 of the rows), its
experts either sharded like every other weight or placed by --expert_parallel, and in one
process as the reference; 10 steps (--quick: 5), phase ep_step: step_ms and tokens_per_s the
medians after two warm-up steps, ep_step_peak_mb rank 0's peak_memory_mb.

- glam-fsdp2: the experts FSDP-sharded: each layer's experts all-gathered for forward, again
  for the recomputed forward, gradients reduce-scattered. The baseline of the ratios;
- glam-fsdp2-ep: --expert_parallel: each rank keeps E / 2 experts whole and exchanges the
  routed tokens with the other by all-to-all;
- glam-w1: one process, every core.

Each record carries state_mb and comm_mb_per_step (rank 0's, from metrics.jsonl; 0 at world
1): FSDP's whole gathered and reduce-scatter buffers, and with --expert_parallel the rows its
all-to-alls send (six per MoE layer: forward, the forward remat recomputes, backward; each out
and back; the rows a rank keeps included, as FSDP's count includes its own shard). Ratios
against glam-fsdp2 (tokens_per_s, peak_mb, state_mb, comm_mb_per_step) are in the JSON as
vs_glam_fsdp2 and printed after the table. loss is the last
step's; it is the same in all three up to reduction order. --task picks tasks (e.g. --quick
--task ep).

    .venv/bin/python tools/bench/moe.py [--quick] [--task layer train ep] [--out FILE]
"""

import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REPO, main, measure, safetensors_numel  # noqa: E402

TASK_PHASES = {"layer": ("fwd", "fwdbwd"), "train": ("step",), "ep": ("ep_step",)}  # the others: skipped
TASKS = tuple(TASK_PHASES)
PHASES = tuple(phase for phases in TASK_PHASES.values() for phase in phases)
LAYER = dict(N=4096, C=512, I=1408)
LAYER_QUICK = dict(N=256, C=64, I=128)
TOP_K, CHUNK = 2, 2048
LAYER_IMPLS = ("bpt", "torch-loop", "dense-equal-flops")
TRAIN = dict(T=256, B=4, D=256, I=688, layers=4, heads=4)  # I: GLaM's expert intermediate
TRAIN_QUICK = dict(T=64, B=2, D=64, I=160, layers=2, heads=4)
TRAIN_EXPERTS, MOE_LAYER_FREQ = 8, 2  # MOE_LAYER_FREQ: make_glam's
STEPS, WARMUP = 6, 2
EP_STEPS, EP_STEPS_QUICK = 10, 5
EP_WORLD = 2
EP_IMPLS = ("glam-fsdp2", "glam-fsdp2-ep", "glam-w1")  # the first: the baseline of the ratios
EP_RATIOS = ("tokens_per_s", "peak_mb", "state_mb", "comm_mb_per_step")


def add_args(parser):
    parser.add_argument("--task", choices=TASKS, nargs="+", default=list(TASKS), help="the tasks to run (default: all)")


def cases(args):
    layer = LAYER_QUICK if args.quick else LAYER
    train = TRAIN_QUICK if args.quick else TRAIN
    ep_steps = EP_STEPS_QUICK if args.quick else EP_STEPS
    by_task = {
        "layer": [{"task": "layer", "E": E, **layer, "k": TOP_K, "impl": impl}
                  for E in (8, 64) for impl in LAYER_IMPLS],
        "train": [{"task": "train", "E": TRAIN_EXPERTS, "k": TOP_K, **train, "impl": impl}
                  for impl in ("glam", "llama-dense")],
        "ep": [{"task": "ep", "E": TRAIN_EXPERTS, "k": TOP_K, **train, "steps": ep_steps, "impl": impl}
               for impl in EP_IMPLS],
    }
    return [case for task in TASKS if task in args.task for case in by_task[task]]


def ep_ratios(record, base) -> dict:
    """record's numbers over the glam-fsdp2 record's (None where the baseline's is 0)."""
    return {key: record[key] / base[key] if base[key] > 0 else None for key in EP_RATIOS}


def make_annotate():
    """annotate(record) for main, and the task=ep records it saw (to print their ratios after the
    table; none in a --case child). A record's ratios are filled in once the baseline has run."""
    ep_records = []

    def annotate(record):
        p = record["params"]
        if p["task"] == "layer" and "fwdbwd_ms" in record:
            record["tokens_per_s"] = p["N"] / (record["fwdbwd_ms"] / 1e3)
        elif p["task"] == "train" and "step_ms" in record:
            record["tokens_per_s"] = p["B"] * p["T"] / (record["step_ms"] / 1e3)
        elif p["task"] == "ep" and "ep_step_ms" in record:  # tokens_per_s: the measured median
            ep_records.append(record)
            base = next((r for r in ep_records if r["impl"] == EP_IMPLS[0]), None)
            if base is not None:
                for r in ep_records:
                    r["vs_glam_fsdp2"] = ep_ratios(r, base)

    return annotate, ep_records


def print_ep_ratios(ep_records):
    rows = [r for r in ep_records if "vs_glam_fsdp2" in r]
    if not rows:
        return
    header = ("impl", *EP_RATIOS)
    body = [(r["impl"], *("-" if v is None else f"{v:.2f}x" for v in r["vs_glam_fsdp2"].values())) for r in rows]
    widths = [max(len(x) for x in column) for column in zip(header, *body)]
    print(f"\nmoe task=ep, ratios against {EP_IMPLS[0]}")
    for line in (header, *body):
        print("  ".join(c.ljust(w) for c, w in zip(line, widths)).rstrip())


# ---- task=layer

def bpt_moe(x, gate, w1, w3, w2, k):
    """csrc/nn/moe.cpp's MoELayer::forward (dropless) with the same ops. x [N, C] -> [N, C];
    gate [E, C]; per expert w1, w3 [I, C] (gate, up), w2 [C, I] (down)."""
    import torch
    import torch.nn.functional as F

    N, E = x.shape[0], gate.shape[0]
    logits = F.linear(x.float(), gate.float())  # [N, E]: fp32 routing whatever x's dtype
    top_probs, top_experts = logits.softmax(-1).topk(k, -1)
    weights = top_probs / top_probs.sum(-1, keepdim=True)
    # Slot j N + n: token n's j-th choice; grouped by expert, each group in priority order.
    experts = top_experts.t().reshape(-1)
    slots = experts.sort(stable=True).indices
    token = torch.arange(N).repeat(k).index_select(0, slots)
    weight = weights.t().reshape(-1).index_select(0, slots)
    counts = torch.bincount(experts, minlength=E).tolist()

    dispatched = torch.ops.bpt.moe_dispatch(x, token)  # [k N, C]
    outputs, offset = [], 0
    for e, count in enumerate(counts):
        if count > 0:
            outputs.append(torch.ops.bpt.blockwise_ffn(dispatched.narrow(0, offset, count), w1[e], w3[e], w2[e],
                                                        chunk=CHUNK))
        offset += count
    return torch.ops.bpt.moe_combine(torch.cat(outputs), token, weight, N)


def torch_loop_moe(x, gate, w1, w3, w2, k):
    """Hugging Face's MixtralSparseMoeBlock.forward, its experts' SwiGLU in F.linear."""
    import torch
    import torch.nn.functional as F

    E = gate.shape[0]
    routing = F.softmax(F.linear(x, gate), dim=1, dtype=torch.float)
    routing, selected = torch.topk(routing, k, dim=-1)
    routing = (routing / routing.sum(dim=-1, keepdim=True)).to(x.dtype)
    out = torch.zeros_like(x)
    mask = F.one_hot(selected, num_classes=E).permute(2, 1, 0)  # [E, k, N]
    for e in torch.greater(mask.sum(dim=(-1, -2)), 0).nonzero().flatten().tolist():
        choice, tokens = torch.where(mask[e])
        h = x[tokens]
        h = F.linear(F.silu(F.linear(h, w1[e])) * F.linear(h, w3[e]), w2[e]) * routing[tokens, choice, None]
        out.index_add_(0, tokens, h.to(x.dtype))
    return out


def dense_ffn(x, w_gate, w_up, w_down):
    import torch.nn.functional as F

    return F.linear(F.silu(F.linear(x, w_gate)) * F.linear(x, w_up), w_down)


def layer_inputs(p, train: bool, dense: bool):
    """(x [N, C], weights..., output gradient [N, C]); the MoE's weights: gate, w1, w3, w2 (lists
    of E leaves), the dense FFN's: w_gate, w_up [k I, C], w_down [C, k I]."""
    import torch

    def w(*shape):
        return (torch.randn(*shape) / shape[-1] ** 0.5).requires_grad_(train)

    N, C, I, E, k = p["N"], p["C"], p["I"], p["E"], p["k"]
    x = torch.randn(N, C, requires_grad=train)
    if dense:
        weights = (w(k * I, C), w(k * I, C), w(C, k * I))
    else:
        weights = (w(E, C), [w(I, C) for _ in range(E)], [w(I, C) for _ in range(E)], [w(C, I) for _ in range(E)])
    return (x, *weights, torch.randn(N, C))


def leaves(inputs):
    """The tensors of layer_inputs that take gradients, flattened."""
    return [t for item in inputs[:-1] for t in (item if isinstance(item, list) else [item])]


def check_against_loop(p):
    """bpt's output and every gradient equal torch-loop's on the same inputs (fp32)."""
    import torch

    inputs = layer_inputs(p, train=True, dense=False)
    results = []
    for fn in (bpt_moe, torch_loop_moe):
        for t in leaves(inputs):
            t.grad = None
        out = fn(*inputs[:-1], p["k"])
        out.backward(inputs[-1])
        # An expert no token chose has no gradient, in either (likely at --quick's 64 experts).
        results.append([out.detach()] + [torch.zeros_like(t) if t.grad is None else t.grad.clone()
                                          for t in leaves(inputs)])
    for i, (ours, theirs) in enumerate(zip(*results)):
        torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4,
                                   msg=lambda m: f"bpt vs torch-loop, {'output' if i == 0 else f'grad {i - 1}'}: {m}")


def run_layer(p, phase):
    import torch

    import bpt  # noqa: F401

    train = phase == "fwdbwd"
    dense = p["impl"] == "dense-equal-flops"
    fn = {"bpt": bpt_moe, "torch-loop": torch_loop_moe}.get(p["impl"])

    def forward(*inputs):
        return dense_ffn(*inputs[:-1]) if dense else fn(*inputs[:-1], p["k"])

    def step(*inputs):
        if train:
            for t in leaves(inputs):
                t.grad = None
            forward(*inputs).backward(inputs[-1])
        else:
            with torch.no_grad():
                forward(*inputs)

    result = measure(lambda: layer_inputs(p, train, dense), step)
    if train and p["impl"] == "bpt":
        check_against_loop(p)  # after timing: its allocations are not the phase's
    return result


# ---- task=train and task=ep

def train_flags(p, glam: bool, steps: int, out: str) -> list:
    """bpt-train's flags for a task=train or task=ep case, metrics.jsonl (every step) into out."""
    intermediate = p["I"]
    if not glam:  # every layer's MLP holds the active share of GLaM's MLPs (see the docstring)
        assert (MOE_LAYER_FREQ - 1 + p["k"]) * p["I"] % MOE_LAYER_FREQ == 0, "a whole dense intermediate size"
        intermediate = (MOE_LAYER_FREQ - 1 + p["k"]) * p["I"] // MOE_LAYER_FREQ
    config = dict(hidden_size=p["D"], intermediate_size=intermediate, num_hidden_layers=p["layers"],
                  num_attention_heads=p["heads"], num_key_value_heads=p["heads"])
    args = [f"--model={'glam' if glam else 'llama'}", "--load_llama_config=tiny",
            "--update_llama_config=" + ",".join(f"{k}={v}" for k, v in config.items()),
            "--train_dataset.type=synthetic", f"--train_dataset.json_dataset.seq_length={p['T']}",
            f"--train_dataset.json_dataset.batch_size={p['B']}", f"--total_steps={steps}", "--log_freq=1",
            "--dtype=float32", "--progress=never", f"--logger.output_dir={out}",
            "--llama.remat_policy=nothing_saveable", "--peak_flops=1e12"]
    if glam:
        args += [f"--llama.num_local_experts={p['E']}", f"--llama.num_experts_per_tok={p['k']}",
                 "--llama.expert_activation=silu", "--llama.capacity_factor=0"]
    return args


def run_train(p):
    glam = p["impl"] == "glam"
    with tempfile.TemporaryDirectory() as out:
        args = train_flags(p, glam, STEPS, out)
        subprocess.run([str(REPO / "build" / "bpt-train"), *args], check=True, capture_output=True, timeout=3000)
        records = [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]
        saved = json.loads((Path(out) / "checkpoint" / "config.json").read_text())
        total = safetensors_numel(Path(out) / "checkpoint" / "model.safetensors")
    moe_layers = saved["num_hidden_layers"] // MOE_LAYER_FREQ if glam else 0
    assert not glam or saved["bpt"]["moe_layer_freq"] == MOE_LAYER_FREQ, saved["bpt"]
    unused = moe_layers * (p["E"] - p["k"]) * 3 * saved["hidden_size"] * saved["intermediate_size"]
    timed = [r for r in records if "tokens_per_s" in r][WARMUP:]
    ms = statistics.median(p["B"] * p["T"] / r["tokens_per_s"] * 1e3 for r in timed)
    extra = {"total_params": total, "active_params": total - unused, "state_mb": timed[-1]["state_mb"]}
    return ms, max(r["peak_memory_mb"] for r in records), extra


def run_ep(p):
    """One task=ep configuration: (step ms, rank 0's peak MB, its numbers from metrics.jsonl)."""
    world = 1 if p["impl"] == "glam-w1" else EP_WORLD
    expert_parallel = p["impl"] == "glam-fsdp2-ep"
    with tempfile.TemporaryDirectory() as out:
        args = train_flags(p, True, p["steps"], out) + (["--expert_parallel"] if expert_parallel else [])
        if world > 1:
            cmd = [str(REPO / "tools" / "launch"), "--nproc", str(world), "bpt-train", *args]
            env = {**os.environ, "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // world))}
        else:
            cmd, env = [str(REPO / "build" / "bpt-train"), *args], None
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=3000, env=env)
        if proc.returncode != 0:  # bpt-train's own message, not just the exit status
            lines = (proc.stderr.strip() or proc.stdout.strip() or "(no output)").splitlines()
            raise RuntimeError(f"{p['impl']}: exit {proc.returncode}: {' | '.join(lines[-3:])}")
        records = [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]
    timed = [r for r in records if "tokens_per_s" in r][WARMUP:]
    assert timed, f"{p['impl']}: no step after the {WARMUP} warm-up steps in metrics.jsonl"
    tokens_per_s = statistics.median(r["tokens_per_s"] for r in timed)
    extra = {"world_size": world, "tokens_per_s": tokens_per_s, "state_mb": timed[-1]["state_mb"],
             "comm_mb_per_step": statistics.median(r.get("comm_mb_per_step", 0.0) for r in timed),
             "loss": timed[-1]["loss"]}
    return p["B"] * p["T"] / tokens_per_s * 1e3, max(r["peak_memory_mb"] for r in records), extra


def run_phase(p, phase):
    if phase not in TASK_PHASES[p["task"]]:
        return None
    if p["task"] == "layer":
        return run_layer(p, phase)
    return run_train(p) if p["task"] == "train" else run_ep(p)


if __name__ == "__main__":
    annotate, ep_records = make_annotate()
    main(__file__, cases, PHASES, run_phase, add_args, annotate)
    print_ep_ratios(ep_records)
