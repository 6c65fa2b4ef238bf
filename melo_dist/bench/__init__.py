"""Benchmarks: `melo-dist bench NAME` prints a readable table, then one JSON line of figures."""

from __future__ import annotations

import importlib
import json
import multiprocessing as mp
import resource
from collections.abc import Callable
from typing import Any

from melo_dist.data.statistics import format_table
from melo_dist.errors import InputError

BENCHMARKS = {
    "prepare": "melo_dist.bench.prepare",
    "meta-step": "melo_dist.bench.meta_step",
    "ray": "melo_dist.bench.ray",
    "train": "melo_dist.bench.train",
    "serve": "melo_dist.bench.serve",
    "predict": "melo_dist.bench.predict",
}


def run_benchmark(name: str, options: list[str]) -> None:
    if name not in BENCHMARKS:
        raise InputError(f"unknown benchmark {name!r}; choose from {sorted(BENCHMARKS)}")
    module = importlib.import_module(BENCHMARKS[name])
    title, rows, figures = module.run(options)
    print(format_table(rows, title))
    print(json.dumps({"bench": name, **figures}))


def in_fresh_process(measure: Callable, *args) -> tuple[Any, float]:
    """(what `measure(*args)` returns, the process's peak RSS in MiB), run in a spawned process
    so that each variant's memory peak is its own and no caches are shared."""
    context = mp.get_context("spawn")
    queue = context.Queue()
    worker = context.Process(target=_measure_into, args=(queue, measure, *args))
    worker.start()
    result = queue.get()
    worker.join()
    return result


def _measure_into(queue: mp.Queue, measure: Callable, *args) -> None:
    value = measure(*args)
    queue.put((value, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024))
