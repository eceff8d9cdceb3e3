"""Queue requests and decide what each iteration of the engine's thread runs."""

from __future__ import annotations

import collections
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass

from .requests import RequestRow, ScoreJob


@dataclass
class Schedule:
    """What one iteration runs: at most one Score job, then a prefill of the admitted rows, or
    (when none were admitted) a decode step of the running batch."""

    score: ScoreJob | None
    #: Rows admitted into the running batch, in arrival order, to prefill together.
    admitted: list[RequestRow]


class Scheduler:
    """Hold the waiting Generate rows and Score jobs, and the running batch's rows.

    The API side (the event loop thread) adds requests and wakes the engine's thread; the
    engine's thread takes each iteration's Schedule and alone changes the running batch.
    """

    def __init__(self, max_batch_size: int):
        self._max_batch_size = max_batch_size
        self._waiting: collections.deque[RequestRow] = collections.deque()
        self._scoring: collections.deque[ScoreJob] = collections.deque()
        #: The running batch's rows, in the order of the KV batch's rows.
        self.running: list[RequestRow] = []
        # Guards _waiting, _scoring and _stopping.
        self._wakeup = threading.Condition()
        self._stopping = False

    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def num_waiting(self) -> int:
        """Generate requests not yet prefilled, and Score requests not yet run."""
        return len(self._waiting) + len(self._scoring)

    # --- API side (event loop thread) ---------------------------------------------------------

    def add_row(self, row: RequestRow) -> None:
        with self._wakeup:
            self._waiting.append(row)
            self._wakeup.notify()

    def add_score(self, job: ScoreJob) -> None:
        with self._wakeup:
            self._scoring.append(job)
            self._wakeup.notify()

    def wake(self) -> None:
        """Let the engine's thread see a row's cancellation."""
        with self._wakeup:
            self._wakeup.notify()

    def stop(self) -> None:
        with self._wakeup:
            self._stopping = True
            self._wakeup.notify()

    # --- Engine thread ------------------------------------------------------------------------

    def schedule(self) -> Schedule | None:
        """Wait for work, then take this iteration's: None once stopping."""
        with self._wakeup:
            while not self._stopping and not self._waiting and not self.running and not self._scoring:
                self._wakeup.wait()
            if self._stopping:
                return None
            if any(r.cancelled for r in self._waiting):
                self._waiting = collections.deque(r for r in self._waiting if not r.cancelled)
            free = self._max_batch_size - len(self.running)
            admitted = [self._waiting.popleft() for _ in range(min(free, len(self._waiting)))]
            # One Score request per iteration, so a stream of them cannot starve decoding.
            score = self._scoring.popleft() if self._scoring else None
        return Schedule(score, admitted)

    @staticmethod
    def start_prefill(rows: Sequence[RequestRow]) -> None:
        """The rows' wait ends as their prefill begins."""
        now = time.monotonic()
        for row in rows:
            row.queue_seconds = now - row.submitted_at

    def join_running(self, rows: Sequence[RequestRow]) -> None:
        """Prefilled rows join the running batch, after the rows already in it."""
        self.running.extend(rows)

    def cancelled_running(self) -> list[RequestRow]:
        return [r for r in self.running if r.cancelled]

    def leave_running(self, rows: Sequence[RequestRow]) -> list[int] | None:
        """Take these rows out of the running batch: the indices of the rows kept, in order, or
        None when no row leaves."""
        if not rows:
            return None
        gone = {id(r) for r in rows}
        kept = [i for i, r in enumerate(self.running) if id(r) not in gone]
        self.running = [self.running[i] for i in kept]
        return kept

    def clear_running(self) -> list[RequestRow]:
        """Empty the running batch (its step failed): the rows that were in it."""
        rows, self.running = self.running, []
        return rows

    def take_everything(self) -> list[RequestRow | ScoreJob]:
        """Empty the batch and both queues (the engine is dead): every request that was in them."""
        with self._wakeup:
            waiting, scoring = list(self._waiting), list(self._scoring)
            self._waiting.clear()
            self._scoring.clear()
        return [*self.clear_running(), *waiting, *scoring]
