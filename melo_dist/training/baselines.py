"""What the training ratings say before any model: the bias model's global mean and shrunk item
biases (Koren's baseline predictors), and item factors of a ridge matrix factorisation of what
the biases leave. The bias reference point is scored from the first; the bias head starts its
item biases and item factors from them, as MAML/MELO start their embeddings from `basic`."""

from __future__ import annotations

import numpy as np

from melo_dist.data.tasks import TaskRows

ITEM_SHRINK, USER_SHRINK = 25.0, 10.0  # Koren-style baseline-predictor regularisation
# The factor reference point: k and the fold-in ridge of the user factors, chosen on the ML-1M
# subset's validation users (results/ml1m-subset-findings.md).
REFERENCE_FACTORS, FACTOR_SHRINK = 16, 30.0
# The factor reference point with recency: each support rating weighted by RECENCY_DECAY **
# (age - 1), chosen on the same validation users (results/recency_baselines.py).
RECENCY_DECAY = 0.95
# The factor reference point fitted on each support rating once (not once per window holding
# it), recency-weighted, its shrinks divided by ONCE_SCALE: decay and scale chosen on the
# validation users' 10 last ratings (results/recency_baselines.py ... valid,test 10).
ONCE_SCALE = 12.0


def recency_weights(ages: np.ndarray, decay: float) -> np.ndarray:
    """decay ** (age - 1): age = how many interactions before the target a rating lies."""
    return decay ** (ages - 1.0)


def bias_statistics(train: TaskRows, num_items: int) -> tuple[float, np.ndarray]:
    """The bias model's global mean and shrunk item biases [num_items + 1] (rating scale)."""
    mu = float(train.ratings.mean())
    item_count = np.bincount(train.items, minlength=num_items + 1)
    item_sum = np.bincount(train.items, weights=train.ratings, minlength=num_items + 1)
    return mu, (item_sum - mu * item_count) / (ITEM_SHRINK + item_count)


def item_factors(
    train: TaskRows, num_items: int, factors: int, reg: float = 10.0, sweeps: int = 6
) -> np.ndarray:
    """[num_items + 1, factors] item factors of the training ratings' residuals after the bias
    model (alternating ridge regressions, seeded), scaled to a mean squared norm of 1 over the
    training interactions: the inner loss's curvature in the user factors is then about 2 at
    most, so inner steps of lr <= 0.5 do not overshoot (unit scale per factor diverged)."""
    mu, item_bias = bias_statistics(train, num_items)
    users = np.repeat(np.arange(len(train)), train.lengths)
    residual = train.ratings - mu - item_bias[train.items]
    residual -= (np.bincount(users, residual) / (USER_SHRINK + train.lengths))[users]
    item = np.random.default_rng(0).normal(0.0, 0.1, (num_items + 1, factors))
    for _ in range(sweeps):
        user = ridge(users, len(train), item[train.items], residual, reg)
        item = ridge(train.items, num_items + 1, user[users], residual, reg)
    return item / np.sqrt((item[train.items] ** 2).sum(1).mean())


def factor_design(train: TaskRows, num_items: int) -> tuple[np.ndarray, np.ndarray]:
    """The factor reference point's regressors per item [num_items + 1, 1 + k] (a 1 for the user
    bias, then the item factors) and the fold-in ridge of each user weight [1 + k]."""
    factors = item_factors(train, num_items, REFERENCE_FACTORS)
    design = np.concatenate([np.ones((num_items + 1, 1)), factors], axis=1)
    return design, np.r_[USER_SHRINK, np.full(REFERENCE_FACTORS, FACTOR_SHRINK)]


def ridge(
    rows: np.ndarray,
    count: int,
    x: np.ndarray,
    y: np.ndarray,
    reg: float | np.ndarray,
    weights: np.ndarray | None = None,
) -> np.ndarray:
    """For every row r < count: argmin_w sum over its entries weight * (y - x . w)^2 + reg |w|^2
    (`reg` one value, or one per coordinate; `weights` one per entry, default 1)."""
    k = x.shape[1]
    wx = x if weights is None else weights[:, None] * x
    gram = np.empty((count, k, k))
    for a in range(k):
        for b in range(a, k):
            gram[:, a, b] = gram[:, b, a] = np.bincount(rows, wx[:, a] * x[:, b], minlength=count)
    rhs = np.stack([np.bincount(rows, wx[:, a] * y, minlength=count) for a in range(k)], axis=1)
    return np.linalg.solve(gram + np.diag(np.broadcast_to(reg, k)), rhs[..., None])[..., 0]
