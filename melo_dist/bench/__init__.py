"""Benchmarks: `melo-dist bench NAME` prints a readable table, then one JSON line of figures."""

from __future__ import annotations

import importlib
import json

from melo_dist.data.report import format_table
from melo_dist.errors import InputError

BENCHMARKS = {
    "prepare": "melo_dist.bench.prepare",
    "meta-step": "melo_dist.bench.meta_step",
    "ray": "melo_dist.bench.ray",
}


def run_benchmark(name: str, options: list[str]) -> None:
    if name not in BENCHMARKS:
        raise InputError(f"unknown benchmark {name!r}; choose from {sorted(BENCHMARKS)}")
    module = importlib.import_module(BENCHMARKS[name])
    title, rows, figures = module.run(options)
    print(format_table(rows, title))
    print(json.dumps({"bench": name, **figures}))
