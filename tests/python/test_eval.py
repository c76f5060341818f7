"""bpt-eval against transformers: every metric recomputed in fp64 from the token ids bpt reports."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest
import torch

from llama_helpers import CORPUS, run_app, save_hf_model, train_tokenizer

BOS = 1
NLL_TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny random LLaMA with a 512-piece tokenizer, and its fp64 transformers twin."""
    directory = tmp_path_factory.mktemp("model")
    hf = save_hf_model(directory)
    train_tokenizer(directory, vocab_size=512)
    return directory, copy.deepcopy(hf).double()


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


def evaluate(checkpoint, tmp_path: Path, task: str, records: list, *args) -> dict:
    data = write_jsonl(tmp_path / f"{task}.jsonl", records)
    output = tmp_path / f"{task}.json"
    result = run_app("eval", "--model", checkpoint[0], "--task", task, "--data", data, "--details", "--output",
                     output, *args)
    assert result.returncode == 0, result.stderr
    report = json.loads(output.read_text())
    assert report["task"] == task and report["data"] == str(data) and report["model"] == str(checkpoint[0])
    assert len(report["examples"]) == len(records) == report["metrics"]["examples"]
    for name in report["metrics"]:
        assert name in result.stdout  # the printed table
    return report


def reference_scores(hf, ids: list[int], first: int) -> tuple[torch.Tensor, list[int]]:
    """log p(ids[t] | ids[:t]) for t >= first, and the argmax at those positions, by transformers."""
    with torch.no_grad():
        logits = hf(torch.tensor([ids])).logits[0, first - 1:-1]
    logprobs = logits.log_softmax(-1).gather(1, torch.tensor(ids[first:])[:, None])[:, 0]
    return logprobs, logits.argmax(-1).tolist()


def paragraphs(count: int) -> list[str]:
    return [p.strip() for p in CORPUS.read_text().split("\n\n") if p.strip()][:count]


def test_perplexity_is_token_weighted_over_windows_overlapping_by_one(checkpoint, tmp_path):
    texts = ["This License applies to any program.", *paragraphs(3)]  # the paragraphs need several windows
    window = 16
    report = evaluate(checkpoint, tmp_path, "perplexity", [{"text": t} for t in texts], "--max_seq_len", window)
    hf = checkpoint[1]
    total_nll, total_tokens = 0.0, 0
    for example in report["examples"]:
        ids = example["ids"]
        assert ids[0] == BOS and example["tokens"] == len(ids) - 1
        nll, start = 0.0, 0
        while start + 1 < len(ids):  # each window after the first starts with the previous one's last token
            nll -= reference_scores(hf, ids[start:start + window], 1)[0].sum().item()
            start += window - 1
        assert example["nll"] == pytest.approx(nll / (len(ids) - 1), abs=NLL_TOLERANCE)
        total_nll, total_tokens = total_nll + nll, total_tokens + len(ids) - 1
    assert max(len(e["ids"]) for e in report["examples"]) > 2 * window  # windows were exercised
    metrics = report["metrics"]
    assert metrics["tokens"] == total_tokens
    assert metrics["nll"] == pytest.approx(total_nll / total_tokens, abs=NLL_TOLERANCE)
    assert metrics["perplexity"] == pytest.approx(math.exp(metrics["nll"]), rel=1e-9)


def test_multiple_choice_picks_the_highest_summed_log_likelihood(checkpoint, tmp_path):
    passage, question = "Each licensee is addressed as you.", "is the licensee addressed as you"
    boolq_prompt = f"{passage}\nQuestion: {question}?\nAnswer:"
    records = [
        {"prompt": "The GNU General Public License is", "choices": [" free", " a license", " café"], "label": 1},
        {"passage": passage, "question": question, "answer": True},
        {"passage": "To protect your rights.", "question": "is it about rights", "answer": False},
        {"prompt": boolq_prompt, "choices": [" no", " yes"], "label": 1},  # BoolQ's template, by hand
        {"prompt": "You may copy it", "choices": [" too", " too"], "label": 1},  # a tie: the lowest index wins
    ]
    report = evaluate(checkpoint, tmp_path, "multiple_choice", records)
    examples = report["examples"]
    for boolq, label in ((examples[1], 1), (examples[2], 0)):
        assert [c["text"] for c in boolq["choices"]] == [" no", " yes"] and boolq["label"] == label
    assert examples[1]["context_ids"] == examples[3]["context_ids"]
    assert [c["ids"] for c in examples[1]["choices"]] == [c["ids"] for c in examples[3]["choices"]]
    assert examples[4]["prediction"] == examples[4]["prediction_norm"] == 0 and not examples[4]["correct"]
    assert examples[0]["choices"][2]["bytes"] == len(" café".encode())

    hf = checkpoint[1]
    correct = correct_norm = 0
    for example in examples:
        context = example["context_ids"]
        assert context[0] == BOS
        logliks = []
        for choice in example["choices"]:
            assert choice["ids"]
            loglik = reference_scores(hf, context + choice["ids"], len(context))[0].sum().item()
            assert choice["loglik"] == pytest.approx(loglik, abs=NLL_TOLERANCE)
            logliks.append(loglik)
        per_byte = [loglik / c["bytes"] for loglik, c in zip(logliks, example["choices"])]
        if example is not examples[4]:  # the tie is decided by index, not by rounding
            assert example["prediction"] == max(range(len(logliks)), key=logliks.__getitem__)
            assert example["prediction_norm"] == max(range(len(per_byte)), key=per_byte.__getitem__)
        correct += example["prediction"] == example["label"]
        correct_norm += example["prediction_norm"] == example["label"]
        assert example["correct"] == (example["prediction"] == example["label"])
    assert report["metrics"]["accuracy"] == pytest.approx(correct / len(examples))
    assert report["metrics"]["accuracy_norm"] == pytest.approx(correct_norm / len(examples))


def test_last_word_is_correct_when_the_argmax_matches_every_target_token(checkpoint, tmp_path):
    # The model's own greedy continuations are targets it must get right (unless the text
    # re-tokenizes differently; at least one must not).
    prompts = ["This License", "You may", "the Program", "Each licensee", "copyright"]
    generated = run_app("generate", "--model", checkpoint[0], *[a for p in prompts for a in ("--prompt", p)],
                        "--max_new_tokens", 1, "--output", "json")
    assert generated.returncode == 0, generated.stderr
    continuations = [json.loads(line) for line in generated.stdout.splitlines()]
    continuations = [c for c in continuations if c["text"].strip() and "\ufffd" not in c["text"]]  # whole characters
    records = [{"text": "You may convey verbatim copies of the Program"},
               {"text": "The precise terms and conditions follow"},
               *({"prompt": c["prompt"], "response": c["text"]} for c in continuations)]
    report = evaluate(checkpoint, tmp_path, "last_word", records)

    hf = checkpoint[1]
    correct, nll, tokens, own_matches = 0, 0.0, 0, 0
    for example, record in zip(report["examples"], records):
        context, target = example["context_ids"], example["target_ids"]
        assert context[0] == BOS and target
        logprobs, argmax = reference_scores(hf, context + target, len(context))
        assert example["loglik"] == pytest.approx(logprobs.sum().item(), abs=NLL_TOLERANCE)
        assert example["predicted_ids"] == argmax
        assert example["correct"] == (argmax == target)
        correct += example["correct"]
        nll, tokens = nll - logprobs.sum().item(), tokens + len(target)
        generated_ids = next((c["ids"] for c in continuations if c["prompt"] == record.get("prompt")), None)
        if generated_ids == target:
            assert example["correct"]
            own_matches += 1
    assert own_matches >= 1
    metrics = report["metrics"]
    assert metrics["accuracy"] == pytest.approx(correct / len(records)) and 0 < metrics["accuracy"] < 1
    assert metrics["target_tokens"] == tokens
    assert metrics["target_nll"] == pytest.approx(nll / tokens, abs=NLL_TOLERANCE)


def test_add_bos_false_leaves_the_bos_out(checkpoint, tmp_path):
    report = evaluate(checkpoint, tmp_path, "last_word", [{"text": "You may convey verbatim copies"}],
                      "--add_bos", "false")
    assert report["examples"][0]["context_ids"][0] != BOS


@pytest.mark.parametrize("task, lines, args, message", [
    ("perplexity", ['{"text": "fine"}', '{"text": "broken'], [], ":2: not valid JSON"),
    ("perplexity", ['{"text": ""}'], [], ":1: field 'text': empty string"),
    ("perplexity", ['{"text": "no body"}'], ["--field", "body"], ":1: field 'body': missing"),
    ("multiple_choice", ['{"prompt": "a", "choices": [" b", " c"], "label": 2}'], [], ":1: field 'label'"),
    ("multiple_choice", ['{"prompt": "a", "choices": [" b"], "label": 0}'], [], ":1: field 'choices'"),
    ("multiple_choice", ['{"prompt": "a", "choices": [" b", " c"], "label": 0}',
                         '{"prompt": "a", "choices": [" b", 3], "label": 0}'], [], ":2: field 'choices[1]'"),
    ("multiple_choice", ['{"passage": "a", "question": "b", "answer": "yes"}'], [], ":1: field 'answer'"),
    ("last_word", ['{"text": "oneword"}'], [], ":1: field 'text'"),
])
def test_bad_records_exit_2_naming_file_line_and_field(checkpoint, tmp_path, task, lines, args, message):
    data = write_jsonl(tmp_path / "bad.jsonl", lines)
    result = run_app("eval", "--model", checkpoint[0], "--task", task, "--data", data, *args)
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith(f"bpt-eval: error: {data}{message}"), result.stderr
