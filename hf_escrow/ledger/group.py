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
    """One caller's operation; `wake` is released when it is done or its caller is to lead."""

    __slots__ = ("op", "done", "failure", "leads", "wake")

    def __init__(self, op: Operation):
        self.op, self.done, self.failure, self.leads = op, False, None, False
        self.wake = threading.Lock()
        self.wake.acquire()


class GroupCommitter:
    """Runs `commit(operations)` (one transaction) for the operations of concurrent callers.

    Each caller sleeps on its own lock: a commit wakes its own callers and the one caller
    that leads next, not every waiting thread (which, under load, costs more than the
    commit's own Python)."""

    def __init__(self, commit: Callable[[list[Operation]], None], *, max_batch: int = MAX_OPERATIONS,
                 max_waiting: int = MAX_WAITING):
        self._commit = commit
        self._max_batch = max(1, min(max_batch, MAX_OPERATIONS))
        self._max_waiting = max_waiting
        self._waiting: deque[_Slot] = deque()
        self._leading = False
        self._lock = threading.Lock()
        self.transactions = 0   # how many transactions committed (or failed) so far
        self.operations = 0     # how many operations they carried

    def submit(self, op: Operation) -> None:
        """Commit `op` with whatever else is waiting; returns once its transaction is on disk."""
        slot = _Slot(op)
        with self._lock:
            if len(self._waiting) >= self._max_waiting:
                raise RateLimited(f"more than {self._max_waiting} ledger operations are waiting; retry shortly",
                                  details={"retry_after_s": 1})
            self._waiting.append(slot)
            slot.leads = not self._leading
            self._leading = True
        if not slot.leads:
            self._wait(slot)
        if not slot.done:
            self._lead()
        if slot.failure is not None:
            raise slot.failure

    def _wait(self, slot: _Slot) -> None:
        """Sleep until `slot` is done or is to lead. A caller interrupted here (KeyboardInterrupt
        in the main thread) withdraws its operation if no commit has taken it yet, and hands
        on the lead if it was given one, so that nobody waits for a leader who has gone."""
        try:
            slot.wake.acquire()  # released once done, or once this caller is to lead
        except BaseException:
            successor = None
            with self._lock:
                if slot in self._waiting:
                    self._waiting.remove(slot)
                    if slot.leads:
                        successor = self._waiting[0] if self._waiting else None
                        self._leading = successor is not None
                        if successor is not None:
                            successor.leads = True
            if successor is not None:
                successor.wake.release()
            raise

    def _lead(self) -> None:
        """Commit one batch of what is waiting, then hand the lead on (or put it down)."""
        with self._lock:
            batch = [self._waiting.popleft() for _ in range(min(len(self._waiting), self._max_batch))]
        try:
            self._run(batch)
        finally:
            with self._lock:
                successor = self._waiting[0] if self._waiting else None
                self._leading = successor is not None
                if successor is not None:
                    successor.leads = True
            for slot in batch:
                if not slot.leads:
                    slot.wake.release()
            if successor is not None:
                successor.wake.release()

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
