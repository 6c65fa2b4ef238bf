"""Sweep spaces (parsing, checks, trial configs) and sweep outputs, without Ray."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import pandas as pd
import pytest
import yaml
from conftest import write

from melo_dist.cli import main
from melo_dist.config import load_config
from melo_dist.errors import InputError
from melo_dist.sweeps.outputs import BEST, CURVES, EFFECTS, RESULTS, TrialRecord, write_outputs
from melo_dist.sweeps.space import load_space

ROOT = Path(__file__).resolve().parents[1]
SPACE = """\
fixed: {optim.iterations: 8, meta.multi_step_iterations: 4, run.validate_every: 2}
search:
  meta.inner_lr: {loguniform: [1.0e-3, 1.0e-1]}
  meta.inner_steps: {randint: [1, 5]}
  model.backbone: {choice: [gru4rec, sasrec]}
"""


def space_file(tmp_path: Path, text: str = SPACE) -> Path:
    return write(tmp_path / "space.yaml", text)


def test_every_shipped_space_parses():
    spaces = sorted((ROOT / "tune" / "spaces").glob("*.yaml"))
    assert any(path.name == "smoke.yaml" for path in spaces)
    for path in spaces:
        space = load_space(path)
        assert space.search, path


def test_trial_config_layers_base_fixed_and_parameters(tmp_path):
    base = write(tmp_path / "base.yaml", "model: {dim: 16}\nmeta: {inner_steps: 2}\n")
    text = f"base: {base}\n" + SPACE
    space = load_space(space_file(tmp_path, text), ["meta.tasks_per_batch=8"])
    params = {"meta.inner_lr": 0.01, "meta.inner_steps": 4, "model.backbone": "sasrec"}
    config = space.trial_config(params, tmp_path / "trial")
    assert config.model.dim == 16  # base
    assert config.optim.iterations == 8 and config.meta.tasks_per_batch == 8  # fixed, --set
    assert (config.meta.inner_lr, config.meta.inner_steps) == (0.01, 4)  # searched
    assert config.model.backbone == "sasrec" and config.run.out == str(tmp_path / "trial")
    assert space.max_iterations == 8 and space.grace_iterations == 4  # two validations


def test_set_reaches_trial_and_scheduler_settings_and_fixes_searched_keys(tmp_path):
    text = SPACE + "initial: [{meta.inner_lr: 1e-2, meta.inner_steps: 2, model.backbone: sasrec}]\n"
    path = space_file(tmp_path, text)
    space = load_space(path, ["trial.workers=4", "scheduler.reduction_factor=3", "run.seed=7"])
    assert (space.trial.workers, space.scheduler.reduction_factor) == (4, 3)
    assert space.trial_config({}, "x").run.seed == 7
    assert space.initial == [
        {"meta.inner_lr": 0.01, "meta.inner_steps": 2, "model.backbone": "sasrec"}
    ]
    assert isinstance(space.initial[0]["meta.inner_lr"], float)  # YAML read "1e-2" as a string
    fixed = load_space(path, ["model.backbone=gru4rec"])  # searched in the file, fixed here
    assert "model.backbone" not in fixed.search
    assert fixed.initial == [{"meta.inner_lr": 0.01, "meta.inner_steps": 2}]
    assert fixed.trial_config({}, "x").model.backbone == "gru4rec"
    with pytest.raises(InputError, match=r"trial.workers is out of range"):
        load_space(path, ["trial.workers=0"])


def test_randint_includes_its_high_end_in_optuna():
    from ray.tune.search.optuna import OptunaSearch

    from melo_dist.distributed.tune import domain
    from melo_dist.sweeps.space import Distribution

    (converted,) = OptunaSearch.convert_search_space(
        {"k": domain(Distribution("randint", [1, 5]))}
    ).values()
    assert (converted.low, converted.high) == (1, 5)


def test_resolved_makes_the_data_path_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    space = load_space(space_file(tmp_path), ["data.path=data/here"])
    resolved = space.resolved()
    assert resolved.trial_config({}, "x").data.path == str(tmp_path / "data" / "here")
    assert space.trial_config({}, "x").data.path == "data/here"  # the original is untouched


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("search: [1, 2]\n", "search must be a mapping"),
        (
            "fixed: {optim.iterations: 8, meta.multi_step_iterations: 4}\n",
            "search names no parameter",
        ),
        ("serch: {}\n", "unknown key(s) ['serch']"),
        ("search: {meta.inner_lr: {normal: [0, 1]}}\n", "search key meta.inner_lr must be one"),
        ("search: {meta.inner_lr: {loguniform: [0, 1]}}\n", "low < high and low > 0"),
        ("search: {meta.inner_steps: {randint: [5, 1]}}\n", "randint needs low < high"),
        ("search: {meta.inner_steps: {randint: [1]}}\n", "randint needs [low, high]"),
        ("search: {meta.inner_steps: {choice: []}}\n", "choice needs a non-empty list"),
        ("search: {meta.inner_steps: {choice: [1, 0]}}\n", "meta.inner_steps must be >= 1"),
        ("search: {meta.bogus: {choice: [1]}}\n", "meta.bogus is not a config key"),
        ("search: {meta.tasks_per_batch: {randint: [4, 10]}}\n", "meta.tasks_per_batch=5"),
        (
            "search: {model.dropout: {choice: [0, 0.1]}}\ninitial: [{model.dropout: 0.5}]\n",
            "initial model.dropout=0.5 is outside its choice [0.0, 0.1]",
        ),
        (
            "search: {meta.inner_steps: {randint: [1, 5]}}\ninitial: [{meta.inner_steps: 9}]\n",
            "initial meta.inner_steps=9 is outside its randint [1, 5]",
        ),
        (
            "search: {meta.inner_steps: {choice: [1]}}\nscheduler: {grace_iterations: 5000}\n",
            "grace_iterations (5000) exceeds the longest trial (2000 iterations)",
        ),
        ("search: {run.out: {choice: [a, b]}}\n", "run.out cannot be searched"),
        ("search: {model.dim: {choice: [8, x]}}\n", "model.dim expects int"),
        (
            "search: {meta.inner_steps: {choice: [1]}}\ninitial: [{meta.inner_lr: 0.1}]\n",
            "must set exactly the searched keys",
        ),
        ("search: {meta.inner_steps: {choice: [1]}}\ntrial: {workers: 0}\n", "trial.workers"),
        (
            "search: {meta.tasks_per_batch: {choice: [8, 9]}}\n",
            "search meta.tasks_per_batch=9: meta.tasks_per_batch (9) must be a multiple of "
            "trial.workers (2)",
        ),
        ("search: {meta.inner_steps: {choice: [1]}}\ntrial: {cpu: 1}\n", "unknown key(s)"),
        ("search: {meta.inner_steps: {choice: [1]}}\nbase: nowhere.yaml\n", "nowhere.yaml"),
        ("search: {meta.inner_steps: {choice: [1]}\n", "space.yaml:2: invalid YAML"),
        (
            "fixed: {meta.inner_steps: 2}\nsearch: {meta.inner_steps: {choice: [1]}}\n",
            "['meta.inner_steps'] are both fixed and searched",
        ),
    ],
)
def test_bad_spaces_name_the_file_and_key(tmp_path, text, message):
    with pytest.raises(InputError) as raised:
        load_space(space_file(tmp_path, text))
    assert message in str(raised.value)
    assert "space.yaml" in str(raised.value) or "nowhere.yaml" in str(raised.value)


def no_ray(*args, **kwargs):
    raise AssertionError("Ray was started")


def test_cli_rejects_a_bad_space_before_starting_ray(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("melo_dist.distributed.tune.connect", no_ray)
    path = space_file(tmp_path, "search: {meta.inner_lr: {loguniform: [0, 1]}}\n")
    code = main(["tune", "--space", str(path), "--trials", "2", "--out", str(tmp_path / "o")])
    error = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(error) == 1 and "space.yaml" in error[0]
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("storage", [None, "shared"])
def test_a_folder_of_another_sweep_is_refused_before_ray_starts(
    synthetic_dir, tmp_path, monkeypatch, storage
):
    from melo_dist.distributed.tune import SWEEP_FILE, sweep

    monkeypatch.setattr("melo_dist.distributed.tune.connect", no_ray)
    monkeypatch.chdir(tmp_path)
    space = load_space(space_file(tmp_path), [f"data.path={synthetic_dir}"])
    state = tmp_path / (storage or "out/ray") / "out"  # Tune's folder, under --storage if given
    state.mkdir(parents=True)
    (state / SWEEP_FILE).write_text('{"space": {}, "trials": 3}')
    with pytest.raises(InputError, match="holds a different sweep"):
        sweep(space, 3, "out", storage=storage)
    with pytest.raises(InputError, match="cannot run the space's 1 initial points"):
        sweep(dataclasses.replace(space, initial=[{}]), 0, "elsewhere")


def record(number: int, best: float, lr: float, status: str = "completed", error=None):
    history = pd.DataFrame({"iteration": [2, 4], "valid_rmse": [best + 0.1, best]})
    if math.isnan(best):
        history = history.iloc[:0]
    params = {"meta.inner_lr": lr, "meta.inner_steps": 1 + number, "model.backbone": "gru4rec"}
    return TrialRecord(f"t{number}", number, status, best, 4, params, history, error)


def test_outputs_rank_trials_and_write_a_trainable_best_config(tmp_path):
    space = load_space(space_file(tmp_path), ["data.path=data/synthetic"])
    records = [
        record(0, 1.10, 0.01),
        record(1, math.nan, 0.05, "errored", "InputError: boom"),
        record(2, 0.95, 0.02, "stopped early"),
        record(3, 1.00, 0.03),
    ]
    out = tmp_path / "sweep"  # not there yet: with --storage, nothing else writes into it
    write_outputs(records, space, out)

    table = pd.read_csv(out / RESULTS, dtype={"trial": str})  # ids like 043692e5: text
    assert table["trial"].tolist() == ["t2", "t3", "t0", "t1"]  # by RMSE, errored last
    assert table.loc[3, "status"] == "errored" and table.loc[3, "error"] == "InputError: boom"
    best = load_config(out / BEST)  # exactly what `melo-dist train --config` reads
    assert best.meta.inner_lr == 0.02 and best.meta.inner_steps == 3
    assert best.optim.iterations == 8 and best.data.path == "data/synthetic"
    assert best.run.out == str(out / "best-run")
    assert "validation RMSE 0.9500" in (out / BEST).read_text().splitlines()[0]
    for plot in (CURVES, EFFECTS):
        assert (out / plot).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert yaml.safe_load((out / BEST).read_text())["model"]["backbone"] == "gru4rec"


def test_effects_plot_places_numeric_choices_by_value(tmp_path):
    text = "search:\n  model.dropout: {choice: [0, 0.1]}\n  meta.inner_lr: {uniform: [0.01, 0.1]}\n"
    space = load_space(space_file(tmp_path, text))
    records = [record(n, 1.0 + n / 10, 0.02) for n in range(2)]
    for number, dropout in enumerate([0.0, 0.1]):
        records[number].params = {"model.dropout": dropout, "meta.inner_lr": 0.02}
    write_outputs(records, space, tmp_path)
    assert load_config(tmp_path / BEST).model.dropout == 0.0
    assert (tmp_path / EFFECTS).read_bytes()[:4] == b"\x89PNG"


def test_outputs_when_every_trial_errored(tmp_path):
    space = load_space(space_file(tmp_path))
    records = [record(0, math.nan, 0.01, "errored", "RuntimeError: first")]
    with pytest.raises(InputError, match=r"no trial of 1 validated .*RuntimeError: first"):
        write_outputs(records, space, tmp_path)
    assert (tmp_path / RESULTS).exists() and not (tmp_path / BEST).exists()
