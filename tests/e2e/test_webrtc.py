"""WebRTC end to end: the Python aiortc client against a real server, on loopback only."""

from __future__ import annotations

import asyncio

import aiohttp
import pytest

from client.common.rtc_client import WebRtcClient
from tests.conftest import Server, speak, until

LOOPBACK = ["127.0.0.1"]


async def health(server: Server) -> dict:
    async with aiohttp.ClientSession() as http, http.get(f"{server.http}/healthz") as r:
        return await r.json()


async def test_spoken_question_over_webrtc(server: Server, voice, transcriber) -> None:  # type: ignore[no-untyped-def]
    audio, rate = speak(voice, "What is the capital of France?")
    async with WebRtcClient(server.http, host_addresses=LOOPBACK) as client:
        assert client.ready is not None and client.output_rate == 48000
        await client.speak(audio, rate)
        reply = await client.wait_reply(timeout_s=60)
        await asyncio.sleep(2.0)  # let the paced reply audio arrive in full
    assert reply.transcript and "capital of france" in reply.transcript.lower()
    assert "paris" in reply.text.lower()
    assert len(reply.audio) > 48000  # > 0.5 s of 48 kHz s16le
    heard = transcriber(bytes(reply.audio), 48000)
    assert "paris" in heard.lower(), heard


async def test_typed_turn_and_bad_messages_on_the_data_channel(server: Server) -> None:
    async with WebRtcClient(server.http, host_addresses=LOOPBACK) as client:
        client.send({"type": "dance"})
        client.send({"type": "session.start"})
        await client.wait_for(lambda: len(client.errors) >= 2, timeout_s=10)
        assert [e["code"] for e in client.errors] == ["unknown_type", "unsupported"]
        client.say_text("What is the capital of Italy?")
        reply = await client.wait_reply(timeout_s=60)
    assert "rome" in reply.text.lower()


async def test_peer_leaving_mid_reply_frees_everything(server: Server) -> None:
    base = await health(server)
    client = WebRtcClient(server.http, host_addresses=LOOPBACK)
    await client.__aenter__()
    client.say_text("Tell me a long story about a dragon and a knight.")
    await client.wait_for(lambda: any(e["type"] == "reply.text" for e in client.events), 60)
    await client.close()

    async def freed() -> bool:
        now = await health(server)
        return bool(now["sessions"] == 0 and now["tasks"] <= base["tasks"])
    await until(freed, timeout_s=10)  # no session and no task of it left behind


@pytest.mark.parametrize(("body", "status", "fragment"), [
    (b"not json", 400, "not valid JSON"),
    (b'{"type": "offer"}', 400, "sdp"),
    (b'{"sdp": "v=0 garbage", "type": "offer"}', 400, "cannot use this offer"),
    (b'{"sdp": "x", "type": "answer"}', 400, "type"),
    (b'{"sdp": "' + b"a" * 300_000 + b'", "type": "offer"}', 413, "exceeds"),
])
async def test_malformed_offers_are_refused_clearly(server: Server, body: bytes, status: int,
                                                    fragment: str) -> None:
    async with aiohttp.ClientSession() as http, \
            http.post(f"{server.http}/offer", data=body,
                      headers={"Content-Type": "application/json"}) as r:
        assert r.status == status
        answer = await r.json()
    assert fragment in answer["message"]
    assert (await health(server))["ready"] is True
