"""Counter-based randomness: every random draw of training comes from a hash of where it is
used (run seed, iteration, user, rank), never from a stateful generator. Batches, windows and
dropout masks are then the same whichever worker computes them, and a checkpoint needs no RNG
state."""

from __future__ import annotations

import hashlib

import numpy as np

GOLDEN = np.uint64(0x9E3779B97F4A7C15)
MIX_1, MIX_2 = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)
MASK = 2**64 - 1


def mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser on uint64 values (wraps around on purpose)."""
    with np.errstate(over="ignore"):
        x = (x ^ (x >> np.uint64(30))) * MIX_1
        x = (x ^ (x >> np.uint64(27))) * MIX_2
        return x ^ (x >> np.uint64(31))


def derive_seed(*parts: int) -> int:
    """One 63-bit seed from integers (e.g. run seed, iteration, rank): for torch or numpy."""
    x = np.zeros(1, dtype=np.uint64)
    with np.errstate(over="ignore"):
        for part in parts:
            x = mix64((x ^ np.uint64(int(part) & MASK)) + GOLDEN)
    return int(x[0] >> np.uint64(1))


def user_keys(user_id: np.ndarray) -> np.ndarray:
    """A stable 64-bit key per user id (independent of table order and Python's hash seed)."""
    return np.array(
        [
            int.from_bytes(hashlib.blake2b(str(u).encode(), digest_size=8).digest(), "little")
            for u in user_id
        ],
        dtype=np.uint64,
    )


def hashed_uniforms(keys: np.ndarray, seed: int, count: int) -> np.ndarray:
    """[len(keys), count] uniforms in [0, 1) from splitmix64 of (seed, key, slot)."""
    with np.errstate(over="ignore"):
        x = keys[:, None] * GOLDEN + np.uint64(seed & MASK)
        x = mix64(x + np.arange(1, count + 1, dtype=np.uint64) * MIX_1)
    return (x >> np.uint64(11)).astype(np.float64) / float(2**53)
