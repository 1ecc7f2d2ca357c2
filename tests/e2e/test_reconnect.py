"""`voxlens talk` and `voxlens desktop` reconnect by themselves (issue 16, point 4), against real
server processes on 127.0.0.1: HAProxy (deploy/haproxy.cfg) in front of two ``voxlens serve``
nodes, and a single server killed and started again on its port.

- A node drained with SIGTERM ends its conversation with ``session.closing``: the client (talk
  over WebSocket, the desktop app over WebRTC) connects again through the balancer by itself,
  lands on the other node, and its next turn is answered there.
- A server killed outright (SIGKILL: no last word) and started again on the same port: talk
  keeps trying, with growing waits, and goes on once it is back.

The nodes run the small packaged models (Whisper tiny.en, SmolLM2-135M, Piper joe, no
vision): the tests are about the connection, not the answers' quality."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import signal
import sys
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from client.common.wavio import write_wav
from server.launch import Fleet, ServerProcess, free_port, spawn_fleet, spawn_server
from tests.conftest import ARTIFACTS, ROOT, speak, until
from tests.e2e.test_desktop import DesktopProcess

GUARD_S = 120.0  # a guard against hanging, not a measure of speed
LIGHT = {"VOXLENS_ASR__MODEL": "tiny.en", "VOXLENS_LLM__MODEL": "smollm2-135m",
         "VOXLENS_VISION__ENGINE": "none", "VOXLENS_TTS__VOICES": '{"en": "joe"}',
         "VOXLENS_LLM__TEMPERATURE": "0", "VOXLENS_WEBRTC__HOST_ADDRESSES": '["127.0.0.1"]',
         "VOXLENS_LIMITS__SESSIONS_PER_CLIENT": "0", "VOXLENS_LIMITS__CONNECTIONS_PER_MINUTE": "0",
         "VOXLENS_SERVER__DRAIN_TIMEOUT_S": "3"}


# ---- the balancer and its two nodes (server/launch.py) -----------------------------------------

def health(node: ServerProcess) -> tuple[int, dict[str, Any]]:
    try:
        with urllib.request.urlopen(f"{node.http}/healthz", timeout=5) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())
    except OSError:
        return 0, {}


def sessions(node: ServerProcess) -> int:
    return int(health(node)[1].get("sessions", 0))


@pytest.fixture
def fleet(request: pytest.FixtureRequest) -> Iterator[Fleet]:
    name = re.sub(r"\W+", "-", request.node.name.removeprefix("test_")).strip("-")
    f = spawn_fleet(2, ARTIFACTS / f"reconnect-{name}", env=LIGHT)
    try:
        yield f
    finally:
        f.stop()


async def the_node_with_the_session(fleet: Fleet) -> tuple[ServerProcess, ServerProcess]:
    """(the node holding the one session, the other node)."""
    await until(lambda: sum(sessions(n) for n in fleet.nodes) == 1, GUARD_S)
    first, second = fleet.nodes
    return (first, second) if sessions(first) == 1 else (second, first)


# ---- voxlens talk as a child process ---------------------------------------------------------

class TalkProcess:
    """``voxlens talk --text -``: typed turns written to its stdin; its stdout events (JSON
    lines) and stderr notes (plain lines) collected as they come."""

    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []
        self.notes: list[str] = []
        self.proc: asyncio.subprocess.Process | None = None
        self._readers: list[asyncio.Task[None]] = []

    async def start(self, url: str, *args: str) -> None:
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "server.cli", "talk", "--url", url, "--text", "-",
            "--timeout", str(GUARD_S), *args, cwd=ROOT, stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        assert self.proc.stdout is not None and self.proc.stderr is not None
        self._readers = [asyncio.create_task(self._read(self.proc.stdout, self._event)),
                         asyncio.create_task(self._read(self.proc.stderr, self.notes.append))]

    def _event(self, line: str) -> None:
        self.events.append(json.loads(line))

    @staticmethod
    async def _read(stream: asyncio.StreamReader, keep: Any) -> None:
        async for line in stream:
            keep(line.decode().rstrip("\n"))

    def of(self, kind: str) -> list[dict[str, Any]]:
        return [e for e in self.events if e["type"] == kind]

    async def type(self, text: str) -> None:
        assert self.proc is not None and self.proc.stdin is not None
        self.proc.stdin.write(text.encode() + b"\n")
        await self.proc.stdin.drain()

    async def finish(self) -> int:
        """End its input: it exits once every turn was answered."""
        assert self.proc is not None and self.proc.stdin is not None
        self.proc.stdin.close()
        code = await asyncio.wait_for(self.proc.wait(), GUARD_S)
        await asyncio.wait_for(asyncio.gather(*self._readers), 10)
        return code

    async def kill(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.kill()
            await self.proc.wait()
        for reader in self._readers:
            reader.cancel()
        await asyncio.gather(*self._readers, return_exceptions=True)


@contextlib.asynccontextmanager
async def talk(url: str, *args: str) -> AsyncIterator[TalkProcess]:
    t = TalkProcess()
    try:
        await t.start(url, *args)
        yield t
    finally:
        await t.kill()


def after(events: list[dict[str, Any]], kind: str, n: int) -> list[dict[str, Any]]:
    """The events that came after the ``n``-th (1-based) event of ``kind``."""
    seen = 0
    for i, ev in enumerate(events):
        seen += ev["type"] == kind
        if seen == n:
            return events[i + 1:]
    return []


# ---- the tests -------------------------------------------------------------------------------

@pytest.mark.parametrize("transport", ["ws", "webrtc"])
async def test_talk_goes_to_the_other_node_when_its_node_drains(fleet: Fleet,
                                                                transport: str) -> None:
    url = fleet.ws if transport == "ws" else fleet.http
    async with talk(url, "--transport", transport, "--ice-host", "127.0.0.1") as t:
        await t.type("What is two plus two?")
        await until(lambda: bool(t.of("reply.done")), GUARD_S)
        drained, other = await the_node_with_the_session(fleet)
        drained.proc.send_signal(signal.SIGTERM)
        # the drain's time is up: the node says session.closing, and talk opens a new session
        # through the balancer, by itself
        await until(lambda: len(t.of("session.ready")) == 2, GUARD_S)
        assert t.of("session.closing")[0]["reconnect"] is True
        assert sessions(other) == 1 and health(drained)[0] != 200
        assert await asyncio.to_thread(drained.proc.wait, GUARD_S) == 0
        await t.type("What is the capital of France?")
        await until(lambda: bool([e for e in after(t.events, "session.ready", 2)
                                  if e["type"] == "reply.done"]), GUARD_S)
        answer = next(e for e in after(t.events, "session.ready", 2) if e["type"] == "reply.done")
        assert answer["text"].strip()
        assert sessions(other) == 1  # answered on the other node
        assert await t.finish() == 0, t.notes
    first, second = t.of("session.ready")
    assert first["session_id"] != second["session_id"]
    assert not t.of("error"), t.of("error")
    notes = "\n".join(t.notes)
    assert "the server is restarting: reconnecting in" in notes, notes
    assert f"reconnected to {url}" in notes, notes


async def test_desktop_goes_to_the_other_node_when_its_node_drains(  # type: ignore[no-untyped-def]
        fleet: Fleet, voice, tmp_path: Path) -> None:
    audio, rate = speak(voice, "What is the capital of France?")
    question = tmp_path / "question.wav"
    write_wav(question, np.concatenate([np.zeros(rate // 2, np.float32), audio]), rate)
    app = DesktopProcess()
    try:
        await app.start(["--headless", "--stdin", "--url", fleet.http, "--mic-file", str(question),
                         "--no-camera", "--record", str(tmp_path / "reply.wav"),
                         "--language", "en", "--ice-host", "127.0.0.1"],
                        log=ARTIFACTS / "reconnect-desktop.log")
        await until(lambda: bool(app.of("reply.done")), GUARD_S)  # the spoken turn
        spoken = [e for e in app.of("transcript") if e["final"]]
        assert spoken and "capital of france" in spoken[0]["text"].lower(), spoken
        drained, other = await the_node_with_the_session(fleet)
        drained.proc.send_signal(signal.SIGTERM)
        await until(lambda: len(app.of("session.ready")) == 2, GUARD_S)
        assert app.of("session.closing")[0]["reconnect"] is True
        reconnecting = app.of("desktop.reconnecting")
        assert reconnecting and reconnecting[0]["reason"] == "the server is restarting"
        assert reconnecting[0]["message"].startswith("the server is restarting: reconnecting in")
        assert sessions(other) == 1
        assert await asyncio.to_thread(drained.proc.wait, GUARD_S) == 0
        await app.type("What is two plus two?")
        await until(lambda: bool([e for e in after(app.events, "session.ready", 2)
                                  if e["type"] == "reply.done"]), GUARD_S)
        assert sessions(other) == 1  # answered on the other node
        code = await app.stop(signal.SIGINT)
    finally:
        await app.kill()
    assert code == 0
    assert not app.of("error"), app.of("error")
    first, second = app.of("session.ready")
    assert first["session_id"] != second["session_id"]
    answer = next(e for e in after(app.events, "session.ready", 2) if e["type"] == "reply.done")
    assert answer["text"].strip()
    summary = app.of("desktop.exit")[0]  # what the app showed at the end
    assert summary["state"] == "disconnected" and summary["error"] is None, summary  # stopped
    assert summary["log"][-2] == "you: What is two plus two?", summary["log"]
    assert summary["log"][-1] == f"assistant: {answer['text']}", summary["log"]
    assert app.of("desktop.closed")[-1]["reason"] is None


async def test_talk_waits_for_a_killed_server_to_come_back() -> None:
    port = free_port()
    server = await asyncio.to_thread(spawn_server, ARTIFACTS / "reconnect-before-restart.log",
                                     env=LIGHT, port=port)
    try:
        async with talk(f"ws://127.0.0.1:{port}/ws") as t:
            await t.type("What is two plus two?")
            await until(lambda: bool(t.of("reply.done")), GUARD_S)
            server.proc.kill()  # no drain, no last word: the connection just drops
            await asyncio.to_thread(server.proc.wait, 30)
            await until(lambda: sum("reconnecting in" in n for n in t.notes) >= 2, GUARD_S)
            server = await asyncio.to_thread(  # back, on the same port
                spawn_server, ARTIFACTS / "reconnect-after-restart.log", env=LIGHT, port=port)
            await until(lambda: len(t.of("session.ready")) == 2, GUARD_S)
            await t.type("What is the capital of France?")
            await until(lambda: bool([e for e in after(t.events, "session.ready", 2)
                                      if e["type"] == "reply.done"]), GUARD_S)
            assert await t.finish() == 0, t.notes
    finally:
        if server.proc.poll() is None:
            server.stop()
    assert not t.of("session.closing")  # it was not told: it noticed
    notes = [n for n in t.notes if "reconnecting in" in n]
    assert notes[0].startswith("voxlens: the connection was lost: reconnecting in"), notes
    assert any("could not connect to" in n for n in notes[1:]), notes  # while it was down
    tries = [int(n.split("(try ")[1].split(" ")[0]) for n in notes]
    assert tries == list(range(1, len(tries) + 1))  # counted in a row
    assert f"reconnected to ws://127.0.0.1:{port}/ws" in "\n".join(t.notes)
