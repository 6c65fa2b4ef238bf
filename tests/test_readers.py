"""Tests for melo_dist.data.readers: real sample files, every format, detection, bad input."""

from __future__ import annotations

import gzip
import io
import json
import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import shared_file, write

from melo_dist.data.formats import FORMATS, SOURCES, detect_format
from melo_dist.data.readers import read_ratings
from melo_dist.errors import InputError

DAY = 1468281600  # 2016-07-12 00:00:00 UTC


def zip_members(members: dict[str, str]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as zf:
        for name, text in members.items():
            zf.writestr(name, text)
    return buffer.getvalue()


def jsonl(*rows: dict) -> str:
    return "".join(json.dumps(r) + "\n" for r in rows)


def assert_canonical(df: pd.DataFrame) -> None:
    assert list(df.columns) == ["user_id", "item_id", "rating", "timestamp"]
    for col in ("user_id", "item_id"):
        assert isinstance(df[col].dtype, pd.StringDtype) and df[col].dtype.na_value is pd.NA
    assert df["rating"].dtype == np.float32
    assert df["timestamp"].dtype == np.int64


def rows(df: pd.DataFrame) -> list[tuple[str, str, float, int]]:
    return [(u, i, float(r), int(t)) for u, i, r, t in df.itertuples(index=False)]


def test_public_tables() -> None:
    assert SOURCES == ("movielens", "amazon", "yelp", "recbole", "csv", "parquet")
    assert set(FORMATS) == set(SOURCES)
    assert FORMATS["movielens"] == ("ml-100k", "ml-1m", "ml-csv")


# --- real files -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("relative", "fmt", "n_rows", "n_users", "n_items"),
    [
        ("ml-100k/u.data", "ml-100k", 100_000, 943, 1_682),
        ("ml-1m-users1-2999/ratings.dat.gz", "ml-1m", 487_650, 2_999, 3_615),
    ],
)
def test_real_movielens(relative: str, fmt: str, n_rows: int, n_users: int, n_items: int) -> None:
    path = shared_file(relative)
    df, used = read_ratings(path, "movielens")  # speed: `melo-dist bench prepare`, not here
    assert used == fmt
    assert_canonical(df)
    assert (len(df), df["user_id"].nunique(), df["item_id"].nunique()) == (n_rows, n_users, n_items)
    assert set(np.unique(df["rating"])) == {1.0, 2.0, 3.0, 4.0, 5.0}
    assert df["timestamp"].min() > 8e8


@pytest.mark.parametrize(
    ("relative", "source", "fmt", "n_rows"),
    [
        ("samples/amazon_musical_instruments_5core_head400.json", "amazon", "amazon-json", 400),
        ("samples/yelp_academic_review_head300.json", "yelp", "yelp-json", 300),
    ],
)
def test_real_samples(relative: str, source: str, fmt: str, n_rows: int) -> None:
    df, used = read_ratings(shared_file(relative), source)
    assert used == fmt
    assert_canonical(df)
    assert len(df) == n_rows
    assert df["rating"].between(1, 5).all()
    assert (df["timestamp"] > 1e8).all() and (df["timestamp"] < 2e9).all()
    assert (df["user_id"].str.len() > 0).all() and (df["item_id"].str.len() > 0).all()


def test_real_yelp_date_is_utc_seconds() -> None:
    df, _ = read_ratings(shared_file("samples/yelp_academic_review_head300.json"), "yelp")
    assert df["timestamp"].iloc[0] == 1325604498  # "2012-01-03 15:28:18"


# --- every format from small files --------------------------------------------------------------

ML_ROWS = [("1", "10", 5.0, 978300760), ("1", "11", 3.0, 978300761), ("2", "10", 4.0, 978300762)]
ML_LINES = [f"{u}\t{i}\t{int(r)}\t{t}" for u, i, r, t in ML_ROWS]


@pytest.mark.parametrize(
    ("name", "content", "source", "fmt", "expected"),
    [
        ("u.data", "\n".join(ML_LINES) + "\n", "movielens", "ml-100k", ML_ROWS),
        ("ml.tsv", "\n".join(ML_LINES), "movielens", "ml-100k", ML_ROWS),  # by content
        ("ratings.dat", "\n".join(ML_LINES).replace("\t", "::"), "movielens", "ml-1m", ML_ROWS),
        ("ratings.dat.gz", "\n".join(ML_LINES).replace("\t", "::"), "movielens", "ml-1m", ML_ROWS),
        ("x.dat", "1::10::5::978300760\r\n", "movielens", "ml-1m", ML_ROWS[:1]),  # CRLF
        (
            "ratings.csv",
            "userId,movieId,rating,timestamp\n1,10,0.5,978300760\n1,11,4.5,978300761\n",
            "movielens",
            "ml-csv",
            [("1", "10", 0.5, 978300760), ("1", "11", 4.5, 978300761)],
        ),
        (
            "ratings_Musical_Instruments.csv",
            "A1X,B00,5.0,1393545600\nA2Y,B01,1.0,1393545601\n",
            "amazon",
            "amazon-csv",
            [("A1X", "B00", 5.0, 1393545600), ("A2Y", "B01", 1.0, 1393545601)],
        ),
        (
            "amazon.csv",
            "rating,reviewerID,product_id,date\n4,A1,P1,2016-07-12\n2,A2,P2,1393545600\n"
            '5,A3,P3,"07 12, 2016"\n',
            "amazon",
            "melo-amazon-csv",
            [("A1", "P1", 4.0, DAY), ("A2", "P2", 2.0, 1393545600), ("A3", "P3", 5.0, DAY)],
        ),
        (
            "yelp.csv",
            "stars,user_id,business_id,timestamp\n"
            "3,u1,b1,2016-07-12 00:00:10\n1,u2,b2,1468281600\n",
            "yelp",
            "melo-yelp-csv",
            [("u1", "b1", 3.0, DAY + 10), ("u2", "b2", 1.0, DAY)],
        ),
        (
            "yelp_review.json",
            jsonl(
                {"user_id": "u1", "business_id": "b1", "stars": 4, "date": "2016-07-12"},
                {"user_id": "u2", "business_id": "b1", "stars": 2.0, "date": "2016-07-12 00:01:00"},
            ),
            "yelp",
            "yelp-json",
            [("u1", "b1", 4.0, DAY), ("u2", "b1", 2.0, DAY + 60)],
        ),
        (
            "ml.inter",
            "timestamp:float\trating:float\titem_id:token\tuser_id:token\n"
            "978300760.0\t5.0\t10\t1\n978300761\t3\t11\t1\n",
            "recbole",
            "recbole-inter",
            [("1", "10", 5.0, 978300760), ("1", "11", 3.0, 978300761)],
        ),
    ],
)
def test_formats(
    tmp_path: Path, name: str, content: str, source: str, fmt: str, expected: list
) -> None:
    df, used = read_ratings(write(tmp_path / name, content), source)
    assert used == fmt
    assert_canonical(df)
    assert rows(df) == expected


AMAZON = [
    {"reviewerID": "A1", "asin": "X1", "overall": 5.0, "unixReviewTime": 1393545600, "x": [1]},
    {"reviewerID": "A2", "asin": "X1", "overall": 1.0, "unixReviewTime": 1393545601},
    {"reviewerID": "A1", "asin": "X1", "overall": 5.0, "unixReviewTime": 1393545600},  # dup kept
]
AMAZON_ROWS = [("A1", "X1", 5.0, 1393545600), ("A2", "X1", 1.0, 1393545601)]
AMAZON_ROWS.append(AMAZON_ROWS[0])


@pytest.mark.parametrize(
    "make",
    [
        lambda d: write(d / "Musical_Instruments_5.json", jsonl(*AMAZON)),
        lambda d: write(d / "Musical_Instruments_5.json.gz", jsonl(*AMAZON)),
        lambda d: write(d / "blank_lines.json", "\n" + jsonl(*AMAZON) + "\n\n"),
        lambda d: write(d / "r.zip", zip_members({"dir/r.json": jsonl(*AMAZON), "README": ""})),
    ],
    ids=["json", "json.gz", "blank-lines", "zip"],
)
def test_amazon_json(tmp_path: Path, make: Callable[[Path], Path]) -> None:
    df, used = read_ratings(make(tmp_path), "amazon")
    assert used == "amazon-json"
    assert_canonical(df)
    assert rows(df) == AMAZON_ROWS


def test_generic_csv_with_mapping(tmp_path: Path) -> None:
    path = write(tmp_path / "mine.csv", "uid;iid;score;ts;extra\n7;8;4.5;2016-07-12;x\n9;8;1;5;y\n")
    columns = {"user_id": "uid", "item_id": "iid", "rating": "score", "timestamp": "ts"}
    df, used = read_ratings(path, "csv", columns=columns)
    assert used == "csv"
    assert_canonical(df)
    assert rows(df) == [("7", "8", 4.5, DAY), ("9", "8", 1.0, 5)]


def test_generic_csv_canonical_and_recbole_headers(tmp_path: Path) -> None:
    path = write(
        tmp_path / "x.tsv.gz", "user_id:token\titem_id:token\trating\ttimestamp\na\tb\t2\t3\n"
    )
    df, _ = read_ratings(path, "csv")
    assert rows(df) == [("a", "b", 2.0, 3)]


def test_parquet(tmp_path: Path) -> None:
    table = pa.table(
        {
            "u": pa.array([1, 2], pa.int64()),
            "i": ["x", "y"],
            "score": pa.array([4.0, 0.5], pa.float32()),
            "when": pa.array([DAY * 1000, DAY * 1000 + 1500], pa.timestamp("ms", tz="UTC")),
        }
    )
    pq.write_table(table, tmp_path / "r.parquet")
    columns = {"user_id": "u", "item_id": "i", "rating": "score", "timestamp": "when"}
    df, used = read_ratings(tmp_path / "r.parquet", "parquet", columns=columns)
    assert used == "parquet"
    assert_canonical(df)
    assert rows(df) == [("1", "x", 4.0, DAY), ("2", "y", 0.5, DAY + 1)]


def test_parquet_canonical_names(tmp_path: Path) -> None:
    frame = pd.DataFrame({"user_id": ["a"], "item_id": ["b"], "rating": [3], "timestamp": [7]})
    frame.to_parquet(tmp_path / "r.parquet")
    df, _ = read_ratings(str(tmp_path / "r.parquet"), "parquet")
    assert rows(df) == [("a", "b", 3.0, 7)]


def test_rating_range_is_inclusive_and_configurable(tmp_path: Path) -> None:
    path = write(tmp_path / "u.data", "1\t2\t10\t5\n1\t3\t1\t5\n")
    df, _ = read_ratings(path, "movielens", rating_range=(1, 10))
    assert df["rating"].tolist() == [10.0, 1.0]


# --- detection and fmt override ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "content", "source", "fmt"),
    [
        ("u.data.gz", "not even looked at", "movielens", "ml-100k"),
        ("ratings.dat", "1,2,3,4\n", "movielens", "ml-1m"),  # the name wins over the content
        ("r.csv", "userId,movieId,rating,timestamp\n", "movielens", "ml-csv"),
        ("r.txt", "1::2::3::4\n", "movielens", "ml-1m"),
        ("r.csv", "A,B,5.0,123\n", "amazon", "amazon-csv"),
        ("r.csv", "rating,reviewerID,product_id,date\n", "amazon", "melo-amazon-csv"),
        ("r", jsonl(AMAZON[0]), "amazon", "amazon-json"),
        ("r.csv", "stars,user_id,business_id,timestamp\n", "yelp", "melo-yelp-csv"),
        ("r.json", '{"user_id":"u","business_id":"b","stars":1,"date":"x"}', "yelp", "yelp-json"),
        ("anything", "", "recbole", "recbole-inter"),
        ("anything", "", "csv", "csv"),
        ("anything", "", "parquet", "parquet"),
    ],
)
def test_detect_format(tmp_path: Path, name: str, content: str, source: str, fmt: str) -> None:
    assert detect_format(write(tmp_path / name, content), source) == fmt


def test_fmt_override(tmp_path: Path) -> None:
    # a tab file named like ML-1M: the name would say ml-1m, fmt says ml-100k
    path = write(tmp_path / "ratings.dat", "\n".join(ML_LINES))
    df, used = read_ratings(path, "movielens", fmt="ml-100k")
    assert used == "ml-100k"
    assert rows(df) == ML_ROWS


# --- bad input ----------------------------------------------------------------------------------

GOOD_ML1M = "1::10::5::978300760\n"
# (file name, content or None for no file, source, read_ratings kwargs, message fragments)
BAD = {
    "missing-file": ("u.data", None, "movielens", {}, ["u.data", "file not found"]),
    "empty-file": ("u.data", "", "movielens", {}, ["u.data", "file is empty"]),
    "blank-file": ("ratings.dat", "\n\n", "movielens", {}, ["ratings.dat", "empty"]),
    "header-only": (
        "ratings.csv",
        "userId,movieId,rating,timestamp\n",
        "movielens",
        {},
        ["ratings.csv", "no data rows"],
    ),
    "empty-json": ("r.json", "\n", "amazon", {"fmt": "amazon-json"}, ["r.json", "empty"]),
    "unknown-source": ("u.data", GOOD_ML1M, "netflix", {}, ["unknown source 'netflix'", "yelp"]),
    "fmt-not-in-family": (
        "u.data",
        GOOD_ML1M,
        "movielens",
        {"fmt": "yelp-json"},
        ["'yelp-json' is not a movielens format", "ml-100k, ml-1m, ml-csv"],
    ),
    "undetectable": (
        "r.json",
        '{"a": 1}\n',
        "movielens",
        {},
        ["r.json", "cannot tell the movielens format", "ml-100k, ml-1m, ml-csv"],
    ),
    "missing-columns": (
        "ratings.csv",
        "userId,itemId,rating,time\n1,2,3,4\n",
        "movielens",
        {"fmt": "ml-csv"},
        ["ratings.csv", "missing column(s) ['movieId', 'timestamp']", "found ['userId', 'itemId'"],
    ),
    "mapping-missing-column": (
        "m.csv",
        "uid,iid,rating,timestamp\n1,2,3,4\n",
        "csv",
        {"columns": {"user_id": "uid", "item_id": "item"}},
        ["m.csv", "missing column(s) ['item']"],
    ),
    "mapping-unknown-key": ("m.csv", "a\n1\n", "csv", {"columns": {"user": "a"}}, ["'user'"]),
    "ml1m-three-fields": (
        "ratings.dat",
        GOOD_ML1M + "1::2::3\n",
        "movielens",
        {},
        ["ratings.dat:2", "expected 4 fields", "found 3", "1::2::3"],
    ),
    "ml100k-five-fields": (
        "u.data",
        "1\t2\t3\t4\n\n1\t2\t3\t4\t5\n",
        "movielens",
        {},
        ["u.data:3", "found 5"],
    ),
    "amazon-csv-after-header": (
        "r.csv",
        "rating,reviewerID,product_id,date\n5,A,B,1\n5,A\n",
        "amazon",
        {},
        ["r.csv:3", "expected 4 fields, found 2"],
    ),
    "malformed-json": (
        "r.json",
        jsonl(*AMAZON[:2]) + '{"reviewerID": "A3", \n',
        "amazon",
        {},
        ["r.json:3", "malformed JSON"],
    ),
    "json-not-object": ("r.json", jsonl(AMAZON[0]) + "[1, 2]\n", "amazon", {}, ["r.json:2"]),
    "json-missing-key": (
        "r.json",
        jsonl(AMAZON[0], {"reviewerID": "A", "asin": "B", "unixReviewTime": 1}),
        "amazon",
        {},
        ["r.json:2", "['overall']", "found ['asin', 'reviewerID', 'unixReviewTime']"],
    ),
    "json-null-rating": (
        "r.json",
        jsonl({**AMAZON[1], "overall": None}),
        "amazon",
        {},
        ["r.json:1", "null", "overall"],
    ),
    "non-numeric-rating": (
        "ratings.csv",
        "userId,movieId,rating,timestamp\n1,2,3,4\n1,3,five,4\n",
        "movielens",
        {},
        ["ratings.csv:3 (column 'rating')", "'five' is not a number"],
    ),
    "empty-rating": ("u.data", "1\t2\t3\t4\n1\t3\t\t4\n", "movielens", {}, ["u.data:2", "rating"]),
    "nan-rating": (
        "r.inter",
        "user_id:token\titem_id:token\trating:float\ttimestamp:float\nu\ti\tnan\t1\n",
        "recbole",
        {},
        ["r.inter:2 (column 'rating')", "missing rating"],
    ),
    "rating-too-high": (
        "ratings.csv",
        "userId,movieId,rating,timestamp\n1,2,3,4\n1,2,4,4\n1,2,5.5,4\n",
        "movielens",
        {},
        ["ratings.csv:4", "rating 5.5 outside the range [0.5, 5]"],
    ),
    "rating-too-low": ("u.data", "1\t2\t0\t4\n", "movielens", {}, ["u.data:1", "rating 0 "]),
    "json-rating-bool": (
        "r.json",
        jsonl({**AMAZON[0], "overall": True}),
        "amazon",
        {},
        ["r.json:1", "'True' is not a number"],
    ),
    "bad-unix-timestamp": (
        "u.data",
        "1\t2\t3\t4\n1\t2\t3\t5\n1\t2\t3\t2016-07-12\n",
        "movielens",
        {},
        ["u.data:3 (column 'timestamp')", "'2016-07-12' is not a number"],
    ),
    "bad-date": (
        "r.csv",
        "stars,user_id,business_id,timestamp\n3,u,b,yesterday-ish\n",
        "yelp",
        {},
        ["r.csv:2 (column 'timestamp')", "'yesterday-ish' is not a number or a date"],
    ),
    "bad-json-date": (
        "y.json",
        jsonl({"user_id": "u", "business_id": "b", "stars": 1, "date": "2016-13-45"}),
        "yelp",
        {},
        ["y.json:1 (column 'timestamp')", "2016-13-45"],
    ),
    "empty-timestamp": ("u.data", "1\t2\t3\t\n", "movielens", {}, ["u.data:1", "timestamp"]),
    "negative-timestamp": ("u.data", "1\t2\t3\t-5\n", "movielens", {}, ["u.data:1", "negative"]),
    "empty-user": (
        "ratings.dat",
        GOOD_ML1M * 2 + "::10::5::978300760\n",
        "movielens",
        {},
        ["ratings.dat:3 (column 'user_id')", "empty user id"],
    ),
    "blank-item": ("u.data", "1\t \t3\t4\n", "movielens", {}, ["u.data:1", "empty item id"]),
    "json-empty-user": (
        "r.json",
        jsonl({**AMAZON[0], "reviewerID": ""}),
        "amazon",
        {},
        ["r.json:1 (column 'user_id')", "empty user id"],
    ),
    "corrupt-gzip": (
        "ratings.dat.gz",
        b"this is not gzip data",
        "movielens",
        {},
        ["ratings.dat.gz", "cannot read gzip"],
    ),
    "truncated-gzip": (
        "r.json.gz",
        gzip.compress(jsonl(*AMAZON).encode() * 50)[:60],
        "amazon",
        {"fmt": "amazon-json"},
        ["r.json.gz", "cannot read gzip"],
    ),
    "bad-zip": ("r.zip", b"PK\x03\x04 broken", "amazon", {}, ["r.zip", "cannot read zip"]),
    "not-utf8": (
        "ratings.csv",
        b"userId,movieId,rating,timestamp\n1,2,3,4\n\xff\xfe,2,3,4\n",
        "movielens",
        {},
        ["ratings.csv:3", "UTF-8"],
    ),
    "not-parquet": ("r.parquet", "user_id\n1\n", "parquet", {}, ["r.parquet", "Parquet"]),
    "bad-range-arg": ("u.data", "1\t2\t3\t4\n", "movielens", {"rating_range": (5, 1)}, ["min"]),
}

BAD["zip-no-json"] = ("r.zip", zip_members({"a.csv": "x"}), "amazon", {}, ["found 0", "a.csv"])
BAD["zip-two-json"] = (
    "r.zip",
    zip_members({"a.json": jsonl(AMAZON[0]), "b.json": jsonl(AMAZON[1])}),
    "amazon",
    {"fmt": "amazon-json"},
    ["r.zip", "exactly one .json file, found 2"],
)


@pytest.mark.parametrize(
    ("name", "content", "source", "kwargs", "fragments"), BAD.values(), ids=BAD
)
def test_bad_input(
    tmp_path: Path,
    name: str,
    content: str | bytes | None,
    source: str,
    kwargs: dict,
    fragments: list[str],
) -> None:
    path = tmp_path / name
    if content is not None:
        path.write_bytes(content.encode() if isinstance(content, str) else content)
    with pytest.raises(InputError) as info:
        read_ratings(path, source, **kwargs)
    message = str(info.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message
