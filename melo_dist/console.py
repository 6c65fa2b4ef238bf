"""What a person sees while a command runs: one progress line per training run, and the
libraries' own chatter (Ray's INFO logs, deprecation warnings) kept out of the way unless
`--verbose` asks for it. Warnings and errors still reach the user."""

from __future__ import annotations

import logging
import os
import sys
import time
import warnings
from typing import TextIO

BAR_WIDTH = 20


class RayNotices(logging.Filter):
    """Ray's notices that need no action: token authentication is on (it stays on), and Ray
    Data's progress bars are off (melo-dist turns them off and shows its own progress)."""

    NOTICES = ("Token authentication is enabled", "Progress bars disabled")

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.NOTICES)


def quiet_libraries(verbose: bool) -> None:
    """Hide Ray's INFO logging, its notices and Python deprecation warnings in this process
    (verbose: keep them; Ray's own RAY_DATA_LOG_LEVEL is respected). Ray processes' output is
    kept from the driver by `connect(verbose)`."""
    if verbose:
        return
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)
    os.environ.setdefault("RAY_DATA_LOG_LEVEL", "WARNING")
    for name in ("ray", "ray.data", "ray.train", "ray.tune", "ray.serve"):
        logging.getLogger(name).setLevel(logging.WARNING)


def hide_ray_notices() -> None:
    """Filter `RayNotices` out of every handler Ray's loggers have now (call once Ray and Ray
    Data are imported: they install their handlers then)."""
    for name in ("ray", "ray.data"):
        for handler in logging.getLogger(name).handlers:
            if not any(isinstance(f, RayNotices) for f in handler.filters):
                handler.addFilter(RayNotices())


def format_progress(event: dict) -> str:
    """A training progress event as one line: an iteration's loss, or a validation record."""
    text = f"iter {event['iteration']}/{event['total']} loss {event['loss']:.4f}"
    if "valid_rmse" in event:
        text += (
            f" valid RMSE {event['valid_rmse']:.4f} MAE {event['valid_mae']:.4f}"
            f" (best {event['best_valid_rmse']:.4f})"
        )
    return f"{text} {event['seconds_per_iteration']:.2f} s/it"


class ProgressLine:
    """A training run's progress: iteration / total as a bar, meta-loss, the last and best
    validation RMSE, s/it (training only) and the time left. On a terminal the line is redrawn
    in place; elsewhere (a pipe, a log file) a line is printed at each validation only."""

    def __init__(self, name: str, stream: TextIO | None = None) -> None:
        self.name = name
        self.stream = stream or sys.stderr
        self.live = self.stream.isatty()
        self.state: dict = {}
        self.drawn = False

    def __call__(self, event: dict) -> None:
        self.state.update(event)
        self.state["updated"] = time.monotonic()
        if self.live:
            self.draw()
        elif "valid_rmse" in event:
            self.stream.write(self.text() + "\n")
            self.stream.flush()

    def text(self) -> str:
        s = self.state
        done, total = s["iteration"], s["total"]
        filled = round(BAR_WIDTH * done / max(total, 1))
        parts = [
            f"{self.name} [{'#' * filled}{'.' * (BAR_WIDTH - filled)}] {done}/{total}",
            f"loss {s['loss']:.4f}",
        ]
        if "valid_rmse" in s:
            parts.append(f"valid RMSE {s['valid_rmse']:.4f} (best {s['best_valid_rmse']:.4f})")
        per_iteration = s["seconds_per_iteration"]
        left = int(per_iteration * (total - done))
        parts.append(f"{per_iteration:.2f} s/it, {left // 60}:{left % 60:02d} left")
        return "  ".join(parts)

    def draw(self) -> None:
        self.stream.write("\r\x1b[2K" + self.text())
        self.stream.flush()
        self.drawn = True

    def message(self, text: str) -> None:
        """A log line, printed above the progress line."""
        if self.drawn:
            self.stream.write("\r\x1b[2K")
        self.stream.write(f"[melo-dist] {text}\n")
        if self.drawn:
            self.draw()
        self.stream.flush()

    def close(self) -> None:
        if self.drawn:
            self.stream.write("\n")
            self.stream.flush()
            self.drawn = False
