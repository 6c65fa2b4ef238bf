"""melo-dist: distributed MELO meta-training for cold-start sequential recommendation."""

__version__ = "0.1.0"


def __getattr__(name: str):
    """`from melo_dist import ColdStartModel` without importing torch for the version alone."""
    if name == "ColdStartModel":
        from melo_dist.inference import ColdStartModel

        return ColdStartModel
    raise AttributeError(f"module 'melo_dist' has no attribute {name!r}")
