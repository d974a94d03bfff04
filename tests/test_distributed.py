"""Data-parallel training and sampling under torchrun, on the CPU with gloo and two processes.

The process tests launch ``python -m torch.distributed.run`` (torchrun) in a subprocess, as a
user would, either on ``-m ddpm`` or on ``tests/helpers/ddp_worker.py`` (the same CLI plus
test-only hooks: every rank's weight checksum, and a rank that kills itself at a chosen step).
"""

from __future__ import annotations

import importlib.util
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from ddpm import distributed
from ddpm.checkpoint import list_checkpoints, load_checkpoint, save_checkpoint, split_prefix, tensor_checksum
from ddpm.cli import main
from ddpm.config import TrainConfig
from ddpm.resolve import per_process_batch
from ddpm.errors import ConfigError
from ddpm.resolve import checkpoint_global_batch
from ddpm.training_data import EpochOrder, rank_rows

WORKER = Path(__file__).parent / "helpers" / "ddp_worker.py"
# A tiny run on the built-in digits: T = 50, dropout 0 (dropout masks are drawn per rank).
TINY = ["--timesteps", "50", "--num-images", "2", "--log-every", "1", "--dropout", "0", "--device", "cpu",
        "--quiet"]
TIMEOUT = 240


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(*args: str, nproc: int = 2, worker: bool = False, env: dict | None = None,
             timeout: float = TIMEOUT) -> subprocess.CompletedProcess:
    """``torchrun --nproc_per_node N -m ddpm ARGS`` (or the test worker) in a subprocess."""
    target = [str(WORKER)] if worker else ["-m", "ddpm"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_addr",
           "127.0.0.1", "--master_port", str(free_port()), *target, *args]
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", "DDPM_DIST_TIMEOUT": "60",
                **(env or {})}
    return subprocess.run(cmd, capture_output=True, text=True, env=full_env, timeout=timeout)


def our_lines(proc: subprocess.CompletedProcess) -> list[str]:
    """The lines our workers printed on stderr (torchrun adds its own report after them)."""
    return [line for line in proc.stderr.splitlines() if line.startswith("ddpm:")]


def assert_close_checkpoints(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=2e-5, rtol=1e-4, msg=name)


# ----------------------------------------------------------------------------- pure helpers

@pytest.mark.parametrize("n, world", [(5, 2), (64, 3), (7, 7), (100, 8)])
def test_shard_ranges_are_contiguous_disjoint_and_cover_every_index(n, world):
    ranges = [distributed.shard_range(n, r, world) for r in range(world)]
    assert ranges[0][0] == 0 and ranges[-1][1] == n
    assert all(ranges[r][1] == ranges[r + 1][0] for r in range(world - 1))
    sizes = [hi - lo for lo, hi in ranges]
    assert max(sizes) - min(sizes) <= 1


@pytest.mark.parametrize("b, world, accum", [(4, 2, 1), (2, 2, 2), (3, 4, 3), (8, 1, 1)])
def test_rank_rows_partition_the_global_batch_chunk_by_chunk(b, world, accum):
    rows = [rank_rows(b, world, accum, r) for r in range(world)]
    assert sorted(torch.cat(rows).tolist()) == list(range(b * world * accum))
    # Micro-batch a of all ranks together is chunk a of one process with batch b x world.
    one = rank_rows(b * world, 1, accum, 0)
    for a in range(accum):
        together = torch.cat([r[a * b:(a + 1) * b] for r in rows])
        assert together.tolist() == one[a * b * world:(a + 1) * b * world].tolist()


def test_epoch_order_drops_the_last_partial_global_batch():
    order = EpochOrder(num_images=50, batch_size=16, seed=0)          # 3 global batches, 2 images dropped
    epoch = torch.cat([order.batch(step) for step in range(3)])
    assert len(set(epoch.tolist())) == 48
    assert not torch.equal(order.batch(3), order.batch(0))            # a new permutation for the next epoch


def test_global_batch_and_its_per_process_share():
    assert TrainConfig(batch_size=4, grad_accum=2).global_batch_size(world_size=3) == 24
    assert per_process_batch(24, 3, 2) == 4
    assert per_process_batch(24, 1, 1) == 24
    with pytest.raises(ConfigError, match="does not divide"):
        per_process_batch(24, 5, 1)


def test_helpers_are_the_identity_for_one_process():
    assert not distributed.is_initialized() and distributed.world_size() == 1 and distributed.is_main()
    x = torch.arange(6.0)
    assert distributed.all_gather_cat(x) is x
    assert distributed.all_reduce_sum([1.5, 2.0]) == [1.5, 2.0]
    assert distributed.broadcast_object({"a": 1}) == {"a": 1}
    arrays = (np.zeros((2, 3)),)
    assert distributed.gather_arrays(arrays) is arrays
    with pytest.raises(ConfigError, match="mistake"):
        with distributed.agree():
            raise ConfigError("mistake")


def test_ranks_meet_at_a_barrier_before_leaving_the_group_only_after_a_completed_command(monkeypatch):
    """A rank that finished early must not tear its connections down while rank 0 still writes the
    last files: after a command every rank completed, shutdown is barrier, then destroy. After an
    error (a peer may be gone) it destroys without waiting."""
    calls = []
    monkeypatch.setattr(distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(distributed, "world_size", lambda: 2)
    monkeypatch.setattr(distributed.dist, "barrier", lambda: calls.append("barrier"))
    monkeypatch.setattr(distributed.dist, "destroy_process_group", lambda: calls.append("destroy"))
    distributed.shutdown(completed=True)
    assert calls == ["barrier", "destroy"]
    calls.clear()
    distributed.shutdown()
    assert calls == ["destroy"]
    # ...and the CLI says which it was.
    monkeypatch.undo()
    seen = []
    monkeypatch.setattr(distributed, "shutdown", lambda completed=False: seen.append(completed))
    assert main(["train", "--preset", "digits", "--dry-run"]) == 0
    assert main(["train", "--data", "/nonexistent/folder", "--dry-run"]) != 0
    assert seen == [True, False]


def test_checkpoints_before_data_parallelism_count_their_batch_size_as_the_global_batch():
    assert checkpoint_global_batch({"config": {"train": {"batch_size": 16, "grad_accum": 2}}}) == 16
    assert checkpoint_global_batch({"global_batch": 32, "config": {"train": {"batch_size": 8}}}) == 32


# ----------------------------------------------------------------------------- resume: the global batch is kept

@pytest.fixture(scope="module")
def one_step_run(tmp_path_factory) -> Path:
    """One process, batch 3 x grad_accum 2: a global batch of 6."""
    run_dir = tmp_path_factory.mktemp("dist") / "run"
    assert main(["train", *TINY, "--steps", "1", "--batch-size", "3", "--grad-accum", "2", "--out", str(run_dir)]) == 0
    return run_dir


def test_checkpoint_stores_the_global_batch(one_step_run):
    _, meta = load_checkpoint(one_step_run)
    assert (meta["global_batch"], meta["world_size"], meta["data_position"]) == (6, 1, 6)


def test_resume_with_another_grad_accum_recomputes_the_batch_size(one_step_run, capsys):
    assert main(["train", "--resume", str(one_step_run), "--steps", "2", "--grad-accum", "6", "--dry-run"]) == 0
    train_cfg = json.loads(capsys.readouterr().out)["train"]
    assert (train_cfg["batch_size"], train_cfg["grad_accum"]) == (1, 6)


def test_resume_with_an_indivisible_global_batch_is_one_clear_error(one_step_run, capsys):
    assert main(["train", "--resume", str(one_step_run), "--steps", "2", "--grad-accum", "4"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ddpm: error: "), lines
    assert "global batch of 6" in lines[0] and "grad_accum 4" in lines[0]
    assert [step for step, _ in list_checkpoints(one_step_run)] == [1]          # nothing written


def test_resume_refuses_a_batch_size_that_changes_the_global_batch(one_step_run, capsys):
    assert main(["train", "--resume", str(one_step_run), "--steps", "2", "--batch-size", "6", "--dry-run"]) == 2
    assert "takes --batch-size 3" in capsys.readouterr().err


def test_resume_of_a_checkpoint_from_before_data_parallelism_keeps_its_images_per_step(tmp_path, one_step_run,
                                                                                        capsys):
    """Then batch_size 6 with grad_accum 2 meant 6 images per step, in micro-batches of 3."""
    tensors, meta = load_checkpoint(one_step_run)
    for key in ("global_batch", "world_size", "path"):
        meta.pop(key)
    meta["config"]["train"]["batch_size"] = 6
    meta.pop("format_version")
    run_dir = tmp_path / "old"
    save_checkpoint(run_dir / "checkpoints" / "step-0000001.safetensors", tensors, meta)
    assert main(["train", "--resume", str(run_dir), "--steps", "2", "--dry-run"]) == 0
    train_cfg = json.loads(capsys.readouterr().out)["train"]
    assert (train_cfg["batch_size"], train_cfg["grad_accum"]) == (3, 2)


# ----------------------------------------------------------------------------- two processes

@pytest.fixture(scope="module")
def two_and_one(tmp_path_factory) -> dict:
    """3 steps on 2 processes x batch 4 (each rank reporting its weights) and on 1 process x batch 8."""
    root = tmp_path_factory.mktemp("ddp")
    digests = root / "digests"
    digests.mkdir()
    start = time.monotonic()
    proc = torchrun("train", *TINY, "--steps", "3", "--batch-size", "4", "--checkpoint-every", "0",
                    "--out", str(root / "two"), worker=True, env={"DDPM_TEST_DIGEST_DIR": str(digests)})
    seconds = time.monotonic() - start
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert main(["train", *TINY, "--steps", "3", "--batch-size", "8", "--checkpoint-every", "0",
                 "--out", str(root / "one")]) == 0
    return {"root": root, "digests": digests, "proc": proc, "seconds": seconds}


def test_after_k_steps_every_rank_holds_the_same_weights(two_and_one):
    reports = [json.loads((two_and_one["digests"] / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert reports[0]["model_checksum"] == reports[1]["model_checksum"]
    # ...and they are the weights rank 0 saved, after training moved them.
    tensors, meta = load_checkpoint(two_and_one["root"] / "two")
    saved = tensor_checksum({f"model.{k}": v for k, v in split_prefix(tensors, "model").items()})
    assert reports[0]["model_checksum"] == saved
    assert meta["step"] == 3 and meta["world_size"] == 2 and meta["global_batch"] == 8


def test_two_processes_with_batch_b_train_like_one_process_with_batch_2b(two_and_one):
    root = two_and_one["root"]
    two, _ = load_checkpoint(root / "two")
    one, _ = load_checkpoint(root / "one")
    assert_close_checkpoints(two, one)                     # weights, EMA and Adam's moments
    assert any(name.startswith("optim.") for name in two) and any(name.startswith("ema.") for name in two)
    rows = {name: [json.loads(line) for line in (root / name / "metrics.jsonl").read_text().splitlines()]
            for name in ("two", "one")}
    assert [r["step"] for r in rows["two"]] == [1, 2, 3]
    for a, b in zip(rows["two"], rows["one"]):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4)
        assert a["images_per_s"] > 0


def test_only_rank_0_writes_and_speaks(two_and_one):
    root, proc = two_and_one["root"], two_and_one["proc"]
    board = ["tensorboard"] if importlib.util.find_spec("tensorboard") else []
    assert sorted(p.name for p in (root / "two").iterdir()) == sorted([
        "checkpoints", "config.json", "loss.png", "metrics.jsonl", "provenance.json", "samples", "samples.png", *board])
    if board:                                              # one writer: rank 0's event file alone
        assert len(list((root / "two" / "tensorboard").iterdir())) == 1
    assert proc.stdout.count("done in") == 1
    assert len(json.loads((root / "two" / "provenance.json").read_text())) == 1


def test_distributed_sampling_is_byte_identical_to_one_process(two_and_one, tmp_path):
    checkpoint = two_and_one["root"] / "one"
    options = ["--checkpoint", str(checkpoint), "--num-images", "5", "--batch-size", "2", "--steps", "4",
               "--device", "cpu", "--quiet"]
    proc = torchrun("sample", *options, "--out", str(tmp_path / "two"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("wrote 5 images") == 1
    assert main(["sample", *options, "--out", str(tmp_path / "one")]) == 0
    for name in ("samples.npz", "grid.png"):
        assert (tmp_path / "two" / name).read_bytes() == (tmp_path / "one" / name).read_bytes(), name
    assert json.loads((tmp_path / "two" / "record.json").read_text())["processes"] == 2


def test_a_killed_rank_makes_the_other_exit_promptly_with_one_clear_line(tmp_path):
    # The collective timeout is set far beyond the subprocess timeout: a survivor that waited for
    # it instead of noticing the lost peer would raise TimeoutExpired here. No wall-clock bound.
    proc = torchrun("train", *TINY, "--steps", "50", "--batch-size", "4", "--checkpoint-every", "2",
                    "--out", str(tmp_path / "run"), worker=True,
                    env={"DDPM_TEST_KILL_RANK": "1", "DDPM_TEST_KILL_AT_STEP": "3",
                         "DDPM_DIST_TIMEOUT": str(10 * TIMEOUT)})
    assert proc.returncode != 0
    lines = our_lines(proc)
    assert len(lines) == 1, proc.stderr[-3000:]
    assert lines[0].startswith("ddpm: error: rank 0 of 2: lost contact with the other processes"), lines[0]
    assert "ddpm train --resume" in lines[0]
    assert "Signal 9 (SIGKILL)" in proc.stderr                     # torchrun's own report names the dead rank
    # The worker's own output has no traceback: the only one is torchrun's, about the failed child.
    assert proc.stderr.count("Traceback") <= 1 and "/ddpm/" not in proc.stderr
    assert [step for step, _ in list_checkpoints(tmp_path / "run")] == [2]


# ----------------------------------------------------------------------------- longer runs

def test_a_signal_to_one_rank_stops_all_ranks_at_the_same_step(tmp_path):
    proc = torchrun("train", *TINY, "--steps", "50", "--batch-size", "4", "--checkpoint-every", "0",
                    "--out", str(tmp_path / "run"), worker=True,
                    env={"DDPM_TEST_KILL_RANK": "1", "DDPM_TEST_KILL_AT_STEP": "2", "DDPM_TEST_KILL_SIGNAL": "TERM"})
    lines = our_lines(proc)
    assert len(lines) == 1 and lines[0].startswith("ddpm: SIGTERM received: stopped after step 3"), proc.stderr
    assert "exitcode  : 143" in proc.stderr
    assert [step for step, _ in list_checkpoints(tmp_path / "run")] == [3]
    rows = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(r)["step"] for r in rows] == [1, 2, 3]


@pytest.mark.slow      # minutes of subprocesses; run with -m slow
def test_two_processes_with_gradient_accumulation_train_like_one_process(tmp_path):
    """2 processes x batch 2 x grad_accum 2 = 1 process x batch 8, with flips on."""
    common = [*TINY, "--steps", "2", "--hflip", "--checkpoint-every", "0"]
    proc = torchrun("train", *common, "--batch-size", "2", "--grad-accum", "2", "--out", str(tmp_path / "two"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert main(["train", *common, "--batch-size", "8", "--out", str(tmp_path / "one")]) == 0
    assert_close_checkpoints(load_checkpoint(tmp_path / "two")[0], load_checkpoint(tmp_path / "one")[0])


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("uninterrupted") / "run"
    assert main(["train", *TINY, "--steps", "4", "--batch-size", "8", "--checkpoint-every", "2",
                 "--out", str(run_dir)]) == 0
    return run_dir


@pytest.mark.slow      # minutes of subprocesses; run with -m slow
def test_resume_from_two_processes_on_one_keeps_the_global_batch_and_the_weights(tmp_path, uninterrupted):
    run_dir = tmp_path / "run"
    proc = torchrun("train", *TINY, "--steps", "2", "--batch-size", "4", "--checkpoint-every", "2",
                    "--out", str(run_dir))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert main(["train", "--resume", str(run_dir), "--steps", "4", "--quiet"]) == 0
    tensors, meta = load_checkpoint(run_dir)
    assert (meta["step"], meta["global_batch"], meta["world_size"]) == (4, 8, 1)
    assert meta["config"]["train"]["batch_size"] == 8
    assert_close_checkpoints(tensors, load_checkpoint(uninterrupted)[0])


@pytest.mark.slow      # minutes of subprocesses; run with -m slow
def test_resume_from_one_process_on_two_keeps_the_global_batch_and_the_weights(tmp_path, uninterrupted):
    run_dir = tmp_path / "run"
    assert main(["train", *TINY, "--steps", "2", "--batch-size", "8", "--checkpoint-every", "2",
                 "--out", str(run_dir)]) == 0
    proc = torchrun("train", "--resume", str(run_dir), "--steps", "4", "--quiet")
    assert proc.returncode == 0, proc.stderr[-3000:]
    tensors, meta = load_checkpoint(run_dir)
    assert (meta["step"], meta["global_batch"], meta["world_size"]) == (4, 8, 2)
    assert meta["config"]["train"]["batch_size"] == 4
    assert_close_checkpoints(tensors, load_checkpoint(uninterrupted)[0])
    steps = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]


def test_an_indivisible_global_batch_on_resume_under_torchrun_is_one_clear_error(one_step_run):
    proc = torchrun("train", "--resume", str(one_step_run), "--steps", "2", "--grad-accum", "2", nproc=4)
    lines = our_lines(proc)
    assert len(lines) == 1 and "global batch of 6" in lines[0] and "4 process(es)" in lines[0], proc.stderr[-3000:]
    assert "exitcode  : 2" in proc.stderr


def test_distributed_eval_samples_like_one_process(two_and_one, tmp_path):
    checkpoint = two_and_one["root"] / "one"
    options = ["eval", "--metric", "fast", "--checkpoint", str(checkpoint), "--data", "digits", "--num-images", "6",
               "--ref-n", "50", "--steps", "3", "--device", "cpu", "--quiet", "--cache-dir", str(tmp_path / "cache")]
    proc = torchrun(*options, "--out", str(tmp_path / "two.json"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert main([*options, "--out", str(tmp_path / "one.json")]) == 0
    two, one = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("two", "one"))
    assert two["n_samples"] == one["n_samples"] == 6
    assert two["fast_fid"] == pytest.approx(one["fast_fid"], rel=1e-9)


def test_single_process_commands_refuse_torchrun_with_one_line(two_and_one):
    """Rank 0 speaks for both ranks. It is slowed down here (3 s before its line, as a loaded machine
    can): rank 1 must wait for it, for torchrun stops the other workers as soon as one exits."""
    proc = torchrun("inspect", str(two_and_one["root"] / "one"), worker=True, env={"DDPM_TEST_SLOW_SPEAKER": "3"})
    lines = our_lines(proc)
    assert lines == ["ddpm: error: ddpm inspect runs in one process; start it without torchrun"], proc.stderr[-3000:]


@pytest.mark.slow      # minutes of subprocesses; run with -m slow
def test_training_variants_under_two_processes_train_like_one_process(tmp_path):
    """Importance-sampled timesteps (histories gathered from every rank in global row order),
    offset noise, self-conditioning and learned variances: 2 x batch 4 = 1 x batch 8.

    T = 10 lets every timestep's loss history fill within the run, so the later steps draw t
    from the importance distribution and its weights; the checkpoints' sampler states must agree.
    """
    common = [*TINY[2:], "--timesteps", "10", "--schedule", "cosine", "--steps", "24", "--checkpoint-every", "0",
              "--variance", "learned-range", "--loss", "hybrid", "--timestep-sampling", "importance",
              "--offset-noise", "0.1", "--self-condition"]
    proc = torchrun("train", *common, "--batch-size", "4", "--out", str(tmp_path / "two"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert main(["train", *common, "--batch-size", "8", "--out", str(tmp_path / "one")]) == 0
    two, one = load_checkpoint(tmp_path / "two")[0], load_checkpoint(tmp_path / "one")[0]
    assert bool((one["timestep_sampler.counts"] >= 10).all()), "the histories never filled: importance sampling unused"
    torch.testing.assert_close(two["timestep_sampler.counts"], one["timestep_sampler.counts"], rtol=0, atol=0)
    assert_close_checkpoints(two, one)


@pytest.mark.slow      # minutes of subprocesses; run with -m slow
def test_distillation_under_two_processes_trains_like_one_process(two_and_one, tmp_path):
    """A distillation round is an ordinary data-parallel run (DDP wraps the student's U-Net, the loss
    takes it as an argument): 2 processes x batch 4 train the student like 1 process x batch 8."""
    teacher = two_and_one["root"] / "one"
    common = ["--checkpoint", str(teacher), "--rounds", "1", "--teacher-steps", "4", "--steps-per-round", "3",
              "--num-images", "2", "--log-every", "1", "--checkpoint-every", "0", "--device", "cpu", "--quiet"]
    proc = torchrun("distill", *common, "--batch-size", "4", "--out", str(tmp_path / "two"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("done in") == 1                        # rank 0 alone speaks
    assert main(["distill", *common, "--batch-size", "8", "--out", str(tmp_path / "one")]) == 0
    two, meta = load_checkpoint(tmp_path / "two" / "round-01")
    one, _ = load_checkpoint(tmp_path / "one" / "round-01")
    assert meta["world_size"] == 2 and meta["global_batch"] == 8 and meta["step"] == 3
    assert_close_checkpoints(two, one)
    assert (tmp_path / "two" / "student").resolve() == (tmp_path / "two" / "round-01").resolve()


@pytest.mark.slow
def test_an_image_conditioned_run_on_two_processes_trains_like_one(tmp_path):
    """Super-resolution with conditioning augmentation: each rank makes the conditions (and draws the
    augmentation levels) of its own rows as one process does for the whole global batch."""
    sr = ["--task", "super-resolution", "--scale", "2", "--condition-noise", "0.2", *TINY, "--steps", "3",
          "--checkpoint-every", "0"]
    proc = torchrun("train", *sr, "--batch-size", "4", "--out", str(tmp_path / "two"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert main(["train", *sr, "--batch-size", "8", "--out", str(tmp_path / "one")]) == 0
    two, meta = load_checkpoint(tmp_path / "two")
    one, _ = load_checkpoint(tmp_path / "one")
    assert meta["world_size"] == 2 and json.loads((tmp_path / "two" / "config.json").read_text())["condition"]
    assert_close_checkpoints(two, one)
