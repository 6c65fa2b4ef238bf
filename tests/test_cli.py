"""The CLI end to end: prepare/inspect, and bad input -> one line, exit 2, nothing left behind."""

from __future__ import annotations

import json
import subprocess
import sys
import zipfile

import pytest
from conftest import write

from melo_dist.cli import main


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_prepare_synthetic_then_inspect(tmp_path, capsys):
    out = tmp_path / "data"
    code, stdout, _ = run_cli(
        capsys,
        "prepare",
        "--source",
        "synthetic",
        "--out",
        str(out),
        "--synthetic-users",
        "300",
        "--min-item-ratings",
        "10",
        "--test-users",
        "50",
    )
    assert code == 0 and "train / valid / test users" in stdout
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["counts"]["test_users"] == 50
    code, stdout, _ = run_cli(capsys, "inspect", str(out))
    assert code == 0 and "balance score" in stdout
    code, stdout, _ = run_cli(capsys, "inspect", str(out), "--json")
    assert json.loads(stdout) == manifest


def zipped(path, members: dict[str, str]):
    with zipfile.ZipFile(path, "w") as archive:
        for name, text in members.items():
            archive.writestr(name, text)
    return path


GOOD_LINE = "1::10::5::978300760\n"
AMAZON_LINE = (
    json.dumps({"reviewerID": "u", "asin": "a", "overall": 5.0, "unixReviewTime": 1393545600})
    + "\n"
)

# (name, file maker, extra CLI arguments, expected message fragment)
BAD_INPUTS = [
    ("missing file", lambda d: d / "absent.dat", [], "file not found"),
    ("empty file", lambda d: write(d / "ratings.dat", ""), [], "empty"),
    (
        "unknown format",
        lambda d: write(d / "ratings.dat", GOOD_LINE),
        ["--format", "xml"],
        "not a movielens format",
    ),
    ("undetectable", lambda d: write(d / "stuff.txt", "a;b\n"), [], "ml-100k"),
    (
        "missing columns",
        lambda d: write(d / "r.csv", "user_id,item_id,rating\n1,2,3\n"),
        ["--source", "csv"],
        "timestamp",
    ),
    (
        "malformed line",
        lambda d: write(d / "ratings.dat", GOOD_LINE + "1::2::3\n"),
        [],
        "ratings.dat:2",
    ),
    (
        "non-numeric rating",
        lambda d: write(d / "ratings.dat", GOOD_LINE + "1::11::five::9\n"),
        [],
        "ratings.dat:2",
    ),
    (
        "NaN rating",
        lambda d: write(d / "ratings.dat", GOOD_LINE + "1::11::nan::9\n"),
        [],
        "ratings.dat:2",
    ),
    (
        "out-of-scale rating",
        lambda d: write(d / "ratings.dat", GOOD_LINE + "1::11::7::9\n"),
        [],
        "ratings.dat:2",
    ),
    (
        "bad timestamp",
        lambda d: write(d / "ratings.dat", GOOD_LINE + "1::11::4::soon\n"),
        [],
        "ratings.dat:2",
    ),
    (
        "empty user id",
        lambda d: write(d / "ratings.dat", GOOD_LINE + "::11::4::9\n"),
        [],
        "ratings.dat:2",
    ),
    ("empty item id", lambda d: write(d / "u.data", "1\t10\t5\t9\n1\t\t4\t9\n"), [], "u.data:2"),
    (
        "corrupt gzip",
        lambda d: write(d / "ratings.dat.gz", b"\x1f\x8bnot gzip at all"),
        [],
        "ratings.dat.gz",
    ),
    (
        "zip of two files",
        lambda d: zipped(d / "reviews.zip", {"a.json": "{}\n", "b.json": "{}\n"}),
        ["--source", "amazon"],
        "reviews.zip",
    ),
    (
        "malformed json",
        lambda d: write(d / "reviews.json", AMAZON_LINE + '{"reviewerID": "u", "asin": \n'),
        ["--source", "amazon"],
        "reviews.json:2",
    ),
    (
        "yelp bad date",
        lambda d: write(
            d / "review.json",
            json.dumps({"user_id": "u", "business_id": "b", "stars": 4, "date": "yesterday"})
            + "\n",
        ),
        ["--source", "yelp"],
        "review.json:1",
    ),
    (
        "mapping on a fixed format",
        lambda d: write(d / "ratings.dat", GOOD_LINE),
        ["--columns", "user_id=uid"],
        "column mapping",
    ),
    (
        "bad column mapping",
        lambda d: write(d / "r.csv", "uid,iid,r,t\n1,2,3,4\n"),
        ["--source", "csv", "--columns", "user_id"],
        "--columns",
    ),
    (
        "nothing survives filters",
        lambda d: write(d / "ratings.dat.gz", GOOD_LINE),
        [],
        "no ratings survive",
    ),
    (
        "too many test users",
        lambda d: write(
            d / "ratings.dat", "".join(f"{u}::{i}::4::9\n" for u in (1, 2, 3) for i in (10, 11))
        ),
        ["--protocol", "melo", "--min-item-ratings", "1", "--min-user-ratings", "2"],
        "no training users",
    ),
    ("negative seed", lambda d: write(d / "ratings.dat", GOOD_LINE), ["--seed", "-1"], "--seed"),
    (
        "no validation users",
        lambda d: write(d / "ratings.dat", GOOD_LINE),
        ["--valid-fraction", "0"],
        "--valid-fraction",
    ),
]


@pytest.mark.parametrize(
    ("name", "make", "extra", "fragment"), BAD_INPUTS, ids=[case[0] for case in BAD_INPUTS]
)
def test_bad_input_exits_2_with_one_line_and_no_output(
    tmp_path, capsys, name, make, extra, fragment
):
    source_dir = tmp_path / "in"
    source_dir.mkdir()
    path = make(source_dir)
    out = tmp_path / "out"
    argv = ["prepare", "--source", "movielens", "--path", str(path), "--out", str(out), *extra]
    code, _, stderr = run_cli(capsys, *argv)
    assert code == 2
    message = [line for line in stderr.splitlines() if line.startswith("melo-dist: error:")]
    assert len(message) == 1 and fragment in message[0], stderr
    assert "Traceback" not in stderr
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in"]  # no temporary folder either


def test_failed_prepare_keeps_the_existing_dataset(tmp_path, capsys):
    out = tmp_path / "data"
    args = [
        "prepare",
        "--source",
        "synthetic",
        "--out",
        str(out),
        "--synthetic-users",
        "200",
        "--min-item-ratings",
        "5",
        "--test-users",
        "20",
    ]
    assert run_cli(capsys, *args)[0] == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    # Without --overwrite the dataset is refused; with it, a failing run changes nothing.
    code, _, stderr = run_cli(capsys, *args)
    assert code == 2 and "--overwrite" in stderr
    code, _, stderr = run_cli(capsys, *args[:-1], "100000", "--overwrite")
    assert code == 2 and "no training users" in stderr
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_console_script_exit_status(tmp_path):
    """The installed entry point itself exits 2 with a one-line message."""
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "melo_dist.cli",
            "prepare",
            "--source",
            "movielens",
            "--path",
            str(tmp_path / "absent.dat"),
            "--out",
            str(tmp_path / "out"),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 2
    errors = [line for line in result.stderr.splitlines() if not line.startswith("[melo-dist]")]
    assert len(errors) == 1 and "absent.dat: file not found" in errors[0]
