"""Ray Tune glue for sweeps: Optuna's seeded TPE proposes, ASHA stops trials whose validation
RMSE trails, and every trial is a full distributed training run (a trial function that builds
and fits the `TorchTrainer`, reporting through `TuneReportCallback`). An interrupted sweep
resumes with `Tuner.restore`; finished trials are kept, unfinished ones continue from their
last checkpoint. Nothing algorithmic lives here.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import pandas as pd
import pyarrow.fs
import ray
from ray import tune
from ray.tune.integration.ray_train import CHECKPOINT_PATH_KEY, TuneReportCallback
from ray.tune.schedulers import ASHAScheduler
from ray.tune.search.optuna import OptunaSearch
from ray.util.state import list_nodes
from ray.util.state.exception import RayStateApiException

from melo_dist.data.dataset import load_dataset
from melo_dist.distributed.train import DATA_CPUS, build_trainer, connect
from melo_dist.errors import InputError
from melo_dist.runtime import log
from melo_dist.sweeps.outputs import TrialRecord
from melo_dist.sweeps.space import Distribution, SweepSpace

METRIC = "valid_rmse"
SWEEP_FILE = "melo-sweep.json"  # what the experiment's sweep is: a resume must match it


class SweepInterrupted(Exception):
    """Tune stopped before every trial finished (Ctrl+C, SIGUSR1); its state is saved."""


def run_trial(params: dict, space: SweepSpace, out: str, storage: str | None) -> None:
    """One trial: the sweep's base config with these parameters, trained on Ray Train. Its
    checkpoints stay in Ray Train's storage (results.csv names the last): Tune may stop the
    trial as soon as its last result is in, so nothing is copied after `fit`."""
    trial_id = tune.get_context().get_trial_id()
    config = space.trial_config(params, Path(out) / "trials" / trial_id)
    build_trainer(
        config,
        space.trial.workers,
        cpus_per_worker=space.trial.cpus_per_worker,
        use_gpu=space.trial.use_gpu,
        storage_path=f"{storage}/{Path(out).name}-trials" if storage else f"{out}/trials",
        max_failures=space.trial.max_failures,
        callbacks=[TuneReportCallback()],
    ).fit()


def domain(dist: Distribution) -> tune.search.sample.Domain:
    low, high = dist.values[0], dist.values[-1]
    if dist.kind == "choice":
        return tune.choice(dist.values)
    if dist.kind == "uniform":
        return tune.uniform(low, high)
    if dist.kind == "loguniform":
        return tune.loguniform(low, high)
    return tune.randint(low, high + 1)  # the space's randint includes its high end


def trial_cpus(space: SweepSpace) -> float:
    return space.trial.driver_cpus + space.trial.workers * space.trial.cpus_per_worker


def check_fits(space: SweepSpace) -> None:
    """A trial bigger than the cluster would wait forever, unless an autoscaler adds nodes."""
    resources = ray.cluster_resources()
    gpus = space.trial.workers if space.trial.use_gpu else 0
    if trial_cpus(space) <= resources.get("CPU", 0.0) and gpus <= resources.get("GPU", 0.0):
        return
    message = (
        f"a trial needs {trial_cpus(space):g} CPUs"
        + (f" and {gpus} GPUs" if gpus else "")
        + f"; the cluster has {resources.get('CPU', 0.0):g} CPUs and "
        f"{resources.get('GPU', 0.0):g} GPUs now"
    )
    if not space.trial.wait_for_nodes:
        raise InputError(
            f"{message}: lower trial.workers / trial.cpus_per_worker with --set, or set "
            "trial.wait_for_nodes=true on a cluster that autoscales"
        )
    log(f"{message}: trials wait for the autoscaler to add nodes")


def concurrency(space: SweepSpace) -> int:
    """Trials that fit the cluster at once (a trial: its driver plus its workers)."""
    if space.trial.concurrent:
        return space.trial.concurrent
    resources = ray.cluster_resources()
    fits = int((resources.get("CPU", 1.0) - DATA_CPUS) // trial_cpus(space))
    if space.trial.use_gpu:
        fits = min(fits, int(resources.get("GPU", 0) // space.trial.workers))
    return max(1, fits)


class TrialLines(tune.Callback):
    """One console line per finished trial (Tune's own status tables only with --verbose)."""

    def __init__(self, trials: int) -> None:
        self.trials, self.ended = trials, 0

    def line(self, trial: tune.experiment.Trial, outcome: str) -> None:
        self.ended += 1
        result = trial.last_result or {}
        best = result.get("best_valid_rmse")
        text = f"trial {self.ended}/{self.trials} {trial.trial_id} {outcome}"
        if best is not None:
            text += f": best valid RMSE {best:.4f}, {result.get('iteration')} iterations run"
        log(text)

    def on_trial_complete(self, iteration: int, trials: list, trial, **info) -> None:
        self.line(trial, "finished")

    def on_trial_error(self, iteration: int, trials: list, trial, **info) -> None:
        self.line(trial, "errored")


def build_tuner(
    space: SweepSpace, trials: int, out: Path, storage: str | None, verbose: bool = False
) -> tune.Tuner:
    trainable = tune.with_resources(
        tune.with_parameters(run_trial, space=space, out=str(out), storage=storage),
        {"cpu": space.trial.driver_cpus, "gpu": 0},
    )
    path = experiment_path(out, storage)
    if tune.Tuner.can_restore(path):
        return tune.Tuner.restore(path, trainable, resume_unfinished=True, resume_errored=False)
    searcher = OptunaSearch(
        metric=METRIC, mode="min", seed=space.seed, points_to_evaluate=space.initial or None
    )
    scheduler = ASHAScheduler(
        time_attr="iteration",
        metric=METRIC,
        mode="min",
        max_t=space.max_iterations,
        grace_period=space.grace_iterations,
        reduction_factor=space.scheduler.reduction_factor,
    )
    return tune.Tuner(
        trainable,
        param_space={key: domain(dist) for key, dist in space.search.items()},
        tune_config=tune.TuneConfig(
            trial_dirname_creator=trial_folder,
            search_alg=searcher,
            scheduler=scheduler,
            num_samples=trials,
            max_concurrent_trials=concurrency(space),
        ),
        run_config=tune.RunConfig(
            name=out.name,  # no timestamp: a re-run finds the sweep and resumes it
            storage_path=path.rsplit("/", 1)[0],
            failure_config=tune.FailureConfig(max_failures=0, fail_fast=False),
            verbose=2 if verbose else 0,
            callbacks=[TrialLines(trials)],
        ),
    )


def require_dashboard(wait_s: float = 20.0) -> None:
    """Sweeps need the dashboard: a finished trial's Ray Train worker reservation is released
    through its state API, and without it the next trial waits forever for CPUs (DESIGN §4).
    The state API is asked at the connected cluster's address: left to guess, it refuses to
    choose when another Ray instance runs on the machine."""
    deadline = time.monotonic() + wait_s
    address = ray.get_runtime_context().gcs_address
    while True:
        try:
            list_nodes(address=address, limit=1, timeout=10)
            return
        except RayStateApiException as error:
            if time.monotonic() > deadline:  # it may still be starting: retry a little first
                raise InputError(
                    "this Ray cluster has no dashboard, which sweeps need to release each "
                    "trial's workers (start it with the dashboard: `ray start --head "
                    f"--include-dashboard=true`, ray[default]); the state API said: {error}"
                ) from None
            time.sleep(1.0)


def experiment_path(out: Path, storage: str | None) -> str:
    """Where Tune keeps the sweep's state: `storage` (shared, on a cluster) or `out/ray`."""
    return f"{storage or out / 'ray'}/{out.name}"


def sweep(
    space: SweepSpace,
    trials: int,
    out: str | Path,
    storage: str | None = None,
    verbose: bool = False,
) -> list[TrialRecord]:
    """Run (or resume) the sweep, joining or starting Ray once the inputs are checked;
    returns one `TrialRecord` per trial. `verbose`: Tune's status tables and Ray's logs too."""
    out = Path(out).resolve()
    if storage and "://" not in storage:  # trials run in their own folders: no relative paths
        storage = str(Path(storage).resolve())
    storage = storage.rstrip("/") if storage else None
    # the sweep as written (not its resolved paths): a resume from another folder is the same
    identity = json.loads(
        json.dumps({"space": {**space.to_dict(), "path": None}, "trials": trials})
    )
    space = space.resolved()
    if trials < len(space.initial):
        raise InputError(
            f"{trials} trials cannot run the space's {len(space.initial)} initial points"
        )
    load_dataset(space.base_config.data)  # fail now, not in N trials
    space.base_config.check_training()
    path = experiment_path(out, storage)
    filesystem, folder = pyarrow.fs.FileSystem.from_uri(path)
    marker = f"{folder}/{SWEEP_FILE}"  # beside Tune's state, so a shared --storage is checked too
    if filesystem.get_file_info(marker).type == pyarrow.fs.FileType.File:
        with filesystem.open_input_stream(marker) as stream:
            if json.loads(stream.read()) != identity:
                raise InputError(
                    "holds a different sweep (space or trial count); choose another --out",
                    path=path,
                )
    elif tune.Tuner.can_restore(path):
        raise InputError("holds a Tune experiment that is not a melo-dist sweep", path=path)

    connect(verbose)
    require_dashboard()
    check_fits(space)
    tuner = build_tuner(space, trials, out, storage, verbose)
    filesystem.create_dir(folder)
    with filesystem.open_output_stream(marker) as stream:
        stream.write(json.dumps(identity, indent=1).encode())
    grid = tuner.fit()
    # After Ctrl+C, Tune returns normally; the state it saved tells what is still unfinished.
    saved = tune.ExperimentAnalysis(grid.experiment_path, storage_filesystem=grid.filesystem)
    ended = sum(trial.status in ("TERMINATED", "ERROR") for trial in saved.trials)
    if ended < trials:
        raise SweepInterrupted(
            f"sweep interrupted with {ended} of {trials} trials finished; "
            "run the same command again to resume it"
        )
    return [trial_record(result, space) for result in grid]


def trial_folder(trial: tune.experiment.Trial) -> str:
    """`trial-<launch number>-<trial id>`: Tune numbers trials from 1 in its experiment tag,
    and its result grid does not keep launch order after a restore."""
    return f"trial-{trial.experiment_tag.split('_', 1)[0]}-{trial.trial_id}"


def trial_record(result: tune.Result, space: SweepSpace) -> TrialRecord:
    """What the sweep's outputs need from one Tune result, errored or not."""
    _, launch, trial_id = Path(result.path).name.split("-", 2)
    with result.filesystem.open_input_stream(f"{result.path}/params.json") as stream:
        params = json.loads(stream.read())  # Tune writes it when the trial starts
    history = result.metrics_dataframe
    if history is not None and METRIC in history:
        history = history[["iteration", METRIC]].dropna().reset_index(drop=True)
    else:
        history = pd.DataFrame({"iteration": [], METRIC: []})
    error = None
    if result.error is not None:
        lines = [line for line in str(result.error).splitlines() if line.strip()]
        error = lines[-1] if lines else type(result.error).__name__
    reached = int(history["iteration"].max()) if len(history) else 0
    if error:
        status = "errored"
    else:
        target = space.trial_config(params, out="-").optim.iterations
        status = "completed" if reached >= target else "stopped early"  # by ASHA
    best = float(history[METRIC].min()) if len(history) else math.nan
    return TrialRecord(
        trial=trial_id,
        number=int(launch) - 1,
        status=status,
        best_valid_rmse=best,
        iterations=reached,
        params={key: params[key] for key in space.search},
        history=history,
        error=error,
        checkpoint=result.metrics.get(CHECKPOINT_PATH_KEY, ""),
    )
