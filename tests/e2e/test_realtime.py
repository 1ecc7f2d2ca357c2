"""The OpenAI Realtime endpoint with the real packaged models on a real server (loopback), the
official ``openai`` SDK as the client: spoken questions under server VAD and by hand."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import re
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from openai import AsyncOpenAI

from server.launch import ServerProcess, spawn_server
from streaming.audio import float_to_pcm16, resample
from tests.conftest import ARTIFACTS, speak
from tests.e2e.test_realtime_protocol import Events, realtime_session

RATE = 24_000
GUARD_S = 90.0


def realtime(server: ServerProcess, **session: Any
             ) -> contextlib.AbstractAsyncContextManager[tuple[Any, Events]]:
    client = AsyncOpenAI(base_url=f"{server.http}/v1", api_key="unused on loopback")
    return realtime_session(client, "voxlens", **session)


def pcm24(voice: Any, text: str) -> bytes:
    audio, rate = speak(voice, text)
    return float_to_pcm16(resample(audio, rate, RATE))


async def stream(conn: Any, pcm: bytes, *, real_time: bool) -> None:
    """Append ``pcm`` in 100 ms events (at the pace of a microphone when ``real_time``)."""
    step = RATE * 2 // 10
    for k in range(0, len(pcm), step):
        await conn.input_audio_buffer.append(audio=base64.b64encode(pcm[k:k + step]).decode())
        if real_time:
            await asyncio.sleep(0.1)


def reply_audio(events: Events, response_id: str) -> bytes:
    return b"".join(base64.b64decode(e["delta"]) for e in events.of("response.output_audio.delta")
                    if e["response_id"] == response_id)


async def test_a_spoken_question_under_server_vad_gets_a_spoken_answer(
        server: ServerProcess, voice, transcriber) -> None:  # type: ignore[no-untyped-def]
    silence = bytes(RATE * 2 * 2)
    async with realtime(server, audio={"input": {"transcription": {"language": "en"}}}) as (conn, ev):
        await stream(conn, pcm24(voice, "What is the capital of France?") + silence, real_time=True)
        done = await asyncio.wait_for(ev.wait("response.done"), GUARD_S)
    heard = ev.of("conversation.item.input_audio_transcription.completed")[0]["transcript"]
    assert "capital of france" in heard.lower()
    assert ev.of("input_audio_buffer.speech_started") and ev.of("input_audio_buffer.speech_stopped")
    response = done["response"]
    assert response["status"] == "completed"
    transcript = response["output"][0]["content"][0]["transcript"]
    assert "paris" in transcript.lower()
    spoken = transcriber(reply_audio(ev, response["id"]), RATE)
    assert "paris" in spoken.lower(), spoken


async def test_manual_turns_commit_and_response_create(
        server: ServerProcess, voice) -> None:  # type: ignore[no-untyped-def]
    async with realtime(server, output_modalities=["text"],
                        audio={"input": {"turn_detection": None}}) as (conn, ev):
        await stream(conn, pcm24(voice, "What is the capital of Italy?"), real_time=False)
        await conn.input_audio_buffer.commit()
        completed = await asyncio.wait_for(
            ev.wait("conversation.item.input_audio_transcription.completed"), GUARD_S)
        assert "capital of italy" in completed["transcript"].lower()
        assert not ev.of("response.created")
        await conn.response.create()
        done = await asyncio.wait_for(ev.wait("response.done"), GUARD_S)
    text = done["response"]["output"][0]["content"][0]["text"]
    assert "rome" in text.lower() and not ev.of("response.output_audio.delta")


async def test_a_text_question_gets_an_audio_answer_and_cancel_stops_it(
        server: ServerProcess, transcriber) -> None:  # type: ignore[no-untyped-def]
    async with realtime(server) as (conn, ev):
        await conn.conversation.item.create(item={"type": "message", "role": "user", "content": [
            {"type": "input_text", "text": "What is the capital of Germany?"}]})
        await conn.response.create()
        first = await asyncio.wait_for(ev.wait("response.done"), GUARD_S)
        await conn.conversation.item.create(item={"type": "message", "role": "user", "content": [
            {"type": "input_text", "text": "Tell me a long story about a dragon and a knight."}]})
        await conn.response.create()
        await asyncio.wait_for(ev.wait("response.output_audio.delta", n=len(
            ev.of("response.output_audio.delta")) + 10), GUARD_S)
        await conn.response.cancel()
        second = await asyncio.wait_for(ev.wait("response.done", 2), GUARD_S)
    assert "berlin" in transcriber(reply_audio(ev, first["response"]["id"]), RATE).lower()
    assert second["response"]["status"] == "cancelled"
    cut = second["response"]["output"][0]
    assert cut["status"] == "incomplete"
    kinds = ev.types()
    done_at = len(kinds) - 1 - kinds[::-1].index("response.done")
    assert "response.output_audio.delta" not in kinds[done_at:]
    assert np.frombuffer(reply_audio(ev, second["response"]["id"]), "<i2").size > 0


TIME_TOOL = {"type": "function", "name": "get_time", "description": "Get the current time.",
             "parameters": {"type": "object", "properties": {}}}


async def test_the_packaged_model_calls_a_client_tool_and_answers_with_its_output(
        server: ServerProcess) -> None:
    async with realtime(server, output_modalities=["text"], tools=[TIME_TOOL]) as (conn, ev):
        await conn.conversation.item.create(item={"type": "message", "role": "user", "content": [
            {"type": "input_text", "text": "What time is it?"}]})
        await conn.response.create()
        first = await asyncio.wait_for(ev.wait("response.done"), GUARD_S)
        calls = [o for o in first["response"]["output"] if o["type"] == "function_call"]
        assert [c["name"] for c in calls] == ["get_time"], first["response"]["output"]
        await conn.conversation.item.create(item={"type": "function_call_output",
                                                  "call_id": calls[0]["call_id"], "output": "14:37"})
        await conn.response.create()
        second = await asyncio.wait_for(ev.wait("response.done", 2), GUARD_S)
    answer = second["response"]["output"][0]["content"][0]["text"]
    assert "14:37" in answer or "2:37" in answer, answer


@pytest.fixture(scope="module")
def mcp_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ServerProcess, Path]]:
    """A real server whose tools come from a real MCP server (stdio) it starts itself."""
    calls = tmp_path_factory.mktemp("mcp") / "calls.log"
    script = Path(__file__).parents[1] / "mcp_server.py"
    tools = json.dumps([f"{sys.executable} {script} --calls {calls}"])
    s = spawn_server(ARTIFACTS / "server-mcp.log", env={
        "VOXLENS_WEBRTC__HOST_ADDRESSES": '["127.0.0.1"]', "VOXLENS_LLM__TEMPERATURE": "0",
        "VOXLENS_TOOLS__MCP_SERVERS": tools})
    yield s, calls
    s.stop()


async def test_the_assistant_uses_an_mcp_servers_tool(
        mcp_server: tuple[ServerProcess, Path]) -> None:
    server, calls = mcp_server
    async with realtime(server, output_modalities=["text"]) as (conn, ev):
        await conn.conversation.item.create(item={"type": "message", "role": "user", "content": [
            {"type": "input_text", "text": "What time is it?"}]})
        await conn.response.create()
        done = await asyncio.wait_for(ev.wait("response.done", 2), GUARD_S)
    ran = calls.read_text("utf-8").split()
    assert ran[0] == "get_time", ran
    answer = done["response"]["output"][0]["content"][0]["text"]
    hour, minute = ran[1].split(":")[:2]
    assert re.search(rf"\b0?{int(hour)}:{minute}|\b0?{int(hour) % 12 or 12}:{minute}", answer), (ran, answer)
    assert not ev.of("response.function_call_arguments.done")  # the server ran it
