"""The one place model work is queued.

Each engine kind runs on its own *lane*: a worker thread that takes the most
urgent job first (lower ``Priority`` value first, then first come). Awaiting
callers that are cancelled before their job starts remove it from the queue;
a job already running is abandoned (its result dropped) and, for streaming
jobs, stopped between two items.

Lanes share the cores, so priority also holds *across* lanes: while urgent
work (``Priority.URGENT`` and above: a final transcript, a reply's first audio)
runs on any lane, streaming jobs of lower priority (LLM token loops) wait
between two items instead of competing for the cores.
"""

from __future__ import annotations

import asyncio
import enum
import heapq
import itertools
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, TypeVar

T = TypeVar("T")


class Priority(enum.IntEnum):
    """Work classes, most urgent first."""

    ASR_FINAL = 0
    TTS_FIRST = 1
    LLM = 2
    TTS_REST = 3
    ASR_PARTIAL = 4
    VISION = 5


URGENT = Priority.TTS_FIRST  # this and more urgent work pauses streaming jobs on other lanes


@dataclass(order=True)
class _Job:
    priority: int
    seq: int
    run: Callable[[], None] = field(compare=False)
    cancelled: bool = field(default=False, compare=False)


class Lane:
    """One worker thread with a priority queue of jobs."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._heap: list[_Job] = []
        self._cv = threading.Condition()
        self._seq = itertools.count()
        self._stopped = False
        self._thread = threading.Thread(target=self._work, name=f"lane-{name}", daemon=True)
        self._thread.start()

    def submit(self, priority: int, run: Callable[[], None]) -> _Job:
        job = _Job(priority, next(self._seq), run)
        with self._cv:
            if self._stopped:
                raise RuntimeError(f"lane {self.name} is stopped")
            heapq.heappush(self._heap, job)
            self._cv.notify()
        return job

    def queued(self) -> int:
        with self._cv:
            return sum(not j.cancelled for j in self._heap)

    def _work(self) -> None:
        while True:
            with self._cv:
                while not self._heap and not self._stopped:
                    self._cv.wait()
                if self._stopped and not self._heap:
                    return
                job = heapq.heappop(self._heap)
            if not job.cancelled:
                job.run()

    def stop(self, timeout: float = 10.0) -> None:
        """Drop queued jobs and wait (up to ``timeout``) for the running one to finish."""
        with self._cv:
            self._stopped = True
            for job in self._heap:
                job.cancelled = True
            self._cv.notify_all()
        if self._thread is not threading.current_thread():
            self._thread.join(timeout)


class Compute:
    """Lanes by engine kind. Shared by every session of the process."""

    def __init__(self) -> None:
        self._lanes: dict[str, Lane] = {}
        self._urgent = 0  # urgent jobs running now, on any lane
        self._urgent_cv = threading.Condition()

    def _run_job(self, priority: Priority, body: Callable[[], None]) -> None:
        if priority > URGENT:
            body()
            return
        with self._urgent_cv:
            self._urgent += 1
        try:
            body()
        finally:
            with self._urgent_cv:
                self._urgent -= 1
                self._urgent_cv.notify_all()

    def _yield_to_urgent(self, timeout: float = 2.0) -> None:
        """Block a lower-priority streaming job while urgent work runs (bounded wait)."""
        with self._urgent_cv:
            self._urgent_cv.wait_for(lambda: self._urgent == 0, timeout)

    def lane(self, name: str) -> Lane:
        if name not in self._lanes:
            self._lanes[name] = Lane(name)
        return self._lanes[name]

    async def call(self, lane: str, priority: Priority, fn: Callable[..., T], *args: Any) -> T:
        """Run ``fn(*args)`` on a lane's worker thread and return its result.

        Cancelling this coroutine removes a job that has not started; a running
        job finishes in its thread and its result is dropped.
        """
        fut: Future[T] = Future()

        def body() -> None:
            if not fut.set_running_or_notify_cancel():
                return
            try:
                fut.set_result(fn(*args))
            except BaseException as e:  # handed to the awaiting coroutine
                fut.set_exception(e)

        job = self.lane(lane).submit(priority, lambda: self._run_job(priority, body))
        try:
            return await asyncio.wrap_future(fut)
        except asyncio.CancelledError:
            job.cancelled = True
            fut.cancel()
            raise

    async def iterate(
        self, lane: str, priority: Priority, make: Callable[[], Iterator[T]]
    ) -> AsyncIterator[T]:
        """Drain the iterator ``make()`` on a lane's worker, yielding its items as they come.

        Closing or cancelling the consumer removes a job that has not started,
        and stops a running one before its next item. Items are handed over in
        a queue bounded by the iterator itself (callers bound their generators,
        e.g. an LLM's max_tokens).
        """
        loop = asyncio.get_running_loop()
        items: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()
        stop = threading.Event()

        def put(kind: str, value: Any) -> None:
            try:
                loop.call_soon_threadsafe(items.put_nowait, (kind, value))
            except RuntimeError:  # loop closed: nobody is listening any more
                stop.set()

        def body() -> None:
            try:
                it = make()
                try:
                    while not stop.is_set():
                        if priority > URGENT:
                            self._yield_to_urgent()  # before computing the next item
                        try:
                            item = next(it)
                        except StopIteration:
                            break
                        put("item", item)
                finally:
                    close = getattr(it, "close", None)
                    if close is not None:
                        close()
                put("end", None)
            except BaseException as e:
                put("error", e)

        job = self.lane(lane).submit(priority, lambda: self._run_job(priority, body))
        try:
            while True:
                kind, value = await items.get()
                if kind == "item":
                    yield value
                elif kind == "end":
                    return
                else:
                    raise value
        finally:
            job.cancelled = True
            stop.set()

    def close(self) -> None:
        for lane in self._lanes.values():
            lane.stop()
