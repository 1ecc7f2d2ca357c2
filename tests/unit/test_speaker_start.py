"""The speaker client's ``session.start`` over MQTT, where nobody may be listening yet: sent
again until a ``session.ready`` answers it, waiting longer each time (a busy server answers
every start it gets), on a virtual clock (looptime)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from client.common.links import Incoming
from client.common.wavio import write_wav
from client.speaker.app import RECONNECT_MAX_S, START_RETRY_S, Speaker
from client.speaker.audio import FileAudio


class Unanswered:
    """A connection (and its link) on which nobody answers: it notes when each start went."""

    name, resend_start = "nobody", True

    def __init__(self) -> None:
        self.starts: list[float] = []

    async def send(self, message: dict[str, Any]) -> None:
        if message["type"] == "session.start":
            self.starts.append(asyncio.get_running_loop().time())

    async def send_audio(self, pcm: bytes) -> None:
        return None

    async def incoming(self) -> AsyncIterator[Incoming]:
        await asyncio.Event().wait()
        yield b""

    def connect(self) -> Any:
        raise AssertionError("not used")


@pytest.mark.looptime
async def test_an_unanswered_start_is_sent_again_after_longer_and_longer_waits(
        tmp_path: Path) -> None:
    wav = tmp_path / "in.wav"
    write_wav(wav, np.zeros(1600, dtype=np.float32), 16000)
    conn = Unanswered()
    speaker = Speaker(conn, FileAudio(wav, None, 16000, 24000))
    t0 = asyncio.get_running_loop().time()
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(40):
            await speaker._keep_session(conn)
    waits = np.diff([t0, *conn.starts]).round(3).tolist()
    expected = [START_RETRY_S]
    while sum(expected) + min(expected[-1] * 2, RECONNECT_MAX_S) <= 40:
        expected.append(min(expected[-1] * 2, RECONNECT_MAX_S))
    assert waits == expected and expected[-2:] == [RECONNECT_MAX_S] * 2


@pytest.mark.looptime
async def test_once_answered_it_waits_for_the_server_to_lose_the_session(tmp_path: Path) -> None:
    wav = tmp_path / "in.wav"
    write_wav(wav, np.zeros(1600, dtype=np.float32), 16000)
    conn = Unanswered()
    speaker = Speaker(conn, FileAudio(wav, None, 16000, 24000))
    speaker.ready.set()
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(60):
            await speaker._keep_session(conn)
    assert conn.starts == []
