"""Ray glue: Ray Data + Ray Train + Ray Tune around the pure-torch library. Nothing algorithmic."""
