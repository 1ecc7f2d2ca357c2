"""Per-client limits through the real app on 127.0.0.1 (HTTP, WebSocket and WebRTC over real
sockets), with fake engines: the models do not matter here, the logic around them does. Two
access keys make two clients on one loopback address. Limits are small and set per test;
nothing waits on a duration, each test waits for the effect (with a guard against a hang)."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
from collections.abc import AsyncIterator, Hashable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import pytest
from aiohttp import WSMsgType, web
from aiortc import RTCPeerConnection, RTCSessionDescription

from client.common.rtc_client import MicrophoneTrack
from pipelines.compute import Priority
from pipelines.engines.fakes import FakeAsr, FakeLlm, FakeTts, FakeVad
from pipelines.session import Engines
from server.app import create_app
from server.settings import load_settings
from server.state import STATE, AppState
from streaming.images import Image, encode_jpeg
from streaming.webrtc import EVENTS_LABEL, restrict_host_candidates

KEY_A = "vx-limits-key-a-5d0c9e71b2"
KEY_B = "vx-limits-key-b-08f3a6c4d9"
GUARD_S = 30.0  # a hang guard, never a timing assertion
REPLY = "Ok."
PICTURE = base64.b64encode(encode_jpeg(np.full((32, 32, 3), 128, np.uint8))).decode()


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


class FakeVlm:
    """Looks at once, except for the question "hold", which waits for ``release``."""

    name = "fake-vlm"

    def __init__(self) -> None:
        self.release = asyncio.Event()
        self.holding = 0

    async def look(self, image: Image, *, question: str | None = None,
                   priority: Priority = Priority.VISION, session: str | None = None,
                   key: Hashable | None = None) -> str:
        if question == "hold":
            self.holding += 1
            await self.release.wait()
        return "a grey square"


async def until(predicate: Any, what: str) -> None:
    async def poll() -> None:
        while not predicate():  # noqa: ASYNC110 (the state changes in other tasks)
            await asyncio.sleep(0.01)
    try:
        await asyncio.wait_for(poll(), GUARD_S)
    except TimeoutError:
        raise AssertionError(f"still waiting after {GUARD_S:.0f} s: {what}") from None


class Peer:
    """A WebSocket client whose events are read as they come."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        self.ws = ws
        self.events: list[dict[str, Any]] = []
        self.reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        async for msg in self.ws:
            if msg.type == WSMsgType.TEXT:
                self.events.append(json.loads(msg.data))

    def of(self, kind: str) -> list[dict[str, Any]]:
        return [e for e in self.events if e["type"] == kind]

    @property
    def first(self) -> dict[str, Any]:
        return self.events[0]

    async def send(self, message: dict[str, Any]) -> None:
        await self.ws.send_str(json.dumps(message))

    async def ended(self) -> int | None:
        """Wait for the server to close the socket; its close code."""
        await asyncio.wait_for(asyncio.shield(self.reader), GUARD_S)
        return self.ws.close_code

    async def answers(self) -> None:
        """A typed turn gets its reply; a turn over the rate waits as long as it was told."""
        while True:
            done, errors = len(self.of("reply.done")), len(self.of("error"))
            await self.send({"type": "text", "text": "Are you there?"})
            await until(lambda: len(self.of("reply.done")) > done  # noqa: B023
                        or len(self.of("error")) > errors or self.ws.closed,  # noqa: B023
                        "a reply or an error")
            assert not self.ws.closed, self.events[-3:]
            if len(self.of("reply.done")) > done:
                return
            error = self.of("error")[-1]
            assert error["code"] == "rate_limited" and not error["fatal"], error
            await asyncio.sleep(error["retry_after"])

    async def close(self) -> None:
        await self.ws.close()
        with contextlib.suppress(Exception):
            await self.reader


@dataclass
class App:
    app: web.Application
    base: str
    http: aiohttp.ClientSession
    vlm: FakeVlm

    @property
    def state(self) -> AppState:
        return self.app[STATE]

    async def open(self, key: str, query: str = "") -> Peer:
        """A WebSocket to /ws, once its first event (session.ready or an error) came."""
        headers = bearer(key) if key else {}
        peer = Peer(await self.http.ws_connect(f"{self.base}/ws{query}", headers=headers))
        await until(lambda: peer.events or peer.ws.closed, "the first event")
        return peer

    async def ask(self, key: str, question: str = "What is it?") -> aiohttp.ClientResponse:
        async with self.http.post(f"{self.base}/v1/vision/ask", headers=bearer(key),
                                  json={"image": PICTURE, "question": question}) as r:
            await r.read()
            return r


@contextlib.asynccontextmanager
async def serve(tmp_path: Path, *, keys: bool = True, **limits: Any) -> AsyncIterator[App]:
    """The app with two access keys (or none) and ``limits`` (the other limits off)."""
    off = {"sessions_per_client": 0, "connections_per_minute": 0, "texts_per_second": 0,
           "images_per_second": 0, "vision_asks_per_client": 0, "max_session_s": 0,
           "idle_timeout_s": 0}
    auth = {"api_keys": [KEY_A, KEY_B], "state_dir": tmp_path} if keys else {}
    settings = load_settings(auth=auth, webrtc={"host_addresses": ["127.0.0.1"]},
                             limits={**off, **limits})
    vlm = FakeVlm()
    engines = Engines(FakeVad(), FakeAsr(latency_s=0.01),
                      FakeLlm(reply=REPLY, first_token_s=0.0, token_s=0.0),
                      FakeTts(ms_per_char=1.0, latency_s=0.0), vlm)
    app = create_app(settings, lambda settings, compute: engines)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    try:
        await until(lambda: app[STATE].engines is not None, "the fake engines")
        host, port = runner.addresses[0][:2]
        async with aiohttp.ClientSession() as http:
            yield App(app, f"http://{host}:{port}", http, vlm)
    finally:
        vlm.release.set()
        await runner.cleanup()


async def offer(app: App, key: str) -> tuple[int, dict[str, Any], dict[str, str]]:
    """``POST /offer`` with an SDP aiortc cannot use: refused by the limits (429) or, past
    them, by aiortc (400 bad_offer)."""
    async with app.http.post(f"{app.base}/offer", headers=bearer(key),
                             json={"sdp": "v=0", "type": "offer"}) as r:
        return r.status, await r.json(), dict(r.headers)


async def test_one_client_gets_its_cap_of_sixty_sockets_and_another_still_gets_in(
        tmp_path: Path) -> None:
    async with serve(tmp_path, sessions_per_client=4) as app:
        tasks = asyncio.all_tasks()
        peers = await asyncio.gather(*(app.open(KEY_A) for _ in range(60)))
        ready = [p for p in peers if p.first["type"] == "session.ready"]
        refused = [p for p in peers if p.first["type"] == "error"]
        assert len(ready) == 4 and len(refused) == 56
        for peer in refused:  # told why, at once, then closed: try again later
            assert peer.first["code"] == "busy" and peer.first["fatal"] is True
            assert "4 sessions" in peer.first["message"]
            assert await peer.ended() == 1013 and len(peer.events) == 1
        assert len(app.state.sessions) == 4  # the refused sockets made no session
        # the client's tokens are the same client; its WebRTC offers count by the same rule
        async with app.http.post(f"{app.base}/v1/tokens", headers=bearer(KEY_A)) as r:
            token = (await r.json())["token"]
        by_token = await app.open("", f"?token={token}")
        assert by_token.first["code"] == "busy"
        status, body, headers = await offer(app, KEY_A)
        assert status == 429 and body["error"] == "busy" and body["message"]
        assert "Retry-After" not in headers  # (nobody knows when one of its sessions ends)
        # another client still gets a session, and an answer
        other = await app.open(KEY_B)
        assert other.first["type"] == "session.ready"
        await other.answers()
        status, body, _ = await offer(app, KEY_B)
        assert status == 400 and body["error"] == "bad_offer"  # past the limits: aiortc's turn
        # a place of the first client comes free when one of its sessions ends
        await ready[0].close()
        await until(lambda: len(app.state.sessions) == 4, "the session to be forgotten")
        again = await app.open(KEY_A)
        assert again.first["type"] == "session.ready"
        for peer in [*peers, by_token, other, again]:
            await peer.close()
        await until(lambda: not app.state.sessions and app.state.limits._sessions == {},
                    "every session to be forgotten")
        await until(lambda: asyncio.all_tasks() <= tasks | {asyncio.current_task()},
                    "no task left behind")


async def test_the_connection_rate_limits_that_client_alone(tmp_path: Path) -> None:
    async with serve(tmp_path, connections_per_minute=3) as app:
        for _ in range(3):
            peer = await app.open(KEY_A)
            assert peer.first["type"] == "session.ready"
            await peer.close()
        limited = await app.open(KEY_A)
        error = limited.first
        assert error["code"] == "rate_limited" and error["fatal"] is True
        assert 0 < error["retry_after"] <= 20 and "3 new sessions a minute" in error["message"]
        assert await limited.ended() == 1013
        status, body, headers = await offer(app, KEY_A)  # WebRTC: the same bucket
        assert status == 429 and body["error"] == "rate_limited"
        assert 1 <= body["retry_after"] <= 20 and headers["Retry-After"] == str(body["retry_after"])
        other = await app.open(KEY_B)
        assert other.first["type"] == "session.ready"
        await other.answers()
        await other.close()
        await until(lambda: not app.state.sessions, "every session to be forgotten")


async def test_typed_turns_and_images_over_their_rate_are_dropped_and_the_session_goes_on(
        tmp_path: Path) -> None:
    async with serve(tmp_path, texts_per_second=1, images_per_second=1) as app:
        peer = await app.open(KEY_A)
        for i in range(6):  # a burst of 3 passes, then 1 a second
            await peer.send({"type": "text", "text": f"question {i}"})
        await until(lambda: len(peer.of("error")) >= 1 and peer.of("reply.done"),
                    "a refused turn and a reply")
        for _ in range(6):
            await peer.send({"type": "image", "data": PICTURE})
        await until(lambda: any("image" in e["message"] for e in peer.of("error")),
                    "a refused image")
        errors = peer.of("error")
        assert all(e["code"] == "rate_limited" and e["fatal"] is False and e["retry_after"] > 0
                   for e in errors), errors
        assert 1 <= sum("typed turns" in e["message"] for e in errors) <= 3
        assert 1 <= sum("image" in e["message"] for e in errors) <= 3
        await peer.answers()  # the session goes on (after waiting as long as it was told)
        assert not peer.ws.closed
        await peer.close()


async def test_an_idle_session_is_closed_and_an_active_one_of_another_client_goes_on(
        tmp_path: Path) -> None:
    async with serve(tmp_path, idle_timeout_s=1.0) as app:
        idle = await app.open(KEY_A)
        active = await app.open(KEY_B)

        async def keep_talking() -> None:
            while True:
                await active.send({"type": "playback", "played_ms": 0})
                await asyncio.sleep(0.05)

        talking = asyncio.create_task(keep_talking())
        try:
            assert await idle.ended() == 1000
            error = idle.events[-1]
            assert error["type"] == "error" and error["code"] == "idle_timeout"
            assert error["fatal"] is True and "1 s" in error["message"]
            assert not active.ws.closed
            await active.answers()
        finally:
            talking.cancel()
        assert list(app.state.sessions) == [active.first["session_id"]]
        await active.close()


async def webrtc_peer(app: App, key: str) -> tuple[RTCPeerConnection, list[dict[str, Any]]]:
    restrict_host_candidates(["127.0.0.1"])
    pc = RTCPeerConnection()
    events: list[dict[str, Any]] = []
    channel = pc.createDataChannel(EVENTS_LABEL)
    channel.on("message", lambda raw: events.append(json.loads(raw)))
    pc.addTrack(MicrophoneTrack())
    await pc.setLocalDescription(await pc.createOffer())
    async with app.http.post(f"{app.base}/offer", headers=bearer(key), json={
            "sdp": pc.localDescription.sdp, "type": "offer"}) as r:
        assert r.status == 200, await r.text()
        answer = await r.json()
    await pc.setRemoteDescription(RTCSessionDescription(answer["sdp"], answer["type"]))
    await until(lambda: bool(events), "session.ready on the data channel")
    return pc, events


async def test_sessions_end_at_their_maximum_length_one_by_one(tmp_path: Path) -> None:
    async with serve(tmp_path, max_session_s=3.0) as app:
        pc, events = await webrtc_peer(app, KEY_A)  # the first client, over WebRTC
        try:
            assert events[0]["type"] == "session.ready"
            await asyncio.sleep(1.5)  # (an order, not a measurement: the next one starts later)
            later = await app.open(KEY_B)
            await until(lambda: any(e["type"] == "error" for e in events),
                        "the WebRTC session's expiry")
            error = events[-1]
            assert error["code"] == "session_expired" and error["fatal"] is True
            await until(lambda: pc.connectionState == "closed" or len(app.state.sessions) == 1,
                        "the WebRTC session to end")
            assert not later.ws.closed  # the other client's session has its own clock
            await later.answers()
            assert await later.ended() == 1000  # …and ends when it is up
            assert later.events[-1]["code"] == "session_expired"
        finally:
            await pc.close()
        await until(lambda: not app.state.sessions, "every session to be forgotten")


async def test_concurrent_vision_asks_beyond_the_cap_are_refused_for_that_client_only(
        tmp_path: Path) -> None:
    async with serve(tmp_path, vision_asks_per_client=2) as app:
        held = [asyncio.create_task(app.ask(KEY_A, "hold")) for _ in range(2)]
        await until(lambda: app.vlm.holding == 2, "two asks looking")
        r = await app.ask(KEY_A)
        assert r.status == 429
        async with app.http.post(f"{app.base}/v1/vision/ask", headers=bearer(KEY_A),
                                 json={"image": PICTURE}) as refused:
            body = await refused.json()
        assert body["error"] == "busy" and "2 vision questions" in body["message"]
        assert (await app.ask(KEY_B)).status == 200  # another client is served meanwhile
        app.vlm.release.set()
        assert [(await t).status for t in held] == [200, 200]
        assert (await app.ask(KEY_A)).status == 200  # its places came free
        assert app.state.limits._running["vision"] == {}


@pytest.mark.parametrize(("limit", "code"), [("sessions_per_client", "busy"),
                                             ("connections_per_minute", "rate_limited")])
async def test_without_keys_the_client_is_the_address(tmp_path: Path, limit: str,
                                                     code: str) -> None:
    async with serve(tmp_path, keys=False, **{limit: 2}) as app:
        peers = [await app.open("") for _ in range(3)]
        assert [p.first.get("code", p.first["type"]) for p in peers] == [
            "session.ready", "session.ready", code]
        for peer in peers:
            await peer.close()


async def test_a_bug_in_one_websocket_transport_closes_that_client_alone(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A failure in the WebSocket adapter itself (not the session) tells that client
    ``internal`` and closes it with 1011; the server and other sessions go on."""
    from streaming.ws import WebSocketAdapter

    handle = WebSocketAdapter._on_text

    async def buggy(self: WebSocketAdapter, raw: str) -> bool:
        if "trip the bug" in raw:
            raise RuntimeError("a transport bug")
        return await handle(self, raw)

    monkeypatch.setattr(WebSocketAdapter, "_on_text", buggy)
    async with serve(tmp_path, keys=False) as app:
        bystander, victim = await app.open(""), await app.open("")
        await victim.send({"type": "text", "text": "trip the bug"})
        assert await victim.ended() == 1011
        assert victim.events[-1]["type"] == "error"
        assert victim.events[-1]["code"] == "internal" and victim.events[-1]["fatal"] is True
        await bystander.answers()
        await until(lambda: len(app.state.sessions) == 1, "the victim's session forgotten")
        await bystander.close()
