"""Bad checkpoints, tokenizers and flags: one clear message naming the file and tensor, exit 2."""

from __future__ import annotations

import json
import struct

import pytest
import torch
from safetensors.torch import load_file, save_file

from llama_helpers import edit_config, run_app, save_hf_model, train_tokenizer


@pytest.fixture
def checkpoint(tmp_path):
    save_hf_model(tmp_path / "ckpt")
    return tmp_path / "ckpt"


def convert_error(checkpoint, *extra) -> str:
    result = run_app("convert", "--input", checkpoint, "--output", checkpoint.parent / "out", *extra)
    assert result.returncode == 2, (result.returncode, result.stdout, result.stderr)
    assert result.stderr.startswith("bpt-convert: error: ")
    assert len(result.stderr.strip().splitlines()) == 1
    return result.stderr


def test_truncated_file(checkpoint):
    path = checkpoint / "model.safetensors"
    path.write_bytes(path.read_bytes()[:-100])
    message = convert_error(checkpoint)
    assert str(path) in message and "truncated" in message
    assert "model.norm.weight" in message  # the last tensor, the one cut short


def test_file_shorter_than_its_header(checkpoint):
    path = checkpoint / "model.safetensors"
    path.write_bytes(path.read_bytes()[:50])
    assert "header claims" in convert_error(checkpoint)


def test_header_that_is_not_json(checkpoint):
    path = checkpoint / "model.safetensors"
    data = bytearray(path.read_bytes())
    data[8:12] = b"#!@?"
    path.write_bytes(bytes(data))
    assert "header is not valid JSON" in convert_error(checkpoint)


def test_overlapping_tensors(tmp_path):
    save_hf_model(tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    header = {}
    offset = 0
    for name, tensor in tensors.items():
        size = tensor.numel() * 4
        header[name] = {"dtype": "F32", "shape": list(tensor.shape), "data_offsets": [offset, offset + size]}
        offset += size
    first = next(iter(header))
    header[first]["data_offsets"] = [4, 4 + tensors[first].numel() * 4]  # slides into its neighbour
    text = json.dumps(header).encode()
    (tmp_path / "model.safetensors").write_bytes(struct.pack("<Q", len(text)) + text + bytes(offset))
    assert "overlap" in convert_error(tmp_path)


def test_missing_tensor(checkpoint):
    tensors = load_file(checkpoint / "model.safetensors")
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, checkpoint / "model.safetensors")
    message = convert_error(checkpoint)
    assert "missing tensor 'model.layers.1.mlp.up_proj.weight'" in message and str(checkpoint) in message


def test_unexpected_tensor(checkpoint):
    tensors = load_file(checkpoint / "model.safetensors")
    tensors["model.layers.2.mlp.up_proj.weight"] = torch.zeros(48, 32)
    save_file(tensors, checkpoint / "model.safetensors")
    assert "unexpected tensor 'model.layers.2.mlp.up_proj.weight'" in convert_error(checkpoint)


def test_wrong_shape(checkpoint):
    edit_config(checkpoint, intermediate_size=64)
    message = convert_error(checkpoint)
    assert "model.layers.0.mlp.gate_proj.weight" in message and "[48, 32], expected [64, 32]" in message


def test_wrong_vocab(checkpoint):
    edit_config(checkpoint, vocab_size=1000)
    message = convert_error(checkpoint)
    assert "model.embed_tokens.weight" in message and "expected [1000, 32]" in message


def test_integer_weights(checkpoint):
    tensors = load_file(checkpoint / "model.safetensors")
    tensors["model.norm.weight"] = tensors["model.norm.weight"].to(torch.int32)
    save_file(tensors, checkpoint / "model.safetensors")
    assert "'model.norm.weight' is I32, expected a float type" in convert_error(checkpoint)


def test_index_naming_a_shard_without_the_tensor(tmp_path, checkpoint):
    result = run_app("convert", "--input", checkpoint, "--output", tmp_path / "sharded", "--max_shard_size", "20KB")
    assert result.returncode == 0, result.stderr
    index_path = tmp_path / "sharded" / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    shards = sorted(set(index["weight_map"].values()))
    name = next(n for n, f in index["weight_map"].items() if f == shards[0])
    index["weight_map"][name] = shards[1]
    index_path.write_text(json.dumps(index))
    assert f"lists '{name}' in {shards[1]}, which does not hold it" in convert_error(tmp_path / "sharded")


def test_bad_config(checkpoint):
    edit_config(checkpoint, num_key_value_heads=3)
    assert "num_key_value_heads: 3 does not divide num_attention_heads 4" in convert_error(checkpoint)
    (checkpoint / "config.json").write_text("{not json")
    assert "config.json: not valid JSON" in convert_error(checkpoint)


def test_unwritable_output(checkpoint):
    result = run_app("convert", "--input", checkpoint, "--output", "/proc/bpt-cannot-write-here")
    assert result.returncode == 2 and "/proc/bpt-cannot-write-here" in result.stderr


def test_missing_directory(tmp_path):
    assert "cannot open" in convert_error(tmp_path / "nowhere")


def test_unknown_and_bad_flags(checkpoint):
    assert "did you mean '--llama.q_chunk_size'" in convert_error(checkpoint, "--llama.q_chunk_sise=64")
    assert "--llama.q_chunk_size: expected an integer, got 'big'" in convert_error(checkpoint, "--llama.q_chunk_size=big")
    assert "did you mean '--max_shard_size'" in convert_error(checkpoint, "--max_shard_sise=1GB")


def test_tokenizer_larger_than_the_vocabulary(tmp_path):
    save_hf_model(tmp_path, vocab_size=300)
    train_tokenizer(tmp_path)  # 512 pieces
    result = run_app("generate", "--model", tmp_path, "--prompt", "hello")
    assert result.returncode == 2
    assert "tokenizer.model: the tokenizer has 512 pieces but the model's vocab_size is 300" in result.stderr


def test_missing_tokenizer(checkpoint):
    result = run_app("generate", "--model", checkpoint, "--prompt", "hello")
    assert result.returncode == 2 and "tokenizer.model: cannot load" in result.stderr
