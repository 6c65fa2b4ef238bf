"""Data layer: readers, preparation into Parquet task tables, task windows and batching."""
