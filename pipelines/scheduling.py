"""Scheduling policy: what runs next on a lane, and whether the machine can take a new session.

Pure logic with no threads and no clock of its own (callers pass ``now``), so
every decision is unit-tested directly (tests/unit/test_scheduling.py).

Order on a lane: the most urgent ``Priority`` first; within a priority, the
session served least recently first (fairness), then first come. Queued work
that a newer request with the same ``key`` supersedes (a newer partial of the
same utterance, a newer camera frame) or whose deadline passed is dropped,
never run. Work with a ``batch_key`` is handed out together with queued work
of the same priority and batch key, up to ``max_batch``.
"""

from __future__ import annotations

import collections
import enum
import itertools
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field


class Priority(enum.IntEnum):
    """Work classes, most urgent first."""

    ASR_FINAL = 0
    TTS_FIRST = 1
    LLM = 2
    TTS_REST = 3
    ASR_PARTIAL = 4
    VISION = 5


URGENT = Priority.TTS_FIRST  # this and more urgent work pauses streaming jobs on other lanes


class State(enum.Enum):
    QUEUED = "queued"
    RUNNING = "running"
    CANCELLED = "cancelled"
    STALE = "stale"  # superseded or past its deadline: dropped unrun


_seq = itertools.count()


@dataclass(eq=False)
class Work:
    priority: Priority
    session: str | None = None
    key: Hashable | None = None  # newer queued work with the same key replaces this
    deadline: float | None = None  # queued past this time = stale
    batch_key: Hashable | None = None
    enqueued_at: float = 0.0
    state: State = State.QUEUED
    seq: int = field(default_factory=lambda: next(_seq))


class Policy:
    """The queue of one lane. ``fifo=True`` is the plain first-come-first-served baseline
    (no classes, no fairness, nothing superseded), kept to measure what the policy buys."""

    def __init__(self, max_batch: int = 4, *, fifo: bool = False,
                 order: Sequence[Priority] | None = None) -> None:
        """``order``: the classes, most urgent first (default: ``Priority``'s own order)."""
        self.max_batch = max_batch
        self.fifo = fifo
        ranked = list(order) if order is not None else sorted(Priority)
        if sorted(ranked) != sorted(Priority):
            raise ValueError("the priority order must name every work class exactly once")
        self._class_rank = {p: i for i, p in enumerate(ranked)}
        self._queued: list[Work] = []
        self._served: dict[tuple[Priority, str | None], int] = {}  # last service, by class
        self._turn = itertools.count(1)

    def __len__(self) -> int:
        return len(self._queued)

    def add(self, work: Work, now: float) -> list[Work]:
        """Queue ``work``; returns queued work it supersedes (now STALE)."""
        work.enqueued_at = now
        stale = []
        if work.key is not None and not self.fifo:
            stale = [w for w in self._queued if w.key == work.key]
            for w in stale:
                w.state = State.STALE
                self._queued.remove(w)
        self._queued.append(work)
        return stale

    def cancel(self, work: Work) -> bool:
        """Remove queued work; False when it already started or left the queue."""
        if work.state is not State.QUEUED:
            return False
        work.state = State.CANCELLED
        self._queued.remove(work)
        return True

    def expire(self, now: float) -> list[Work]:
        """Drop queued work past its deadline; returns it (now STALE)."""
        gone = [w for w in self._queued if w.deadline is not None and now > w.deadline]
        for w in gone:
            w.state = State.STALE
            self._queued.remove(w)
        return gone

    def _rank(self, w: Work) -> tuple[int, int, int]:
        if self.fifo:
            return (0, 0, w.seq)
        return (self._class_rank[w.priority], self._served.get((w.priority, w.session), 0), w.seq)

    def peek(self) -> Work | None:
        """The work ``next`` would hand out first (None when idle)."""
        return min(self._queued, key=self._rank) if self._queued else None

    def next(self, now: float) -> list[Work]:
        """The next batch to run (one item unless batchable), marked RUNNING; [] when idle."""
        self.expire(now)
        if not self._queued:
            return []
        first = min(self._queued, key=self._rank)
        batch = [first]
        if first.batch_key is not None:
            mates = sorted((w for w in self._queued if w is not first
                            and w.batch_key == first.batch_key
                            and (self.fifo or w.priority == first.priority)), key=self._rank)
            batch += mates[: self.max_batch - 1]
        turn = next(self._turn)
        for w in batch:
            w.state = State.RUNNING
            self._queued.remove(w)
            self._served[(w.priority, w.session)] = turn
        return batch

    def mates(self, batch: list[Work]) -> list[Work]:
        """More queued work that may join a batch that has not started yet (gathering)."""
        head = batch[0]
        if head.batch_key is None or len(batch) >= self.max_batch:
            return []
        joiners = sorted((w for w in self._queued if w.batch_key == head.batch_key
                          and (self.fifo or w.priority == head.priority)), key=self._rank)
        joiners = joiners[: self.max_batch - len(batch)]
        for w in joiners:
            w.state = State.RUNNING
            self._queued.remove(w)
            self._served[(w.priority, w.session)] = next(self._turn)
        return joiners


class Admission:
    """Says a new session would overload the machine: the mean queue wait of urgent work
    over the last ``window_s`` exceeded ``max_wait_s``."""

    def __init__(self, max_wait_s: float, window_s: float = 10.0) -> None:
        self.max_wait_s = max_wait_s
        self.window_s = window_s
        self._waits: collections.deque[tuple[float, float]] = collections.deque(maxlen=1000)

    def record(self, wait_s: float, now: float) -> None:
        self._waits.append((now, wait_s))

    def mean_wait(self, now: float) -> float:
        while self._waits and now - self._waits[0][0] > self.window_s:
            self._waits.popleft()
        return sum(w for _, w in self._waits) / len(self._waits) if self._waits else 0.0

    def saturated(self, now: float) -> bool:
        return self.mean_wait(now) > self.max_wait_s
