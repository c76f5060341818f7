"""llama: a bpt LLaMA (C++, torch.classes.bpt.Llama) vs transformers' LlamaForCausalLM on the
same weights: D=512, 8 layers, 8 heads, vocab 32000, batch 1.

- task=train: one forward+backward of the loss over T tokens (bpt: blockwise attention, FFN
  and chunked loss; transformers: eager or sdpa attention, full logits), fp32 and bf16;
- task=generate: 128 new tokens greedily after a 128-token prompt, with and without a KV
  cache (fp32).

Records carry tokens_per_s (T / step time for train, new tokens / time for generate) and
peak_mb. --quick: T 1k and 4k, and generation. Full: T 1k, 4k, 16k (eager stops at 4k: its
[T, T] attention weights, kept for backward, need 8 GB per layer at 16k).
"""

import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import main, measure  # noqa: E402

PHASES = ("step",)
CONFIG = dict(vocab_size=32000, hidden_size=512, intermediate_size=1376, num_hidden_layers=8, num_attention_heads=8,
              num_key_value_heads=8, max_position_embeddings=16384)
BPT_CHUNKS = dict(q_chunk_size=256, k_chunk_size=256, ffn_chunk_size=2048, loss_chunk_size=1024)
PROMPT, NEW_TOKENS = 128, 128


def cases(args):
    lengths = [1024, 4096] if args.quick else [1024, 4096, 16384]
    train = [
        {"task": "train", "T": T, "dtype": dtype, "impl": impl}
        for T in lengths
        for dtype in ("float32", "bfloat16")
        for impl in ("bpt", "hf-sdpa", "hf-eager")
    ]
    generate = [
        {"task": "generate", "cache": cache, "dtype": "float32", "impl": impl}
        for cache in (True, False)
        for impl in ("bpt", "hf-sdpa")
    ]
    return train + generate


def annotate(record):
    p = record["params"]
    tokens = p["T"] if p["task"] == "train" else NEW_TOKENS
    record["tokens_per_s"] = tokens / (record["ms"] / 1e3)


def run_phase(p, phase):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from bpt.llama import Llama

    if p["impl"] == "hf-eager" and p["task"] == "train" and p["T"] > 4096:
        return None
    dtype = getattr(torch, p["dtype"])
    attn = "eager" if p["impl"] == "hf-eager" else "sdpa"
    hf = LlamaForCausalLM(LlamaConfig(**CONFIG, attn_implementation=attn)).to(dtype)
    if p["impl"] == "bpt":
        with tempfile.TemporaryDirectory() as directory:
            hf.save_pretrained(directory)
            model = Llama(directory, **BPT_CHUNKS)
        del hf
    else:
        model = hf

    if p["task"] == "generate":
        prompt = torch.randint(0, CONFIG["vocab_size"], (PROMPT,))

        def setup():
            return (prompt,)

        def step(prompt):
            if p["impl"] == "bpt":
                out = model.generate(prompt, NEW_TOKENS, use_cache=p["cache"])
            else:
                with torch.no_grad():
                    out = model.generate(prompt[None], max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
                                         do_sample=False, use_cache=p["cache"])[0, PROMPT:]
            assert len(out) == NEW_TOKENS

        return measure(setup, step)

    def setup():
        ids = torch.randint(0, CONFIG["vocab_size"], (1, p["T"]))
        targets = ids.roll(-1, 1)
        targets[:, -1] = -100
        return ids, targets

    def step(ids, targets):
        model.zero_grad()
        if p["impl"] == "bpt":
            model.loss(ids, targets).backward()
        else:
            model(ids, labels=ids).loss.backward()  # transformers shifts the labels itself

    return measure(setup, step)


if __name__ == "__main__":
    main(__file__, cases, PHASES, run_phase, annotate=annotate)
