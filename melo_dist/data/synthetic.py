"""A seeded generator of realistic, imbalanced rating histories: the embedded default dataset.

Items have a popularity (Zipf) and a latent profile; users have a latent taste that steers
both what they watch and how they like it, plus a personal rating habit (a generous or harsh
centre and a narrow or wide spread). Most users therefore use only two or three rating
levels, skewed towards the top, as in MovieLens or Amazon. Everything is vectorised over a
[users, items] score matrix, so a few thousand users take well under a second.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from melo_dist.errors import InputError


@dataclass(frozen=True)
class SyntheticSpec:
    users: int = 2000  # number of users generated (before the preparation filters)
    items: int = 600  # catalogue size
    mean_length: float = 45.0  # mean interactions per user (log-normal lengths, min 8)
    factors: int = 8  # latent dimensions of taste
    seed: int = 0


def generate_ratings(spec: SyntheticSpec = SyntheticSpec()) -> pd.DataFrame:
    """Return a canonical rating table (user_id, item_id, rating, timestamp) in time order."""
    if spec.users < 1 or spec.items < 2 or spec.mean_length < 2:
        raise InputError(f"synthetic spec too small: {spec}")
    rng = np.random.default_rng(spec.seed)
    taste = rng.normal(size=(spec.users, spec.factors)) / np.sqrt(spec.factors)
    profile = rng.normal(size=(spec.items, spec.factors))
    quality = rng.normal(scale=0.6, size=spec.items)
    log_popularity = -1.1 * np.log(rng.permutation(spec.items) + 1.0)

    # What each user consumes: Gumbel top-k over popularity plus taste, i.e. sampling
    # without replacement in one vectorised argsort.
    affinity = taste @ profile.T
    choice_logits = log_popularity + 0.8 * affinity + rng.gumbel(size=affinity.shape)
    order = np.argsort(-choice_logits, axis=1)
    sigma = 0.6
    lengths = rng.lognormal(np.log(spec.mean_length) - sigma**2 / 2, sigma, size=spec.users)
    lengths = np.clip(np.round(lengths), 8, spec.items).astype(np.int64)
    taken = np.arange(spec.items) < lengths[:, None]
    users, ranks = np.nonzero(taken)
    items = order[users, ranks]

    # How they rate it: a standardised liking, then the user's habit maps it to 1..5.
    liking = quality[items] + affinity[users, items] + rng.normal(scale=0.5, size=items.size)
    liking = (liking - liking.mean()) / liking.std()
    centre = np.clip(rng.normal(3.8, 0.55, size=spec.users), 2.0, 4.9)
    spread = rng.gamma(2.0, 0.3, size=spec.users)
    ratings = np.clip(np.round(centre[users] + spread[users] * liking), 1, 5)

    # Time: each user starts somewhere in a two-year span; about a third of consecutive
    # ratings share a timestamp, as in MovieLens, so the preparation tie-break is exercised.
    starts = rng.integers(946_684_800, 946_684_800 + 2 * 365 * 86_400, size=spec.users)
    gaps = rng.exponential(3 * 86_400, size=items.size) * (rng.random(items.size) > 0.33)
    first = np.r_[True, users[1:] != users[:-1]]
    gaps[first] = 0
    offsets = np.cumsum(gaps) - np.maximum.accumulate(np.where(first, np.cumsum(gaps), 0))
    timestamps = starts[users] + offsets.astype(np.int64)

    return pd.DataFrame(
        {
            "user_id": pd.array([f"u{u}" for u in users], dtype="string"),
            "item_id": pd.array([f"i{i}" for i in items], dtype="string"),
            "rating": ratings.astype(np.float32),
            "timestamp": timestamps.astype(np.int64),
        }
    )


def random_task_rows(tasks: int, items: int, lengths: tuple[int, int], seed: int = 0):
    """Uniformly random users (items, 1..5 ratings, lengths in [low, high)): benchmark and test
    inputs whose only job is to have a given shape."""
    from melo_dist.data.tasks import TaskRows

    rng = np.random.default_rng(seed)
    offsets = np.r_[0, np.cumsum(rng.integers(*lengths, size=tasks))]
    return TaskRows(
        np.array([f"u{i}" for i in range(tasks)], dtype=object),
        rng.integers(1, items + 1, size=offsets[-1]),
        rng.integers(1, 6, size=offsets[-1]).astype(np.float32),
        offsets,
    )
