"""generate: greedy decoding at batch 1 with the KV cache: a quantized bLLaMA (BitLinear
weights packed 2 bits per value, int8 x ternary kernels) vs an fp32 and a bf16 LLaMA of the
same shape, side by side.

Shape: bLLaMA 1.7B's layers (hidden 2048, intermediate 8192, 32 heads, vocab 32000) with 4
of its 24 layers (--quick: 2), random weights. The quantized bLLaMA keeps its embedding,
norms and head in bf16 (bpt-convert --quantize ternary's default). Each case builds its
checkpoint in a subprocess, then loads it (bpt.llama.Llama) and times 32 new tokens after an
8-token prompt; step_ms is the time per new token (the median of three runs), model_mb the
resident memory the loaded model holds, step_peak_mb the peak above that while decoding.

- llama-fp32: the baseline; llama-bf16: the same weights in bf16;
- bllama-ternary: bpt-convert --quantize ternary of a bLLaMA of the same shape.
"""

import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REPO, main, peak_memory_mb, reset_peak_memory  # noqa: E402

PHASES = ("decode",)
SHAPE = dict(vocab_size=32000, hidden_size=2048, intermediate_size=8192, num_attention_heads=32,
             num_key_value_heads=32)
PROMPT, NEW_TOKENS = 8, 32


def cases(args):
    layers = 2 if args.quick else 4
    return [{"layers": layers, "impl": impl} for impl in ("llama-fp32", "llama-bf16", "bllama-ternary")]


def annotate(record):
    record["tokens_per_s"] = 1e3 / record["ms"]


def build_checkpoint(p, directory: Path) -> Path:
    """A random model of the case's shape saved in `directory` (in a subprocess: its memory
    is not the measured process's)."""
    fields = {**SHAPE, "num_hidden_layers": p["layers"], "bitlinear": str(p["impl"].startswith("bllama")).lower()}
    script = ("import sys; from bpt.llama import Llama; "
              f"Llama.preset('tiny', **{fields!r}).save(sys.argv[1])")
    source = directory / "source"
    subprocess.run([sys.executable, "-c", script, str(source)], check=True, capture_output=True, timeout=1800)
    if p["impl"] == "bllama-ternary":
        packed = directory / "ternary"
        subprocess.run([str(REPO / "build/bpt-convert"), "--input", str(source), "--output", str(packed),
                        "--quantize", "ternary"], check=True, capture_output=True, timeout=1800)
        return packed
    return source


def run_phase(p, phase):
    import torch

    from bpt.llama import Llama

    with tempfile.TemporaryDirectory() as tmp:
        directory = build_checkpoint(p, Path(tmp))
        before = reset_peak_memory()
        model = Llama(directory, **({"dtype": "bfloat16"} if p["impl"] == "llama-bf16" else {}))
        model_mb = reset_peak_memory() - before  # resident now, the file mappings gone
        prompt = torch.randint(0, SHAPE["vocab_size"], (PROMPT,))
        with torch.no_grad():
            model.generate(prompt, 4)  # warm-up
            base = reset_peak_memory()
            times = []
            for _ in range(3):
                start = time.perf_counter()
                model.generate(prompt, NEW_TOKENS)
                times.append((time.perf_counter() - start) * 1e3 / NEW_TOKENS)
        checkpoint_mb = sum(f.stat().st_size for f in directory.glob("*.safetensors")) / 1e6
    return statistics.median(times), peak_memory_mb() - base, {"model_mb": model_mb, "checkpoint_mb": checkpoint_mb}


if __name__ == "__main__":
    os.environ.setdefault("PYTHONPATH", str(REPO / "python"))
    main(__file__, cases, PHASES, run_phase, annotate=annotate)
