"""`melo-dist bench serve`: latency and throughput of `melo-dist serve` under a closed-loop load.

Serves a checkpoint (default: a SASRec MELO model with the reference's sizes, trained for a few
iterations on the embedded synthetic default: latency depends on the sizes, not the quality)
through the same Ray Serve application `melo-dist serve` runs, on a free loopback port, and
sends real HTTP requests, each a history of `--history` ratings and `--candidates` candidates:

- single user: one client, one request at a time, on the batching deployment (the latency a
  lone user sees there);
- one at a time: `--clients` concurrent clients, max batch size 1;
- batched: the same load with `@serve.batch` (max batch size `--max-batch-size`).

`batching_speedup` is batched over one-at-a-time throughput, measured in the same run.
`compute_ms_<mode>` is the median time the replica spent adapting and predicting a request's
batch (the replies carry it); the rest of the latency is HTTP, Serve and the batch wait.
`compute_speedup` is the replica's compute per user one at a time over that in batches: what
the batched inner loop saves, apart from the HTTP path.
"""

from __future__ import annotations

import argparse
import http.client
import json
import tempfile
import threading
import time
import urllib.parse
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from melo_dist.bench.train import embedded_default
from melo_dist.config import load_config
from melo_dist.inference.batching import BATCH_WAIT_MS, MAX_BATCH_SIZE, PEAK_WINDOW_S

DEFAULT_MODEL = "small SASRec MELO (synthetic)"


def train_small_model(folder: Path) -> Path:
    from melo_dist.training.loop import train_local

    data = embedded_default(folder)
    overrides = [
        f"data.path={data}",
        "model.backbone=sasrec",
        "model.user_factors=16",
        "meta.adapt=head",
        "optim.iterations=4",
        "meta.multi_step_iterations=2",
        "run.validate_every=4",
        f"run.out={folder / 'run'}",
    ]
    train_local(load_config(None, overrides), log=lambda message: None)
    return folder / "run"


def load(url: str, bodies: list[bytes], clients: int) -> tuple[list[float], float, list[dict]]:
    """Send every body from `clients` closed-loop clients, each on its own kept-alive
    connection (as load generators and HTTP client libraries do); (latencies in s, wall s,
    replies)."""
    address = urllib.parse.urlsplit(url)
    local, connections = threading.local(), []

    def send(body: bytes) -> tuple[float, dict]:
        if not hasattr(local, "connection"):
            local.connection = http.client.HTTPConnection(address.hostname, address.port, 120)
            connections.append(local.connection)
        started = time.perf_counter()
        local.connection.request("POST", address.path, body, {"Content-Type": "application/json"})
        response = local.connection.getresponse()
        payload = response.read()
        if response.status != 200:
            raise RuntimeError(f"{url} answered HTTP {response.status}: {payload[:300]!r}")
        return time.perf_counter() - started, json.loads(payload)

    started = time.perf_counter()
    try:
        with ThreadPoolExecutor(clients) as pool:
            results = list(pool.map(send, bodies))
    finally:
        for connection in connections:
            connection.close()
    wall = time.perf_counter() - started
    return [r[0] for r in results], wall, [r[1] for r in results]


def request_bodies(model, count: int, history: int, candidates: int) -> list[bytes]:
    """`count` request bodies (seeded): a history of `history` distinct items with random
    ratings and `candidates` random candidates each, from `model`'s catalogue."""
    rng = np.random.default_rng(0)
    bodies = []
    for user in range(count):
        request = {
            "history": {
                "items": rng.choice(model.catalogue, history, replace=False).tolist(),
                "ratings": rng.choice(model.levels, history).tolist(),
            },
            "candidates": rng.choice(model.catalogue, candidates).tolist(),
            "user_id": f"user{user}",
        }
        bodies.append(json.dumps(request).encode())
    return bodies


def run(options: list[str]) -> tuple[str, list, dict]:
    parser = argparse.ArgumentParser(prog="melo-dist bench serve")
    parser.add_argument("--checkpoint", help="default: a small SASRec model on synthetic data")
    parser.add_argument("--data", help="the checkpoint's prepared dataset (default: its own)")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--requests", type=int, default=400, help="requests per load")
    parser.add_argument("--history", type=int, default=30)
    parser.add_argument("--candidates", type=int, default=100)
    parser.add_argument("--max-batch-size", type=int, default=MAX_BATCH_SIZE)
    parser.add_argument("--batch-wait-ms", type=float, default=BATCH_WAIT_MS)
    parser.add_argument("--threads", type=int, default=2, help="torch threads of the replica")
    args = parser.parse_args(options)
    from ray import serve

    from melo_dist.inference.model import ColdStartModel
    from melo_dist.inference.serve import build_app, free_port, serving

    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = args.checkpoint or str(train_small_model(Path(tmp)))
        model = ColdStartModel.load(checkpoint, args.data)
        bodies = request_bodies(model, args.requests, args.history, args.candidates)
        port = free_port()
        url = f"http://127.0.0.1:{port}/predict"
        results = {}
        with serving("127.0.0.1", port):
            for batch, loads in (
                (1, [("one at a time", args.clients)]),
                (args.max_batch_size, [("batched", args.clients), ("single user", 1)]),
            ):
                app = build_app(
                    checkpoint,
                    args.data,
                    max_batch_size=batch,
                    batch_wait_ms=args.batch_wait_ms,
                    cpus_per_replica=0,
                    threads=args.threads,
                )
                serve.run(app, name="melo-dist-bench", route_prefix="/")
                for mode, clients in loads:
                    if mode == "single user":  # after the batched load's peak has passed
                        time.sleep(PEAK_WINDOW_S)
                    load(url, bodies[: max(4, clients)], clients)  # warm up
                    results[mode] = load(url, bodies, clients)
    table, figures = [], {}
    for mode, (latencies, wall, replies) in results.items():
        p50, p99 = np.percentile(latencies, [50, 99]) * 1000
        throughput = len(latencies) / wall
        compute = np.median([r["compute_ms"] for r in replies])  # a request's batch, on the replica
        table.append(
            (
                mode,
                f"p50 {p50:7.1f} ms  p99 {p99:7.1f} ms  {throughput:6.1f} requests/s  "
                f"mean batch {np.mean([r['batch_size'] for r in replies]):.1f}  "
                f"batch compute p50 {compute:5.1f} ms",
            )
        )
        key = mode.replace(" ", "_")
        figures.update(
            {
                f"p50_ms_{key}": round(p50, 2),
                f"p99_ms_{key}": round(p99, 2),
                f"requests_per_s_{key}": round(throughput, 2),
                f"compute_ms_{key}": round(float(compute), 2),
            }
        )
    figures["p50_ms"] = figures["p50_ms_single_user"]
    figures["p99_ms"] = figures["p99_ms_batched"]
    figures["requests_per_s"] = figures["requests_per_s_batched"]
    figures["batching_speedup"] = round(
        figures["requests_per_s_batched"] / figures["requests_per_s_one_at_a_time"], 2
    )
    # the batched inner loop alone: replica time per user, one at a time over batched
    batched = results["batched"][2]
    per_user_batched = np.median([r["compute_ms"] / r["batch_size"] for r in batched])
    figures["compute_speedup"] = round(
        figures["compute_ms_one_at_a_time"] / float(per_user_batched), 2
    )
    table.append(
        (
            "",
            f"batching: {figures['batching_speedup']:.2f}x the requests/s of one at a "
            f"time; the replica's compute per user {figures['compute_speedup']:.2f}x",
        )
    )
    title = (
        f"bench serve: {args.requests} requests per load over loopback HTTP, histories of "
        f"{args.history}, {args.candidates} candidates, {args.clients} clients, one replica "
        f"with {args.threads} torch thread(s); checkpoint {args.checkpoint or DEFAULT_MODEL}"
    )
    return title, table, figures
