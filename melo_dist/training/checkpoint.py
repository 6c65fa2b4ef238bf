"""A run folder: checkpoints (`last.pt`, `best.pt`) and the metrics record (`metrics.jsonl`).

A checkpoint is one plain dict, written atomically and loaded with `weights_only=True`: the
learner (backbone, weight net, inner learning rates), the optimiser and scheduler states, the
iteration, the best validation RMSE, the config and the SHA-256 of the dataset manifest it was
trained on. There is no RNG or sampler state to save: batches, task windows and dropout masks
are drawn from seeds derived from (run seed, iteration, rank).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch
import yaml

from melo_dist.config import Config
from melo_dist.errors import InputError
from melo_dist.runtime import log
from melo_dist.storage import (
    exists,
    fetched_file,
    is_uri,
    local_dataset,
    local_folder,
    normalised,
    write_atomically,
)

LAST, BEST, METRICS = "last.pt", "best.pt", "metrics.jsonl"
CONFIG = "config.yaml"  # the resolved config of the run, written when it starts
RESOURCE_KEYS = ("path", "out", "threads")  # where and with what a run runs, not what it learns


def manifest_hash(data_dir: str | Path) -> str:
    return hashlib.sha256((local_dataset(data_dir) / "manifest.json").read_bytes()).hexdigest()


def save_checkpoint(path: str | Path, state: dict) -> None:
    write_atomically(path, lambda stream: torch.save(state, stream))


def write_config(out: str | Path, config: dict) -> None:
    """The run's resolved config (`Config.to_dict()`) as `out/config.yaml`: what it trains
    with, every default included. Written after the resume check, so a refused run leaves the
    folder's own file alone."""
    text = yaml.safe_dump(config, sort_keys=False).encode()
    write_atomically(Path(out) / CONFIG, lambda stream: stream.write(text))


def checkpoint_path(path: str | Path) -> Path:
    """A checkpoint file, or a run folder's best.pt (last.pt before the first improvement); at a
    URI, the local copy of its run folder's file."""
    if is_uri(path):  # a local copy of the one file
        uri = normalised(str(path))
        if not uri.endswith(".pt"):
            uri = f"{uri}/{BEST if exists(uri, BEST) else LAST}"
        return fetched_file(uri)
    path = Path(path)
    if path.is_dir():
        return path / BEST if (path / BEST).exists() else path / LAST
    return path


def load_checkpoint(path: str | Path) -> dict:
    """The state of a checkpoint file or run folder (`checkpoint_path`), local or at a URI."""
    path = checkpoint_path(path)
    if not path.is_file():
        raise InputError("checkpoint not found", path=path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # unpickling errors come in many types; name the file
        raise InputError(f"not a melo-dist checkpoint: {error}", path=path) from None


def resumable_state(out: str | Path, config: dict) -> dict | None:
    """The last checkpoint of the run in `out` (a URI: in its checked-out working copy), if
    any. A folder whose checkpoint or config.yaml is of another config is refused, naming
    `out`: config.yaml covers a run stopped before its first checkpoint reached the folder."""
    folder = local_folder(out)
    if (folder / LAST).exists():
        state = load_checkpoint(folder / LAST)
        refuse_other_config(state["config"], config, out)
        return state
    if (folder / CONFIG).exists():
        refuse_other_config(read_config(folder / CONFIG), config, out)
    return None


def refuse_other_config(saved: dict, config: dict, out: str | Path) -> None:
    """An InputError naming `out` and the first learning setting that differs. The saved
    config gets today's defaults for keys it predates (their old behaviour)."""
    saved = learning_settings(Config.from_dict(saved, source=str(out)).to_dict())
    for section, values in learning_settings(config).items():
        for key, value in values.items():
            before = saved.get(section, {}).get(key)
            if before != value:
                raise InputError(
                    f"holds a run with a different config ({section}.{key} was {before!r}, "
                    f"now {value!r}); choose another run.out, or delete the folder to start over",
                    path=out,
                )


def read_config(path: Path) -> dict:
    try:
        saved = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        raise InputError(f"is not a run's config: {error}", path=path) from None
    if not isinstance(saved, dict):
        raise InputError("is not a run's config", path=path)
    return saved


def learning_settings(config: dict) -> dict:
    """The settings a resumed run must share: all but where and with what it runs (paths may
    move; the dataset itself is checked by its manifest hash). The initialising checkpoint is
    compared by where it is, however it was written."""
    settings = {
        section: {k: v for k, v in values.items() if k not in RESOURCE_KEYS}
        for section, values in config.items()
    }
    start = settings.get("run", {}).get("init_from")
    if start:
        settings["run"]["init_from"] = (
            normalised(start) if is_uri(start) else str(Path(start).resolve())
        )
    return settings


def append_metrics(out: Path, record: dict) -> None:
    """Append one record and fsync it. The trainer appends before it writes the checkpoint, and
    a resume drops records past its checkpoint: after a crash the two always agree."""
    with open(out / METRICS, "a") as handle:
        handle.write(json.dumps(record) + "\n")
        handle.flush()
        os.fsync(handle.fileno())


def read_metrics(out: Path) -> list[dict]:
    """The run's records. A torn last line (a crash mid-append) is dropped with a warning; a
    bad line elsewhere is an error naming it."""
    lines = (out / METRICS).read_text().splitlines()
    records = []
    for number, line in enumerate(lines, 1):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if number < len(lines):
                raise InputError(
                    "is not a metrics record", path=out / METRICS, line=number
                ) from None
            log(f"{out / METRICS}:{number}: dropping a torn last line (the run was interrupted)")
    return records


def best_record(out: Path) -> dict:
    return min(read_metrics(out), key=lambda record: record["valid_rmse"])


def agree_with_checkpoint(out: Path, state: dict | None) -> None:
    """Before training into `out` from `state` (None: from the start), undo what a crash
    between a run's writes left: metric records past the checkpoint are dropped (the iterations
    will be trained again), and a best.pt left behind by a crash between an improving record's
    last.pt and best.pt is made last.pt's state."""
    iteration = 0 if state is None else state["iteration"]
    if not (out / METRICS).exists():
        return
    kept = [r for r in read_metrics(out) if r["iteration"] <= iteration]
    text = "".join(json.dumps(r) + "\n" for r in kept)
    write_atomically(out / METRICS, lambda stream: stream.write(text.encode()))
    if state is None or not kept or min(kept, key=lambda r: r["valid_rmse"]) is not kept[-1]:
        return
    if not (out / BEST).exists() or load_checkpoint(out / BEST)["iteration"] != iteration:
        save_checkpoint(out / BEST, state)
