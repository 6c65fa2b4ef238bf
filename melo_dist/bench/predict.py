"""`melo-dist bench predict`: users scored per second by `melo-dist predict`, in-process vs on a
Ray Data actor pool (`--workers`), in one run on the same users.

The input is a prepared dataset's test task table (default: the embedded synthetic default and
the small SASRec model of `bench serve`); each user is adapted on its history and ranks every
unrated item (`--top-k`). The wall time includes reading the inputs, writing the Parquet file
and, for the pool, starting its actors (Ray itself is started before the clock).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import pyarrow.parquet as pq

from melo_dist.bench.serve import DEFAULT_MODEL, train_small_model
from melo_dist.inference.batch import predict_file
from melo_dist.training.checkpoint import load_checkpoint


def run(options: list[str]) -> tuple[str, list, dict]:
    parser = argparse.ArgumentParser(prog="melo-dist bench predict")
    parser.add_argument("--checkpoint", help=f"default: {DEFAULT_MODEL}")
    parser.add_argument("--users", help="histories (default: the dataset's tasks-test.parquet)")
    parser.add_argument("--top-k", type=int, default=10)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch-users", type=int, default=32)
    args = parser.parse_args(options)
    from melo_dist.distributed.train import connect

    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = args.checkpoint or str(train_small_model(Path(tmp)))
        data = Path(load_checkpoint(checkpoint)["config"]["data"]["path"])
        users = args.users or str(data / "tasks-test.parquet")
        connect()
        table, figures = [], {}
        for mode, workers in (
            ("in-process", 0),
            (f"{args.workers} Ray Data workers", args.workers),
        ):
            out = Path(tmp) / f"out-{workers}.parquet"
            started = time.perf_counter()
            predict_file(
                checkpoint,
                users,
                out,
                top_k=args.top_k,
                workers=workers,
                batch_users=args.batch_users,
            )
            seconds = time.perf_counter() - started
            scored = len(pq.read_table(out, columns=["user_id"]).column(0).unique())
            table.append(
                (mode, f"{scored:,} users in {seconds:6.1f} s  {scored / seconds:7.1f} users/s")
            )
            figures[f"users_per_s_workers_{workers}"] = round(scored / seconds, 2)
    figures["speedup"] = round(
        figures[f"users_per_s_workers_{args.workers}"] / figures["users_per_s_workers_0"], 2
    )
    title = (
        f"bench predict: top {args.top_k} of every unrated item per user, "
        f"{args.batch_users} users adapted together; checkpoint {args.checkpoint or DEFAULT_MODEL}"
    )
    return title, table, figures
