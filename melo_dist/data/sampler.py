"""Training batches: which users an iteration trains on, and their windows.

Windows are drawn from (run seed, iteration, user), so an iteration's tasks are the same
whichever worker cuts them. The local sampler walks epochs of seeded user permutations; batch
i holds positions i*B .. (i+1)*B - 1 of their concatenation, a pure function of the iteration:
resuming needs no sampler state.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from melo_dist.data.seeds import derive_seed
from melo_dist.data.tasks import TaskBatch, TaskRows, WindowSpec, sample_tasks


def training_batch(rows: TaskRows, spec: WindowSpec, seed: int, iteration: int) -> TaskBatch:
    """The tasks of `rows` at one training iteration: random windows, seeded by the iteration."""
    return sample_tasks(rows, spec, seed=derive_seed(seed, iteration), train=True)


class EpochSampler:
    """Meta-batches of `tasks` users for in-process training."""

    def __init__(self, rows: TaskRows, spec: WindowSpec, seed: int, tasks: int) -> None:
        self.rows, self.spec, self.seed, self.tasks = rows, spec, seed, tasks

    def users(self, iteration: int) -> np.ndarray:
        """Indices of the users of batch `iteration`."""
        positions = np.arange(iteration * self.tasks, (iteration + 1) * self.tasks)
        epochs, places = np.divmod(positions, len(self.rows))
        users = np.empty_like(positions)
        for epoch in np.unique(epochs):
            order = np.random.default_rng(derive_seed(self.seed, epoch)).permutation(len(self.rows))
            users[epochs == epoch] = order[places[epochs == epoch]]
        return users

    def batches(self, start: int) -> Iterator[TaskBatch]:
        """The batches of iterations start, start + 1, ... (endless)."""
        iteration = start
        while True:
            rows = self.rows.take(self.users(iteration))
            yield training_batch(rows, self.spec, self.seed, iteration)
            iteration += 1
