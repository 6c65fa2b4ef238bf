"""The console: progress lines on a terminal and in a log, and the compact settings line."""

from __future__ import annotations

import io

from melo_dist.config import Config
from melo_dist.console import ProgressLine, format_progress

ITERATION = {"event": "iteration", "iteration": 5, "total": 20, "loss": 0.05}
VALIDATION = {
    "event": "validation",
    "iteration": 10,
    "total": 20,
    "loss": 0.04,
    "valid_rmse": 0.91,
    "valid_mae": 0.7,
    "best_valid_rmse": 0.9,
}


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_in_a_log_only_validations_print_a_line():
    stream = io.StringIO()
    line = ProgressLine("run", stream)
    line({**ITERATION, "seconds_per_iteration": 0.5})
    assert stream.getvalue() == ""
    line({**VALIDATION, "seconds_per_iteration": 0.5})
    line.message("resuming")
    line.close()
    lines = stream.getvalue().splitlines()
    assert lines[0].startswith("run [##########..........] 10/20")
    assert "valid RMSE 0.9100 (best 0.9000)" in lines[0] and "0:05 left" in lines[0]
    assert lines[1] == "[melo-dist] resuming" and len(lines) == 2


def test_on_a_terminal_one_line_is_redrawn_and_messages_go_above_it():
    stream = Terminal()
    line = ProgressLine("run", stream)
    line({**ITERATION, "seconds_per_iteration": 1.0})
    line.message("hello")
    line({**VALIDATION, "seconds_per_iteration": 1.0})
    line.close()
    text = stream.getvalue()
    assert text.count("\n") == 2  # the message, and the end of the progress line
    assert text.count("\r\x1b[2K") == 4  # three draws and one clear for the message
    assert text.rstrip("\n").rsplit("\r\x1b[2K", 1)[-1].startswith("run [##########")


def test_format_progress_without_and_with_validation():
    assert format_progress({**ITERATION, "seconds_per_iteration": 0.25}) == (
        "iter 5/20 loss 0.0500 0.25 s/it"
    )
    assert "valid RMSE 0.9100 MAE 0.7000 (best 0.9000)" in format_progress(
        {**VALIDATION, "seconds_per_iteration": 0.25}
    )


def test_changed_settings_name_only_what_differs_from_the_defaults():
    config = Config()
    assert config.changed_settings() == []
    config.model.dim, config.meta.regime = 8, "maml"
    assert config.changed_settings() == ["model.dim=8", "meta.regime=maml"]
