"""`melo-dist report`: its inputs (run folders, a run not yet validated, an unknown folder) and
what it writes (report.md, a self-contained report.html, PNG figures)."""

from __future__ import annotations

import shutil

from melo_dist.cli import main
from melo_dist.report.build import FIGURES, differing_settings, write_report
from melo_dist.training.checkpoint import CONFIG, LAST

PNG = b"\x89PNG\r\n\x1a\n"


def test_report_of_a_run_writes_markdown_html_and_figures(trained, tmp_path, capsys):
    assert main(["report", str(trained), "--split", "valid", "--out", str(tmp_path)]) == 0
    assert "report.md" in capsys.readouterr().err
    text = (tmp_path / "report.md").read_text()
    for section in ("## Runs", "## Learning curves", "## Valid RMSE", "## What adaptation does"):
        assert section in text
    assert "factor model" in text and "inner steps" in text
    for name in FIGURES.values():  # MELO: every figure, the inner-loss weights included
        assert (tmp_path / name).read_bytes()[:8] == PNG and f"]({name})" in text
    page = (tmp_path / "report.html").read_text()
    assert page.count('src="data:image/png;base64,') == len(FIGURES) and "<table>" in page


def test_report_compares_runs_and_names_what_differs(trained, tmp_path):
    other = tmp_path / "other"
    shutil.copytree(trained, other)
    write_report([str(trained), str(other)], "test", tmp_path / "out")
    text = (tmp_path / "out" / "report.md").read_text()
    assert "| run | other |" not in text and "| other |" in text  # a row per run
    assert "Settings that differ" not in text  # the same config: nothing differs
    assert differing_settings(
        {
            "a": {"meta": {"regime": "melo", "steps": 3}},
            "b": {"meta": {"regime": "maml", "steps": 3}},
        }
    ) == [("meta.regime", ["melo", "maml"])]


def test_report_refuses_unknown_and_unvalidated_folders(trained, tmp_path, capsys):
    missing = tmp_path / "missing"
    assert main(["report", str(missing), "--out", str(tmp_path / "a")]) == 2
    assert "missing" in capsys.readouterr().err
    started = tmp_path / "started"  # training began: its config is written, no checkpoint yet
    started.mkdir()
    shutil.copy(trained / CONFIG, started / CONFIG)
    assert main(["report", str(trained), str(started), "--out", str(tmp_path / "b")]) == 2
    error = capsys.readouterr().err
    assert "started" in error and "first validation" in error
    assert not (tmp_path / "b").exists()  # nothing written


def test_report_reads_a_run_with_only_last_checkpoint(trained, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    (run / "best.pt").unlink()  # before any improvement a run has last.pt alone
    assert (run / LAST).exists()
    assert write_report([str(run)], "test", tmp_path / "out").exists()
