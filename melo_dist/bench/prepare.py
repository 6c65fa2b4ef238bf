"""`melo-dist bench prepare`: read + prepare throughput on the ML-1M subset, one core."""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import pyarrow as pa

from melo_dist.data.prepare import PrepareSettings, prepare
from melo_dist.data.readers import read_ratings
from melo_dist.errors import InputError
from melo_dist.paths import shared_data_dir


def run(options: list[str]) -> tuple[str, list, dict]:
    parser = argparse.ArgumentParser(prog="melo-dist bench prepare")
    parser.add_argument("--path", default=None, help="ratings file (default: ML-1M subset)")
    parser.add_argument("--source", default="movielens")
    args = parser.parse_args(options)
    path = Path(args.path) if args.path else shared_data_dir() / "ml-1m-users1-2999/ratings.dat.gz"
    if not path.exists():
        raise InputError("benchmark input not found (set MELO_DATA_DIR or pass --path)", path=path)
    pa.set_cpu_count(1)  # arrow's csv reader is multi-threaded by default
    with tempfile.TemporaryDirectory() as tmp:
        started = time.perf_counter()
        ratings, fmt = read_ratings(path, args.source)
        read_s = time.perf_counter() - started
        manifest = prepare(ratings, Path(tmp) / "out", PrepareSettings(), {"family": args.source})
        seconds = time.perf_counter() - started
    rows = len(ratings)
    table = [
        ("input", f"{path.name} ({fmt})"),
        ("ratings", rows),
        ("users kept", manifest["counts"]["users"]),
        ("items kept", manifest["counts"]["items"]),
        ("read seconds", round(read_s, 3)),
        ("prepare seconds", round(seconds - read_s, 3)),
        ("total seconds", round(seconds, 3)),
        ("ratings / s", round(rows / seconds)),
    ]
    figures = {
        "ratings": rows,
        "seconds": round(seconds, 3),
        "read_seconds": round(read_s, 3),
        "ratings_per_s": round(rows / seconds),
    }
    return "bench prepare (1 thread)", table, figures
