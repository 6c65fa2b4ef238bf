"""melo-dist: distributed MELO meta-training for cold-start sequential recommendation."""

__version__ = "0.1.0"
