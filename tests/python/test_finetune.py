"""Fine-tuning end to end: LoRA and full SFT from a Hugging Face checkpoint, adapters that peft
loads over transformers' model, merged checkpoints, resuming and FSDP, and evaluation."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import LlamaForCausalLM

from bpt.llama import Llama
from llama_helpers import TINY, run_app, run_launch, save_hf_model, train_tokenizer

# A synthetic SFT task: eight prompts, each with a one-word answer to learn.
ANSWERS = {"first": "software", "second": "freedom", "third": "program", "fourth": "license", "fifth": "source",
           "sixth": "patent", "seventh": "warranty", "eighth": "copyright"}
RANK = 8


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A random Hugging Face LLaMA with a tokenizer, and the SFT task as JSONL.

    initializer_range 0.3 (not 0.02) gives the frozen head of this 32-wide model logits large
    enough to be confident: with 0.02 no adapter could push a token's probability far."""
    root = tmp_path_factory.mktemp("finetune")
    model = save_hf_model(root / "base", initializer_range=0.3)
    train_tokenizer(root / "base", vocab_size=TINY["vocab_size"])
    records = [{"prompt": f"The {key} word is", "response": answer} for key, answer in ANSWERS.items()]
    (root / "sft.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    chat = [{"messages": [{"role": "user", "content": r["prompt"]}, {"role": "assistant", "content": r["response"]}]}
            for r in records]
    (root / "chat.jsonl").write_text("".join(json.dumps(r) + "\n" for r in chat))
    return SimpleNamespace(dir=root / "base", model=model, data=root / "sft.jsonl", chat=root / "chat.jsonl")


def finetune_args(base, out: Path, mode: str, *extra) -> list[str]:
    return [f"--load_checkpoint=hf::{base.dir}", f"--finetune.mode={mode}", f"--finetune.lora_rank={RANK}",
            f"--tokenizer.vocab_file={base.dir / 'tokenizer.model'}", f"--train_dataset.json_dataset.path={base.data}",
            "--train_dataset.text_processor.fields=[prompt],response", "--train_dataset.json_dataset.seq_length=64",
            "--train_dataset.json_dataset.batch_size=4", "--optimizer.adamw_optimizer.lr=1e-2",
            "--optimizer.adamw_optimizer.lr_warmup_steps=10", "--progress=never", "--log_freq=1",
            f"--logger.output_dir={out}", *map(str, extra)]


def metrics(out: Path) -> list[dict]:
    return [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


def train(base, out: Path, mode: str, *extra) -> Path:
    result = run_app("train", *finetune_args(base, out, mode, *extra))
    assert result.returncode == 0, result.stderr
    return out / "checkpoint"


def peft_logits(base, adapter: Path, ids: torch.Tensor) -> torch.Tensor:
    hf = LlamaForCausalLM.from_pretrained(base.dir, attn_implementation="eager").eval()
    with torch.no_grad():
        return PeftModel.from_pretrained(hf, adapter).eval()(input_ids=ids).logits


@pytest.fixture(scope="module")
def lora_run(base, tmp_path_factory):
    out = tmp_path_factory.mktemp("lora") / "run"
    return train(base, out, "lora", "--total_steps=20")


def test_lora_trains_only_the_adapters_and_peft_loads_them(base, lora_run, tmp_path):
    assert sorted(p.name for p in lora_run.iterdir()) == [
        "adapter_config.json", "adapter_model.safetensors", "optimizer.safetensors", "tokenizer.model",
        "trainer_state.json"]
    config = json.loads((lora_run / "adapter_config.json").read_text())
    assert (config["peft_type"], config["r"], config["lora_alpha"]) == ("LORA", RANK, 32.0)
    assert config["base_model_name_or_path"] == str(base.dir)
    optimizer = load_file(lora_run / "optimizer.safetensors")
    assert {k for k in optimizer if k != "step"} and all(".lora_" in k for k in optimizer if k != "step")

    # peft over transformers' model computes what bpt's adapted model does.
    ids = torch.randint(0, TINY["vocab_size"], (2, 13))
    want = peft_logits(base, lora_run, ids)
    got = Llama(lora_run).logits(ids)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    with torch.no_grad():
        plain = base.model(input_ids=ids).logits
    assert (want - plain).abs().max() > 0.1  # the adapters learned something

    # Memory: a LoRA step holds the base once, and gradients and Adam's two moments (fp32,
    # no masters) for the adapters only; full fine-tuning holds all four for every weight.
    hf = LlamaForCausalLM.from_pretrained(base.dir, attn_implementation="eager")
    trainable, total = PeftModel.from_pretrained(hf, lora_run, is_trainable=True).get_nb_trainable_parameters()
    base_params = sum(p.numel() for p in base.model.parameters())
    assert total == base_params + trainable
    lora_state = metrics(lora_run.parent)[-1]["state_mb"]
    assert lora_state == pytest.approx((4 * base_params + 16 * trainable) / 1e6)
    full = train(base, tmp_path / "full", "full", "--total_steps=2").parent
    assert metrics(full)[-1]["state_mb"] == pytest.approx(16 * base_params / 1e6)


def test_merged_checkpoint_equals_base_plus_adapter(base, lora_run, tmp_path):
    merged = tmp_path / "merged"
    result = run_app("convert", "--input", lora_run, "--output", merged, "--format", "hf", "--merge-lora")
    assert result.returncode == 0, result.stderr
    assert not (merged / "adapter_config.json").exists() and (merged / "tokenizer.model").exists()
    ids = torch.randint(0, TINY["vocab_size"], (2, 11))
    with torch.no_grad():
        merged_logits = LlamaForCausalLM.from_pretrained(merged, attn_implementation="eager").eval()(input_ids=ids).logits
    torch.testing.assert_close(merged_logits, peft_logits(base, lora_run, ids), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(Llama(merged).logits(ids), Llama(lora_run).logits(ids), rtol=1e-4, atol=1e-4)


def launch(nproc: int, args: list[str]) -> None:
    result = run_launch(nproc, *args)
    assert result.returncode == 0, result.stderr


def test_lora_resumes_exactly_and_fsdp_world_2_equals_world_1(base, tmp_path):
    one = train(base, tmp_path / "one", "lora", "--total_steps=8")
    # Four steps sharded over two processes, then four more in one process from that checkpoint.
    launch(2, finetune_args(base, tmp_path / "two", "lora", "--total_steps=4"))
    sharded = tmp_path / "two" / "checkpoint"
    assert (sharded / "shards.json").exists() and (sharded / "adapter_model.safetensors").exists()
    index = json.loads((sharded / "shards.json").read_text())
    assert list(index["files"]) == ["optimizer"] and all(".lora_" in name for name in index["tensors"])
    assert metrics(tmp_path / "two")[-1]["state_mb"] < metrics(tmp_path / "one")[-1]["state_mb"] / 1.9
    train(base, tmp_path / "two", "lora", "--total_steps=8", "--autoresume")
    # And the other way: one process, then two that load the adapters and optimizer state into
    # their shards, keeping each layer gathered (everything_saveable: frozen units stay too).
    train(base, tmp_path / "three", "lora", "--total_steps=4")
    launch(2, finetune_args(base, tmp_path / "three", "lora", "--total_steps=8", "--autoresume",
                            "--llama.remat_policy=everything_saveable"))
    want = metrics(tmp_path / "one")
    adapters = load_file(one / "adapter_model.safetensors")
    for run in ("two", "three"):
        got = metrics(tmp_path / run)
        assert [r["step"] for r in got] == list(range(1, 9))
        for a, b in zip(want, got):
            assert b["loss"] == pytest.approx(a["loss"], abs=1e-5)
        resumed = load_file(tmp_path / run / "checkpoint" / "adapter_model.safetensors")
        assert resumed.keys() == adapters.keys()
        for name in adapters:
            torch.testing.assert_close(resumed[name], adapters[name], rtol=1e-4, atol=1e-4)


def test_adapters_on_some_projections_match_peft(base, tmp_path):
    # Attention and MLP each with one adapter: the MLP runs through its layers with the
    # other two projections plain.
    adapter = train(base, tmp_path / "some", "lora", "--total_steps=5", "--finetune.lora_target=q_proj,down_proj",
                    "--finetune.lora_alpha=16")
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["target_modules"] == ["q_proj", "down_proj"] and config["lora_alpha"] == 16
    assert len(load_file(adapter / "adapter_model.safetensors")) == 2 * 2 * TINY["num_hidden_layers"]
    ids = torch.randint(0, TINY["vocab_size"], (1, 19))
    torch.testing.assert_close(Llama(adapter).logits(ids), peft_logits(base, adapter, ids), rtol=1e-4, atol=1e-4)


def exact_match(checkpoint: Path, base, data: Path) -> float:
    """bpt-eval's last-word accuracy: the greedy answer equals the record's response."""
    out = checkpoint.parent / f"eval-{data.stem}.json"
    result = run_app("eval", "--model", checkpoint, "--tokenizer", base.dir / "tokenizer.model", "--task", "last_word",
                     "--data", data, "--output", out)
    assert result.returncode == 0, result.stderr
    assert "accuracy" in result.stdout  # the printed table
    return json.loads(out.read_text())["metrics"]["accuracy"]


@pytest.fixture(scope="module")
def full_run(base, tmp_path_factory):
    return train(base, tmp_path_factory.mktemp("full") / "run", "full", "--total_steps=120")


def test_full_sft_and_lora_learn_the_task(base, full_run, tmp_path):
    assert exact_match(base.dir, base, base.data) == 0
    assert exact_match(full_run, base, base.data) == 1.0
    lora = train(base, tmp_path / "lora", "lora", "--total_steps=200", "--optimizer.adamw_optimizer.lr=2e-2")
    assert exact_match(lora, base, base.data) >= 0.75
    generated = run_app("generate", "--model", lora, "--prompt", "The first word is", "--max_new_tokens", 2,
                        "--output", "json")
    assert generated.returncode == 0, generated.stderr
    assert json.loads(generated.stdout)["text"].strip().startswith(ANSWERS["first"][:3])


def test_prompt_tokens_carry_no_loss(base, full_run, tmp_path):
    # "[prompt],response" trains on the answers only, so the prompts' own words are never
    # learned: after "The first", "word is" is no likelier than before. Trained with the
    # prompt in the loss ("prompt,response"), the model predicts it every time.
    probe = tmp_path / "probe.jsonl"
    probe.write_text("".join(json.dumps({"prompt": f"The {key}", "response": "word is"}) + "\n" for key in ANSWERS))
    everything = train(base, tmp_path / "everything", "full", "--total_steps=120",
                       "--train_dataset.text_processor.fields=prompt,response")
    assert exact_match(everything, base, probe) == 1.0
    assert exact_match(full_run, base, probe) <= 0.25
    # Chat records train too (their template and mask: tests/cpp/test_data.cpp).
    train(base, tmp_path / "chat", "lora", "--total_steps=2", f"--train_dataset.json_dataset.path={base.chat}",
          "--train_dataset.text_processor.fields=messages")


@pytest.mark.parametrize("flags, message", [
    (["--finetune.mode=lora", "--load_checkpoint="], "--finetune.mode=lora: adapters train on a frozen base model"),
    (["--finetune.mode=adapter"], "--finetune.mode: expected full or lora, got 'adapter'"),
    (["--finetune.mode=lora", "--finetune.lora_target=q_proj,wq"], "--finetune.lora_target: 'wq' is not a LLaMA projection"),
    (["--finetune.mode=lora", "--finetune.lora_rank=0"], "--finetune.lora_rank: expected >= 1, got 0"),
])
def test_bad_finetune_flags_exit_2(base, tmp_path, flags, message):
    result = run_app("train", *finetune_args(base, tmp_path / "bad", "lora", "--total_steps=1"), *flags)
    assert result.returncode == 2 and message in result.stderr, result.stderr


def test_adapter_errors_name_the_file(base, lora_run, tmp_path):
    # Resuming a LoRA checkpoint as a full run, and adapters bpt does not implement.
    resumed = run_app("train", *finetune_args(base, tmp_path / "r", "full", "--total_steps=1"),
                      f"--load_checkpoint=trainstate::{lora_run}")
    assert resumed.returncode == 2 and "a LoRA adapter checkpoint; continue it with --finetune.mode=lora" in resumed.stderr
    dora = tmp_path / "dora"
    shutil.copytree(lora_run, dora)
    config = json.loads((dora / "adapter_config.json").read_text())
    (dora / "adapter_config.json").write_text(json.dumps({**config, "use_dora": True}))
    result = run_app("generate", "--model", dora, "--prompt", "x")
    assert result.returncode == 2 and f"{dora}/adapter_config.json: use_dora = true is not supported" in result.stderr
    (dora / "adapter_config.json").write_text(json.dumps({**config, "r": RANK * 2}))
    result = run_app("generate", "--model", dora, "--prompt", "x")
    assert result.returncode == 2 and "adapter_model.safetensors: tensor 'base_model.model.model.layers.0" in result.stderr
    plain = run_app("convert", "--input", base.dir, "--output", tmp_path / "x", "--merge-lora")
    assert plain.returncode == 2 and "has no adapter_config.json" in plain.stderr
    # Resuming with other adapter settings than the checkpoint's.
    other = run_app("train", *finetune_args(base, tmp_path / "o", "lora", "--total_steps=30", "--finetune.lora_alpha=8"),
                    f"--load_checkpoint=trainstate::{lora_run}")
    assert other.returncode == 2 and "lora_alpha is 32, but this run asks for 8" in other.stderr
    # A peft directory without a tokenizer: the base's is used; a base that is not on disk is named.
    peft_style = tmp_path / "peft"
    shutil.copytree(lora_run, peft_style, ignore=shutil.ignore_patterns("tokenizer.model", "optimizer*", "trainer*"))
    assert run_app("generate", "--model", peft_style, "--prompt", "x", "--max_new_tokens", 1).returncode == 0
    (peft_style / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": "meta/llama"}))
    moved = run_app("generate", "--model", peft_style, "--prompt", "x")
    assert moved.returncode == 2 and "base_model_name_or_path 'meta/llama' is not a directory" in moved.stderr
