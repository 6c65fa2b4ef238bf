"""Sweep definitions and outputs (no Ray here: the Tune glue is melo_dist.distributed.tune)."""
