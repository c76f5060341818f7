"""Tiny random Hugging Face LLaMA checkpoints and the bpt apps, for the LLaMA tests."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

import bpt

BUILD = Path(bpt.library_path()).parent
ROOT = Path(__file__).resolve().parents[2]
CORPUS = Path("/usr/share/common-licenses/GPL-3")  # any English text from a Debian package

TINY = dict(vocab_size=512, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256)


def save_hf_model(directory: Path, seed: int = 0, **overrides) -> LlamaForCausalLM:
    """A random LlamaForCausalLM (fp32, eager attention) saved with save_pretrained."""
    torch.manual_seed(seed)
    config = LlamaConfig(**{**TINY, **overrides}, attn_implementation="eager")
    model = LlamaForCausalLM(config).eval()
    # Norm weights start at 1; randomise them so a mixed-up norm would show.
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if parameter.dim() == 1:
                parameter.uniform_(0.5, 1.5)
    model.save_pretrained(directory)
    return model


def train_tokenizer(directory: Path, vocab_size: int = 512) -> Path:
    """A SentencePiece BPE model (byte fallback) trained on CORPUS, as tokenizer.model."""
    prefix = directory / "spm"
    subprocess.run(["spm_train", f"--input={CORPUS}", f"--model_prefix={prefix}", f"--vocab_size={vocab_size}",
                    "--model_type=bpe", "--character_coverage=1.0", "--byte_fallback=true", "--minloglevel=2"],
                   check=True, capture_output=True, timeout=120)
    target = directory / "tokenizer.model"
    shutil.move(f"{prefix}.model", target)
    return target


def run_app(name: str, *args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    """Runs build/bpt-<name> with `args`, capturing its output."""
    return subprocess.run([str(BUILD / f"bpt-{name}"), *map(str, args)], capture_output=True, text=True,
                          timeout=timeout)


def run_launch(nproc: int, *args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    """Runs bpt-train over `nproc` local processes through tools/launch, capturing its output."""
    return subprocess.run([str(ROOT / "tools/launch"), "--nproc", str(nproc), "bpt-train", *map(str, args)],
                          capture_output=True, text=True, timeout=timeout)


def edit_config(directory: Path, **changes) -> None:
    path = directory / "config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))
