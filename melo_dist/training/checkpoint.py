"""Checkpoints: one plain dict, written atomically, loaded with `weights_only=True`.

It holds the learner (backbone, weight net, inner learning rates), the optimiser and scheduler
states, the iteration, the best validation RMSE, the local sampler's position, the config and
the SHA-256 of the dataset manifest it was trained on. There is no RNG state to save: task
windows and dropout masks are drawn from seeds derived from (run seed, iteration, rank).
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path

import torch

from melo_dist.errors import InputError

LAST, BEST = "last.pt", "best.pt"


def manifest_hash(data_dir: str | Path) -> str:
    return hashlib.sha256((Path(data_dir) / "manifest.json").read_bytes()).hexdigest()


def save_checkpoint(path: str | Path, state: dict) -> None:
    """Write to a temporary file in the same folder, then rename: never a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(handle)
    try:
        torch.save(state, tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_checkpoint(path: str | Path) -> dict:
    path = Path(path)
    if path.is_dir():
        path = path / BEST if (path / BEST).exists() else path / LAST
    if not path.is_file():
        raise InputError("checkpoint not found", path=path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # unpickling errors come in many types; name the file
        raise InputError(f"not a melo-dist checkpoint: {error}", path=path) from None
