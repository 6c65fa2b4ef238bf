"""The benchmarks' own arithmetic (their timings are measured by `melo-dist bench`, not here)."""

from __future__ import annotations

import pytest

from melo_dist.bench.ray import HOP_LATENCY_S, NETWORK_BYTES_PER_S, ring_allreduce_seconds


def test_ring_allreduce_model_sends_twice_the_buffer_share_per_worker():
    megabyte = 1_000_000
    assert ring_allreduce_seconds(megabyte, 1) == 0
    two = megabyte / NETWORK_BYTES_PER_S + 2 * HOP_LATENCY_S
    assert ring_allreduce_seconds(megabyte, 2) == pytest.approx(two)
    # the bandwidth term tends to 2x the buffer; the latency term grows with the ring
    many = ring_allreduce_seconds(megabyte, 512)
    assert many == pytest.approx(2 * 511 / 512 * megabyte / NETWORK_BYTES_PER_S + 1022 * 50e-6)
