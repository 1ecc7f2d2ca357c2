"""The one place model work is queued and run: lanes of worker threads under one policy.

Each engine kind runs on its own *lane* (``asr``, ``llm``, ``tts`` …): a worker
thread whose queue follows ``scheduling.Policy`` — most urgent class first,
fair between sessions, superseded or expired work dropped, batchable work
handed out together (after a gathering window of a few ms at most). Callers
cancelled before their work starts remove it; running work is abandoned (its
result dropped) and streaming work (LLM tokens) stops before its next item.

Lanes share the cores, so priority also holds *across* lanes: while urgent
work (``URGENT`` and above: a final transcript, a reply's first audio) runs on
any lane, streaming work of lower priority waits between two items; and
background work (VISION) starts only while no other model work runs.

A model on another server (``asr.engine = "openai"`` …) runs on a *remote lane*:
the same policy decides which request goes next, but up to ``slots`` requests are
in flight at once and none of them holds a core here, so they take no part in
the cross-lane rules above.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Hashable, Iterator, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, TypeVar

from pipelines.metrics import ComputeMetrics
from pipelines.scheduling import URGENT, Admission, Policy, Priority, State, Work
from streaming.errors import VoxlensError

T = TypeVar("T")
R = TypeVar("R")

__all__ = ["URGENT", "Compute", "Dropped", "Priority"]


class Dropped(VoxlensError):
    """The work was superseded by newer work or expired before it could run."""

    code = "stale"


@dataclass(eq=False)
class _Job(Work):
    future: Future[Any] = field(default_factory=Future)
    fn: Callable[[], Any] | None = None  # single work
    item: Any = None  # batchable work: its item, and the function that runs a batch of items
    batch_fn: Callable[[list[Any]], Sequence[Any]] | None = None


class Lane:
    """One worker thread and its policy."""

    def __init__(self, name: str, compute: Compute, max_batch: int, gather_s: float,
                 fifo: bool, order: Sequence[Priority] | None) -> None:
        self.name = name
        self._compute = compute
        self._policy = Policy(max_batch, fifo=fifo, order=order)
        self._gather_s = gather_s
        self._cv = threading.Condition()
        self._stopped = False
        self._thread = threading.Thread(target=self._work, name=f"lane-{name}", daemon=True)
        self._thread.start()

    def submit(self, job: _Job) -> None:
        with self._cv:
            if self._stopped:
                raise RuntimeError(f"lane {self.name} is stopped")
            stale = self._policy.add(job, time.monotonic())
            self._cv.notify()
        self._drop(stale)

    def cancel(self, job: _Job) -> None:
        with self._cv:
            removed = self._policy.cancel(job)
        if removed:
            self._compute.metrics.cancelled(self.name, job.priority)
        job.future.cancel()

    def queued(self) -> int:
        with self._cv:
            return len(self._policy)

    def _drop(self, jobs: Sequence[Work]) -> None:
        for job in jobs:
            assert isinstance(job, _Job)
            self._compute.metrics.stale(self.name, job.priority)
            if job.future.set_running_or_notify_cancel():
                job.future.set_exception(Dropped("superseded or expired before it could run"))

    def _take(self) -> list[_Job] | None:
        with self._cv:
            while True:
                while not self._stopped and not len(self._policy):
                    self._cv.wait()
                if self._stopped:
                    return None
                head = self._policy.peek()
                if head is None or not self._compute.background_must_wait(head.priority):
                    break
                self._cv.wait(0.02)  # background work waits; anything queued meanwhile goes first
            now = time.monotonic()
            stale = self._policy.expire(now)
            batch = self._policy.next(now)
            if batch and batch[0].batch_key is not None and self._gather_s > 0:
                until = now + self._gather_s  # a lone request waits this long at most
                while len(batch) < self._policy.max_batch and (left := until - time.monotonic()) > 0:
                    self._cv.wait(left)
                    batch += self._policy.mates(batch)
        self._drop(stale)
        return [j for j in batch if isinstance(j, _Job)]

    def _work(self) -> None:
        while (batch := self._take()) is not None:
            live = [j for j in batch if j.future.set_running_or_notify_cancel()]
            if not live:
                continue
            start = time.monotonic()
            for job in live:
                self._compute.metrics.waited(self.name, job.priority, start - job.enqueued_at)
                if job.priority <= Priority.LLM:
                    self._compute.admission.record(start - job.enqueued_at, start)
            self._compute.run_job(live[0].priority, lambda b=live: self._run(b))  # type: ignore[misc]
            self._compute.metrics.ran(self.name, live[0].priority, time.monotonic() - start,
                                      len(live))

    @staticmethod
    def _run(batch: list[_Job]) -> None:
        try:
            if batch[0].batch_fn is not None:
                results = batch[0].batch_fn([j.item for j in batch])
                for job, result in zip(batch, results, strict=True):
                    job.future.set_result(result)
            else:
                assert batch[0].fn is not None
                batch[0].future.set_result(batch[0].fn())
        except BaseException as e:  # handed to every awaiting coroutine
            for job in batch:
                if not job.future.done():
                    job.future.set_exception(e)

    def stop(self, timeout: float = 10.0) -> None:
        """Drop queued work and wait (up to ``timeout``) for the running work to finish."""
        with self._cv:
            self._stopped = True
            self._cv.notify_all()
        if self._thread is not threading.current_thread():
            self._thread.join(timeout)


class RemoteLane:
    """Requests to a model server: the lane's policy orders them, ``slots`` run at once.

    The waiting happens on the event loop (the work is I/O): a caller queues, is granted a
    slot, then performs its request itself, so cancelling it cancels the request."""

    def __init__(self, name: str, compute: Compute, slots: int, fifo: bool,
                 order: Sequence[Priority] | None) -> None:
        self.name = name
        self._compute = compute
        self._policy = Policy(1, fifo=fifo, order=order)
        self._slots = slots
        self._running = 0
        self._grants: dict[Work, asyncio.Future[None]] = {}

    def queued(self) -> int:
        return len(self._policy)

    async def call(self, fn: Callable[[], Awaitable[T]], work: Work) -> T:
        granted = asyncio.get_running_loop().create_future()
        self._grants[work] = granted
        self._drop(self._policy.add(work, time.monotonic()))
        self._grant()
        try:
            await granted
        except asyncio.CancelledError:
            self._grants.pop(work, None)
            if self._policy.cancel(work):
                self._compute.metrics.cancelled(self.name, work.priority)
            elif work.state is State.RUNNING:  # granted as it was cancelled: give it back
                self._release()
            raise
        start = time.monotonic()
        try:
            return await fn()
        finally:
            self._compute.metrics.ran(self.name, work.priority, time.monotonic() - start, 1)
            self._release()

    def _grant(self) -> None:
        now = time.monotonic()
        self._drop(self._policy.expire(now))
        while self._running < self._slots and (batch := self._policy.next(now)):
            work = batch[0]
            self._running += 1
            self._compute.metrics.waited(self.name, work.priority, now - work.enqueued_at)
            if work.priority <= Priority.LLM:
                self._compute.admission.record(now - work.enqueued_at, now)
            grant = self._grants.pop(work, None)
            if grant is not None and not grant.done():
                grant.set_result(None)

    def _release(self) -> None:
        self._running -= 1
        self._grant()

    def _drop(self, works: Sequence[Work]) -> None:
        for work in works:
            self._compute.metrics.stale(self.name, work.priority)
            grant = self._grants.pop(work, None)
            if grant is not None and not grant.done():
                grant.set_exception(Dropped("superseded or expired before it could run"))


class Compute:
    """Lanes by engine kind, shared by every session of the process."""

    def __init__(self, *, max_batch: int = 4, gather_ms: float = 3.0,
                 admission_wait_ms: float = 1000.0, fifo: bool = False,
                 order: Sequence[Priority] | None = None,
                 metrics: ComputeMetrics | None = None) -> None:
        """``order``: work classes most urgent first (default ``Priority``'s order);
        ``fifo``: plain first-come-first-served lanes, no cross-lane priority (a baseline
        for benchmarks, not for production)."""
        self._lanes: dict[str, Lane] = {}
        self._remote: dict[str, RemoteLane] = {}
        self._order = list(order) if order is not None else None
        Policy(order=self._order)  # refuse a bad order now, not in a lane thread
        self.fifo = fifo
        self._max_batch = max_batch
        self._gather_s = gather_ms / 1000
        self.metrics = metrics or ComputeMetrics()
        self.admission = Admission(admission_wait_ms / 1000)
        self._urgent = 0  # urgent work running now, on any lane
        self._foreground = 0  # work of any class above VISION running now, on any lane
        self._urgent_cv = threading.Condition()
        self._lock = threading.Lock()

    def lane(self, name: str) -> Lane:
        with self._lock:
            if name not in self._lanes:
                self._lanes[name] = Lane(name, self, self._max_batch, self._gather_s, self.fifo,
                                         self._order)
            return self._lanes[name]

    def remote_lane(self, name: str, slots: int) -> RemoteLane:
        """The lane of one model server (``slots``: its requests in flight at once; the
        first caller's count holds)."""
        if name not in self._remote:
            self._remote[name] = RemoteLane(name, self, slots, self.fifo, self._order)
        return self._remote[name]

    async def remote(self, lane: str, slots: int, priority: Priority,
                     fn: Callable[[], Awaitable[T]], *, session: str | None = None,
                     key: Hashable | None = None, deadline_s: float | None = None) -> T:
        """Await ``fn()`` (a request to a model server) when the lane's policy grants it a
        slot. ``key`` and ``deadline_s`` as in ``call``; cancelling cancels the request."""
        work = Work(priority, session, key, _deadline(deadline_s))
        return await self.remote_lane(lane, slots).call(fn, work)

    def saturated(self) -> bool:
        """Whether urgent work has been waiting too long lately (admission control)."""
        return self.admission.saturated(time.monotonic())

    def background_must_wait(self, priority: Priority) -> bool:
        """Background (VISION) work starts only while no other model work runs, on any lane."""
        return not self.fifo and priority >= Priority.VISION and self._foreground > 0

    def run_job(self, priority: Priority, body: Callable[[], None]) -> None:
        """Run work, keeping the cross-lane counts (urgent work pauses LLM token loops; any
        foreground work holds background work back)."""
        if self.fifo:
            body()
            return
        urgent = priority <= URGENT
        with self._urgent_cv:
            if priority < Priority.VISION:
                self._foreground += 1
            self._urgent += urgent
        try:
            body()
        finally:
            with self._urgent_cv:
                self._urgent -= urgent
                if priority < Priority.VISION:
                    self._foreground -= 1
                self._urgent_cv.notify_all()

    def _yield_to_urgent(self, timeout: float = 2.0) -> None:
        """Block a lower-priority streaming job while urgent work runs (bounded wait)."""
        with self._urgent_cv:
            self._urgent_cv.wait_for(lambda: self._urgent == 0, timeout)

    async def _await(self, lane: Lane, job: _Job) -> Any:
        lane.submit(job)
        try:
            return await asyncio.wrap_future(job.future)
        except asyncio.CancelledError:
            lane.cancel(job)
            raise

    async def call(self, lane: str, priority: Priority, fn: Callable[..., T], *args: Any,
                   session: str | None = None, key: Hashable | None = None,
                   deadline_s: float | None = None) -> T:
        """Run ``fn(*args)`` on a lane's worker thread and return its result.

        ``key``: newer work with the same key supersedes this while queued;
        ``deadline_s``: drop it if it waited longer (both raise ``Dropped``).
        Cancelling this coroutine removes work that has not started; running
        work finishes in its thread and its result is dropped.
        """
        job = _Job(priority, session, key, _deadline(deadline_s), fn=lambda: fn(*args))
        result: T = await self._await(self.lane(lane), job)
        return result

    async def call_batch(self, lane: str, priority: Priority, item: Any,
                         batch_fn: Callable[[list[Any]], Sequence[R]], *, batch_key: Hashable,
                         session: str | None = None, key: Hashable | None = None,
                         deadline_s: float | None = None) -> R:
        """Like ``call``, for an engine with a batch call: ``batch_fn(items)`` returns one
        result per item, and queued work with the same ``batch_key`` runs together."""
        job = _Job(priority, session, key, _deadline(deadline_s), batch_key=batch_key,
                   item=item, batch_fn=batch_fn)
        result: R = await self._await(self.lane(lane), job)
        return result

    async def iterate(self, lane: str, priority: Priority, make: Callable[[], Iterator[T]],
                      *, session: str | None = None) -> AsyncIterator[T]:
        """Drain the iterator ``make()`` on a lane's worker, yielding its items as they come.

        Closing or cancelling the consumer removes work that has not started,
        and stops running work before its next item. Items are handed over in
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

        def drain() -> None:
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

        job = _Job(priority, session, fn=drain)
        target = self.lane(lane)
        target.submit(job)
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
            stop.set()
            if job.state is State.QUEUED:
                target.cancel(job)

    def close(self) -> None:
        for lane in self._lanes.values():
            lane.stop()


def _deadline(seconds: float | None) -> float | None:
    return None if seconds is None else time.monotonic() + seconds
