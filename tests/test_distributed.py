"""Ray Train meta-training: 1x16 == 2x8, recovery from a killed worker, the shared step."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from conftest import tiny_config

from melo_dist.cli import main
from melo_dist.distributed.train import (
    RAY_CHECKPOINTS,
    build_trainer,
    connect,
    default_cpus_per_worker,
    fit,
    trainer_name,
    training_users,
)
from melo_dist.errors import InputError
from melo_dist.report.build import write_report
from melo_dist.training.checkpoint import LAST, load_checkpoint, read_metrics
from melo_dist.training.loop import Interrupted

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def sixteen_users(synthetic_dir, tmp_path_factory):
    """The synthetic dataset cut to exactly 16 training users: one meta-batch is every user."""
    out = tmp_path_factory.mktemp("sixteen") / "data"
    shutil.copytree(synthetic_dir, out)
    table = pq.read_table(out / "tasks-train.parquet")
    pq.write_table(table.slice(0, 16), out / "tasks-train.parquet")
    return out


def test_two_workers_of_8_equal_one_worker_of_16(ray_session, sixteen_users, tmp_path):
    fit(
        tiny_config(sixteen_users, tmp_path / "one", iterations=4, tasks=16),
        workers=1,
        cpus_per_worker=0.5,
    )
    events = []
    fit(
        tiny_config(sixteen_users, tmp_path / "two", iterations=4, tasks=16),
        workers=2,
        cpus_per_worker=0.5,
        progress=events.append,  # rank 0's progress reaches the driver
    )
    assert [e["iteration"] for e in events if e["event"] == "validation"] == [2, 4]
    assert [e["iteration"] for e in events if e["event"] == "iteration"] == [1, 3]
    one = load_checkpoint(tmp_path / "one" / LAST)
    two = load_checkpoint(tmp_path / "two" / LAST)
    assert one["iteration"] == two["iteration"] == 4
    for name, value in one["learner"].items():
        assert torch.allclose(value, two["learner"][name], rtol=1e-4, atol=1e-6), name
    records = [json.loads(x) for x in (tmp_path / "two/metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in records] == [2, 4]
    report = write_report([str(tmp_path / "one"), str(tmp_path / "two")], "test", tmp_path / "r")
    assert "| two |" in report.read_text()  # Ray run folders report as local ones do


def test_ray_training_users_come_in_a_seeded_well_mixed_order(ray_session, synthetic_dir):
    tables = str(synthetic_dir / "tasks-train.parquet")
    stored = pq.read_table(tables, columns=["user_id"]).column(0).to_pylist()
    order = [row["user_id"] for row in training_users(tables, seed=0).iter_rows()]
    assert sorted(order) == sorted(stored)  # every user once
    assert order == [row["user_id"] for row in training_users(tables, seed=0).iter_rows()]
    assert order != [row["user_id"] for row in training_users(tables, seed=1).iter_rows()]
    rank = {user: index for index, user in enumerate(stored)}
    position = np.array([rank[user] for user in order], dtype=float)
    assert abs(np.corrcoef(position, np.arange(len(order)))[0, 1]) < 0.2  # not the stored order
    first = position[:16]  # a first meta-batch spans the table, not 16 neighbouring ids
    assert first.max() - first.min() > len(order) / 2


def training_worker_pids() -> list[int]:
    """Ray titles its worker processes by actor: find the training workers in /proc."""
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as handle:
                    if handle.read().startswith(b"ray::RayTrainWorker"):
                        pids.append(int(entry))
            except OSError:
                continue
    return pids


def registered_checkpoints(storage) -> int:
    """Checkpoints Ray's controller has recorded (a worker's report is registered only when the
    controller polls it; a kill before that restarts from zero)."""
    count = 0
    for snapshot in storage.glob("*/checkpoint_manager_snapshot.json"):
        try:
            count += len(json.loads(snapshot.read_text())["checkpoint_results"])
        except (ValueError, KeyError):  # being written
            continue
    return count


def kill_a_worker_after_first_checkpoint(storage, killed: list) -> None:
    deadline = time.time() + 240
    while time.time() < deadline:
        pids = training_worker_pids()
        if pids and registered_checkpoints(storage) >= 1:
            os.kill(pids[-1], signal.SIGKILL)
            killed.append(pids[-1])
            return
        time.sleep(0.05)


def test_recovers_from_a_killed_worker(ray_session, synthetic_dir, tmp_path):
    iterations = 16  # the kill lands early: most of the run is left to recover
    fit(
        tiny_config(synthetic_dir, tmp_path / "clean", iterations),
        workers=2,
        cpus_per_worker=0.5,
    )
    killed: list = []
    killer = threading.Thread(
        # the crashed run's own Ray storage: the clean run's checkpoints cannot trigger it
        target=kill_a_worker_after_first_checkpoint,
        args=(tmp_path / "crashed" / RAY_CHECKPOINTS, killed),
    )
    killer.start()
    best = fit(
        tiny_config(synthetic_dir, tmp_path / "crashed", iterations),
        workers=2,
        cpus_per_worker=0.5,
        max_failures=1,
    )
    killer.join()
    assert killed, "no worker was killed: the test did not exercise recovery"
    records = [json.loads(x) for x in (tmp_path / "crashed/metrics.jsonl").read_text().splitlines()]
    iterations_seen = [r["iteration"] for r in records]
    assert iterations_seen == sorted(set(iterations_seen)) and iterations_seen[-1] == iterations
    assert best["resumed_from"] > 0  # the restarted workers continued from a checkpoint
    clean = [json.loads(x) for x in (tmp_path / "clean/metrics.jsonl").read_text().splitlines()]
    # After a restart the Ray Data epoch starts again, so the user order differs from the
    # uninterrupted run; the result must agree within a small tolerance.
    assert abs(records[-1]["valid_rmse"] - clean[-1]["valid_rmse"]) < 0.05
    assert best["valid_rmse"] == min(r["valid_rmse"] for r in records)


def test_training_survives_losing_a_node(synthetic_dir, tmp_path):
    """On a two-node local cluster (`ray.cluster_utils.Cluster`, its own process so it does not
    meet the session's Ray), the node hosting a worker is removed mid-run."""
    script = Path(__file__).with_name("node_loss_run.py")
    result = subprocess.run(
        [sys.executable, str(script), str(synthetic_dir), str(tmp_path / "run")],
        capture_output=True,
        text=True,
        timeout=420,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    # the summary line by its start: once, under load, stdout ended with another line
    lines = [line for line in result.stdout.splitlines() if line.startswith('{"removed"')]
    assert lines, result.stdout[-3000:]
    summary = json.loads(lines[-1])
    assert summary["removed"]
    assert summary["joined_cpus_per_worker"] == 1.0  # a joined cluster: not a share of its size
    assert summary["resumed_from"] > 0  # the new worker group continued from a checkpoint
    assert summary["iterations"] == sorted(set(summary["iterations"]))
    assert summary["iterations"][-1] == 8


def test_sigterm_stops_ray_workers_with_a_checkpoint_of_the_current_iteration(
    ray_session, synthetic_dir, tmp_path
):
    """As in-process: the workers finish their iteration, rank 0 writes its checkpoint (no
    validation boundary is near), the driver exits 143, and the same command resumes there."""
    out = tmp_path / "run"
    config = tiny_config(synthetic_dir, out, iterations=100, validate_every=100)
    sent = []

    def terminate_once_training(event: dict) -> None:  # (the forwarder thread)
        if event["event"] == "iteration" and event["iteration"] >= 3 and not sent:
            sent.append(os.kill(os.getpid(), signal.SIGTERM))

    handler = signal.getsignal(signal.SIGTERM)
    with pytest.raises(Interrupted, match="stopped by SIGTERM at iteration") as stopped:
        fit(config, workers=2, cpus_per_worker=0.5, progress=terminate_once_training)
    assert stopped.value.exit_code == 128 + signal.SIGTERM
    assert signal.getsignal(signal.SIGTERM) == handler
    stop = load_checkpoint(out / LAST)["iteration"]
    assert 3 <= stop < 100 and [r["iteration"] for r in read_metrics(out)] == [stop]
    best = fit(config, workers=2, cpus_per_worker=0.5)
    assert best["resumed_from"] == stop
    assert [r["iteration"] for r in read_metrics(out)] == [stop, 100]


def test_ray_refuses_to_resume_a_run_of_another_config(
    ray_session, synthetic_dir, tmp_path, capsys
):
    """Like in-process training: the folder and the first differing key, exit 2, nothing run."""
    out = tmp_path / "run"
    fit(tiny_config(synthetic_dir, out, iterations=2), workers=2, cpus_per_worker=0.5)
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    changed = ["--set", "optim.lr=0.01"]
    args = ["train", "--workers", "2", "--cpus-per-worker", "0.5", *settings_of(synthetic_dir, out)]
    assert main([*args, *changed]) == 2
    error = capsys.readouterr().err
    assert str(out) in error and "optim.lr was 0.001, now 0.01" in error
    (out / LAST).unlink()  # Ray's own checkpoint of the run is checked too
    assert main([*args, *changed]) == 2
    assert "optim.lr was 0.001" in capsys.readouterr().err
    assert all(p.stat().st_mtime_ns == t for p, t in before.items() if p.exists())


@pytest.mark.skipif(torch.cuda.device_count() >= 2, reason="this machine has 2 GPUs")
def test_use_gpu_with_more_workers_than_local_gpus_is_refused(ray_session, synthetic_dir, tmp_path):
    """Ray would wait forever for the GPUs a local instance does not have."""
    config = tiny_config(synthetic_dir, tmp_path / "run", iterations=2)
    with pytest.raises(InputError, match=r"--use-gpu: .* GPU\(s\) for 2 worker\(s\)"):
        build_trainer(config, 2, use_gpu=True)


def settings_of(data_dir, out) -> list[str]:
    """`--set` flags giving the CLI the config tiny_config(data_dir, out, iterations=2) builds."""
    config = tiny_config(data_dir, out, iterations=2)
    flags = []
    for section, values in config.to_dict().items():
        for key, value in values.items():
            flags += ["--set", f"{section}.{key}={value}"]
    return flags


def test_trainer_names_come_from_the_whole_run_path():
    """Two runs called `run` in different folders, one --storage: never each other's
    checkpoints; the same folder (or URI) always gets the same name."""
    names = {trainer_name(f"/work/{p}/run") for p in ("a", "b")} | {trainer_name("s3://b/run")}
    assert len(names) == 3 and all(n.startswith("run-") for n in names)
    assert trainer_name("/work/a/run") == trainer_name("/work/a/run")


def test_workers_share_a_local_instance_started_here(ray_session):
    """Only the instance this process started is sized by its CPUs; on a joined cluster (which
    may be empty at submit time) a worker takes 1 CPU: test_training_survives_losing_a_node."""
    assert default_cpus_per_worker(16) == 0.25  # the local instance: what fits (2 CPUs here)


def test_connect_with_verbose_output_joins_the_running_instance(ray_session):
    connect(verbose=True)  # `melo-dist train --workers N --verbose` (it raised UnboundLocalError)
    connect(verbose=False)
    assert ray_session.is_initialized()
