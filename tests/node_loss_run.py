"""Run by test_distributed.py in its own process: a two-node local Ray cluster loses the node
that hosts one training worker mid-run; a replacement node joins (as the autoscaler would) and
training completes from the last checkpoint. Usage: python node_loss_run.py DATA_DIR OUT_DIR"""

from __future__ import annotations

import json
import sys
import threading
import time
from pathlib import Path

import ray
from conftest import tiny_config  # this script lives in tests/, beside conftest
from ray.cluster_utils import Cluster
from test_distributed import registered_checkpoints

from melo_dist.distributed.train import RAY_CHECKPOINTS, default_cpus_per_worker, fit


def main(data_dir: str, out: str) -> None:
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    cluster.add_node(num_cpus=1)
    doomed = cluster.add_node(num_cpus=1)
    ray.init(address=cluster.address, log_to_driver=False)
    config = tiny_config(data_dir, out, iterations=8, inner_steps=1)
    outcome: dict = {"joined_cpus_per_worker": default_cpus_per_worker(2)}

    def train() -> None:
        try:  # 0.75 CPU each: the two workers cannot share a 1-CPU node, one runs on `doomed`
            outcome["best"] = fit(config, workers=2, cpus_per_worker=0.75, max_failures=2)
        except BaseException as error:  # re-raised in the main thread
            outcome["error"] = error

    # Ray's node start-up needs the main thread (signal handlers): train in a thread instead.
    trainer = threading.Thread(target=train)
    trainer.start()
    storage = Path(out) / RAY_CHECKPOINTS  # this run's own Ray storage
    while trainer.is_alive() and not registered_checkpoints(storage):
        time.sleep(0.2)
    removed = trainer.is_alive()
    if removed:
        cluster.remove_node(doomed)
        cluster.add_node(num_cpus=1)  # the replacement, as the autoscaler would bring
    trainer.join()
    if "error" in outcome:
        raise outcome["error"]
    records = [json.loads(x) for x in (Path(out) / "metrics.jsonl").read_text().splitlines()]
    iterations = [r["iteration"] for r in records]
    resumed_from = outcome["best"]["resumed_from"]
    summary = {"removed": removed, "iterations": iterations, "resumed_from": resumed_from}
    print(json.dumps({**summary, "joined_cpus_per_worker": outcome["joined_cpus_per_worker"]}))
    ray.shutdown()
    cluster.shutdown()


if __name__ == "__main__":
    main(*sys.argv[1:])
