"""matplotlib for files only: no display on a cluster node or in CI."""

from __future__ import annotations

from types import ModuleType

import matplotlib


def pyplot() -> ModuleType:
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt
