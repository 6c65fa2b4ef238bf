"""results/study.py: a plan's runs as a Ray Tune grid (basic first), a record per finished run,
tables written from the records, and a re-run that trains nothing it has a record for."""

from __future__ import annotations

import importlib.util
import json
import math
import shutil
import sys
from pathlib import Path

import pytest
from conftest import shared_file

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def study():
    spec = importlib.util.spec_from_file_location("study", ROOT / "results" / "study.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["study"] = module  # a module Ray can pickle its functions from, by value
    spec.loader.exec_module(module)
    yield module
    del sys.modules["study"]


def test_a_plan_runs_as_a_tune_grid_and_resumes_from_its_records(
    ray_session, study, tmp_path, monkeypatch, capsys
):
    shared_file("ml-100k/u.data")
    # the records of uncommitted code are refused outside tests; here the code is pinned
    version = {"commit": "0" * 40, "code": "test", "dirty": False}
    monkeypatch.setattr(study, "code_version", lambda: version)
    tiny = [
        "model.dim=8", "model.heads=2", "model.max_length=10", "model.user_factors=2",
        "data.window=10", "data.support=4", "data.query=2", "data.valid_users=30",
        "meta.tasks_per_batch=4", "meta.multi_step_iterations=2", "run.validate_every=2",
        "run.threads=1",
    ]  # fmt: skip
    plan = {
        "title": "tiny",
        "data": {
            "source": "movielens",
            "file": "ml-100k/u.data",
            "prepare": {"protocol": "melo", "test_users": 50},
        },
        "config": "configs/ml1m-subset.yaml",
        "set": tiny,
        "budget": "4 iterations.",
        "runs": [
            {
                "backbones": ["gru4rec"],
                "regimes": ["basic", "maml"],
                "seeds": [0],
                "iterations": 4,
                "basic_iterations": 4,
            }
        ],
        "seconds_per_iteration": {"gru4rec basic": 0.1, "gru4rec maml": 0.1},
    }
    plan_path = tmp_path / "tiny.yaml"
    plan_path.write_text(json.dumps(plan))  # YAML is a superset of JSON
    args = [str(plan_path), "--work", str(tmp_path / "work"), "--results", str(tmp_path)]
    study.main(args)
    out = capsys.readouterr().out
    assert "basic runs: basic-gru4rec-s0" in out and "meta runs: maml-gru4rec-s0" in out
    records = {p.stem: json.loads(p.read_text()) for p in (tmp_path / "tiny" / "runs").glob("*")}
    assert set(records) == {"basic-gru4rec-s0", "maml-gru4rec-s0"}
    assert all(math.isfinite(r["rmse"]) and r["code"] == "test" for r in records.values())
    assert "run.init_from=basic-gru4rec-s0/best.pt" in records["maml-gru4rec-s0"]["settings"]
    table = json.loads((tmp_path / "tiny.json").read_text())
    assert sorted(r["rmse"] for r in table["runs"]) == sorted(r["rmse"] for r in records.values())
    assert "bias model" in table["references"] and (tmp_path / "tiny.md").is_file()

    study.main(args)  # every run has its record: nothing trains, the tables are rewritten
    out = capsys.readouterr().out
    assert "runs:" not in out and "wrote" in out
    table_md = (tmp_path / "tiny.md").read_text()
    assert (
        "| gru4rec | maml - basic |" in table_md
        and "| gru4rec | maml - bias model |" not in table_md
    )
    assert "How far the budget goes" in table_md
    maml = records["maml-gru4rec-s0"]
    assert len(maml["user_mse"]) == maml["users"] == len(maml["user_rating"])

    # a record from before records kept per-user errors gets them from its run folder, checked
    # against its own RMSE; --tables-only trains nothing, whatever the checkout's code
    monkeypatch.setattr(study, "code_version", lambda: {**version, "code": "newer"})
    older = {k: v for k, v in maml.items() if k not in ("user_mse", "user_rating")}
    record_path = tmp_path / "tiny" / "runs" / "maml-gru4rec-s0.json"
    record_path.write_text(json.dumps(older))
    study.main([*args, "--tables-only"])
    assert "runs:" not in capsys.readouterr().out
    assert json.loads(record_path.read_text())["user_mse"] == maml["user_mse"]
    assert (tmp_path / "tiny.md").read_text() == table_md

    record_path.write_text(json.dumps({**older, "code": "other", "rmse": maml["rmse"] + 0.1}))
    with pytest.raises(SystemExit, match="2 code versions"):
        study.main([*args, "--tables-only"])
    record_path.write_text(json.dumps({**older, "rmse": maml["rmse"] + 0.1}))
    with pytest.raises(SystemExit, match="now scores"):  # scoring changed: never a quiet mix
        study.main([*args, "--tables-only"])


@pytest.mark.parametrize(
    "plan",
    [
        "ml100k",
        "ml1m-subset",
        "ml1m-rare",
        "ml100k-rare",
        "ml1m-recency",
        "ml1m-recency-gru4rec",
        "ml1m-average",
        "ml1m-half",
    ],
)
def test_results_tables_are_what_the_study_writes_from_their_records(study, plan, tmp_path):
    """results/<plan>.md and .json are the study command's output for the committed records:
    rewritten from them (with the reference points fitted again on a fresh preparation of the
    plan's data), they come out byte for byte the same, so no hand edit survives."""
    plan_file = ROOT / "results" / "plans" / f"{plan}.yaml"
    shared_file(study.read_yaml(plan_file)["data"]["file"])
    (tmp_path / plan).mkdir()
    shutil.copytree(ROOT / "results" / plan / "runs", tmp_path / plan / "runs")
    work = tmp_path / "work"  # no run folders: the records alone
    study.main([str(plan_file), "--tables-only", "--work", str(work), "--results", str(tmp_path)])
    md = (tmp_path / f"{plan}.md").read_text()
    assert md == (ROOT / "results" / f"{plan}.md").read_text()
    # the reference points are fitted again (BLAS may round the last bit otherwise elsewhere)
    written, committed = (
        json.loads((p / f"{plan}.json").read_text()) for p in (tmp_path, ROOT / "results")
    )
    written, committed = flattened(written), flattened(committed)
    assert written.keys() == committed.keys()
    numbers = {k for k, v in committed.items() if isinstance(v, float)}
    assert {k: written[k] for k in numbers} == pytest.approx({k: committed[k] for k in numbers})
    assert {k: written[k] for k in written.keys() - numbers} == {
        k: committed[k] for k in committed.keys() - numbers
    }


def flattened(value, key: str = "") -> dict:
    """A nested JSON value as {path: leaf}, for comparing numbers with a tolerance."""
    if isinstance(value, dict):
        return {
            k: v
            for name, item in value.items()
            for k, v in flattened(item, f"{key}/{name}").items()
        }
    if isinstance(value, list):
        return {
            k: v for i, item in enumerate(value) for k, v in flattened(item, f"{key}/{i}").items()
        }
    return {key: value}
