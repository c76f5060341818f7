"""Mixture of experts: the dispatch / combine ops against naive loops (values, gradients,
opcheck), bpt's MoE LLaMA against transformers' MixtralForCausalLM on the same random weights
(logits, and the loss with its load-balancing term), and GLaM training with bpt-train."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import MixtralConfig, MixtralForCausalLM
from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

from bpt.llama import Llama
from llama_helpers import CORPUS, run_app, run_launch, train_tokenizer

dispatch, combine = torch.ops.bpt.moe_dispatch, torch.ops.bpt.moe_combine


def slots(n_tokens: int, n_slots: int) -> torch.Tensor:
    return torch.randint(0, n_tokens, (n_slots,))


def test_dispatch_and_combine_against_loops():
    x = torch.randn(7, 5, dtype=torch.float64, requires_grad=True)
    index = slots(7, 11)
    weight = torch.rand(11, dtype=torch.float64, requires_grad=True)
    y = dispatch(x, index)
    torch.testing.assert_close(y, torch.stack([x[i] for i in index.tolist()]))
    out = combine(y * 2, index, weight, 7)
    want = torch.zeros(7, 5, dtype=torch.float64)
    for m, n in enumerate(index.tolist()):
        want[n] += weight[m] * 2 * x[n]
    torch.testing.assert_close(out, want)
    assert torch.autograd.gradcheck(lambda x, w: combine(dispatch(x, index), index, w, 7), (x, weight))


def test_opcheck_and_dtypes():
    for dtype in (torch.float32, torch.bfloat16):
        x, index = torch.randn(6, 4, dtype=dtype), slots(6, 9)
        weight = torch.rand(9)
        torch.library.opcheck(dispatch.default, (x, index))
        torch.library.opcheck(combine.default, (x[index], index, weight, 6))
        assert combine(x[index], index, weight, 6).dtype == dtype
    with pytest.raises(RuntimeError, match="index must be int64"):
        dispatch(torch.randn(3, 2), torch.zeros(2, dtype=torch.int32))
    with pytest.raises(RuntimeError, match="weight.size\\(0\\)"):
        combine(torch.randn(4, 2), slots(3, 4), torch.rand(3), 3)


@pytest.fixture(scope="module")
def mixtral(tmp_path_factory):
    """A random tiny Mixtral (8 experts, top-2, every layer) saved by transformers."""
    torch.manual_seed(0)
    config = MixtralConfig(vocab_size=128, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, num_local_experts=8, num_experts_per_tok=2,
                           max_position_embeddings=256, router_aux_loss_coef=0.02, attn_implementation="eager")
    model = MixtralForCausalLM(config).eval()
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if parameter.dim() == 1:
                parameter.uniform_(0.5, 1.5)
            if name.endswith("gate.weight"):
                parameter.normal_(0, 0.5)  # a router with clear preferences
    directory = tmp_path_factory.mktemp("mixtral")
    model.save_pretrained(directory)
    return directory, model


def test_mixtral_logits_and_loss_match_transformers(mixtral):
    directory, hf = mixtral
    ids = torch.randint(0, 128, (2, 23))
    bpt = Llama(directory)
    with torch.no_grad():
        want = hf(input_ids=ids, output_router_logits=True, labels=ids)
    torch.testing.assert_close(bpt.logits(ids), want.logits, rtol=1e-4, atol=1e-4)
    # bpt's loss: cross-entropy plus router_aux_loss_coef x the mean of the MoE layers'
    # load-balancing losses (transformers pools the layers' statistics into one term
    # instead), each layer's computed by transformers' function.
    targets = torch.cat([ids[:, 1:], torch.full((2, 1), -100)], dim=1)
    cross_entropy = torch.nn.functional.cross_entropy(want.logits[:, :-1].reshape(-1, 128), ids[:, 1:].reshape(-1))
    per_layer = [load_balancing_loss_func((logits,), 8, 2) for logits in want.router_logits]
    assert all(aux > 1.0 for aux in per_layer)
    torch.testing.assert_close(bpt.loss(ids, targets), cross_entropy + 0.02 * sum(per_layer) / 2, rtol=1e-4, atol=1e-4)


def test_mixtral_checkpoint_round_trips(mixtral, tmp_path):
    directory, hf = mixtral
    Llama(directory).save(tmp_path / "out", hf_format=True)
    assert json.loads((tmp_path / "out" / "config.json").read_text())["model_type"] == "mixtral"
    again = MixtralForCausalLM.from_pretrained(tmp_path / "out", attn_implementation="eager").eval()
    ids = torch.randint(0, 128, (1, 9))
    with torch.no_grad():
        torch.testing.assert_close(again(input_ids=ids).logits, hf(input_ids=ids).logits)


GLAM = ["--model=glam", "--load_llama_config=tiny", "--llama.num_local_experts=4", "--train_dataset.type=synthetic",
        "--train_dataset.json_dataset.seq_length=64", "--train_dataset.json_dataset.batch_size=4",
        "--optimizer.adamw_optimizer.lr=3e-3", "--progress=never", "--log_freq=1"]


# Dropless and without router losses, every rank's rows route as they would in one process.
EXACT = ["--llama.capacity_factor=0", "--llama.router_aux_loss_coef=0", "--llama.router_z_loss_coef=0"]


def records(out: Path) -> list[dict]:
    return [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


def test_glam_trains_logs_its_router_and_generates(tmp_path):
    paragraphs = [p.strip() for p in CORPUS.read_text().split("\n\n") if p.strip()]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps({"text": p}) + "\n" for p in paragraphs))
    tokenizer = train_tokenizer(tmp_path, vocab_size=400)
    result = run_app("train", *GLAM, "--total_steps=30", "--llama.vocab_size=400", "--train_dataset.type=json",
                     f"--tokenizer.vocab_file={tokenizer}",
                     f"--train_dataset.json_dataset.path={tmp_path / 'train.jsonl'}",
                     f"--logger.output_dir={tmp_path / 'glam'}")
    assert result.returncode == 0, result.stderr
    log = records(tmp_path / "glam")
    assert log[-1]["loss"] < log[0]["loss"] - 0.5
    # aux is k = 2 for a perfectly even router; z > 0.
    assert all(1.5 < r["router_aux_loss"] < 4 and r["router_z_loss"] > 0 for r in log)
    assert all(0 <= r["router_dropped_fraction"] < 0.5 for r in log)
    config = json.loads((tmp_path / "glam" / "checkpoint" / "config.json").read_text())
    assert config["model_type"] == "glam" and config["bpt"]["moe_layer_freq"] == 2
    logits = Llama(tmp_path / "glam" / "checkpoint").logits(torch.randint(0, 400, (1, 5)))
    assert logits.shape == (1, 5, 400) and torch.isfinite(logits).all()


def test_glam_world_2_equals_world_1(tmp_path):
    # The experts sharded as the rest of the model.
    one = run_app("train", *GLAM, *EXACT, "--total_steps=5", f"--logger.output_dir={tmp_path / 'one'}")
    assert one.returncode == 0, one.stderr
    two = run_launch(2, *GLAM, *EXACT, "--total_steps=5", f"--logger.output_dir={tmp_path / 'two'}")
    assert two.returncode == 0, two.stderr
    for a, b in zip(records(tmp_path / "one"), records(tmp_path / "two"), strict=True):
        assert b["loss"] == pytest.approx(a["loss"], abs=1e-5)


def weights(checkpoint: Path, tmp_path: Path) -> dict[str, torch.Tensor]:
    """A checkpoint's tensors whole (a sharded one through bpt-convert)."""
    if (checkpoint / "shards.json").exists():
        out = tmp_path / f"{checkpoint.parent.name}-whole"
        assert run_app("convert", f"--input={checkpoint}", f"--output={out}", "--format=hf").returncode == 0
        checkpoint = out
    return load_file(checkpoint / "model.safetensors")


def assert_same_run(a: Path, b: Path) -> None:
    for x, y in zip(records(a), records(b), strict=True):
        assert y["loss"] == pytest.approx(x["loss"], abs=1e-5)
        assert y["grad_norm"] == pytest.approx(x["grad_norm"], rel=1e-4)


@pytest.mark.parametrize("remat, nproc, mesh", [
    ("nothing_saveable", 2, "1,2,1"),     # the experts' gradients land in .grad (recomputed backward)
    ("everything_saveable", 2, "1,2,1"),  # in the placed unit's flat buffer (layers kept)
    ("nothing_saveable", 4, "2,2,1"),     # 2 replicas of 2 expert ranks: all-reduced over dp
    ("everything_saveable", 4, "2,2,1"),
])
def test_expert_parallel_equals_one_process(tmp_path, remat, nproc, mesh):
    args = [*GLAM, *EXACT, "--total_steps=3", "--optimizer.accumulate_gradient_steps=2", f"--llama.remat_policy={remat}"]
    one = run_app("train", *args, f"--logger.output_dir={tmp_path / 'one'}")
    assert one.returncode == 0, one.stderr
    ep = run_launch(nproc, *args, f"--mesh_dim={mesh}", "--expert_parallel", f"--logger.output_dir={tmp_path / 'ep'}")
    assert ep.returncode == 0, ep.stderr
    assert_same_run(tmp_path / "one", tmp_path / "ep")
    # Each rank holds its 2 of the 4 experts whole: one piece each in the index, and half the
    # experts' bytes of state per rank.
    index = json.loads((tmp_path / "ep" / "checkpoint" / "shards.json").read_text())["tensors"]
    experts = {name: t for name, t in index.items() if ".experts." in name}
    assert len(experts) == 8  # layer 1's 4 experts, w1 and w2
    for name, tensor in experts.items():
        owner = int(name.split(".experts.")[1].split(".")[0]) // 2
        assert tensor["pieces"] == [[owner, 0, tensor["shape"][0] * tensor["shape"][1]]]
    whole = weights(tmp_path / "one" / "checkpoint", tmp_path)
    placed = weights(tmp_path / "ep" / "checkpoint", tmp_path)
    assert whole.keys() == placed.keys()
    for name in whole:
        # (Adam divides by the gradient's own size: rounding moves a near-zero gradient's step most.)
        torch.testing.assert_close(placed[name], whole[name], atol=1e-4, rtol=1e-4)
    # The all-to-alls are counted with FSDP's collectives; each rank keeps half the experts.
    sharded = run_launch(nproc, *args, f"--mesh_dim={mesh}", f"--logger.output_dir={tmp_path / 'sharded'}")
    assert sharded.returncode == 0, sharded.stderr
    for a, b in zip(records(tmp_path / "sharded"), records(tmp_path / "ep"), strict=True):
        assert 0 < b["comm_mb_per_step"] < a["comm_mb_per_step"]
        assert b["state_mb"] == pytest.approx(a["state_mb"], rel=0.02)  # (the shards are padded)


def test_expert_parallel_with_empty_exchanges_and_evaluation(tmp_path):
    # Top-1 under a zero router sends every token to the same expert (one of equal scores):
    # one rank receives no row in the first step. Evaluation runs the exchanges without
    # gradients.
    args = [*GLAM, *EXACT, "--llama.num_local_experts=8", "--llama.num_experts_per_tok=1", "--eval_freq=1",
            "--eval_steps=2", "--eval_dataset.type=synthetic", "--eval_dataset.json_dataset.seq_length=64",
            "--eval_dataset.json_dataset.batch_size=4"]
    assert run_app("train", *args, "--total_steps=1", f"--logger.output_dir={tmp_path / 'init'}").returncode == 0
    start = tmp_path / "init" / "checkpoint"
    tensors = load_file(start / "model.safetensors")
    save_file({k: torch.zeros_like(v) if k.endswith(".gate.weight") else v for k, v in tensors.items()},
              start / "model.safetensors")
    args = [a for a in args if not a.startswith("--load_llama_config")] + [f"--load_checkpoint=params::{start}",
                                                                           "--total_steps=3"]
    one = run_app("train", *args, f"--logger.output_dir={tmp_path / 'one'}")
    assert one.returncode == 0, one.stderr
    ep = run_launch(2, *args, "--expert_parallel", f"--logger.output_dir={tmp_path / 'ep'}")
    assert ep.returncode == 0, ep.stderr
    assert_same_run(tmp_path / "one", tmp_path / "ep")
    evals = [[r["eval_loss"] for r in map(json.loads, (tmp_path / run / "metrics.jsonl").read_text().splitlines())
              if "eval_loss" in r] for run in ("one", "ep")]
    assert len(evals[0]) == 3 and evals[1] == pytest.approx(evals[0], abs=1e-5)


def test_expert_parallel_checkpoints_resume_at_other_world_sizes(tmp_path):
    args = [*GLAM, *EXACT]
    assert run_app("train", *args, "--total_steps=4", f"--logger.output_dir={tmp_path / 'whole'}").returncode == 0
    # 2 steps with experts placed over 2 ranks, then 2 more in one process; and the reverse.
    first = run_launch(2, *args, "--expert_parallel", "--total_steps=2", f"--logger.output_dir={tmp_path / 'a'}")
    assert first.returncode == 0, first.stderr
    then = run_app("train", *args, "--total_steps=4", "--autoresume", f"--logger.output_dir={tmp_path / 'a'}")
    assert then.returncode == 0, then.stderr
    assert run_app("train", *args, "--total_steps=2", f"--logger.output_dir={tmp_path / 'b'}").returncode == 0
    then = run_launch(2, *args, "--expert_parallel", "--total_steps=4", "--autoresume",
                      f"--logger.output_dir={tmp_path / 'b'}")
    assert then.returncode == 0, then.stderr
    for run in ("a", "b"):
        assert_same_run(tmp_path / "whole", tmp_path / run)


def test_lora_with_placed_frozen_experts_resumes_in_one_process(tmp_path):
    # LoRA on the attention of a GLaM: the frozen experts are placed, the adapters sharded.
    assert run_app("train", *GLAM, *EXACT, "--total_steps=1", f"--logger.output_dir={tmp_path / 'base'}").returncode == 0
    lora = [a for a in GLAM if not a.startswith(("--model", "--load_llama_config", "--llama."))] + [
        f"--load_checkpoint=hf::{tmp_path / 'base' / 'checkpoint'}", "--finetune.mode=lora",
        "--finetune.lora_target=attention", "--optimizer.adamw_optimizer.lr=1e-2"]
    assert run_app("train", *lora, "--total_steps=4", f"--logger.output_dir={tmp_path / 'one'}").returncode == 0
    first = run_launch(2, *lora, "--expert_parallel", "--total_steps=2", f"--logger.output_dir={tmp_path / 'ep'}")
    assert first.returncode == 0, first.stderr
    then = run_app("train", *lora, "--total_steps=4", "--autoresume", f"--logger.output_dir={tmp_path / 'ep'}")
    assert then.returncode == 0, then.stderr
    assert_same_run(tmp_path / "one", tmp_path / "ep")


@pytest.mark.parametrize("flags, message", [
    (["--llama.num_local_experts=0"], "--expert_parallel: the model has no MoE layers"),
    (["--llama.num_local_experts=3"], "3 experts (num_local_experts) do not divide over the 2 ranks"),
])
def test_bad_expert_parallel_settings_exit_2(tmp_path, flags, message):
    result = run_launch(2, *GLAM, *flags, "--expert_parallel", "--total_steps=1", f"--logger.output_dir={tmp_path}")
    # torchrun itself exits 1, naming each rank's exit code.
    assert "exitcode  : 2" in result.stderr and message in result.stderr, result.stderr


def test_router_losses_train_alike_with_and_without_remat(tmp_path):
    # Capacity drops and both router losses on: recomputing a layer in backward (remat)
    # gives the gradients keeping its activations does.
    runs = {}
    for policy in ("nothing_saveable", "checkpoint_dots", "everything_saveable"):
        out = tmp_path / policy
        result = run_app("train", *GLAM, "--total_steps=4", "--llama.capacity_factor=1", "--llama.router_z_loss_coef=0.01",
                         f"--llama.remat_policy={policy}", f"--logger.output_dir={out}")
        assert result.returncode == 0, result.stderr
        runs[policy] = records(out)
    assert all(r["router_dropped_fraction"] > 0 for r in runs["nothing_saveable"])
    for policy in ("checkpoint_dots", "everything_saveable"):
        for a, b in zip(runs["nothing_saveable"], runs[policy], strict=True):
            assert b["loss"] == pytest.approx(a["loss"], abs=1e-5)
            assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-4)


def test_glam_generation_is_the_same_with_and_without_the_cache(tmp_path):
    out = tmp_path / "glam"
    assert run_app("train", *GLAM, "--total_steps=2", f"--logger.output_dir={out}").returncode == 0
    ids = torch.randint(0, 256, (12,))
    model = Llama(out / "checkpoint")
    torch.testing.assert_close(model.generate(ids, 8, True), model.generate(ids, 8, False))


@pytest.mark.parametrize("flags, message", [
    (["--finetune.mode=lora", "--finetune.lora_target=mlp"], "adapters on an MoE model's MLPs are not supported"),
    (["--llama.moe_layer_freq=3"], "moe_layer_freq: 3 is more than num_hidden_layers 2"),
    (["--llama.num_experts_per_tok=5"], "num_experts_per_tok: expected 1 to num_local_experts (4), got 5"),
    (["--llama.expert_activation=relu"], "expert_activation: expected silu or gelu"),
])
def test_bad_moe_settings_exit_2(mixtral, tmp_path, flags, message):
    base = [*GLAM, "--total_steps=1", f"--logger.output_dir={tmp_path}"]
    if flags[0].startswith("--finetune"):
        base = [a for a in base if not a.startswith(("--model", "--load_llama_config", "--llama.num_local"))]
        base.append(f"--load_checkpoint=hf::{mixtral[0]}")
    result = run_app("train", *base, *flags)
    assert result.returncode == 2 and message in result.stderr, result.stderr


def test_glam_on_a_dense_checkpoint_is_refused(tmp_path):
    dense = tmp_path / "dense"
    assert run_app("train", "--train_dataset.type=synthetic", "--train_dataset.json_dataset.seq_length=16",
                   "--train_dataset.json_dataset.batch_size=1", "--total_steps=1", "--progress=never",
                   f"--logger.output_dir={dense}").returncode == 0
    result = run_app("train", *GLAM, "--total_steps=1", f"--load_checkpoint=hf::{dense / 'checkpoint'}",
                     "--load_llama_config=", f"--logger.output_dir={tmp_path / 'g'}")
    assert result.returncode == 2 and "is a dense model" in result.stderr, result.stderr
