"""bpt-train end to end: exact resume, crash safety, learning, and clear errors."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from llama_helpers import BUILD, CORPUS, run_app, train_tokenizer

TINY_RUN = ["--load_llama_config=tiny", "--llama.q_chunk_size=32", "--llama.k_chunk_size=32",
            "--llama.loss_chunk_size=64", "--optimizer.adamw_optimizer.lr=3e-3",
            "--optimizer.adamw_optimizer.lr_warmup_steps=5", "--optimizer.adamw_optimizer.lr_decay_steps=40",
            "--progress=never", "--log_freq=1"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """GPL-3's paragraphs as JSONL, and a 256-piece tokenizer trained on them."""
    root = tmp_path_factory.mktemp("corpus")
    paragraphs = [p.strip() for p in CORPUS.read_text().split("\n\n") if p.strip()]
    (root / "train.jsonl").write_text("".join(json.dumps({"text": p}) + "\n" for p in paragraphs))
    train_tokenizer(root, vocab_size=400)
    return root


def json_run(corpus: Path, out: Path, *extra) -> list[str]:
    return [*TINY_RUN, "--llama.vocab_size=400", f"--tokenizer.vocab_file={corpus / 'tokenizer.model'}",
            "--train_dataset.type=json", f"--train_dataset.json_dataset.path={corpus / 'train.jsonl'}",
            "--train_dataset.json_dataset.seq_length=64", "--train_dataset.json_dataset.batch_size=2",
            f"--logger.output_dir={out}", *map(str, extra)]


def losses(out: Path) -> list[float]:
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in records if "loss" in r]


def test_resume_is_exact(tmp_path, corpus):
    straight = run_app("train", *json_run(corpus, tmp_path / "a", "--total_steps=20"))
    assert straight.returncode == 0, straight.stderr
    first = run_app("train", *json_run(corpus, tmp_path / "b", "--total_steps=10"))
    assert first.returncode == 0, first.stderr
    second = run_app("train", *json_run(corpus, tmp_path / "b", "--total_steps=20", "--autoresume"))
    assert second.returncode == 0, second.stderr
    assert "resumed from" in second.stdout and "at step 10" in second.stdout
    assert losses(tmp_path / "b") == losses(tmp_path / "a")  # bit for bit, fp32
    a = load_file(tmp_path / "a" / "checkpoint" / "model.safetensors")
    b = load_file(tmp_path / "b" / "checkpoint" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_sigkill_while_saving_keeps_the_previous_checkpoint(tmp_path, corpus):
    out = tmp_path / "run"
    env = {**os.environ, "BPT_CHECKPOINT_DELAY_MS": "2000"}
    proc = subprocess.Popen([str(BUILD / "bpt-train"), *json_run(corpus, out, "--total_steps=10",
                                                                  "--save_model_freq=5")],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    # Wait for the step-5 checkpoint to be complete and the step-10 one to be half written.
    while time.time() < deadline:
        done = (out / "checkpoint" / "trainer_state.json").exists()
        writing = any(".tmp-" in p.name for p in out.iterdir()) if out.exists() else False
        if done and writing:
            break
        time.sleep(0.02)
    else:
        proc.kill()
        pytest.fail("the second checkpoint never started")
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    state = json.loads((out / "checkpoint" / "trainer_state.json").read_text())
    assert state["step"] == 5
    resumed = run_app("train", *json_run(corpus, out, "--total_steps=10", "--autoresume"))
    assert resumed.returncode == 0, resumed.stderr
    assert "at step 5" in resumed.stdout
    assert not any(".tmp-" in p.name for p in out.iterdir())
    assert json.loads((out / "checkpoint" / "trainer_state.json").read_text())["step"] == 10
    # The killed run logged steps 6-10 before dying; the resumed run replaced them.
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 11))


def test_resume_without_optimizer_state_keeps_the_weights(tmp_path, corpus):
    """bf16 weights with fp32 masters: the masters must come from the loaded weights."""
    args = ["--dtype=bf16", "--checkpointer.save_optimizer_state=false"]
    first = run_app("train", *json_run(corpus, tmp_path / "run", "--total_steps=12", *args))
    assert first.returncode == 0, first.stderr
    before = losses(tmp_path / "run")
    resumed = run_app("train", *json_run(corpus, tmp_path / "run", "--total_steps=14", "--autoresume", *args))
    assert resumed.returncode == 0, resumed.stderr
    assert "no optimizer state" in resumed.stdout
    after = losses(tmp_path / "run")[12:]
    assert after[0] < before[0] - 0.3  # trained weights, not a fresh initialisation


def test_lora_dropout_resumes_exactly_and_a_gpu_random_state_is_ignored(tmp_path, corpus):
    """The checkpoint's CPU random state gives a resumed run the dropout masks an uninterrupted
    one draws; a GPU run's gpu_rng met on the CPU is ignored with a note; no CPU run claims GPU memory."""
    base = run_app("train", *json_run(corpus, tmp_path / "base", "--total_steps=1"))
    assert base.returncode == 0, base.stderr
    lora = [f"--load_checkpoint=params::{tmp_path / 'base' / 'checkpoint'}", "--finetune.mode=lora",
            "--finetune.lora_dropout=0.1", "--optimizer.adamw_optimizer.lr=1e-2",
            "--optimizer.adamw_optimizer.lr_warmup_steps=0"]

    def train(out: str, steps: int, *extra) -> str:
        result = run_app("train", *json_run(corpus, tmp_path / out, f"--total_steps={steps}", *lora, *extra))
        assert result.returncode == 0, result.stderr
        return result.stdout

    def edit_state(out: str, edit) -> None:
        path = tmp_path / out / "checkpoint" / "trainer_state.json"
        path.write_text(json.dumps(edit(json.loads(path.read_text()))))

    train("straight", 8)
    for out in ("resumed", "reseeded"):
        train(out, 4)
    state = json.loads((tmp_path / "resumed" / "checkpoint" / "trainer_state.json").read_text())
    assert "rng" in state and "gpu_rng" not in state
    edit_state("resumed", lambda s: {**s, "gpu_rng": [0] * 16})  # as a GPU run's checkpoint
    assert "GPU random state (gpu_rng) ignored: this run is on the cpu" in train("resumed", 8, "--autoresume")
    assert losses(tmp_path / "resumed") == losses(tmp_path / "straight")  # bit for bit, fp32
    # Without the random state the masks differ, and so do the losses: the check above is real.
    edit_state("reseeded", lambda s: {k: v for k, v in s.items() if k != "rng"})
    train("reseeded", 8, "--autoresume")
    assert losses(tmp_path / "reseeded")[4:] != pytest.approx(losses(tmp_path / "straight")[4:], abs=1e-4)
    records = [json.loads(line) for line in (tmp_path / "straight" / "metrics.jsonl").read_text().splitlines()]
    assert records and not any(key.startswith("gpu_") for r in records for key in r)
    # A random state that is not the generator's: exit 2, naming the file, the field and the size.
    edit_state("straight", lambda s: {**s, "rng": [1, 2, 3]})
    bad = run_app("train", *json_run(corpus, tmp_path / "straight", "--total_steps=9", *lora, "--autoresume"))
    assert bad.returncode == 2, bad.stderr
    assert re.search(r"straight/checkpoint/trainer_state.json: field 'rng' must be the \d+-byte state of the cpu "
                     r"default generator, got 3 bytes", bad.stderr), bad.stderr


def test_every_evaluation_reads_the_same_batches(tmp_path, corpus):
    result = run_app("train", *json_run(corpus, tmp_path / "run", "--total_steps=4", "--eval_freq=2", "--eval_steps=2",
                                        "--optimizer.adamw_optimizer.lr=0", "--optimizer.adamw_optimizer.end_lr=0",
                                        "--eval_dataset.type=json",
                                        f"--eval_dataset.json_dataset.path={corpus / 'train.jsonl'}",
                                        "--eval_dataset.json_dataset.seq_length=64"))
    assert result.returncode == 0, result.stderr
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    evals = [r["eval_loss"] for r in records if "eval_loss" in r]
    assert len(evals) == 2 and evals[0] == evals[1]  # lr 0: same weights, and the same batches


def test_a_tiny_model_learns_a_repeated_sentence(tmp_path, corpus):
    """The fixed task: one sentence repeated; the loss must fall below 0.3 within 60 steps."""
    data = tmp_path / "repeat.jsonl"
    data.write_text(json.dumps({"text": "Everyone is permitted to copy and distribute verbatim copies."}) + "\n")
    result = run_app("train", *json_run(corpus, tmp_path / "run", "--total_steps=60",
                                        f"--train_dataset.json_dataset.path={data}",
                                        "--optimizer.adamw_optimizer.lr=1e-2",
                                        "--optimizer.adamw_optimizer.lr_decay_steps=0"))
    assert result.returncode == 0, result.stderr
    trace = losses(tmp_path / "run")
    assert trace[0] > 5.0 and max(trace[-5:]) < 0.3, trace


def test_bf16_training_runs_on_fp32_masters(tmp_path, corpus):
    result = run_app("train", *json_run(corpus, tmp_path / "run", "--total_steps=8", "--dtype=bf16"))
    assert result.returncode == 0, result.stderr
    trace = losses(tmp_path / "run")
    assert trace[-1] < trace[0]
    config = json.loads((tmp_path / "run" / "checkpoint" / "config.json").read_text())
    assert config["dtype"] == "bfloat16"
    optimizer = load_file(tmp_path / "run" / "checkpoint" / "optimizer.safetensors")
    assert optimizer["model.norm.weight.master"].dtype == torch.float32


def test_checkpoint_generates_and_loads_in_transformers(tmp_path, corpus):
    from transformers import LlamaForCausalLM

    result = run_app("train", *json_run(corpus, tmp_path / "run", "--total_steps=3"))
    assert result.returncode == 0, result.stderr
    checkpoint = tmp_path / "run" / "checkpoint"
    assert (checkpoint / "tokenizer.model").is_file()
    LlamaForCausalLM.from_pretrained(checkpoint)
    config = json.loads((checkpoint / "trainer_state.json").read_text())["config"]
    assert config["total_steps"] == "3" and config["llama.q_chunk_size"] == "32"
    generated = run_app("generate", "--model", checkpoint, "--prompt", "This License", "--max_new_tokens", 8)
    assert generated.returncode == 0, generated.stderr


@pytest.mark.parametrize("flags, message", [
    (["--total_step=3"], "unknown setting 'total_step'; did you mean 'total_steps'?"),
    (["--total_steps=many"], "--total_steps: total_steps: expected an integer, got 'many'"),
    (["--llama.q_chunk_sise=8"], "did you mean 'llama.q_chunk_size'?"),
    (["--llama.remat_policy=some"], "remat_policy: expected nothing_saveable"),
    (["--optimizer.adamw_optimizer.b2=1.5"], "b2: expected in [0, 1), got 1.5"),
    (["--train_dataset.type=json"], "--tokenizer.vocab_file: required for a json train_dataset"),
    (["--load_checkpoint=weights::x"], "--load_checkpoint: expected params::DIR"),
    (["--device=tpu"], "--device: expected cpu or cuda, got 'tpu'"),
    *([(["--device=cuda"], "--device cuda: no CUDA here")] if not torch.cuda.is_available() else []),
])
def test_bad_flags_exit_2_naming_the_flag(tmp_path, flags, message):
    result = run_app("train", *TINY_RUN, f"--logger.output_dir={tmp_path}", "--total_steps=1",
                     "--train_dataset.type=synthetic", *flags)
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert message in result.stderr, result.stderr


def test_bad_dataset_and_tokenizer_exit_2(tmp_path, corpus):
    missing = run_app("train", *json_run(corpus, tmp_path / "a", "--total_steps=1",
                                         f"--train_dataset.json_dataset.path={tmp_path / 'none.jsonl'}"))
    assert missing.returncode == 2 and "none.jsonl: cannot open the dataset file" in missing.stderr
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"text": broken}\n')
    malformed = run_app("train", *json_run(corpus, tmp_path / "b", "--total_steps=1",
                                           f"--train_dataset.json_dataset.path={bad}",
                                           "--train_dataset.json_dataset.shuffle=false"))
    assert malformed.returncode == 2 and f"{bad}:2: not valid JSON" in malformed.stderr, malformed.stderr
    small_vocab = run_app("train", *json_run(corpus, tmp_path / "c", "--total_steps=1", "--llama.vocab_size=300"))
    assert small_vocab.returncode == 2
    assert "the tokenizer has 400 pieces but the model's vocab_size is 300" in small_vocab.stderr


def test_config_file_and_its_errors(tmp_path):
    config = tmp_path / "run.toml"
    config.write_text('total_steps = 2\nprogress = "never"\n[train_dataset]\ntype = "synthetic"\n'
                      f'[logger]\noutput_dir = "{tmp_path / "out"}"\n')
    ok = run_app("train", "--config", config, "--log_freq=1")
    assert ok.returncode == 0, ok.stderr
    assert len(losses(tmp_path / "out")) == 2
    config.write_text("total_steps = \n")
    broken = run_app("train", "--config", config)
    assert broken.returncode == 2 and f"{config}:1:" in broken.stderr
    config.write_text("[optimizer.adamw_optimizer]\nlr = 'fast'\n")
    typed = run_app("train", "--config", config)
    assert typed.returncode == 2 and f"{config}:2: optimizer.adamw_optimizer.lr: expected a number" in typed.stderr


def test_help_lists_every_flag_with_its_default():
    result = run_app("train", "--help")
    assert result.returncode == 0
    for flag in ["--total_steps", "--optimizer.adamw_optimizer.lr_warmup_steps", "--train_dataset.json_dataset.path",
                 "--checkpointer.save_optimizer_state", "--autoresume", "--llama.remat_policy", "--eval_freq"]:
        assert flag in result.stdout
    assert "[1000]" in result.stdout  # total_steps' default


def test_load_checkpoint_params_and_trainstate(tmp_path, corpus):
    first = run_app("train", *json_run(corpus, tmp_path / "a", "--total_steps=10"))
    assert first.returncode == 0, first.stderr
    checkpoint = tmp_path / "a" / "checkpoint"
    # params:: takes the weights only: step 0, a fresh optimizer, the data from the start.
    params = run_app("train", *json_run(corpus, tmp_path / "b", "--total_steps=2", f"--load_checkpoint=params::{checkpoint}"))
    assert params.returncode == 0, params.stderr
    assert losses(tmp_path / "b")[0] < losses(tmp_path / "a")[0] - 0.3  # trained weights, fresh start
    assert json.loads((tmp_path / "b" / "checkpoint" / "trainer_state.json").read_text())["step"] == 2
    # trainstate:: continues the run: step, optimizer and data position.
    state = run_app("train", *json_run(corpus, tmp_path / "c", "--total_steps=12",
                                       f"--load_checkpoint=trainstate::{checkpoint}"))
    assert state.returncode == 0, state.stderr
    assert "at step 10" in state.stdout
    # load_dataset_state: only the data position.
    data = run_app("train", *json_run(corpus, tmp_path / "d", "--total_steps=1",
                                      f"--load_dataset_state={checkpoint / 'trainer_state.json'}"))
    assert data.returncode == 0, data.stderr
    saved = json.loads((tmp_path / "d" / "checkpoint" / "trainer_state.json").read_text())["dataset"]
    before = json.loads((checkpoint / "trainer_state.json").read_text())["dataset"]
    assert (saved["epoch"], saved["document"]) >= (before["epoch"], before["document"])
