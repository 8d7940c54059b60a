"""How every retrying loop waits: the HTTP client (lost connections, timeouts, 5xx), the
ledger (lock conflicts) and the dataset buyer (an unreachable shard server) each name a
`Backoff`; the loop asks it whether a try was the last and how long to wait before the next,
and sleeps (or awaits) that itself. No I/O here, so the ledger imports it too."""

from __future__ import annotations

import math
import random
from dataclasses import dataclass


@dataclass(frozen=True)
class Backoff:
    """Waits that grow by `step_s` each failed try (or double, `exponential`), at most `cap_s`;
    `jitter` waits a random 50-100 % of that, so clients that failed together come back apart.
    `tries` counts every try, the first included (None: the loop counts them)."""

    step_s: float
    tries: int | None = None
    exponential: bool = False
    cap_s: float = math.inf
    jitter: bool = False

    def last(self, attempt: int) -> bool:
        """Whether try number `attempt` (from 0) is the last one."""
        return self.tries is not None and attempt >= self.tries - 1

    def delay_s(self, attempt: int) -> float:
        """The wait after try number `attempt` (from 0) failed."""
        wait = min(self.cap_s, self.step_s * (2 ** attempt if self.exponential else attempt + 1))
        return wait * (0.5 + random.random() / 2) if self.jitter else wait
