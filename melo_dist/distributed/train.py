"""Ray glue for meta-training: Ray Data shards the training users, a TorchTrainer runs the shared
training loop (`melo_dist.training.loop.train`) on every worker, and gradients are averaged with
one flat all-reduce.

No DDP wrapper: `torch.func` and DDP do not mix (DESIGN §3). Every rank starts from the same
parameters (same seed), takes the same steps and applies the same averaged gradients, so the
ranks stay identical. Nothing algorithmic lives here.
"""

from __future__ import annotations

import hashlib
import shutil
import tempfile
import threading
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from queue import Empty
from typing import Any

import ray
import ray.data  # imported here: its log handlers exist before hide_ray_notices filters them
import ray.train
import torch
import torch.distributed as dist
from ray.train import Checkpoint, CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer, get_device
from ray.util.queue import Queue
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from melo_dist.config import Config
from melo_dist.console import hide_ray_notices
from melo_dist.data.dataset import load_dataset
from melo_dist.data.sampler import training_batch
from melo_dist.data.seeds import derive_seed
from melo_dist.data.tasks import TaskBatch, TaskRows
from melo_dist.errors import InputError
from melo_dist.runtime import log, prepare_process
from melo_dist.storage import (
    checked_out,
    is_uri,
    local_folder,
    normalised,
    publish,
    subfolders,
    write_atomically,
)
from melo_dist.training.checkpoint import (
    BEST,
    LAST,
    METRICS,
    best_record,
    load_checkpoint,
    refuse_other_config,
    resumable_state,
    write_config,
)
from melo_dist.training.loop import StopRequest, train
from melo_dist.training.run import TrainingRun

ROWS = ["user_id", "item_id", "rating"]
RAY_CHECKPOINTS = "ray-checkpoints"  # Ray Train's storage inside run.out, unless --storage
DATA_CPUS = 0.5  # left free beside the training workers, for Ray Data and the controller


def distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def average(grads: dict[str, torch.Tensor], loss: torch.Tensor) -> tuple[dict, float]:
    """Mean over ranks of every gradient and the loss, in one flat all-reduce."""
    names = list(grads)
    flat = torch.cat([grads[n].reshape(-1) for n in names] + [loss.reshape(1)])
    if distributed():
        dist.all_reduce(flat)
        flat /= dist.get_world_size()
    out, offset = {}, 0
    for name in names:
        size = grads[name].numel()
        out[name] = flat[offset : offset + size].view_as(grads[name])
        offset += size
    return out, float(flat[-1])


def in_lockstep(batches: Iterable[dict], device: torch.device) -> Iterator[dict]:
    """Yield batches while every rank still has one; all ranks stop together.

    Ray Data's equal split makes shards equal, but a rank that ran out while another still
    had a batch would wait forever in the gradient all-reduce. One tiny MIN all-reduce per
    step makes that impossible whatever the shard sizes.
    """
    iterator = iter(batches)
    while True:
        batch = next(iterator, None)
        if distributed():
            have = torch.tensor([0 if batch is None else 1], device=device)
            dist.all_reduce(have, op=dist.ReduceOp.MIN)
            if have.item() == 0:
                return
        elif batch is None:
            return
        yield batch


def on_this_node() -> NodeAffinitySchedulingStrategy:
    """For the driver's helper actors: on its node they live as long as the run, whichever
    worker node is lost."""
    return NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)


@ray.remote(num_cpus=0)
class StopFlag:
    """Set by the driver to stop the run after the current iteration (a signal, or
    --max-minutes); rank 0 reads it every iteration."""

    def __init__(self) -> None:
        self.stopping = False

    def set(self) -> None:
        self.stopping = True

    def get(self) -> bool:
        return self.stopping


def stop_consensus(flag: Any, rank: int, device: torch.device) -> Callable[[], bool]:
    """Whether to stop now: rank 0 asks the driver's flag and every rank learns its answer (one
    tiny broadcast), so all ranks stop after the same iteration; without a flag, never."""

    def stop() -> bool:
        asked = torch.tensor([rank == 0 and ray.get(flag.get.remote())], device=device)
        if distributed():
            dist.broadcast(asked, src=0)
        return bool(asked.item())

    return stop if flag is not None else lambda: False


def train_loop_per_worker(loop_config: dict) -> None:
    """One Ray Train worker: the shared training loop on this rank's shard, gradients averaged
    across ranks; rank 0 validates and writes the checkpoint files, every rank reports."""
    config = Config.from_dict(loop_config["config"])
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    prepare_process(config.run.threads)
    run = TrainingRun(config, load_dataset(config.data), rank=rank, device=get_device())
    # rank 0's checkpoint files (Ray copies them to its storage at each report)
    with tempfile.TemporaryDirectory(prefix="melo-checkpoint-") as staging:
        train_rank(run, loop_config, Path(staging), world)


def train_rank(run: TrainingRun, loop_config: dict, staging: Path, world: int) -> None:
    """This rank's part of the run, from Ray's latest checkpoint if there is one."""
    config, rank = run.config, run.rank
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as folder:
            shutil.copytree(folder, staging, dirs_exist_ok=True)
        run.load_state_dict(load_checkpoint(staging / LAST))
    resumed_from = run.iteration  # reported: shows a restart continued, not started over

    def save(losses: list[float], seconds: float) -> dict | None:
        if rank != 0:
            # a barrier: every rank reports (what every rank knows, whichever one Ray keeps)
            ray.train.report({"iteration": run.iteration, "resumed_from": resumed_from})
            return None
        record = run.checkpoint(staging, losses, seconds)
        report = {**record, "resumed_from": resumed_from}
        ray.train.report(report, checkpoint=Checkpoint.from_directory(str(staging)))
        publish(config.run.out, log)  # a URI: rank 0's TensorBoard events, written beside it
        return record

    shard = ray.train.get_dataset_shard("train")
    shard_users = loop_config["users"] // world + 1  # Ray Data's split: equal shards
    batches = shard_batches(run, shard, config.meta.tasks_per_batch // world, shard_users)
    queue = loop_config.get("progress")  # the driver's progress line, if it shows one
    stop = stop_consensus(loop_config.get("stop"), rank, run.device)
    if rank != 0:
        train(run, batches, save, reduce=average, log=lambda message: None, stop=stop)
    elif queue is None:
        train(run, batches, save, reduce=average, log=log, stop=stop)
    else:
        train(run, batches, save, reduce=average, progress=queue.put, stop=stop)
    if rank == 0:
        publish(config.run.out, log)  # the events written out when training closed


def shard_batches(
    run: TrainingRun, shard: Any, per_rank: int, shard_users: int
) -> Iterator[TaskBatch]:
    """Endless epochs over this rank's Ray Data shard, `per_rank` users a batch, in lockstep
    with the other ranks; windows seeded by the iteration, as in local training. Each epoch
    reads the shard in a new seeded order: the shuffle buffer holds the whole shard (one small
    row per user)."""
    config = run.config
    epoch = 0
    while True:
        rows = shard.iter_batches(
            batch_size=per_rank,
            batch_format="numpy",
            drop_last=True,
            local_shuffle_buffer_size=max(shard_users, per_rank),
            local_shuffle_seed=derive_seed(config.run.seed, epoch, run.rank),
        )
        empty = True
        for users in in_lockstep(rows, run.device):
            empty = False
            tasks = TaskRows.from_lists(users["user_id"], users["item_id"], users["rating"])
            yield training_batch(tasks, run.data.spec, config.run.seed, run.iteration)
        if empty:
            raise InputError(
                f"the training shards hold fewer than {per_rank} users per worker; "
                "use fewer workers or a smaller meta.tasks_per_batch"
            )
        epoch += 1


def training_users(tables: str, seed: int) -> ray.data.Dataset:
    """The training users in a seeded global random order (the table is sorted by user id;
    each rank's per-epoch shuffle buffer alone would leave its batches of neighbouring ids).
    One row per user: small. Materialised before the workers take their CPUs, so the read
    never waits for resources the training workers hold."""
    ray.data.DataContext.get_current().enable_progress_bars = False
    users = ray.data.read_parquet(tables).select_columns(ROWS)
    return users.random_shuffle(seed=seed).materialize()


def trainer_name(out: str) -> str:
    """The Ray Train run name of the run folder `out` (absolute, or a URI): its last component
    and a hash of all of it, so runs called `run` in two folders never share checkpoints under
    one --storage, and a restarted run finds its own."""
    return f"{out.rstrip('/').rsplit('/', 1)[-1]}-{hashlib.sha256(out.encode()).hexdigest()[:8]}"


def default_cpus_per_worker(workers: int) -> float:
    """One CPU a worker on a cluster this process joined (RAY_ADDRESS, `ray job submit`, an
    address, or one Ray found running on this machine): an autoscaling cluster's size at submit
    time says nothing (an empty one would give 0.25). On a local instance this process started,
    what fits beside half a CPU for Ray Data (at most 1)."""
    if not started_here():
        return 1.0
    cpus = ray.cluster_resources().get("CPU", 1.0)
    return max(0.25, min(1.0, (cpus - DATA_CPUS) / workers))


def started_here() -> bool:
    """Whether `ray.init` in this process started the instance it is connected to. Ray has no
    public call for it; its node object is the head only when this process launched it."""
    node = ray._private.worker._global_node
    return node is not None and node.head


def build_trainer(
    config: Config,
    workers: int,
    *,
    cpus_per_worker: float | None = None,
    use_gpu: bool = False,
    storage_path: str | None = None,
    max_failures: int = 0,
    callbacks: list | None = None,
    progress: Queue | None = None,
    stop: Any = None,
) -> TorchTrainer:
    """The TorchTrainer of one distributed run, named after the full path of config.run.out (no
    timestamp, so a restarted run finds its checkpoints; two runs called `run` in different
    folders never share them). Ray's checkpoints go under `storage_path`, by default inside
    run.out, so deleting a run folder starts that run over. A run folder or Ray checkpoint of
    another config is refused, as in-process training refuses it. `callbacks`: Ray Train
    callbacks (a Tune trial passes `TuneReportCallback`). `progress`: a queue rank 0 puts its
    progress events on, for the driver to show. `stop`: a `StopFlag` the ranks stop on."""
    config.check_training()
    config.check_workers(workers)
    if use_gpu and started_here():  # Ray would wait forever for GPUs this machine lacks
        gpus = ray.cluster_resources().get("GPU", 0)
        if gpus < workers:
            raise InputError(
                f"--use-gpu: the local Ray instance has {gpus:g} GPU(s) for {workers} "
                "worker(s), one each; use fewer workers, or leave --use-gpu out"
            )
    config = Config.from_dict(config.to_dict())  # paths are made absolute below: work on a copy
    # workers may run elsewhere in the file system: give them absolute paths (URIs stay)
    if not is_uri(config.data.path) and Path(config.data.path).exists():
        config.data.path = str(Path(config.data.path).resolve())
    if not is_uri(config.run.out):  # rank 0 writes TensorBoard events there
        config.run.out = str(Path(config.run.out).resolve())
    if config.run.init_from and Path(config.run.init_from).exists():
        config.run.init_from = str(Path(config.run.init_from).resolve())
    load_dataset(config.data)  # fail here, with a clear message, not in a worker
    out = config.run.out
    name = trainer_name(out)
    if storage_path and not is_uri(storage_path):
        storage_path = str(Path(storage_path).resolve())
    storage = normalised(storage_path or f"{out}/{RAY_CHECKPOINTS}")
    checked_out(out)  # the files of an earlier run, in-process or Ray
    resumable_state(out, config.to_dict())
    earlier = subfolders(f"{storage}/{name}", "checkpoint_")  # Ray's own, local or at a URI
    if earlier:
        refuse_other_config(
            load_checkpoint(f"{earlier[-1]}/{LAST}")["config"], config.to_dict(), out
        )
    tables = f"{config.data.path.rstrip('/')}/tasks-train.parquet"  # Ray Data reads URIs too
    train = training_users(tables, config.run.seed)
    if train.count() < config.meta.tasks_per_batch:
        raise InputError(
            f"{train.count()} training users cannot fill a meta-batch of "
            f"{config.meta.tasks_per_batch} tasks",
            path=tables,
        )
    if cpus_per_worker is None:
        cpus_per_worker = default_cpus_per_worker(workers)
    config.run.threads = max(1, round(cpus_per_worker))  # Ray sets 1 thread; use the CPUs given
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={
            "config": config.to_dict(),
            "progress": progress,
            "stop": stop,
            "users": train.count(),
        },
        scaling_config=ScalingConfig(
            num_workers=workers, use_gpu=use_gpu, resources_per_worker={"CPU": cpus_per_worker}
        ),
        run_config=RunConfig(
            name=name,
            storage_path=storage,
            failure_config=FailureConfig(max_failures=max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
            callbacks=callbacks,
        ),
        datasets={"train": train},
    )


def fit(
    config: Config,
    workers: int,
    progress: Callable[[dict], None] | None = None,
    max_minutes: float | None = None,
    **settings: Any,
) -> dict:
    """Meta-train on Ray (`settings`: those of `build_trainer`); copies the final checkpoint
    files into config.run.out and returns the best validation record, with `resumed_from`: the
    iteration the last worker group started from (> 0 after a recovery or a resume).
    `progress` gets rank 0's progress events, in this process, while the workers train.
    As in-process: SIGINT/SIGTERM (in the main thread) and `max_minutes` stop the workers after
    the current iteration with its checkpoint written; a signal then raises `Interrupted`."""
    stop = StopRequest(max_minutes)
    flag = StopFlag.options(scheduling_strategy=on_this_node()).remote()
    try:
        with forwarded(progress) as queue:
            trainer = build_trainer(config, workers, progress=queue, stop=flag, **settings)
            write_config(local_folder(config.run.out), config.to_dict())
            publish(config.run.out)  # a later submit with another config is refused by it
            main_thread = threading.current_thread() is threading.main_thread()
            with stop.signals() if main_thread else nullcontext():
                result = fit_until(trainer, stop, flag)
    finally:
        ray.kill(flag)
    if result.checkpoint is None:
        raise RuntimeError(f"training finished without a checkpoint: {result.error}")
    out = local_folder(config.run.out)
    with result.checkpoint.as_directory() as folder:
        for name in (METRICS, LAST, BEST):  # the record first, as the trainer writes them
            if (Path(folder) / name).exists():
                content = (Path(folder) / name).read_bytes()
                write_atomically(out / name, lambda stream, data=content: stream.write(data))
    publish(config.run.out)
    stop.conclude(result.metrics["iteration"], config.optim.iterations, config.run.out, log)
    return {**best_record(out), "resumed_from": result.metrics.get("resumed_from", 0)}


def fit_until(trainer: TorchTrainer, stop: StopRequest, flag: Any) -> Any:
    """`trainer.fit()` in a thread, while this thread turns a stop request (a signal, the
    deadline) into the workers' flag: Ray's own SIGINT handler, which it installs when `fit`
    runs in the main thread, would abort the workers without a checkpoint."""
    outcome: dict[str, Any] = {}

    def run() -> None:
        try:
            outcome["result"] = trainer.fit()
        except BaseException as error:  # re-raised in the main thread
            outcome["error"] = error

    thread = threading.Thread(target=run, name="ray-train-fit", daemon=True)
    thread.start()
    asked = False
    while thread.is_alive():
        thread.join(timeout=0.2)
        if not asked and stop():
            ray.get(flag.set.remote())
            asked = True
    if "error" in outcome:
        raise outcome["error"]
    return outcome["result"]


@contextmanager
def forwarded(progress: Callable[[dict], None] | None) -> Iterator[Queue | None]:
    """A queue for the workers' progress events (None without `progress`): while the block
    runs, a thread hands every event on it to `progress`; what is still queued when the block
    ends is handed on too, and the queue's actor is removed."""
    if progress is None:
        yield None
        return
    queue = Queue(actor_options={"num_cpus": 0, "scheduling_strategy": on_this_node()})
    done = threading.Event()

    def forward() -> None:
        while not done.is_set():
            try:
                progress(queue.get(timeout=0.25))
            except Empty:
                continue

    thread = threading.Thread(target=forward, daemon=True)
    thread.start()
    try:
        yield queue
    finally:
        done.set()
        thread.join()
        while not queue.empty():
            progress(queue.get_nowait())
        queue.shutdown()


def connect(verbose: bool = False) -> None:
    """Join the cluster named by RAY_ADDRESS (or one running on this machine), or start a local
    Ray instance when there is none.
    Unless `verbose`, Ray's INFO logging and its processes' output stay out of this console
    (errors still surface where they are raised)."""
    if not verbose:
        hide_ray_notices()
    if not ray.is_initialized():
        ray.init(log_to_driver=verbose, logging_level="INFO" if verbose else "WARNING")
