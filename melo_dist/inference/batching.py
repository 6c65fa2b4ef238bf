"""How `melo-dist serve` batches requests (no Ray here: the CLI reads the defaults).

Serve's `@serve.batch` closes a batch when it holds max_batch_size requests or when its wait is
over. The deployment sets that size, request by request, to the peak of requests in flight on
the replica over the last PEAK_WINDOW_S (`InFlight`), never above the configured maximum:
- once a second has passed since the last load, a lone request's batch closes at once (it is not
  held for company that is not coming);
- a steady load's clients are adapted together, their batch closing when the last of them
  arrives, not when the wait is over;
- a load that split into two batches merges again: the second batch waits for the clients of
  the one computing to come back, which BATCH_WAIT_MS allows for.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable

MAX_BATCH_SIZE = 16  # requests adapted together, at most
BATCH_WAIT_MS = 30.0  # the longest a batch waits to fill
PEAK_WINDOW_S = 1.0  # how long a load peak sets the batch size


class InFlight:
    """The requests in flight on this replica, and their peak over the last `seconds`."""

    def __init__(self, seconds: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.seconds, self.clock, self.count = seconds, clock, 0
        self.peaks: deque[tuple[float, int]] = deque()  # (time, count), falling counts

    def arrive(self) -> int:
        """Count a request in; the peak count of the window, this request included."""
        now = self.clock()
        self.count += 1
        while self.peaks and self.peaks[-1][1] <= self.count:
            self.peaks.pop()
        self.peaks.append((now, self.count))
        while self.peaks[0][0] < now - self.seconds:
            self.peaks.popleft()
        return self.peaks[0][1]

    def leave(self) -> None:
        self.count -= 1
