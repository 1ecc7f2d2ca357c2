"""The scheduling policy on its own: no threads, no models, no clock."""

import asyncio
import threading

import pytest

from pipelines.compute import Compute, Dropped
from pipelines.scheduling import Admission, Policy, Priority, State, Work

P = Priority


def names(batch: list[Work]) -> list[str | None]:
    return [w.session for w in batch]


def drain(policy: Policy, now: float = 0.0) -> list[list[Work]]:
    out = []
    while batch := policy.next(now):
        out.append(batch)
    return out


def test_most_urgent_class_first_then_first_come() -> None:
    p = Policy()
    order = [P.VISION, P.ASR_PARTIAL, P.TTS_REST, P.LLM, P.TTS_FIRST, P.ASR_FINAL, P.LLM]
    works = [Work(prio, session=f"s{i}") for i, prio in enumerate(order)]
    for w in works:
        p.add(w, 0.0)
    ran = [b[0] for b in drain(p)]
    assert [w.priority for w in ran] == sorted(order)
    llms = [w for w in ran if w.priority is P.LLM]
    assert llms == [works[3], works[6]]  # same class: first come first


def test_newer_work_with_the_same_key_supersedes_queued_work() -> None:
    p = Policy()
    old = Work(P.ASR_PARTIAL, "a", key=("partial", "a"))
    other = Work(P.ASR_PARTIAL, "b", key=("partial", "b"))
    assert p.add(old, 0.0) == [] and p.add(other, 0.0) == []
    new = Work(P.ASR_PARTIAL, "a", key=("partial", "a"))
    assert p.add(new, 0.1) == [old]
    assert old.state is State.STALE
    assert {w for b in drain(p) for w in b} == {other, new}


def test_expired_work_is_dropped_not_run() -> None:
    p = Policy()
    frame = Work(P.VISION, "a", deadline=1.0)
    final = Work(P.ASR_FINAL, "a")
    p.add(frame, 0.0)
    p.add(final, 0.0)
    assert p.next(0.5) == [final]
    assert p.next(2.0) == []
    assert frame.state is State.STALE


def test_cancel_before_start_removes_work() -> None:
    p = Policy()
    a, b = Work(P.LLM, "a"), Work(P.LLM, "b")
    p.add(a, 0.0)
    p.add(b, 0.0)
    assert p.cancel(a) is True and a.state is State.CANCELLED
    assert p.next(0.0) == [b]
    assert p.cancel(b) is False  # already running: only its result can be dropped


def test_fairness_between_sessions_of_the_same_class() -> None:
    p = Policy()
    for _ in range(3):  # session a floods the lane before b asks once
        p.add(Work(P.TTS_REST, "a"), 0.0)
    p.add(Work(P.TTS_REST, "b"), 0.0)
    first = p.next(0.0)
    assert names(first) == ["a"]
    assert names(p.next(0.0)) == ["b"]  # b is served before a's second and third
    assert [names(b) for b in drain(p)] == [["a"], ["a"]]


def test_batches_share_key_and_class_and_respect_the_bound() -> None:
    p = Policy(max_batch=3)
    key = ("whisper", 10)
    finals = [Work(P.ASR_FINAL, f"s{i}", batch_key=key) for i in range(4)]
    partial = Work(P.ASR_PARTIAL, "x", batch_key=key)
    other = Work(P.ASR_FINAL, "y", batch_key=("whisper", 15))
    for w in [*finals, partial, other]:
        p.add(w, 0.0)
    first = p.next(0.0)
    assert first == finals[:3]  # bounded by max_batch
    assert p.mates(first) == []  # already full
    second = p.next(0.0)
    assert second[0] in (finals[3], other) and partial not in second
    assert all(w.batch_key == second[0].batch_key for w in second)
    rest = [w for b in drain(p) for w in b]
    assert partial in rest


def test_gathering_adds_late_arrivals_to_a_batch_that_has_room() -> None:
    p = Policy(max_batch=4)
    key = ("whisper", 10)
    a = Work(P.ASR_FINAL, "a", batch_key=key)
    p.add(a, 0.0)
    batch = p.next(0.0)
    late = Work(P.ASR_FINAL, "b", batch_key=key)
    p.add(late, 0.001)
    assert p.mates(batch) == [late]
    assert late.state is State.RUNNING and len(p) == 0


def test_admission_refuses_when_urgent_work_waits_too_long() -> None:
    adm = Admission(max_wait_s=0.5, window_s=10)
    assert not adm.saturated(0.0)
    for t in range(5):
        adm.record(0.1, float(t))
    assert not adm.saturated(5.0)
    for t in range(5, 10):
        adm.record(1.5, float(t))
    assert adm.saturated(10.0)  # mean of the window: (5 × 0.1 + 5 × 1.5) / 10 = 0.8
    assert not adm.saturated(30.0)  # the overload is forgotten once it is out of the window


async def test_compute_runs_queued_batchable_work_as_one_batch() -> None:
    compute = Compute(gather_ms=1)
    gate = threading.Event()
    calls: list[list[int]] = []

    def double(items: list[int]) -> list[int]:
        calls.append(items)
        return [2 * i for i in items]

    try:
        blocker = asyncio.ensure_future(compute.call("asr", P.ASR_FINAL, gate.wait, 5))
        await asyncio.sleep(0.05)
        jobs = [asyncio.ensure_future(compute.call_batch(
            "asr", P.ASR_FINAL, i, double, batch_key="k", session=f"s{i}")) for i in (1, 2, 3)]
        await asyncio.sleep(0.05)
        gate.set()
        assert await asyncio.gather(*jobs) == [2, 4, 6]
        assert calls == [[1, 2, 3]]
        assert await compute.call_batch("asr", P.ASR_FINAL, 5, double, batch_key="k") == 10
        assert calls[-1] == [5]  # a lone request runs alone after the short gathering window
        await blocker
    finally:
        compute.close()


async def test_compute_superseded_partial_raises_dropped() -> None:
    compute = Compute()
    gate = threading.Event()
    try:
        blocker = asyncio.ensure_future(compute.call("asr", P.ASR_FINAL, gate.wait, 5))
        await asyncio.sleep(0.05)
        old = asyncio.ensure_future(compute.call("asr", P.ASR_PARTIAL, lambda: "old", key="p"))
        await asyncio.sleep(0.02)
        new = asyncio.ensure_future(compute.call("asr", P.ASR_PARTIAL, lambda: "new", key="p"))
        with pytest.raises(Dropped):
            await old
        gate.set()
        assert await new == "new"
        await blocker
        assert b'voxlens_dropped_stale_total{lane="asr",work="asr_partial"} 1.0' in \
            compute.metrics.render()
    finally:
        compute.close()


def test_fifo_baseline_ignores_classes_and_keys() -> None:
    p = Policy(fifo=True)
    a = Work(P.VISION, "a", key="k")
    b = Work(P.ASR_FINAL, "b", key="k")
    assert p.add(a, 0.0) == [] and p.add(b, 0.0) == []  # nothing superseded
    assert [w for batch in drain(p) for w in batch] == [a, b]  # arrival order


def test_class_order_is_configurable() -> None:
    p = Policy(order=[P.VISION, P.ASR_FINAL, P.TTS_FIRST, P.LLM, P.TTS_REST, P.ASR_PARTIAL])
    final, frame = Work(P.ASR_FINAL, "a"), Work(P.VISION, "b")
    p.add(final, 0.0)
    p.add(frame, 0.0)
    assert p.next(0.0) == [frame]
    with pytest.raises(ValueError, match="exactly once"):
        Policy(order=[P.ASR_FINAL, P.ASR_FINAL])
