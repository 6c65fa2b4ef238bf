"""Data and run folders at URIs (pyarrow.fs): prepare into one, train from and into one, resume
from what is there, and refuse what prepare did not write. file:// URIs take the same code path
as s3:// or gs:// ones (copies through pyarrow.fs, never the path itself)."""

from __future__ import annotations

import json
import shutil

import pytest
from conftest import tiny_config

from melo_dist import ColdStartModel
from melo_dist.cli import main
from melo_dist.config import Config
from melo_dist.errors import InputError
from melo_dist.storage import (
    checked_out,
    filesystem,
    is_empty,
    local_dataset,
    local_folder,
    publish,
    push,
)
from melo_dist.training.checkpoint import (
    BEST,
    LAST,
    METRICS,
    load_checkpoint,
    read_metrics,
    refuse_other_config,
)
from melo_dist.training.evaluation import evaluate_checkpoints
from melo_dist.training.loop import train_local

PREPARE = ["prepare", "--source", "synthetic", "--synthetic-users", "300", "--synthetic-items"]


def test_prepare_writes_a_dataset_at_a_uri_and_refuses_other_folders(tmp_path, capsys):
    remote = tmp_path / "bucket" / "data"
    uri = remote.as_uri()
    assert main([*PREPARE, "200", "--out", uri]) == 0
    assert (remote / "manifest.json").is_file() and (remote / "tasks-train.parquet").is_file()
    assert main([*PREPARE, "200", "--out", uri]) == 2  # not empty: --overwrite needed
    assert "--overwrite" in capsys.readouterr().err
    assert main([*PREPARE, "150", "--out", uri, "--overwrite"]) == 0
    other = tmp_path / "bucket" / "mine"
    other.mkdir()
    (other / "notes.txt").write_text("keep me")
    assert main([*PREPARE, "200", "--out", other.as_uri(), "--overwrite"]) == 2
    assert "left untouched" in capsys.readouterr().err
    assert [p.name for p in other.iterdir()] == ["notes.txt"]
    local = local_dataset(uri)  # a copy in the cache, not the folder itself
    assert (
        local != remote
        and (local / "manifest.json").read_bytes() == (remote / "manifest.json").read_bytes()
    )


def test_training_reads_and_writes_uris_and_resumes_from_what_is_there(synthetic_dir, tmp_path):
    remote_data = tmp_path / "bucket" / "data"
    shutil.copytree(synthetic_dir, remote_data)
    remote_run = tmp_path / "bucket" / "runs" / "tiny"
    config = tiny_config(remote_data.as_uri(), remote_run.as_uri(), iterations=4)
    train_local(config, log=lambda message: None, max_minutes=1e-5)  # stops after iteration 1
    assert {LAST, METRICS, "config.yaml", "tensorboard"} <= {p.name for p in remote_run.iterdir()}
    shutil.rmtree(local_folder(config.run.out))  # another machine: only the URI has the run
    messages = []
    train_local(config, log=messages.append)
    assert "resuming" in messages[0] and "at iteration 1" in messages[0]
    assert [r["iteration"] for r in read_metrics(remote_run)] == [1, 2, 4]
    assert load_checkpoint(f"{remote_run.as_uri()}/{LAST}")["iteration"] == 4
    assert load_checkpoint(remote_run.as_uri())["iteration"] in (1, 2, 4)  # best.pt
    (scores,) = evaluate_checkpoints([remote_run.as_uri()], "test", references=False).values()
    assert scores["users"] > 0
    model = ColdStartModel.load(remote_run.as_uri())  # the dataset too comes from its URI
    assert model.iteration == load_checkpoint(remote_run.as_uri())["iteration"]


def test_a_uri_without_a_dataset_is_an_error_naming_it(tmp_path, capsys):
    empty = (tmp_path / "nothing").as_uri()
    args = ["train", "--set", f"data.path={empty}", "--set", f"run.out={tmp_path / 'run'}"]
    assert main(args) == 2
    error = capsys.readouterr().err
    assert empty in error and "manifest.json" in error
    assert main(["evaluate", "--checkpoint", "unknown://bucket/run"]) == 2
    assert "unknown://bucket/run" in capsys.readouterr().err


@pytest.mark.slow
def test_ray_training_reads_and_writes_uris(ray_session, synthetic_dir, tmp_path):
    from melo_dist.distributed.train import fit

    remote_data = tmp_path / "bucket" / "data"
    shutil.copytree(synthetic_dir, remote_data)
    remote_run = tmp_path / "bucket" / "runs" / "ray"
    config = tiny_config(remote_data.as_uri(), remote_run.as_uri(), iterations=2)
    best = fit(config, workers=2, cpus_per_worker=0.5)
    assert best["iteration"] == 2
    assert {BEST, LAST, METRICS, "config.yaml", "ray-checkpoints"} <= {
        p.name for p in remote_run.iterdir()
    }


def test_prepare_reads_its_input_file_from_a_uri_and_names_it_in_errors(tmp_path, capsys):
    ratings = tmp_path / "bucket" / "ratings.dat"
    ratings.parent.mkdir()
    rows = [f"{u}::{i}::{1 + (u + i) % 5}::{u * 100 + i}" for u in range(1, 41) for i in range(30)]
    ratings.write_text("\n".join(rows) + "\n")
    out = tmp_path / "data"
    args = ["prepare", "--source", "movielens", "--min-item-ratings", "5", "--test-users", "8"]
    assert main([*args, "--path", ratings.as_uri(), "--out", str(out)]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["source"]["path"] == ratings.as_uri()
    ratings.write_text("\n".join(rows[:5]) + "\n1::2::x::3\n")
    assert main([*args, "--path", ratings.as_uri(), "--out", str(tmp_path / "again")]) == 2
    assert f"{ratings.as_uri()}:6" in capsys.readouterr().err  # the URI's line, not a copy's
    assert main([*args, "--path", (tmp_path / "absent.dat").as_uri(), "--out", str(out)]) == 2
    assert "file not found" in capsys.readouterr().err


def test_ray_checkpoints_stay_at_the_uri_and_uris_have_one_spelling(tmp_path):
    """Ray reads and writes its own checkpoints at the URI: a working copy never brings old
    ones back down or pushes them up. `s3://b/run/` and `s3://b/run` are one run."""
    remote = tmp_path / "bucket" / "run"
    (remote / "ray-checkpoints" / "checkpoint_1").mkdir(parents=True)
    (remote / "ray-checkpoints" / "checkpoint_1" / "last.pt").write_text("Ray's")
    (remote / "metrics.jsonl").write_text("{}\n")
    local = checked_out(remote.as_uri())
    assert (local / "metrics.jsonl").exists() and not (local / "ray-checkpoints").exists()
    (local / "ray-checkpoints" / "old").mkdir(parents=True)
    (local / "ray-checkpoints" / "old" / "last.pt").write_text("stale")
    publish(remote.as_uri())
    assert not (remote / "ray-checkpoints" / "old").exists()
    config = Config()
    config.run.out, config.data.path = remote.as_uri() + "/", "s3://bucket/data/"
    config.validate()
    assert (config.run.out, config.data.path) == (remote.as_uri(), "s3://bucket/data")
    assert local_folder(remote.as_uri() + "/") == local_folder(remote.as_uri())


def test_storage_failures_are_errors_naming_the_uri(tmp_path):
    a_file = tmp_path / "file"
    a_file.write_text("x")
    with pytest.raises(InputError, match="is not a folder") as error:
        is_empty(a_file.as_uri())
    assert a_file.as_uri() in str(error.value)
    with pytest.raises(InputError, match="storage error"):
        filesystem("unknown://bucket/run")


def test_a_run_saved_before_a_new_setting_existed_still_resumes(synthetic_dir, tmp_path):
    """A saved config without a key added since (meta.outer_balance) gets its default, which
    is the old behaviour, so the run is not refused as a different config."""
    config = tiny_config(synthetic_dir, tmp_path / "run")
    saved = config.to_dict()
    del saved["meta"]["outer_balance"]
    refuse_other_config(saved, config.to_dict(), tmp_path / "run")  # no error
    saved["meta"]["inner_steps"] = 5
    with pytest.raises(InputError, match=r"meta\.inner_steps was 5"):
        refuse_other_config(saved, config.to_dict(), tmp_path / "run")


def test_a_push_cut_short_leaves_the_file_at_a_file_uri_whole(tmp_path, monkeypatch):
    """A kill in the middle of copying a file up must leave the old file, not a torn one: at a
    file:// URI each file is written beside its target and renamed onto it."""
    local, remote = tmp_path / "run", tmp_path / "bucket" / "run"
    local.mkdir()
    (local / LAST).write_bytes(b"old checkpoint")
    uri = remote.as_uri()
    push(local, uri)
    (local / LAST).write_bytes(b"new checkpoint, longer than the old one")

    def cut_short(source, sink, *args):
        sink.write(source.read(5))
        raise KeyboardInterrupt  # the kill

    monkeypatch.setattr("melo_dist.storage.shutil.copyfileobj", cut_short)
    with pytest.raises(KeyboardInterrupt):
        push(local, uri)
    assert (remote / LAST).read_bytes() == b"old checkpoint"
    assert [p.name for p in remote.iterdir()] == [LAST]  # no temporary file left behind
