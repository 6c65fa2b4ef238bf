"""Where the CPU goes while `melo-dist serve` is under load (Linux: reads /proc).

    .venv/bin/python scripts/serve_cpu.py [CHECKPOINT] [--clients 8] [--requests 400]

Serves CHECKPOINT (default: `bench serve`'s small SASRec model, trained here) one at a time
(max batch 1) and batched (max batch 16), sends the same closed-loop load as `bench serve`
twice each, and prints per request: the machine's busy CPU time, and that of the processes
that used the most (the replica, HAProxy or Serve's HTTP proxy, this client). Busy time
includes torch's threads spinning while they wait for work.
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

import numpy as np
from ray import serve

from melo_dist.bench.serve import load, request_bodies, train_small_model
from melo_dist.inference.model import ColdStartModel
from melo_dist.inference.serve import build_app, free_port, serving

TICKS = os.sysconf("SC_CLK_TCK")


def machine_seconds() -> tuple[float, float]:
    """(all CPU time, idle CPU time) of the machine so far, in seconds."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return sum(fields) / TICKS, (fields[3] + fields[4]) / TICKS


def process_seconds() -> dict[str, float]:
    """CPU seconds so far of every process, by pid and command line."""
    seconds = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            name = Path(f"/proc/{pid}/cmdline").read_text().replace("\0", " ").strip()
        except OSError:  # the process ended meanwhile
            continue
        seconds[f"{pid} {name[:50]}"] = (int(stat[11]) + int(stat[12])) / TICKS
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("checkpoint", nargs="?")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--requests", type=int, default=400)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = args.checkpoint or str(train_small_model(Path(tmp)))
        model = ColdStartModel.load(checkpoint)
        bodies = request_bodies(model, args.requests, 30, 100)
        port = free_port()
        url = f"http://127.0.0.1:{port}/predict"
        with serving("127.0.0.1", port):
            for max_batch in (1, 16):
                app = build_app(checkpoint, max_batch_size=max_batch, cpus_per_replica=0, threads=2)
                serve.run(app, name="serve-cpu", route_prefix="/")
                load(url, bodies[: args.clients], args.clients)  # warm up
                for _ in range(2):
                    (total0, idle0), before = machine_seconds(), process_seconds()
                    latencies, wall, replies = load(url, bodies, args.clients)
                    (total1, idle1), after = machine_seconds(), process_seconds()
                    count = len(latencies)
                    busy = (total1 - total0) - (idle1 - idle0)
                    used = sorted(
                        ((after[k] - before[k], k) for k in after if k in before), reverse=True
                    )
                    print(
                        f"max batch {max_batch}: {count / wall:.1f} requests/s, mean batch "
                        f"{np.mean([r['batch_size'] for r in replies]):.1f}, machine busy "
                        f"{busy / (total1 - total0):.0%}, {busy / count * 1000:.2f} CPU-ms a "
                        "request; "
                        + "; ".join(f"{name}: {s / count * 1000:.2f}" for s, name in used[:4])
                    )


if __name__ == "__main__":
    main()
