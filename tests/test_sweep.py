"""Ray Tune + Optuna sweeps on the shared 2-CPU Ray instance: a small sweep with an errored and
an ASHA-stopped trial, its outputs (the best config then trains), and an interrupted sweep that
resumes without re-running its finished trial."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml
from conftest import tiny_config

from melo_dist.cli import main
from melo_dist.config import load_config
from melo_dist.distributed.tune import sweep
from melo_dist.sweeps.outputs import BEST, CURVES, EFFECTS, RESULTS, write_outputs
from melo_dist.sweeps.space import load_space
from melo_dist.training.checkpoint import load_checkpoint

pytestmark = pytest.mark.slow

GOOD = {"meta.tasks_per_batch": 4, "meta.inner_lr": 0.05, "optim.lr": 0.005}


def read_results(out) -> pd.DataFrame:
    """results.csv with trial ids as text: an id like 043692e5 would parse as a number."""
    return pd.read_csv(out / RESULTS, dtype={"trial": str})


def space_file(
    folder: Path, data_dir: Path, initial: list[dict], iterations: int = 8, grace: int = 4
) -> Path:
    """Every tiny_config value fixed (validation every 2 iterations), three searched keys."""
    config = tiny_config(data_dir, "unused", iterations=iterations).to_dict()
    # the reference head, so that the slowest learner trails: a bias head that barely trains
    # stays the (good) bias model it starts as
    config["model"]["head"] = "reference"
    search = {
        "meta.tasks_per_batch": {"choice": [4, 4000]},
        "meta.inner_lr": {"loguniform": [1e-3, 1e-1]},
        "optim.lr": {"loguniform": [1e-4, 1e-2]},
    }
    fixed = {
        f"{section}.{key}": value
        for section, values in config.items()
        for key, value in values.items()
        if key != "out" and f"{section}.{key}" not in search
    }
    space = {
        "fixed": fixed,
        "search": search,
        "initial": initial,
        "seed": 0,
        "scheduler": {"grace_iterations": grace, "reduction_factor": 2},
        "trial": {"workers": 2, "cpus_per_worker": 0.5, "driver_cpus": 0.25, "concurrent": 1},
    }
    path = folder / "space.yaml"
    path.write_text(yaml.safe_dump(space))
    return path


@pytest.fixture(scope="module")
def finished_sweep(ray_session, synthetic_dir, tmp_path_factory):
    folder = tmp_path_factory.mktemp("sweep")
    initial = [
        GOOD,
        {**GOOD, "meta.tasks_per_batch": 4000},  # more than the training users: the trial raises
        {**GOOD, "meta.inner_lr": 0.001, "optim.lr": 0.0001},  # learns slowest: ASHA stops it
    ]
    space = load_space(space_file(folder, synthetic_dir, initial))
    out = folder / "out"
    records = sweep(space, trials=len(initial), out=out)
    write_outputs(records, space, out)
    return out, read_results(out).set_index("number")


def test_sweep_writes_the_table_plots_and_a_best_config_that_trains(finished_sweep, capsys):
    out, table = finished_sweep
    assert sorted(table.index) == [0, 1, 2]
    ranked = table["best_valid_rmse"].dropna()
    assert ranked.is_monotonic_increasing or list(ranked) == sorted(ranked)
    assert table.loc[0, "status"] == "completed" and table.loc[0, "iterations"] == 8
    for plot in (CURVES, EFFECTS):
        assert (out / plot).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    best = load_config(out / BEST)
    winner = read_results(out).iloc[0]
    assert best.meta.inner_lr == pytest.approx(winner["meta.inner_lr"])
    assert best.optim.lr == pytest.approx(winner["optim.lr"])
    assert (Path(winner["checkpoint"]) / "best.pt").exists()  # the trial's own checkpoint
    assert main(["train", "--config", str(out / BEST), "--json"]) == 0  # it trains as it is
    done = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert done["event"] == "train_done"  # it reports the best record, at any iteration
    assert load_checkpoint(Path(best.run.out) / "last.pt")["iteration"] == 8  # trained to the end
    assert (Path(best.run.out) / "best.pt").exists()


def test_a_trial_that_raises_is_recorded_as_errored_and_the_sweep_goes_on(finished_sweep):
    _, table = finished_sweep
    assert table.loc[1, "status"] == "errored"
    assert "training users cannot fill a meta-batch of 4000 tasks" in table.loc[1, "error"]
    assert pd.isna(table.loc[1, "best_valid_rmse"])
    assert table.loc[2, "status"] != "errored"  # the trial after it still ran


def test_asha_stops_a_trial_that_trails_at_its_first_rung(finished_sweep):
    _, table = finished_sweep
    assert table.loc[2, "status"] == "stopped early"
    assert table.loc[2, "iterations"] == 4  # stopped at the rung, not trained to 8
    assert table.loc[2, "best_valid_rmse"] > table.loc[0, "best_valid_rmse"]


def snapshot(folders: list[Path]) -> dict:
    """Every file under the folders, with its content (a re-run trial would add checkpoint
    folders and rewrite its results; Tune re-syncs unchanged files, so mtimes are no signal)."""
    return {
        str(path): path.read_bytes()
        for folder in folders
        for path in folder.rglob("*")
        if path.is_file()
    }


def test_an_interrupted_sweep_resumes_without_rerunning_finished_trials(
    ray_session, synthetic_dir, tmp_path, capsys
):
    space = space_file(tmp_path, synthetic_dir, [GOOD], iterations=40, grace=40)  # no ASHA stop
    out = tmp_path / "out"
    command = ["tune", "--space", str(space), "--trials", "2", "--out", str(out)]
    env = {**os.environ, "RAY_ADDRESS": ray_session.get_runtime_context().gcs_address}
    script = "import sys; from melo_dist.cli import main; sys.exit(main(sys.argv[1:]))"
    first = subprocess.Popen(
        [sys.executable, "-c", script, *command],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )

    # one Ray Train run folder per trial, "<trial id>-<hash>", made when it starts training
    # (beside it, the trial's run.out "<trial id>" holds its TensorBoard events)
    runs = out / "trials"

    def started() -> list[Path]:
        return sorted(path for path in runs.glob("*-*") if path.is_dir()) if runs.exists() else []

    deadline = time.time() + 300
    while len(started()) < 2:  # one trial at a time: when the second starts, the first has ended
        first_run = started()[0] if started() else None
        assert first.poll() is None and time.time() < deadline, "second trial never started"
        time.sleep(0.2)
    assert first_run is not None, "the two trials ran at once"
    (second_run,) = set(started()) - {first_run}
    while len(list(second_run.glob("checkpoint_*"))) < 2:  # it has reported twice
        assert first.poll() is None and time.time() < deadline, "second trial never reported"
        time.sleep(0.1)
    # Ray Train names a trial's run "<trial id>-<hash of its path>"
    first_id, second_id = (run.name.rsplit("-", 1)[0] for run in (first_run, second_run))
    trial_ids = {first_id, second_id}  # the finished trial and the interrupted one
    tune_folder = out / "ray" / "out"
    (tune_first,) = tune_folder.glob(f"trial-1-{first_id}")  # Tune numbers trials from 1
    finished = [first_run, tune_first]  # the finished trial's Train and Tune folders
    before = snapshot(finished)
    first.send_signal(signal.SIGINT)  # Ctrl+C: Tune saves its state and stops
    _, stderr = first.communicate(timeout=180)
    assert first.returncode == 130, stderr[-2000:]
    assert "run the same command again to resume" in stderr
    assert not (out / RESULTS).exists()  # no half-written outputs

    assert main([*command, "--json"]) == 0  # in-process, joining the same Ray instance
    table = read_results(out)
    assert set(table["trial"]) == trial_ids  # the same two trials: restored, not started anew
    launched = dict(zip(table["trial"], table["number"]))
    assert (launched[first_id], launched[second_id]) == (0, 1)  # launch order kept
    assert set(table["status"]) <= {"completed", "stopped early"}
    assert snapshot(finished) == before  # the finished trial was not run again
    progress = pd.read_csv(tune_folder / f"trial-2-{second_id}" / "progress.csv")
    last = progress.iloc[-1]  # Tune may or may not keep the reports from before the interrupt
    assert last["iteration"] == 40 and last["resumed_from"] >= 2  # continued from a checkpoint
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["event"] == "sweep_done" and summary["trials"] == 2
