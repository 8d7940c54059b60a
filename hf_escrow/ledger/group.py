"""Group commit: operations submitted at the same time by many threads share one transaction.

The first caller to find nobody committing becomes the leader: it takes every operation
waiting (up to a batch's limit), runs them as one `Batch` in one database transaction,
hands each caller its own outcome, and lets the next leader go. Whoever arrives while a
commit is on disk waits for the next one, so under load one fsync serves many callers
and alone a caller waits for nobody. Nothing is answered before its transaction commits;
a transaction that fails as a whole (the database gone, say) fails each of its callers.
"""

from __future__ import annotations

import threading
from collections import deque
from typing import Callable

from .._exceptions import RateLimited
from .batch import MAX_OPERATIONS, Operation

MAX_WAITING = 20_000


class _Slot:
    __slots__ = ("op", "done", "failure")

    def __init__(self, op: Operation):
        self.op, self.done, self.failure = op, False, None


class GroupCommitter:
    """Runs `commit(operations)` (one transaction) for the operations of concurrent callers."""

    def __init__(self, commit: Callable[[list[Operation]], None], *, max_batch: int = MAX_OPERATIONS,
                 max_waiting: int = MAX_WAITING):
        self._commit = commit
        self._max_batch = max(1, min(max_batch, MAX_OPERATIONS))
        self._max_waiting = max_waiting
        self._waiting: deque[_Slot] = deque()
        self._leading = False
        self._changed = threading.Condition()
        self.transactions = 0   # how many transactions committed (or failed) so far
        self.operations = 0     # how many operations they carried

    def submit(self, op: Operation) -> None:
        """Commit `op` with whatever else is waiting; returns once its transaction is on disk."""
        slot = _Slot(op)
        with self._changed:
            if len(self._waiting) >= self._max_waiting:
                raise RateLimited(f"more than {self._max_waiting} ledger operations are waiting; retry shortly",
                                  details={"retry_after_s": 1})
            self._waiting.append(slot)
            while not slot.done:
                if self._leading:
                    self._changed.wait()
                    continue
                self._leading = True
                batch = [self._waiting.popleft() for _ in range(min(len(self._waiting), self._max_batch))]
                self._changed.release()
                try:
                    self._run(batch)
                finally:
                    self._changed.acquire()
                    self._leading = False
                    self._changed.notify_all()
        if slot.failure is not None:
            raise slot.failure

    def _run(self, batch: list[_Slot]) -> None:
        try:
            self._commit([slot.op for slot in batch])
        except BaseException as failure:  # the whole transaction failed: so did each of its operations
            for slot in batch:
                slot.failure = failure
        finally:
            self.transactions += 1
            self.operations += len(batch)
            for slot in batch:
                slot.done = True
