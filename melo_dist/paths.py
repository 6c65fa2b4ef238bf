"""Where the shared real data lives: $MELO_DATA_DIR, else ../shared/data beside the checkout."""

from __future__ import annotations

import os
from pathlib import Path


def shared_data_dir() -> Path:
    if "MELO_DATA_DIR" in os.environ:
        return Path(os.environ["MELO_DATA_DIR"])
    return Path(__file__).resolve().parents[2] / "shared" / "data"
