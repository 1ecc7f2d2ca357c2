import asyncio
import contextlib
import threading

import pytest

from pipelines.compute import Compute, Dropped, Priority


@pytest.fixture
def compute():
    c = Compute()
    yield c
    c.close()


async def test_call_runs_in_a_worker_thread(compute: Compute) -> None:
    main = threading.get_ident()
    ident = await compute.call("x", Priority.LLM, threading.get_ident)
    assert ident != main


async def test_most_urgent_job_runs_first(compute: Compute) -> None:
    gate = threading.Event()
    order: list[str] = []
    blocker = asyncio.ensure_future(compute.call("x", Priority.VISION, gate.wait))
    await asyncio.sleep(0.05)  # the blocker occupies the worker
    jobs = [asyncio.ensure_future(compute.call("x", p, order.append, p.name))
            for p in (Priority.VISION, Priority.ASR_PARTIAL, Priority.TTS_REST, Priority.ASR_FINAL)]
    await asyncio.sleep(0.05)
    gate.set()
    await asyncio.gather(blocker, *jobs)
    assert order == ["ASR_FINAL", "TTS_REST", "ASR_PARTIAL", "VISION"]


async def test_cancelled_before_start_never_runs(compute: Compute) -> None:
    gate = threading.Event()
    ran: list[int] = []
    blocker = asyncio.ensure_future(compute.call("x", Priority.LLM, gate.wait))
    await asyncio.sleep(0.05)
    victim = asyncio.ensure_future(compute.call("x", Priority.LLM, ran.append, 1))
    await asyncio.sleep(0.05)
    victim.cancel()
    with pytest.raises(asyncio.CancelledError):
        await victim
    assert compute.lane("x").queued() == 0
    gate.set()
    await blocker
    await compute.call("x", Priority.LLM, ran.append, 2)
    assert ran == [2]


async def test_errors_reach_the_caller(compute: Compute) -> None:
    def boom() -> None:
        raise ValueError("bad model")
    with pytest.raises(ValueError, match="bad model"):
        await compute.call("x", Priority.LLM, boom)


async def test_iterate_streams_and_stops_when_the_consumer_leaves(compute: Compute) -> None:
    produced: list[int] = []
    release = threading.Event()

    def numbers():
        for i in range(1000):
            produced.append(i)
            yield i
            if i == 2:
                release.wait(5)

    got = []
    async with contextlib.aclosing(compute.iterate("x", Priority.LLM, numbers)) as items:
        async for n in items:
            got.append(n)
            if n == 2:
                break  # aclosing closes the generator → the worker stops
    release.set()
    await compute.call("x", Priority.LLM, lambda: None)  # the lane is free again
    assert got == [0, 1, 2]
    assert len(produced) <= 4  # stopped before its next item, not after 1000


async def test_streaming_jobs_pause_while_urgent_work_runs(compute: Compute) -> None:
    events: list[str] = []
    urgent_started = threading.Event()
    finish_urgent = threading.Event()

    def tokens():
        for i in range(3):
            events.append(f"token{i}")
            yield i

    def first_audio() -> None:
        urgent_started.set()
        finish_urgent.wait(5)
        events.append("urgent done")

    async def consume() -> None:
        async for _ in compute.iterate("llm", Priority.LLM, tokens):
            pass

    urgent = asyncio.ensure_future(compute.call("tts", Priority.TTS_FIRST, first_audio))
    await asyncio.to_thread(urgent_started.wait, 5)
    consumer = asyncio.ensure_future(consume())
    await asyncio.sleep(0.2)
    assert events == []  # the LLM on another lane waits for the urgent TTS job
    finish_urgent.set()
    await asyncio.gather(consumer, urgent)
    assert events == ["urgent done", "token0", "token1", "token2"]


# ---- remote lanes: requests to a model server ----------------------------------------------

async def test_a_remote_lane_orders_waiting_requests_by_the_policy(compute: Compute) -> None:
    """One slot: while it is taken, the waiting requests go most urgent first; a newer
    request with the same key makes the queued one stale (Dropped), never sent."""
    release = asyncio.Event()
    sent: list[str] = []

    def request(name: str, wait: asyncio.Event | None = None):  # type: ignore[no-untyped-def]
        async def send() -> str:
            sent.append(name)
            if wait is not None:
                await wait.wait()
            return name
        return send

    first = asyncio.ensure_future(compute.remote("asr@x", 1, Priority.ASR_PARTIAL,
                                                 request("busy", release)))
    await asyncio.sleep(0)
    old = asyncio.ensure_future(compute.remote("asr@x", 1, Priority.ASR_PARTIAL,
                                               request("old partial"), key="p"))
    new = asyncio.ensure_future(compute.remote("asr@x", 1, Priority.ASR_PARTIAL,
                                               request("new partial"), key="p"))
    final = asyncio.ensure_future(compute.remote("asr@x", 1, Priority.ASR_FINAL,
                                                 request("final")))
    await asyncio.sleep(0.01)
    assert sent == ["busy"]  # one slot
    release.set()
    assert await asyncio.gather(first, new, final) == ["busy", "new partial", "final"]
    with pytest.raises(Dropped):
        await old
    assert sent == ["busy", "final", "new partial"]


async def test_a_remote_lane_frees_its_slot_on_failure_and_cancellation(compute: Compute) -> None:
    hang = asyncio.Event()

    async def fails() -> str:
        raise RuntimeError("the server is down")

    async def hangs() -> str:
        await hang.wait()
        return "never"

    async def answers() -> str:
        return "ok"

    with pytest.raises(RuntimeError):
        await compute.remote("tts@x", 1, Priority.TTS_FIRST, fails)
    stuck = asyncio.ensure_future(compute.remote("tts@x", 1, Priority.TTS_FIRST, hangs))
    waiting = asyncio.ensure_future(compute.remote("tts@x", 1, Priority.TTS_REST, answers))
    await asyncio.sleep(0.01)
    waiting.cancel()  # cancelled while queued: removed
    stuck.cancel()  # cancelled while sending: the request is cancelled, its slot freed
    for task in (stuck, waiting):
        with contextlib.suppress(asyncio.CancelledError):
            await task
    assert await compute.remote("tts@x", 1, Priority.TTS_REST, answers) == "ok"
    assert compute.remote_lane("tts@x", 1).queued() == 0
