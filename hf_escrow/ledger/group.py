"""Group commit: operations submitted at the same time by many threads share one transaction.

The first caller to find nobody committing becomes the leader: it takes every operation
waiting (up to a batch's limit), runs them as one `Batch` in one database transaction,
hands each caller its own outcome, and lets the next leader go. Whoever arrives while a
commit is on disk waits for the next one, so under load one fsync serves many callers
and alone a caller waits for nobody. Nothing is answered before its transaction commits;
a transaction that fails as a whole (the database gone, say) fails each of its callers.

An event loop's caller (`settle_async`, the HTTP routes) never leads and never blocks:
it enqueues its operation and awaits a future. When one is first in line, the
committer's own thread leads for it; its commit resolves the futures on their loops,
one callback per loop and batch. Both kinds share the same queue, bound and batches.
"""

from __future__ import annotations

import asyncio
import os
import threading
from collections import deque
from typing import Callable, Union

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


class _Awaited:
    """An event loop's operation: its future is resolved on `loop` once its commit is done."""

    __slots__ = ("op", "done", "failure", "loop", "future")

    def __init__(self, op: Operation, loop: asyncio.AbstractEventLoop):
        self.op, self.done, self.failure = op, False, None
        self.loop, self.future = loop, loop.create_future()


def _resolve(slots: list[_Awaited]) -> None:
    for slot in slots:
        if not slot.future.done():  # a caller cancelled meanwhile has stopped listening
            if slot.failure is not None:
                slot.future.set_exception(slot.failure)
            else:
                slot.future.set_result(None)


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
        self._waiting: deque[Union[_Slot, _Awaited]] = deque()
        self._leading = False
        self._lock = threading.Lock()
        self._kick = threading.Semaphore(0)   # one release: the committer's thread leads once
        self._thread: threading.Thread | None = None
        self._thread_pid = 0
        self.transactions = 0   # how many transactions committed (or failed) so far
        self.operations = 0     # how many operations they carried

    def submit(self, op: Operation) -> None:
        """Commit `op` with whatever else is waiting; returns once its transaction is on disk."""
        slot = _Slot(op)
        with self._lock:
            slot.leads = self._enqueue(slot)
        if not slot.leads:
            self._wait(slot)
        if not slot.done:
            self._lead()
        if slot.failure is not None:
            raise slot.failure

    async def settle_async(self, op: Operation) -> None:
        """`submit` for an event loop: awaits the commit of `op` without blocking the loop."""
        slot = _Awaited(op, asyncio.get_running_loop())
        with self._lock:
            first = self._enqueue(slot)
        if first:
            self._lead_in_thread()
        try:
            await slot.future
        except asyncio.CancelledError:
            with self._lock:  # not yet taken by a commit: it never will be
                if slot in self._waiting:
                    self._waiting.remove(slot)
            raise

    def _enqueue(self, slot: Union[_Slot, _Awaited]) -> bool:
        """Queue `slot` (under the lock); True if nobody was leading, so the lead is now its."""
        if len(self._waiting) >= self._max_waiting:
            raise RateLimited(f"more than {self._max_waiting} ledger operations are waiting; retry shortly",
                              details={"retry_after_s": 1})
        self._waiting.append(slot)
        first, self._leading = not self._leading, True
        return first

    def _lead_in_thread(self) -> None:
        """Have the committer's thread lead once (started here the first time, and in a forked child)."""
        with self._lock:
            if self._thread is None or self._thread_pid != os.getpid():
                self._kick = threading.Semaphore(0)
                self._thread = threading.Thread(target=self._serve, name="hf-escrow-group-commit", daemon=True)
                self._thread_pid = os.getpid()
                self._thread.start()
        self._kick.release()

    def _serve(self) -> None:
        while True:
            self._kick.acquire()
            self._lead()

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
                        successor = self._next_leader()
            self._wake_leader(successor)
            raise

    def _lead(self) -> None:
        """Commit one batch of what is waiting, then hand the lead on (or put it down)."""
        with self._lock:
            batch = [self._waiting.popleft() for _ in range(min(len(self._waiting), self._max_batch))]
        try:
            if batch:  # empty when the loop's callers it was to lead for were all cancelled
                self._run(batch)
        finally:
            with self._lock:
                successor = self._next_leader()
            awaited: dict[asyncio.AbstractEventLoop, list[_Awaited]] = {}
            for slot in batch:
                if isinstance(slot, _Awaited):
                    awaited.setdefault(slot.loop, []).append(slot)
                elif not slot.leads:
                    slot.wake.release()
            for loop, slots in awaited.items():
                try:
                    loop.call_soon_threadsafe(_resolve, slots)
                except RuntimeError:
                    pass  # the loop has closed: nobody is left to answer
            self._wake_leader(successor)

    def _next_leader(self) -> Union[_Slot, _Awaited, None]:
        """Under the lock: who leads next (the first in line), or nobody if none is waiting."""
        successor = self._waiting[0] if self._waiting else None
        self._leading = successor is not None
        if successor is not None and not isinstance(successor, _Awaited):
            successor.leads = True
        return successor

    def _wake_leader(self, successor: Union[_Slot, _Awaited, None]) -> None:
        if isinstance(successor, _Awaited):
            self._lead_in_thread()  # a loop's caller never leads: the committer's thread does
        elif successor is not None:
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
