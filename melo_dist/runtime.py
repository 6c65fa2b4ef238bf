"""Process-wide set-up and the one logging helper every entry point and worker uses."""

from __future__ import annotations

import signal
import sys
from collections.abc import Callable

import torch

from melo_dist.errors import InputError


def log(message: str) -> None:
    print(f"[melo-dist] {message}", file=sys.stderr, flush=True)


def prepare_process(threads: int) -> None:
    """Once per training or benchmark process: torch threads (0 = leave as is) and flushed
    denormals (they slowed the reference's CPU meta-iterations almost 3x as training went on;
    DESIGN §4)."""
    if threads > 0:
        torch.set_num_threads(threads)
    torch.set_flush_denormal(True)


def training_device(use_gpu: bool) -> torch.device:
    """The in-process training device: CUDA with `use_gpu`, where torch sees a GPU."""
    if not use_gpu:
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise InputError(
            f"--use-gpu: torch {torch.__version__} sees no CUDA device "
            "(a CPU build, or no GPU on this machine); leave --use-gpu out to train on the CPU"
        )
    return torch.device("cuda")


def exit_on_sigterm() -> signal.Handlers | Callable | None:
    """SIGTERM raises SystemExit(143) in the main thread, so every clean-up (`finally`, the
    staging folders of `prepare`, temporary files) runs; Python's default ends the process at
    once and leaves them behind. Training replaces it while it runs (a checkpoint first).
    Returns the handler it replaces."""
    return signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
