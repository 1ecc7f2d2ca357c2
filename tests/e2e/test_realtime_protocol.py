"""The OpenAI Realtime endpoint through the real app on 127.0.0.1, with the official ``openai``
SDK as the client and fake engines: the protocol and the conversation logic are under test
here (ids, event order, truncation, cancellation, tools, bad input); tests/e2e/test_realtime.py
does the same with the real models."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import sys
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
from aiohttp import web
from openai import AsyncOpenAI

from pipelines.engines.base import ChatMessage, Llm, ToolCall
from pipelines.engines.fakes import FakeAsr, FakeLlm, FakeTts, FakeVad
from pipelines.engines.llm_openai import OpenAiLlm
from pipelines.session import Engines
from server.app import create_app
from server.settings import load_settings
from server.state import STATE
from tests.conftest import until

GUARD_S = 30.0  # a hang guard, never a timing assertion
KEY = "vx-realtime-key-7c1e0b9a44"
RATE = 24_000
TIME_TOOL = {"type": "function", "name": "get_time", "description": "The current time.",
             "parameters": {"type": "object", "properties": {}}}


def script(messages: Sequence[ChatMessage]) -> str | ToolCall | list[str | ToolCall]:
    """The fake LLM: calls get_time when asked the time, answers with a tool's result, repeats
    what the assistant said last when asked (so a test sees what its history holds), else
    a fixed answer."""
    last = messages[-1]
    if last.role == "tool":
        return f"It is {last.content}."
    if "time" in last.content:
        return ["Let me see.", ToolCall("call_t1", "get_time", "{}")]
    if "add" in last.content:
        return ToolCall("call_a1", "add", '{"a": 2, "b": 3}')
    if "repeat" in last.content:
        said = [m.content for m in messages if m.role == "assistant"]
        return f"I said: {said[-1]}" if said else "I said nothing."
    return "The capital of France is Paris, a city on the Seine with many bridges."


@dataclass
class Rt:
    base: str
    llm: FakeLlm
    tts: FakeTts
    app: web.Application
    key: str | None = None

    def client(self) -> AsyncOpenAI:
        return AsyncOpenAI(base_url=f"{self.base}/v1", api_key=self.key or "unused")


@contextlib.asynccontextmanager
async def serve(tmp_path: Path, *, keys: bool = False, asr_text: str = "what is the capital of France",
                ms_per_char: float = 5.0, mcp_servers: Sequence[str] = (),
                llm: Llm | None = None) -> AsyncIterator[Rt]:
    off = {"sessions_per_client": 0, "connections_per_minute": 0, "texts_per_second": 0,
           "images_per_second": 0, "max_session_s": 0, "idle_timeout_s": 0}
    auth = {"api_keys": [KEY], "state_dir": tmp_path} if keys else {}
    settings = load_settings(auth=auth, webrtc={"host_addresses": ["127.0.0.1"]}, limits=off,
                             tools={"mcp_servers": list(mcp_servers)})
    fake = FakeLlm(reply=script, first_token_s=0.0, token_s=0.005)
    tts = FakeTts(sample_rate=RATE, ms_per_char=ms_per_char, latency_s=0.0)
    engines = Engines(FakeVad(), FakeAsr(asr_text, latency_s=0.01), llm or fake, tts)
    app = create_app(settings, lambda settings, compute: engines)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    try:
        await until(lambda: app[STATE].engines is not None)
        host, port = runner.addresses[0][:2]
        yield Rt(f"http://{host}:{port}", fake, tts, app, KEY if keys else None)
    finally:
        await runner.cleanup()


@dataclass
class Events:
    """Every server event of one connection, as JSON objects, read by a background task."""

    conn: Any
    seen: list[dict[str, Any]] = field(default_factory=list)

    async def read(self) -> None:
        with contextlib.suppress(Exception):
            async for event in self.conn:
                self.seen.append(event.to_dict())

    def of(self, kind: str) -> list[dict[str, Any]]:
        return [e for e in self.seen if e["type"] == kind]

    async def wait(self, kind: str, n: int = 1, where: Callable[[dict[str, Any]], bool] = lambda e: True
                   ) -> dict[str, Any]:
        await until(lambda: len([e for e in self.of(kind) if where(e)]) >= n, GUARD_S)
        return [e for e in self.of(kind) if where(e)][n - 1]

    def types(self) -> list[str]:
        return [e["type"] for e in self.seen]


def connect(rt: Rt, **session: Any) -> contextlib.AbstractAsyncContextManager[tuple[Any, Events]]:
    return realtime_session(rt.client(), "gpt-realtime", **session)


@contextlib.asynccontextmanager
async def realtime_session(client: AsyncOpenAI, model: str, **session: Any
                           ) -> AsyncIterator[tuple[Any, Events]]:
    """A Realtime connection with the SDK, its events read in the background; ``session``:
    a session.update to apply first."""
    async with client.realtime.connect(model=model) as conn:
        events = Events(conn)
        reader = asyncio.create_task(events.read())
        try:
            await events.wait("session.created")
            if session:
                await conn.session.update(session={"type": "realtime", **session})
                await events.wait("session.updated")
            yield conn, events
        finally:
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reader


def tone(ms: int, amplitude: float = 0.3) -> bytes:
    t = np.arange(RATE * ms // 1000) / RATE
    return (amplitude * 32767 * np.sin(2 * np.pi * 300 * t)).astype("<i2").tobytes()


def b64(pcm: bytes) -> str:
    return base64.b64encode(pcm).decode()


async def ask(conn: Any, text: str) -> None:
    await conn.conversation.item.create(item={"type": "message", "role": "user",
                                              "content": [{"type": "input_text", "text": text}]})


def audio_of(events: Events, response_id: str) -> bytes:
    return b"".join(base64.b64decode(e["delta"]) for e in events.of("response.output_audio.delta")
                    if e["response_id"] == response_id)


async def test_text_item_and_response_create_give_an_ordered_text_response(tmp_path: Path) -> None:
    async with serve(tmp_path) as rt, connect(rt, output_modalities=["text"]) as (conn, ev):
        created = ev.of("session.created")[0]["session"]
        assert created["model"] == "gpt-realtime" and created["audio"]["output"]["format"] == {
            "type": "audio/pcm", "rate": RATE}
        assert ev.of("session.updated")[0]["session"]["output_modalities"] == ["text"]
        await ask(conn, "What is the capital of France?")
        user = (await ev.wait("conversation.item.added"))["item"]
        assert user["role"] == "user" and user["content"][0]["text"] == "What is the capital of France?"
        await conn.response.create()
        done = await ev.wait("response.done")
    response = done["response"]
    assert response["status"] == "completed" and response["output_modalities"] == ["text"]
    (message,) = response["output"]
    assert message["role"] == "assistant" and message["status"] == "completed"
    text = "".join(e["delta"] for e in ev.of("response.output_text.delta"))
    assert text == message["content"][0]["text"] == script([ChatMessage("user", "x")])
    assert not ev.of("response.output_audio.delta")
    # the protocol's order, with the ids correlated
    kinds = [k for k in ev.types() if k.startswith("response.")]
    assert kinds[:3] == ["response.created", "response.output_item.added", "response.content_part.added"]
    assert kinds.index("response.output_text.done") < kinds.index("response.output_item.done") \
        < kinds.index("response.done") == len(kinds) - 1
    rid = response["id"]
    assert all(e["response_id"] == rid for e in ev.seen if "response_id" in e)
    assert all(e["item_id"] == message["id"] for e in ev.of("response.output_text.delta"))
    added = [e for e in ev.of("conversation.item.added") if e["item"]["id"] == message["id"]]
    assert added[0]["previous_item_id"] == user["id"]
    assert len({e["event_id"] for e in ev.seen}) == len(ev.seen)  # unique event ids


async def test_an_audio_response_streams_pcm_and_ends_after_its_last_audio(tmp_path: Path) -> None:
    async with serve(tmp_path) as rt, connect(rt) as (conn, ev):
        await ask(conn, "Tell me about Paris.")
        await conn.response.create()
        done = await ev.wait("response.done")
    rid = done["response"]["id"]
    pcm = audio_of(ev, rid)
    transcript = "".join(e["delta"] for e in ev.of("response.output_audio_transcript.delta"))
    # the fake voice: 5 ms per character, at 24 kHz s16le
    expected = sum(len(c) for c, _ in rt.tts.calls) * 5 * RATE // 1000 * 2
    assert abs(len(pcm) - expected) <= 4 * len(rt.tts.calls) and transcript
    kinds = ev.types()
    last_audio = max(i for i, k in enumerate(kinds) if k == "response.output_audio.delta")
    assert last_audio < kinds.index("response.output_audio.done") < kinds.index("response.done")
    assert done["response"]["output"][0]["content"][0] == {"type": "output_audio",
                                                          "transcript": transcript}


async def test_response_cancel_mid_answer_ends_it_cancelled_with_no_more_audio(tmp_path: Path) -> None:
    async with serve(tmp_path, ms_per_char=60.0) as rt, connect(rt) as (conn, ev):
        await ask(conn, "Tell me about Paris.")
        await conn.response.create()
        await ev.wait("response.output_audio.delta", 15)  # 600 ms sent, some of it heard
        await conn.response.cancel()
        done = await ev.wait("response.done")
        assert done["response"]["status"] == "cancelled"
        await ev.wait("conversation.item.truncated")
        n = len(ev.of("response.output_audio.delta"))
        await conn.response.cancel()  # nothing in progress now: an error, the socket goes on
        error = await ev.wait("error")
        assert error["error"]["code"] == "response_cancel_not_active"
        assert len(ev.of("response.output_audio.delta")) == n
        truncated = ev.of("conversation.item.truncated")[0]
        assert truncated["item_id"] == done["response"]["output"][0]["id"]
        assert 0 < truncated["audio_end_ms"] < 60 * len(script([ChatMessage("user", "x")]))


async def test_truncate_keeps_only_the_heard_part_for_the_next_answer(tmp_path: Path) -> None:
    async with serve(tmp_path, ms_per_char=20.0) as rt, connect(rt) as (conn, ev):
        await ask(conn, "Tell me about Paris.")
        await conn.response.create()
        first = await ev.wait("response.done")
        item_id = first["response"]["output"][0]["id"]
        full = first["response"]["output"][0]["content"][0]["transcript"]
        # the client played 25 characters' worth of audio when its person spoke
        await conn.conversation.item.truncate(item_id=item_id, content_index=0, audio_end_ms=500)
        truncated = await ev.wait("conversation.item.truncated")
        assert (truncated["item_id"], truncated["audio_end_ms"]) == (item_id, 500)
        await ask(conn, "Please repeat what you said.")
        await conn.response.create()
        second = await ev.wait("response.done", 2)
    heard = second["response"]["output"][0]["content"][0]["transcript"].removeprefix("I said: ")
    assert heard.endswith("…") and full.startswith(heard.removesuffix("…"))
    assert 5 <= len(heard) < len(full) // 2


async def test_delete_removes_an_item_from_what_the_model_sees(tmp_path: Path) -> None:
    async with serve(tmp_path) as rt, connect(rt, output_modalities=["text"]) as (conn, ev):
        await conn.conversation.item.create(item={
            "type": "message", "role": "assistant", "id": "item_mine",
            "content": [{"type": "output_text", "text": "The secret word is banana."}]})
        await ev.wait("conversation.item.added")
        await conn.conversation.item.delete(item_id="item_mine")
        assert (await ev.wait("conversation.item.deleted"))["item_id"] == "item_mine"
        await ask(conn, "Please repeat what you said.")
        await conn.response.create()
        done = await ev.wait("response.done")
        await conn.conversation.item.delete(item_id="item_mine")
        assert (await ev.wait("error"))["error"]["code"] == "bad_item"
    assert done["response"]["output"][0]["content"][0]["text"] == "I said nothing."
    assert not any("banana" in m.content for m in rt.llm.prompts[-1])


async def test_manual_turns_commit_then_respond(tmp_path: Path) -> None:
    async with serve(tmp_path) as rt, connect(rt, audio={"input": {"turn_detection": None}}) as (conn, ev):
        assert ev.of("session.updated")[0]["session"]["audio"]["input"]["turn_detection"] is None
        await conn.input_audio_buffer.commit()  # nothing in it yet
        assert (await ev.wait("error"))["error"]["code"] == "input_audio_buffer_commit_empty"
        for _ in range(10):
            await conn.input_audio_buffer.append(audio=b64(tone(100)))
        await conn.input_audio_buffer.commit()
        committed = await ev.wait("input_audio_buffer.committed")
        completed = await ev.wait("conversation.item.input_audio_transcription.completed")
        assert completed["item_id"] == committed["item_id"]
        assert completed["transcript"] == "what is the capital of France"
        assert not ev.of("response.created") and not ev.of("input_audio_buffer.speech_started")
        await conn.response.create(response={"output_modalities": ["text"]})
        done = await ev.wait("response.done")
    assert "Paris" in done["response"]["output"][0]["content"][0]["text"]
    assert rt.llm.prompts[-1][-1].content == "what is the capital of France"


async def test_server_vad_detects_speech_transcribes_and_answers(tmp_path: Path) -> None:
    async with serve(tmp_path) as rt, connect(rt) as (conn, ev):
        for pcm in [tone(1200), bytes(RATE * 2 * 2)]:  # 1.2 s of "speech", then 2 s of silence
            for k in range(0, len(pcm), 4800):
                await conn.input_audio_buffer.append(audio=b64(pcm[k:k + 4800]))
        done = await ev.wait("response.done")
    started = ev.of("input_audio_buffer.speech_started")[0]
    stopped = ev.of("input_audio_buffer.speech_stopped")[0]
    committed = ev.of("input_audio_buffer.committed")[0]
    completed = ev.of("conversation.item.input_audio_transcription.completed")[0]
    assert started["item_id"] == stopped["item_id"] == committed["item_id"] == completed["item_id"]
    assert started["audio_start_ms"] < stopped["audio_end_ms"]
    kinds = ev.types()
    order = ["input_audio_buffer.speech_started", "input_audio_buffer.speech_stopped",
             "input_audio_buffer.committed", "response.created"]
    assert [kinds.index(k) for k in order] == sorted(kinds.index(k) for k in order)
    assert done["response"]["status"] == "completed" and audio_of(ev, done["response"]["id"])


async def test_server_vad_without_create_response_only_transcribes(tmp_path: Path) -> None:
    vad = {"type": "server_vad", "create_response": False, "silence_duration_ms": 300}
    async with serve(tmp_path) as rt, connect(rt, audio={"input": {"turn_detection": vad}}) as (conn, ev):
        for pcm in [tone(1000), bytes(RATE * 2)]:
            await conn.input_audio_buffer.append(audio=b64(pcm))
        await ev.wait("conversation.item.input_audio_transcription.completed")
        await ask(conn, "and a second message")  # a later event, answered after the transcript
        await ev.wait("conversation.item.added", 2)
        assert not ev.of("response.created")
        await conn.response.create()
        await ev.wait("response.done")
    assert [m.content for m in rt.llm.prompts[-1] if m.role == "user"][-2:] == [
        "what is the capital of France", "and a second message"]


async def test_a_client_tool_call_and_its_output_continue_the_answer(tmp_path: Path) -> None:
    async with serve(tmp_path) as rt, connect(rt, tools=[TIME_TOOL]) as (conn, ev):
        assert ev.of("session.updated")[0]["session"]["tools"][0]["name"] == "get_time"
        await ask(conn, "What time is it?")
        await conn.response.create()
        first = await ev.wait("response.done")
        call = ev.of("response.function_call_arguments.done")[0]
        assert (call["name"], call["arguments"], call["call_id"]) == ("get_time", "{}", "call_t1")
        assert [o["type"] for o in first["response"]["output"]] == ["message", "function_call"]
        assert [t.name for t in rt.llm.tools[-1]] == ["get_time"]
        await conn.conversation.item.create(item={"type": "function_call_output",
                                                  "call_id": call["call_id"], "output": "12:30"})
        await ev.wait("conversation.item.added", 3)
        await conn.response.create()
        second = await ev.wait("response.done", 2)
    assert second["response"]["output"][0]["content"][0]["transcript"] == "It is 12:30."
    prompt = rt.llm.prompts[-1]
    assert prompt[-2].tool_calls[0].call_id == "call_t1" and prompt[-2].content == "Let me see."
    assert (prompt[-1].role, prompt[-1].content, prompt[-1].tool_call_id) == ("tool", "12:30", "call_t1")


async def test_a_tool_call_is_void_once_the_person_speaks_and_its_late_output_is_refused(
        tmp_path: Path) -> None:
    async with serve(tmp_path) as rt, connect(rt, tools=[TIME_TOOL]) as (conn, ev):
        await ask(conn, "What time is it?")
        await conn.response.create()
        await ev.wait("response.done")
        for pcm in [tone(1000), bytes(RATE * 2 * 2)]:  # the person speaks before the result
            await conn.input_audio_buffer.append(audio=b64(pcm))
        await ev.wait("response.done", 2)
        n = len(ev.of("response.created"))
        await conn.conversation.item.create(item={"type": "function_call_output",
                                                  "call_id": "call_t1", "output": "12:30"})
        error = await ev.wait("error")
        assert error["error"]["code"] == "tool_call_cancelled"
        await asyncio.sleep(0.2)  # (no assertion on time: nothing may come of the late output)
        assert len(ev.of("response.created")) == n
    assert not any("12:30" in m.content for p in rt.llm.prompts for m in p)
    tool_messages = [m for m in rt.llm.prompts[-1] if m.role == "tool"]
    assert tool_messages and "cancelled" in tool_messages[0].content


BAD_EVENTS = [
    ("{not json", "invalid_json"),
    ('{"type": "dance"}', "unknown_event"),
    ('["session.update"]', "invalid_event"),
    ('{"type": "input_audio_buffer.append", "audio": "%%%"}', "invalid_value"),
    ('{"type": "input_audio_buffer.append", "audio": "AAAA"}', "bad_audio"),  # 3 bytes
    ('{"type": "input_audio_buffer.append", "audio": "' + "A" * 2_000_000 + '"}', "too_large"),
    ('{"type": "session.update", "session": {"audio": {"input": {"format": {"type": "audio/pcmu"}}}}}',
     "unsupported"),
    ('{"type": "session.update", "session": {"audio": {"output": {"format": {"type": "audio/pcm", '
     '"rate": 16000}}}}}', "unsupported"),
    ('{"type": "session.update", "session": {"temperature": 9}}', "invalid_value"),
    ('{"type": "conversation.item.create", "item": {"type": "message", "role": "system", '
     '"content": [{"type": "input_text", "text": "x"}]}}', "unsupported"),
    ('{"type": "conversation.item.truncate", "audio_end_ms": 5}', "missing_required_parameter"),
    ('{"type": "conversation.item.truncate", "item_id": "nope", "audio_end_ms": 5}', "bad_item"),
    ('{"type": "conversation.item.create", "item": {"type": "function_call_output", '
     '"call_id": "nope", "output": "1"}}', "unknown_call"),
    ('{"type": "input_audio_buffer.commit", "event_id": "evt_mine"}', "bad_state"),
]


async def test_bad_events_are_answered_with_errors_and_harm_no_one(tmp_path: Path) -> None:
    async with serve(tmp_path) as rt, connect(rt, output_modalities=["text"]) as (conn, ev), \
            connect(rt, output_modalities=["text"]) as (other, other_ev):
        for raw, _ in BAD_EVENTS:
            await conn._connection.send(raw)
        await ev.wait("error", len(BAD_EVENTS))
        await conn._connection.send(b"\x00\x01")  # a binary frame
        await ev.wait("error", len(BAD_EVENTS) + 1)
        codes = [e["error"]["code"] for e in ev.of("error")]
        assert codes[:-1] == [code for _, code in BAD_EVENTS] and codes[-1] == "invalid_event"
        errors = ev.of("error")
        assert all(e["error"]["message"] and e["error"]["type"] == "invalid_request_error"
                   for e in errors)
        assert errors[-2]["error"]["event_id"] == "evt_mine"
        assert errors[8]["error"]["param"] == "session.temperature"
        # the socket goes on, and so does the other session
        for c, e in ((conn, ev), (other, other_ev)):
            await ask(c, "What is the capital of France?")
            await c.response.create()
            assert (await e.wait("response.done"))["response"]["status"] == "completed"
        assert not other_ev.of("error")


async def test_a_second_response_create_while_one_runs_is_refused(tmp_path: Path) -> None:
    async with serve(tmp_path, ms_per_char=40.0) as rt, connect(rt) as (conn, ev):
        await ask(conn, "Tell me about Paris.")
        await conn.response.create()
        await ev.wait("response.created")
        await conn.response.create()
        assert (await ev.wait("error"))["error"]["code"] == "conversation_already_has_active_response"
        await conn.response.cancel()
        await ev.wait("response.done")
        assert len(ev.of("response.created")) == 1


async def test_beta_clients_get_beta_event_names(tmp_path: Path) -> None:
    async with serve(tmp_path) as rt, aiohttp.ClientSession() as http, http.ws_connect(
            f"{rt.base}/v1/realtime?model=m1", headers={"OpenAI-Beta": "realtime=v1"}) as ws:
        seen: list[dict[str, Any]] = []
        await ws.send_json({"type": "session.update", "session": {
            "modalities": ["audio", "text"], "turn_detection": None, "voice": "alloy",
            "input_audio_format": "pcm16", "max_response_output_tokens": 40}})
        await ws.send_json({"type": "conversation.item.create", "item": {
            "type": "message", "role": "user", "content": [{"type": "input_text", "text": "Hi"}]}})
        await ws.send_json({"type": "response.create"})
        async for msg in ws:
            seen.append(json.loads(msg.data))
            if seen[-1]["type"] == "response.done":
                break
    kinds = [e["type"] for e in seen]
    assert kinds[0] == "session.created" and seen[0]["session"]["model"] == "m1"
    updated = seen[1]["session"]
    assert updated["audio"]["input"]["turn_detection"] is None and updated["max_output_tokens"] == 40
    assert "conversation.item.created" in kinds and "conversation.item.added" not in kinds
    assert "response.audio.delta" in kinds and "response.audio_transcript.delta" in kinds
    assert "response.output_audio.delta" not in kinds


async def test_a_server_with_keys_wants_a_bearer_credential(tmp_path: Path) -> None:
    async with serve(tmp_path, keys=True) as rt:
        async with aiohttp.ClientSession() as http:
            async with http.get(f"{rt.base}/v1/realtime") as r:
                assert r.status == 401
        async with connect(rt, output_modalities=["text"]) as (conn, ev):
            await ask(conn, "What is the capital of France?")
            await conn.response.create()
            assert (await ev.wait("response.done"))["response"]["status"] == "completed"


async def test_the_tools_of_an_mcp_server_are_offered_and_run_by_the_server(tmp_path: Path) -> None:
    server = f"{sys.executable} {Path(__file__).parents[1] / 'mcp_server.py'}"
    async with serve(tmp_path, mcp_servers=[server]) as rt, \
            connect(rt, output_modalities=["text"]) as (conn, ev):
        health = await _get(f"{rt.base}/healthz")
        assert health["ready"]
        await ask(conn, "Please add two and three.")
        await conn.response.create()
        answer = await ev.wait("response.done", 2)
    assert {t.name for t in rt.llm.tools[0]} == {"get_time", "add", "slow", "fail"}
    assert answer["response"]["output"][0]["content"][0]["text"] == "It is 5."
    assert not ev.of("response.function_call_arguments.done")  # the server's own call
    first = ev.of("response.done")[0]["response"]
    assert first["status"] == "completed" and first["output"] == []


async def _get(url: str) -> dict[str, Any]:
    async with aiohttp.ClientSession() as http, http.get(url) as r:
        return dict(await r.json())


async def test_native_websocket_clients_declare_tools_and_send_results(tmp_path: Path) -> None:
    async with serve(tmp_path) as rt, aiohttp.ClientSession() as http, \
            http.ws_connect(f"{rt.base}/ws") as ws:
        events: list[dict[str, Any]] = []

        async def until_event(kind: str, n: int = 1) -> dict[str, Any]:
            while len([e for e in events if e["type"] == kind]) < n:
                msg = await asyncio.wait_for(ws.receive(), GUARD_S)
                if msg.type == aiohttp.WSMsgType.TEXT:
                    events.append(json.loads(msg.data))
            return [e for e in events if e["type"] == kind][n - 1]

        await ws.send_json({"type": "session.start", "tools": [TIME_TOOL]})
        await until_event("session.ready", 2)
        await ws.send_json({"type": "text", "text": "What time is it?"})
        call = await until_event("tool.call")
        first = await until_event("reply.done")
        assert (call["name"], call["turn_id"]) == ("get_time", first["turn_id"])
        await ws.send_json({"type": "tool.result", "call_id": call["call_id"], "output": "09:15"})
        second = await until_event("reply.done", 2)
        assert second["text"] == "It is 09:15." and second["turn_id"] > first["turn_id"]
        await ws.send_json({"type": "tool.result", "call_id": call["call_id"], "output": "again"})
        assert (await until_event("error"))["code"] == "unknown_call"


async def scripted_completions(request: web.Request) -> web.StreamResponse:
    """An OpenAI-compatible chat endpoint (server-sent events) with a script: asked with tools,
    it calls get_time (in fragments, as OpenAI streams calls); given a tool's result, it says
    it."""
    body = await request.json()
    last = body["messages"][-1]
    if last["role"] == "tool":
        deltas: list[dict[str, Any]] = [{"role": "assistant", "content": "It is "},
                                        {"content": f"{last['content']}."}]
        finish = "stop"
    else:
        assert body["tools"][0]["function"]["name"] == "get_time"
        deltas = [{"role": "assistant", "tool_calls": [{"index": 0, "id": "call_x9", "type": "function",
                                                         "function": {"name": "get_time", "arguments": ""}}]},
                  {"tool_calls": [{"index": 0, "function": {"arguments": "{}"}}]}]
        finish = "tool_calls"
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await resp.prepare(request)
    for delta in deltas:
        chunk = {"choices": [{"index": 0, "delta": delta, "finish_reason": None}]}
        await resp.write(f"data: {json.dumps(chunk)}\n\n".encode())
    done = {"choices": [{"index": 0, "delta": {}, "finish_reason": finish}]}
    await resp.write(f"data: {json.dumps(done)}\n\ndata: [DONE]\n\n".encode())
    return resp


async def test_tools_through_the_openai_compatible_engine(tmp_path: Path) -> None:
    endpoint = web.Application()
    endpoint.router.add_post("/v1/chat/completions", scripted_completions)
    runner = web.AppRunner(endpoint)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    host, port = runner.addresses[0][:2]
    llm = OpenAiLlm(f"http://{host}:{port}/v1", "scripted")
    try:
        async with serve(tmp_path, llm=llm) as rt, \
                connect(rt, output_modalities=["text"], tools=[TIME_TOOL]) as (conn, ev):
            await ask(conn, "What time is it?")
            await conn.response.create()
            await ev.wait("response.done")
            call = ev.of("response.function_call_arguments.done")[0]
            assert (call["call_id"], call["name"]) == ("call_x9", "get_time")
            await conn.conversation.item.create(item={"type": "function_call_output",
                                                      "call_id": "call_x9", "output": "08:05"})
            await conn.response.create()
            done = await ev.wait("response.done", 2)
        assert done["response"]["output"][0]["content"][0]["text"] == "It is 08:05."
    finally:
        await llm.aclose()
        await runner.cleanup()


async def test_an_audio_item_is_transcribed_into_the_conversation(tmp_path: Path) -> None:
    async with serve(tmp_path) as rt, connect(rt, output_modalities=["text"]) as (conn, ev):
        await conn.conversation.item.create(item={"type": "message", "role": "user", "content": [
            {"type": "input_audio", "audio": b64(tone(800))}]})
        completed = await ev.wait("conversation.item.input_audio_transcription.completed")
        assert completed["transcript"] == "what is the capital of France"
        assert not ev.of("input_audio_buffer.committed")  # an item, not the buffer
        await conn.response.create()
        await ev.wait("response.done")
    assert rt.llm.prompts[-1][-1].content == "what is the capital of France"
