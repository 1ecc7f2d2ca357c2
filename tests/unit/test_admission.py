"""Admission control at the session registry: a clear 'busy' instead of everyone degrading."""

import time

import pytest

from pipelines.compute import Compute
from pipelines.engines.fakes import FakeAsr, FakeLlm, FakeTts, FakeVad
from pipelines.session import Engines
from server.engines import session_config
from server.settings import load_settings
from server.state import AppState, Busy


@pytest.fixture
def state():  # type: ignore[no-untyped-def]
    settings = load_settings(server={"max_sessions": 3})
    compute = Compute(admission_wait_ms=200)
    s = AppState(settings, compute, session_config(settings),
                 engines=Engines(FakeVad(), FakeAsr(), FakeLlm(), FakeTts()))
    yield s
    compute.close()


def test_sessions_are_refused_while_urgent_work_waits_too_long(state: AppState) -> None:
    first = state.open_session("ws")
    for _ in range(5):
        state.compute.admission.record(0.9, time.monotonic())  # finals waited 900 ms
    with pytest.raises(Busy) as err:
        state.open_session("webrtc")
    assert err.value.code == "busy" and "saturated" in err.value.message
    assert b"voxlens_sessions_refused_total 1.0" in state.compute.metrics.render()
    state.forget(first)
    assert b'voxlens_sessions{transport="ws"} 0.0' in state.compute.metrics.render()


def test_session_limit(state: AppState) -> None:
    for _ in range(3):
        state.open_session("ws")
    with pytest.raises(Busy, match="session limit"):
        state.open_session("ws")


def test_not_ready_until_models_load(state: AppState) -> None:
    state.engines = None
    with pytest.raises(Busy) as err:
        state.open_session("ws")
    assert err.value.code == "not_ready"


def test_per_client_limits_at_the_registry() -> None:
    settings = load_settings(limits={"sessions_per_client": 2, "connections_per_minute": 0})
    compute = Compute()
    state = AppState(settings, compute, session_config(settings),
                     engines=Engines(FakeVad(), FakeAsr(), FakeLlm(), FakeTts()))
    try:
        first = state.open_session("ws", "key-a")
        state.open_session("webrtc", "key-a")  # one rule for every transport
        with pytest.raises(Busy) as err:
            state.open_session("ws", "key-a")
        assert err.value.code == "busy" and err.value.status == 429
        assert b"voxlens_sessions_refused_total 1.0" in compute.metrics.render()
        state.open_session("ws", "key-b")
        for _ in range(3):  # MQTT devices name no client: not counted
            state.open_session("mqtt")
        state.forget(first)
        state.forget(first)  # (twice is harmless)
        state.open_session("ws", "key-a")
        assert state.limits.sessions("key-a") == 2 and state.limits.sessions("key-b") == 1
    finally:
        compute.close()
