"""bLLaMA (models/bllama): LLaMA with BitNet b1.58 BitLinear layers, trained by bpt-train,
quantized by bpt-convert, run by bpt-generate.

The reference is written here: transformers' LlamaForCausalLM with every attention and MLP
linear swapped for a b1.58 BitLinear (an RMSNorm of its input, then absmax int8 activations
and absmean ternary weights through straight-through estimators) and the layer norms
removed, as BitNet's training recipe builds it. (transformers' own BitNetForCausalLM is
Microsoft's later 2B4T architecture, with sub-norms before o_proj and down_proj only.)
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from bpt.llama import Llama
from llama_helpers import ROOT, run_app, run_launch, train_tokenizer
from reference import activation_quant, weight_quant



def ste(quantize, x):
    """The quantized value forward, the identity backward."""
    return x + (quantize(x) - x).detach()


class RefBitLinear(nn.Module):
    def __init__(self, inputs: int, outputs: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(outputs, inputs))
        self.norm = LlamaRMSNorm(inputs, eps=eps)

    def forward(self, x):
        return F.linear(ste(activation_quant, self.norm(x)), ste(weight_quant, self.weight))


def reference_model(directory: Path) -> LlamaForCausalLM:
    c = json.loads((directory / "config.json").read_text())
    keys = ["vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads", "max_position_embeddings", "rms_norm_eps", "rope_theta", "tie_word_embeddings"]
    model = LlamaForCausalLM(LlamaConfig(**{k: c[k] for k in keys}, attn_implementation="eager"))
    eps = c["rms_norm_eps"]
    for layer in model.model.layers:
        for owner, names in ((layer.self_attn, ("q_proj", "k_proj", "v_proj", "o_proj")),
                             (layer.mlp, ("gate_proj", "up_proj", "down_proj"))):
            for name in names:
                linear = getattr(owner, name)
                setattr(owner, name, RefBitLinear(linear.in_features, linear.out_features, eps))
        layer.input_layernorm = nn.Identity()
        layer.post_attention_layernorm = nn.Identity()
    model.load_state_dict(load_file(directory / "model.safetensors"), strict=True)
    return model.eval()


def train(out: Path, *extra) -> None:
    result = run_app("train", "--config", ROOT / "configs/llama/tiny.toml", "--model=bllama", "--progress=never",
                     "--log_freq=1", f"--logger.output_dir={out}", *extra)
    assert result.returncode == 0, result.stderr


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A tiny bLLaMA after 20 steps of bpt-train (norm weights moved off 1 by training)."""
    out = tmp_path_factory.mktemp("bllama")
    train(out, "--total_steps=20", "--llama.vocab_size=400")
    return out / "checkpoint"


def test_checkpoint_layout(trained):
    config = json.loads((trained / "config.json").read_text())
    assert config["model_type"] == "bllama" and config["bpt"]["quantization"] == "none"
    names = list(load_file(trained / "model.safetensors"))
    assert "model.layers.0.self_attn.q_proj.norm.weight" in names
    assert "model.layers.1.mlp.down_proj.norm.weight" in names
    assert not any("layernorm" in name for name in names)  # BitLinear's norms replace them


def test_forward_and_gradients_match_the_reference(trained):
    reference = reference_model(trained)
    ids = torch.randint(0, 256, (2, 29))
    targets = ids.roll(-1, 1)
    targets[:, -1] = -100
    expected = reference(ids, labels=ids)
    expected.loss.backward()
    model = Llama(trained, q_chunk_size=8, k_chunk_size=8)
    with torch.no_grad():
        logits = model.logits(ids)
    # A value on a rounding boundary may land one int8 level apart between two float
    # orders of summation: compare as closely as that allows, and most values exactly.
    diff = (logits - expected.logits).abs()
    assert diff.max().item() <= 1e-2 * expected.logits.abs().max().item()
    assert diff.median().item() <= 1e-5
    loss = model.loss(ids, targets)
    loss.backward()
    assert abs(loss.item() - expected.loss.item()) <= 1e-4
    for (name, ref), ours in zip(reference.named_parameters(), model.parameters(), strict=True):
        assert ours.shape == ref.shape, name
        scale = ref.grad.abs().max().item()
        assert (ours.grad - ref.grad).abs().max().item() <= 2e-2 * scale + 1e-7, name


def test_training_lowers_the_loss_on_text(tmp_path):
    """A repeated sentence: the fake-quantized model must still learn it."""
    (tmp_path / "data").mkdir()
    train_tokenizer(tmp_path / "data", vocab_size=400)
    line = json.dumps({"text": "The quick brown fox jumps over the lazy dog."})
    (tmp_path / "data/train.jsonl").write_text((line + "\n") * 64)
    train(tmp_path / "run", "--total_steps=60", "--llama.vocab_size=400", "--train_dataset.type=json",
          f"--tokenizer.vocab_file={tmp_path / 'data/tokenizer.model'}",
          f"--train_dataset.json_dataset.path={tmp_path / 'data/train.jsonl'}",
          "--train_dataset.json_dataset.seq_length=64", "--train_dataset.json_dataset.batch_size=4")
    losses = [json.loads(l)["loss"] for l in (tmp_path / "run/metrics.jsonl").read_text().splitlines() if '"loss"' in l]
    assert losses[-1] < 0.5 * losses[0], losses


def test_fsdp_training_follows_one_process(tmp_path):
    """Two ranks against one: quantization turns float-order differences into occasional
    one-level steps, so the runs agree closely rather than to float precision."""
    train(tmp_path / "one", "--total_steps=5")
    result = run_launch(2, "--config", ROOT / "configs/llama/tiny.toml", "--model=bllama", "--progress=never",
                        "--log_freq=1", f"--logger.output_dir={tmp_path / 'two'}", "--total_steps=5", timeout=180)
    assert result.returncode == 0, result.stderr
    read = lambda p: [json.loads(l)["loss"] for l in (p / "metrics.jsonl").read_text().splitlines() if '"loss"' in l]  # noqa: E731
    for one, two in zip(read(tmp_path / "one"), read(tmp_path / "two"), strict=True):
        assert abs(one - two) <= 1e-3
    assert (tmp_path / "two/checkpoint/shards.json").exists()


def test_quantized_checkpoint_is_small_and_equals_the_fake_quantized_model(tmp_path):
    # Linear layers dominate here, as in real sizes (the embedding and head stay bf16).
    train(tmp_path / "run", "--total_steps=3", "--llama.hidden_size=256", "--llama.intermediate_size=768",
          "--llama.num_attention_heads=4", "--llama.num_key_value_heads=4", "--llama.num_hidden_layers=2")
    fp32 = tmp_path / "run/checkpoint"
    result = run_app("convert", "--input", fp32, "--output", tmp_path / "q", "--quantize", "ternary")
    assert result.returncode == 0, result.stderr
    config = json.loads((tmp_path / "q/config.json").read_text())
    assert config["bpt"]["quantization"] == "ternary"
    tensors = load_file(tmp_path / "q/model.safetensors")
    assert tensors["model.layers.0.self_attn.q_proj.weight_packed"].dtype == torch.uint8
    assert tensors["model.layers.0.self_attn.q_proj.weight_packed"].shape == (256, 64)
    assert tensors["model.layers.0.self_attn.q_proj.weight_scale"].shape == ()
    assert "model.layers.0.self_attn.q_proj.weight" not in tensors
    size = (tmp_path / "q/model.safetensors").stat().st_size
    assert size * 8 <= (fp32 / "model.safetensors").stat().st_size

    # The same packing with the other tensors kept fp32: only the kernels differ from the
    # fake-quantized fp32 model now.
    result = run_app("convert", "--input", fp32, "--output", tmp_path / "q32", "--quantize", "ternary",
                     "--dtype", "float32")
    assert result.returncode == 0, result.stderr
    ids = torch.randint(0, 256, (2, 21))
    with torch.no_grad():
        fake = Llama(fp32).logits(ids)
        packed = Llama(tmp_path / "q32").logits(ids)
        packed_bf16 = Llama(tmp_path / "q", dtype="float32").logits(ids)
    # bitlinear multiplies integer levels (exact in fp32) before scaling, as the int32 kernel
    # does: the two agree far inside 1e-4, so no value lands on another int8 level downstream.
    scale = fake.abs().max().item()
    assert (packed - fake).abs().max().item() <= 1e-4 * scale
    assert (packed_bf16 - fake).abs().median().item() <= 0.05 * scale  # bf16 embedding and norms


def test_generate_warns_until_quantized_and_uses_the_cache(tmp_path, trained):
    model = tmp_path / "model"
    result = run_app("convert", "--input", trained, "--output", model)
    assert result.returncode == 0, result.stderr
    train_tokenizer(model, vocab_size=400)
    args = ["--prompt", "This License", "--max_len", 20, "--output", "json"]
    fake = run_app("generate", "--model", model, *args)
    assert fake.returncode == 0, fake.stderr
    assert "14 BitLinear layers are not quantized" in fake.stderr
    assert run_app("convert", "--input", model, "--output", tmp_path / "q", "--quantize", "ternary").returncode == 0
    (tmp_path / "q/tokenizer.model").write_bytes((model / "tokenizer.model").read_bytes())
    cached = run_app("generate", "--model", tmp_path / "q", *args)
    recomputed = run_app("generate", "--model", tmp_path / "q", *args, "--use_cache", "false")
    assert cached.returncode == 0 and "not quantized" not in cached.stderr, cached.stderr
    first, second = json.loads(cached.stdout), json.loads(recomputed.stdout)
    assert len(first["prompt_ids"]) + len(first["ids"]) == 20
    assert first["ids"] == second["ids"]
    sampled = run_app("generate", "--model", tmp_path / "q", "--prompt", "You may", "--max_new_tokens", 8,
                      "--do_sample", "--top_k", 20, "--top_p", 0.9, "--temperature", 0.7, "--repetition_penalty",
                      1.3, "--seed", 3)
    assert sampled.returncode == 0, sampled.stderr


def test_corrupt_quantized_checkpoints_are_refused(tmp_path, trained):
    q = tmp_path / "q"
    assert run_app("convert", "--input", trained, "--output", q, "--quantize", "ternary").returncode == 0
    tensors = load_file(q / "model.safetensors")
    name = "model.layers.0.mlp.up_proj.weight_packed"
    cases = {
        "float packed": ({**tensors, name: tensors[name].float()}, "expected U8 (packed ternary weights)"),
        "short rows": ({**tensors, name: tensors[name][:, :-1].contiguous()}, "has shape [160, 15], expected [160, 16]"),
    }
    train_tokenizer(tmp_path, vocab_size=400)
    for label, (broken, message) in cases.items():
        save_file(broken, q / "model.safetensors", metadata={"format": "pt"})
        result = run_app("generate", "--model", q, "--prompt", "x", "--max_new_tokens", 2, "--tokenizer",
                         tmp_path / "tokenizer.model")
        assert result.returncode == 2 and message in result.stderr, (label, result.stderr)
    save_file(tensors, q / "model.safetensors", metadata={"format": "pt"})
    scale = "model.layers.1.self_attn.v_proj.weight_scale"
    packed = tensors[name].clone()
    packed[0, 0] = 0b11
    for label, (broken, message) in {
        "code 11": ({**tensors, name: packed}, "holds the 2-bit code 11"),
        "nan scale": ({**tensors, scale: torch.tensor(float("nan"))}, "expected a finite scale > 0"),
        "zero scale": ({**tensors, scale: torch.tensor(0.0)}, "expected a finite scale > 0"),
    }.items():
        save_file(broken, q / "model.safetensors", metadata={"format": "pt"})
        result = run_app("convert", "--input", q, "--output", tmp_path / "copy")
        assert result.returncode == 2 and message in result.stderr, (label, result.stderr)
    save_file(tensors, q / "model.safetensors", metadata={"format": "pt"})
    # A quantized checkpoint re-saves as it is, never as Hugging Face's.
    assert run_app("convert", "--input", q, "--output", tmp_path / "copy").returncode == 0
    assert load_file(tmp_path / "copy/model.safetensors")[name].equal(tensors[name])
    result = run_app("convert", "--input", q, "--output", tmp_path / "hf", "--format", "hf")
    assert result.returncode == 2 and "bpt's own format" in result.stderr
    # A quantized model cannot train, and a LLaMA cannot be quantized.
    result = run_app("train", f"--load_llama_config={q}", f"--logger.output_dir={tmp_path / 'run'}")
    assert result.returncode == 2 and "only runs inference" in result.stderr
    hf = tmp_path / "llama"
    train_plain = run_app("train", "--config", ROOT / "configs/llama/tiny.toml", "--total_steps=1",
                          f"--logger.output_dir={hf}", "--progress=never")
    assert train_plain.returncode == 0, train_plain.stderr
    result = run_app("convert", "--input", hf / "checkpoint", "--output", tmp_path / "x", "--quantize", "ternary")
    assert result.returncode == 2 and "is not a bLLaMA" in result.stderr
