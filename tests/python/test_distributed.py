"""bpt-train on several processes (FSDP over Gloo, 127.0.0.1, free ports, bounded time).

The reference is the same run on one process: with the same global batch, every world size
and mesh must follow the same losses, and a checkpoint saved at one world size must continue
at another exactly as the uninterrupted run.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from bpt.llama import Llama
from llama_helpers import BUILD, run_app

ROOT = Path(__file__).resolve().parents[2]
TINY = ["--config", str(ROOT / "configs/llama/tiny.toml"), "--progress=never", "--log_freq=1",
        "--train_dataset.json_dataset.batch_size=4"]
TIMEOUT = 180  # seconds for a whole multi-process run


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_ranks(world: int, args: list[str]) -> list[subprocess.Popen]:
    """`world` bpt-train processes with torchrun's variables, rank 0 hosting the store."""
    port = free_port()
    procs = []
    for rank in range(world):
        env = dict(os.environ, RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")
        procs.append(subprocess.Popen([str(BUILD / "bpt-train"), *args], env=env, text=True,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE))
    return procs


def finish(procs: list[subprocess.Popen], timeout: float = TIMEOUT) -> list[tuple[int, str, str]]:
    deadline = time.monotonic() + timeout
    results = []
    try:
        for proc in procs:
            out, err = proc.communicate(timeout=max(1.0, deadline - time.monotonic()))
            results.append((proc.returncode, out, err))
    finally:
        for proc in procs:
            proc.kill()
    return results


def train(out: Path, world: int, *extra: str) -> list[dict]:
    """Trains with `world` ranks into `out`; returns the logged records."""
    args = [*TINY, f"--logger.output_dir={out}", *extra]
    if world == 1:
        result = run_app("train", *args, timeout=TIMEOUT)
        results = [(result.returncode, result.stdout, result.stderr)]
    else:
        results = finish(start_ranks(world, args))
    for rank, (code, _, err) in enumerate(results):
        assert code == 0, f"rank {rank} exited {code}: {err}"
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def losses(records: list[dict]) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in records if "loss" in r}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """10 steps on one process, fp32."""
    out = tmp_path_factory.mktemp("world1")
    return train(out, 1, "--total_steps=10")


@pytest.mark.parametrize("world, extra", [
    (2, []),
    (4, []),
    (4, ["--mesh_dim=2,2,1"]),                                 # hybrid: 2 replicas of 2 shards
    (2, ["--mesh_dim=2,1,1"]),                                 # pure data parallel
    (2, ["--llama.remat_policy=everything_saveable"]),        # layers kept gathered
    (2, ["--llama.remat_policy=checkpoint_dots", "--fsdp.prefetch=false"]),
])
def test_world_sizes_follow_the_single_process_losses(tmp_path, reference, world, extra):
    got = losses(train(tmp_path / "run", world, "--total_steps=10", *extra))
    assert sorted(got) == list(range(1, 11))
    want = losses(reference)
    for step, loss in got.items():
        assert loss == pytest.approx(want[step], abs=1e-5), f"step {step}"


@pytest.mark.parametrize("world, extra, tolerance", [
    # 3 ranks: the root unit (43136 values) is padded to a multiple of 3.
    (3, ["--train_dataset.json_dataset.batch_size=6"], 1e-5),
    # Two micro-batches of 2 rows are not one batch of 4 (the mean differs).
    (2, ["--optimizer.accumulate_gradient_steps=2", "--train_dataset.json_dataset.batch_size=2"], 1e-5),
    # Evaluation on every rank's slice, summed by tokens.
    (2, ["--eval_freq=5", "--eval_steps=2", "--eval_dataset.type=synthetic",
         "--eval_dataset.json_dataset.seq_length=128", "--eval_dataset.json_dataset.batch_size=4"], 1e-5),
    # bf16 gathers and compute, fp32 masters, fp32 reduce: bf16 rounding differs with the split.
    (2, ["--dtype=bf16", "--fsdp.fp32_reduce"], 2e-3),
])
def test_other_settings_follow_one_process_with_the_same_settings(tmp_path, world, extra, tolerance):
    one = train(tmp_path / "one", 1, "--total_steps=10", *extra)
    many = train(tmp_path / "many", world, "--total_steps=10", *extra)
    for key in ("loss", "eval_loss"):
        want = {r["step"]: r[key] for r in one if key in r}
        got = {r["step"]: r[key] for r in many if key in r}
        assert got.keys() == want.keys()
        for step, value in got.items():
            assert value == pytest.approx(want[step], abs=tolerance), f"{key} at step {step}"


def test_each_rank_holds_a_world_size_share_of_the_state(tmp_path, reference):
    """Shards of parameters and gradients + optimizer state per rank (state_mb, from the tensors each rank
    keeps between steps; the gathered layer and root of a step in flight come on top)."""
    whole = reference[0]["state_mb"]
    for world in (2, 4):
        held = train(tmp_path / f"w{world}", world, "--total_steps=1")[0]["state_mb"]
        # Each unit pads to a multiple of the world size: at most world - 1 elements per unit.
        assert whole / world <= held <= whole / world * 1.01, (world, held, whole)


def test_communication_is_three_times_the_parameter_bytes(tmp_path, reference):
    records = train(tmp_path / "w2", 2, "--total_steps=2")
    parameter_mb = reference[0]["state_mb"] / 4  # fp32: parameters, gradients, two moments
    per_step = records[-1]["comm_mb_per_step"]
    # All-gather forward and backward, reduce-scatter once; the root unit is gathered once.
    assert 2 * parameter_mb < per_step <= 3.01 * parameter_mb


@pytest.mark.parametrize("mesh, worlds", [("1,-1,1", (1, 4)), ("2,2,1", (2,)), ("2,1,1", (1,))])
def test_checkpoint_continues_at_other_world_sizes(tmp_path, reference, mesh, worlds):
    """Saved at world 2 (sharded, or replicated) or 4 (hybrid), continued elsewhere."""
    saved = tmp_path / "saved"
    train(saved, 4 if mesh == "2,2,1" else 2, "--total_steps=5", f"--mesh_dim={mesh}")
    checkpoint = saved / "checkpoint"
    assert (checkpoint / "shards.json").exists() and (checkpoint / "trainer_state.json").exists()
    want = losses(reference)
    for world in worlds:
        out = tmp_path / f"resumed{world}"
        got = losses(train(out, world, "--total_steps=10", f"--load_checkpoint=trainstate::{checkpoint}"))
        assert sorted(got) == list(range(6, 11))
        for step, loss in got.items():
            assert loss == pytest.approx(want[step], abs=1e-5), f"world {world}, step {step}"


def test_convert_gathers_a_sharded_checkpoint(tmp_path, reference):
    train(tmp_path / "w2", 2, "--total_steps=10")
    train(tmp_path / "w1", 1, "--total_steps=10")
    result = run_app("convert", "--input", tmp_path / "w2/checkpoint", "--output", tmp_path / "hf", "--format=hf")
    assert result.returncode == 0, result.stderr
    gathered = load_file(tmp_path / "hf/model.safetensors")
    single = load_file(tmp_path / "w1/checkpoint/model.safetensors")
    assert gathered.keys() == single.keys()
    for name, tensor in single.items():
        torch.testing.assert_close(gathered[name], tensor, atol=1e-6, rtol=1e-5, msg=name)
    # The model loads from the sharded checkpoint directly too.
    ids = torch.randint(0, 256, (1, 16))
    torch.testing.assert_close(Llama(tmp_path / "w2/checkpoint").logits(ids), Llama(tmp_path / "w1/checkpoint").logits(ids),
                               atol=1e-5, rtol=1e-5)


def test_incomplete_sharded_checkpoint_is_refused(tmp_path):
    train(tmp_path / "w2", 2, "--total_steps=2")
    checkpoint = tmp_path / "w2/checkpoint"
    (checkpoint / "model-rank-00001-of-00002.safetensors").unlink()
    result = run_app("convert", "--input", checkpoint, "--output", tmp_path / "hf")
    assert result.returncode == 2
    assert "model-rank-00001-of-00002.safetensors: missing" in result.stderr
    (checkpoint / "shards.json").write_text("{\"format\": \"bpt-fsdp\"}")
    result = run_app("convert", "--input", checkpoint, "--output", tmp_path / "hf")
    assert result.returncode == 2 and "shards.json: expected" in result.stderr


@pytest.mark.parametrize("how, lost", [("kill", 1), ("kill", 0), ("stop", 1)])
def test_a_lost_rank_stops_the_others_with_a_clear_error(tmp_path, how, lost):
    """SIGKILL: the peers see the connection close at once. SIGSTOP: they wait out --dist_timeout."""
    procs = start_ranks(2, [*TINY, f"--logger.output_dir={tmp_path}", "--total_steps=100000", "--dist_timeout=5"])
    metrics = tmp_path / "metrics.jsonl"
    deadline = time.monotonic() + 60
    while not (metrics.exists() and metrics.read_text().count("\n") >= 2):
        assert time.monotonic() < deadline and procs[0].poll() is None, "training did not start"
        time.sleep(0.1)
    procs[lost].send_signal(signal.SIGKILL if how == "kill" else signal.SIGSTOP)
    survivor = procs[1 - lost]
    start = time.monotonic()
    try:
        _, err = survivor.communicate(timeout=30)
    finally:
        for proc in procs:
            proc.kill()
    assert survivor.returncode == 1
    assert "another rank may have stopped, or the collective timed out" in err
    assert f"(rank {1 - lost} of 2)" in err
    assert time.monotonic() - start < (2 if how == "kill" else 15)


def test_a_stop_signal_to_one_rank_stops_all_at_the_same_step(tmp_path):
    procs = start_ranks(2, [*TINY, f"--logger.output_dir={tmp_path}", "--total_steps=100000"])
    metrics = tmp_path / "metrics.jsonl"
    deadline = time.monotonic() + 60
    while not (metrics.exists() and metrics.read_text().count("\n") >= 3):
        assert time.monotonic() < deadline and procs[0].poll() is None, "training did not start"
        time.sleep(0.1)
    procs[1].send_signal(signal.SIGTERM)
    results = finish(procs, timeout=60)
    assert [code for code, _, _ in results] == [0, 0], [err for _, _, err in results]
    step = json.loads((tmp_path / "checkpoint/trainer_state.json").read_text())["step"]
    assert f"bpt-train: stopped at step {step}," in results[0][1]


def test_ranks_with_different_weights_are_refused(tmp_path):
    port = free_port()
    procs = []
    for rank in range(2):
        env = dict(os.environ, RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        procs.append(subprocess.Popen([str(BUILD / "bpt-train"), *TINY, f"--logger.output_dir={tmp_path}",
                                       f"--seed={rank}"], env=env, text=True,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE))
    for code, _, err in finish(procs, timeout=60):
        assert code == 1 and "the ranks hold different weights" in err, err


@pytest.mark.parametrize("env, message", [
    ({"RANK": "0"}, "RANK is set but WORLD_SIZE is not"),
    ({"RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1"}, "MASTER_PORT is not set"),
    ({"RANK": "3", "WORLD_SIZE": "2"}, "RANK: expected 0..1, got 3"),
])
def test_bad_launch_environment_exits_2(tmp_path, env, message):
    clean = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    result = subprocess.run([str(BUILD / "bpt-train"), *TINY, f"--logger.output_dir={tmp_path}"],
                            env={**clean, **env}, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and message in result.stderr, result.stderr


@pytest.mark.parametrize("world, flag, message", [
    (2, "--mesh_dim=1,1,2", "tensor parallelism (tp = 2) is not supported yet"),
    (2, "--mesh_dim=1,4,1", "4 ranks, but the launcher started 2"),
    (3, "--mesh_dim=1,-1,1", "batch_size 4 does not divide among 3 data-parallel ranks"),
])
def test_bad_mesh_or_batch_exits_2_on_every_rank(tmp_path, world, flag, message):
    results = finish(start_ranks(world, [*TINY, f"--logger.output_dir={tmp_path}", flag]), timeout=60)
    for code, _, err in results:
        assert code == 2 and message in err, err


@pytest.mark.parametrize("how", ["sigterm", "ctrl-c"])
def test_launcher_stops_every_rank_with_a_checkpoint(tmp_path, how):
    """SIGTERM to torchrun, or ^C (SIGINT to the launcher's process group); torchrun forwards it."""
    out = tmp_path / "run"
    launcher = subprocess.Popen([str(ROOT / "tools/launch"), "--nproc", "2", "bpt-train", *TINY,
                                 f"--logger.output_dir={out}", "--total_steps=100000"],
                                text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    metrics = out / "metrics.jsonl"
    deadline = time.monotonic() + 60
    while not (metrics.exists() and metrics.read_text().count("\n") >= 3):
        assert time.monotonic() < deadline and launcher.poll() is None, launcher.stderr.read()
        time.sleep(0.1)
    if how == "sigterm":
        launcher.send_signal(signal.SIGTERM)
    else:
        os.killpg(launcher.pid, signal.SIGINT)
    try:
        out_text, err = launcher.communicate(timeout=60)
    finally:
        os.killpg(launcher.pid, signal.SIGKILL) if launcher.poll() is None else None
    state = json.loads((out / "checkpoint/trainer_state.json").read_text())
    assert state["step"] >= 3
    assert "bpt-train: stopped at step" in out_text, out_text + err
    # The checkpoint is whole: it continues on one process.
    resumed = train(out, 1, f"--total_steps={state['step'] + 2}", "--autoresume")
    assert losses(resumed).keys() >= {state["step"] + 1, state["step"] + 2}


def test_launcher_names_the_rank_that_failed(tmp_path):
    result = subprocess.run([str(ROOT / "tools/launch"), "--nproc", "2", "bpt-train", *TINY,
                             f"--logger.output_dir={tmp_path}", "--llama.no_such_field=1"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert "no_such_field" in result.stderr
    assert "rank      : 0" in result.stderr or "rank      : 1" in result.stderr  # torchrun's failure report
    result = subprocess.run([str(ROOT / "tools/launch"), "--nproc", "0", "bpt-train"], capture_output=True, text=True)
    assert result.returncode == 2 and "--nproc: expected" in result.stderr
