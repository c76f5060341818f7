"""bpt's C++ LLaMA against transformers' LlamaForCausalLM on the same random weights."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import LlamaForCausalLM

from bpt.llama import Llama
from llama_helpers import TINY, edit_config, run_app, save_hf_model, train_tokenizer

# Chunks that divide nothing: T = 37 tokens run as partial blocks everywhere.
ODD_CHUNKS = dict(q_chunk_size=8, k_chunk_size=16, ffn_chunk_size=5, loss_chunk_size=7)

CONFIGS = {
    "gqa": dict(num_attention_heads=4, num_key_value_heads=2),
    "mha": dict(num_attention_heads=4, num_key_value_heads=4),
    "mqa-tied": dict(num_attention_heads=4, num_key_value_heads=1, tie_word_embeddings=True),
    "theta-500k": dict(rope_theta=500000.0),
    "llama3-scaling": dict(rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0,
                                             high_freq_factor=4.0, original_max_position_embeddings=16)),
    "linear-scaling": dict(rope_scaling=dict(rope_type="linear", factor=2.0)),
    "head-dim-16": dict(head_dim=16),
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_logits_match_transformers(tmp_path, name):
    hf = save_hf_model(tmp_path, **CONFIGS[name])
    ids = torch.randint(0, TINY["vocab_size"], (2, 37))
    with torch.no_grad():
        expected = hf(ids).logits
        got = Llama(tmp_path, **ODD_CHUNKS).logits(ids)
    assert got.shape == expected.shape
    assert (got - expected).abs().max().item() <= 1e-4


def test_loss_matches_transformers_and_its_gradients(tmp_path):
    hf = save_hf_model(tmp_path)
    ids = torch.randint(0, TINY["vocab_size"], (2, 37))
    targets = ids.roll(-1, 1)
    targets[:, -1] = -100
    expected = hf(ids, labels=ids).loss  # transformers shifts the labels itself
    expected.backward()
    model = Llama(tmp_path, **ODD_CHUNKS)
    loss = model.loss(ids, targets)
    loss.backward()
    assert abs(loss.item() - expected.item()) <= 1e-5
    # Parameters come in the same order as transformers' named_parameters.
    for (name, reference), ours in zip(hf.named_parameters(), model.parameters(), strict=True):
        assert ours.shape == reference.shape, name
        assert torch.allclose(ours.grad, reference.grad, atol=1e-5, rtol=1e-4), name


def test_packed_documents_match_separate_runs(tmp_path):
    """Segment ids keep attention inside each document and restart positions at its start."""
    hf = save_hf_model(tmp_path)
    lengths = [11, 19, 7]
    docs = [torch.randint(0, TINY["vocab_size"], (1, n)) for n in lengths]
    segment_ids = torch.cat([torch.full((1, n), i + 1) for i, n in enumerate(lengths)], 1)
    with torch.no_grad():
        expected = torch.cat([hf(doc).logits for doc in docs], 1)
        got = Llama(tmp_path, **ODD_CHUNKS).logits(torch.cat(docs, 1), segment_ids)
    assert (got - expected).abs().max().item() <= 1e-4


@pytest.mark.parametrize("tied", [False, True])
def test_exported_checkpoint_loads_in_transformers(tmp_path, tied):
    torch.manual_seed(1)
    model = Llama.preset("tiny", tie_word_embeddings=str(tied).lower())
    model.save(tmp_path / "hf", hf_format=True)
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert "bpt" not in config and config["tie_word_embeddings"] == tied
    hf = LlamaForCausalLM.from_pretrained(tmp_path / "hf", attn_implementation="eager").eval()
    ids = torch.randint(0, 256, (2, 29))
    with torch.no_grad():
        assert (model.logits(ids) - hf(ids).logits).abs().max().item() <= 1e-4


def test_convert_round_trip_with_shards_and_bf16(tmp_path):
    hf = save_hf_model(tmp_path / "hf")
    sharded = run_app("convert", "--input", tmp_path / "hf", "--output", tmp_path / "bpt", "--max_shard_size", "20KB",
                      "--llama.q_chunk_size=64")
    assert sharded.returncode == 0, sharded.stderr
    index = json.loads((tmp_path / "bpt" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    assert json.loads((tmp_path / "bpt" / "config.json").read_text())["bpt"]["q_chunk_size"] == 64
    resharded = LlamaForCausalLM.from_pretrained(tmp_path / "bpt").state_dict()
    for name, tensor in hf.state_dict().items():
        assert torch.equal(resharded[name], tensor), name

    ids = torch.randint(0, TINY["vocab_size"], (1, 23))
    with torch.no_grad():
        expected = hf(ids).logits

    halved = run_app("convert", "--input", tmp_path / "bpt", "--output", tmp_path / "bf16", "--format", "hf",
                     "--dtype", "bfloat16")
    assert halved.returncode == 0, halved.stderr
    bf16 = LlamaForCausalLM.from_pretrained(tmp_path / "bf16", dtype=torch.bfloat16)
    assert bf16.model.embed_tokens.weight.dtype == torch.bfloat16
    # Loaded back as fp32, the bf16 weights are hf's rounded once: logits agree to bf16 precision.
    with torch.no_grad():
        got = Llama(tmp_path / "bf16", dtype="float32").logits(ids)
    assert (got - expected).abs().max().item() <= 0.05


def test_greedy_generation_matches_transformers(tmp_path):
    hf = save_hf_model(tmp_path, eos_token_id=None)
    prompt = torch.randint(0, TINY["vocab_size"], (5,))
    expected = hf.generate(prompt[None], max_new_tokens=32, do_sample=False, eos_token_id=None)[0, 5:]
    model = Llama(tmp_path, eos_token_ids="")
    assert model.generate(prompt, 32, use_cache=True).tolist() == expected.tolist()
    assert model.generate(prompt, 32, use_cache=False).tolist() == expected.tolist()


def test_bpt_generate_on_a_converted_model_matches_transformers(tmp_path):
    hf = save_hf_model(tmp_path / "hf")
    train_tokenizer(tmp_path / "hf")
    converted = run_app("convert", "--input", tmp_path / "hf", "--output", tmp_path / "bpt")
    assert converted.returncode == 0, converted.stderr
    assert (tmp_path / "bpt" / "tokenizer.model").is_file()  # copied along
    result = run_app("generate", "--model", tmp_path / "bpt", "--prompt", "This License", "--prompt",
                     "the GNU General Public", "--max_new_tokens", 32, "--output", "json")
    assert result.returncode == 0, result.stderr
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert [line["prompt"] for line in lines] == ["This License", "the GNU General Public"]
    for line in lines:
        assert line["prompt_ids"][0] == 1  # BOS
        prompt = torch.tensor([line["prompt_ids"]])
        expected = hf.generate(prompt, max_new_tokens=32, do_sample=False)[0, prompt.shape[1]:]
        assert line["ids"] == expected.tolist()


def test_streamed_text_is_the_prompt_then_the_continuation(tmp_path):
    """The first generated piece keeps its leading space: text mode prints what json reports."""
    save_hf_model(tmp_path)
    train_tokenizer(tmp_path)
    args = ["--model", tmp_path, "--prompt", "This License", "--max_new_tokens", 12]
    text = run_app("generate", *args)
    line = json.loads(run_app("generate", *args, "--output", "json").stdout)
    assert text.returncode == 0, text.stderr
    assert text.stdout == "This License" + line["text"] + "\n"


def test_a_tokenizer_smaller_than_the_vocabulary_limits_the_choices(tmp_path):
    save_hf_model(tmp_path, vocab_size=700)
    train_tokenizer(tmp_path)  # 512 pieces
    result = run_app("generate", "--model", tmp_path, "--prompt", "You may", "--max_new_tokens", 40, "--do_sample",
                     "--top_k", 0, "--temperature", 5, "--output", "json")
    assert result.returncode == 0, result.stderr
    assert max(json.loads(result.stdout)["ids"]) < 512


def test_convert_replaces_the_output_directory_as_a_whole(tmp_path):
    save_hf_model(tmp_path / "hf")
    out = tmp_path / "out"
    assert run_app("convert", "--input", tmp_path / "hf", "--output", out, "--max_shard_size", "20KB").returncode == 0
    (out / "stray.txt").write_text("from before")
    assert run_app("convert", "--input", tmp_path / "hf", "--output", out).returncode == 0
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "generation_config.json", "model.safetensors"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf", "out"]  # no temporary left behind


def test_bpt_generate_streams_text_and_samples_reproducibly(tmp_path):
    save_hf_model(tmp_path)
    train_tokenizer(tmp_path)
    args = ["--model", tmp_path, "--prompt", "You may", "--max_new_tokens", 16, "--do_sample", "--temperature", 0.8,
            "--top_k", 50, "--top_p", 0.9, "--repetition_penalty", 1.2, "--seed", 7]
    first, second = run_app("generate", *args), run_app("generate", *args)
    assert first.returncode == 0, first.stderr
    assert first.stdout.startswith("You may") and len(first.stdout) > len("You may\n")
    assert first.stdout == second.stdout
    assert "tokens/s" in first.stderr
    other = run_app("generate", *args[:-1], 8)
    assert other.returncode == 0 and other.stdout != first.stdout
