"""Tool calls in the conversation core, on a virtual clock (looptime) with scripted engines:
client tools (the native tool.call / tool.result), server tools (a ToolRunner), the filler
while one runs long, the apology when one fails, and calls voided when the person speaks."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field

import pytest

from pipelines.engines.base import ChatMessage, ToolCall
from pipelines.engines.fakes import FakeAsr, FakeLlm, FakeTts, FakeVad
from pipelines.history import History, Item
from pipelines.session import Engines, Session, SessionConfig
from pipelines.tools import APOLOGIES, CANCELLED, FILLERS, ToolsConfig
from streaming.conversation import ToolSpec
from streaming.errors import EngineError, ProtocolError
from streaming.events import (
    Event,
    ReplyDone,
    ReplyStarted,
    ToolCallRequested,
    ToolCancelled,
)
from streaming.protocol import event_to_json, parse_client_message
from tests.unit.transport import serve

pytestmark = pytest.mark.looptime

WEATHER = ToolSpec("get_weather", "The weather in a city.",
                   {"type": "object", "properties": {"city": {"type": "string"}}})


def script(messages: Sequence[ChatMessage]) -> str | list[str | ToolCall]:
    last = messages[-1]
    if last.role == "tool":
        return f"Result: {last.content}."
    if "weather" in last.content:
        return ToolCall("call_w", "get_weather", '{"city": "Paris"}')
    return "Hello there."


@dataclass
class Runner:
    """A ToolRunner whose get_weather takes ``delay_s`` and fails when ``fail``."""

    delay_s: float = 0.1
    fail: bool = False
    calls: list[tuple[str, str]] = field(default_factory=list)
    cancelled: int = 0

    def specs(self) -> Sequence[ToolSpec]:
        return [WEATHER]

    async def call(self, name: str, arguments: str, *, timeout_s: float) -> str:
        self.calls.append((name, arguments))
        try:
            await asyncio.sleep(self.delay_s)
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        if self.fail:
            raise EngineError("the weather service is down")
        return "sunny, 21 °C"


class Talk:
    def __init__(self, session: Session, llm: FakeLlm, tts: FakeTts) -> None:
        self.session = session
        self.llm = llm
        self.tts = tts
        self.events: list[Event] = []

    async def collect(self) -> None:
        await serve(self.session, self.events.append)

    def of(self, kind: type) -> list:
        return [e for e in self.events if isinstance(e, kind)]

    async def until(self, predicate, guard_s: float = 60) -> None:  # type: ignore[no-untyped-def]
        async with asyncio.timeout(guard_s):
            while not predicate():  # noqa: ASYNC110 (the session's events, read by collect)
                await asyncio.sleep(0.01)


@pytest.fixture
async def talk(request: pytest.FixtureRequest) -> AsyncIterator[Talk]:
    runner = getattr(request, "param", None)
    llm = FakeLlm(script, first_token_s=0.05, token_s=0.01)
    tts = FakeTts()
    session = Session("t1", Engines(FakeVad(), FakeAsr(), llm, tts, tools=runner),
                      SessionConfig(tools=ToolsConfig(timeout_s=5, filler_after_s=1.0)),
                      clock=asyncio.get_running_loop().time)
    t = Talk(session, llm, tts)
    async with asyncio.TaskGroup() as tg:
        tg.create_task(session.run())
        tg.create_task(t.collect())
        yield t
        session.close()


def client_tools(session: Session) -> None:
    session.configure(input_rate=16_000, input_channels=1, output_rate=24_000, language="en",
                      instructions=None, tools=[WEATHER])


async def test_a_client_tool_is_asked_for_and_its_result_continues_the_reply(talk: Talk) -> None:
    client_tools(talk.session)
    talk.session.submit_text("What's the weather in Paris?")
    await talk.until(lambda: talk.of(ReplyDone))
    (call,) = talk.of(ToolCallRequested)
    assert (call.name, json.loads(call.arguments)) == ("get_weather", {"city": "Paris"})
    assert talk.events.index(call) < talk.events.index(talk.of(ReplyDone)[0])
    assert talk.llm.tools[0] == [WEATHER]
    talk.session.tool_result(call.call_id, "rainy")
    await talk.until(lambda: len(talk.of(ReplyDone)) == 2)
    assert talk.of(ReplyDone)[1].text == "Result: rainy."
    prompt = talk.llm.prompts[-1]
    assert prompt[-2].tool_calls == (ToolCall("call_w", "get_weather", '{"city": "Paris"}'),)
    assert (prompt[-1].role, prompt[-1].content) == ("tool", "rainy")
    assert [k for k, _ in talk.session.history.pairs()] == ["user", "assistant", "call", "output",
                                                           "assistant"]


async def test_the_person_speaking_voids_a_pending_call_and_its_late_result(talk: Talk) -> None:
    client_tools(talk.session)
    talk.session.submit_text("What's the weather in Paris?")
    await talk.until(lambda: talk.of(ReplyDone))
    talk.session.submit_text("Never mind, hello.")
    await talk.until(lambda: len(talk.of(ReplyDone)) == 2)
    (void,) = talk.of(ToolCancelled)
    assert void.call_id == "call_w"
    with pytest.raises(ProtocolError) as late:
        talk.session.tool_result("call_w", "rainy")
    assert late.value.code == "tool_call_cancelled"
    with pytest.raises(ProtocolError) as unknown:
        talk.session.tool_result("call_nope", "rainy")
    assert unknown.value.code == "unknown_call"
    await asyncio.sleep(1)
    assert len(talk.of(ReplyStarted)) == 2  # nothing came of the late result
    history = list(talk.session.history.pairs())
    assert history[2:4] == [("call", ""), ("output", CANCELLED)]  # a call never lacks a result
    assert history[4] == ("user", "Never mind, hello.")


@pytest.mark.parametrize("talk", [Runner()], indirect=True)
async def test_a_server_tool_runs_and_the_reply_goes_on_by_itself(talk: Talk) -> None:
    talk.session.submit_text("What's the weather in Paris?")
    await talk.until(lambda: len(talk.of(ReplyDone)) == 2)
    assert not talk.of(ToolCallRequested)  # not the client's to run
    assert talk.of(ReplyDone)[1].text == "Result: sunny, 21 °C."
    assert talk.llm.tools[0] == [WEATHER]
    assert not any(text in FILLERS.values() for text, _ in talk.tts.calls)  # it was quick


@pytest.mark.parametrize("talk", [Runner(delay_s=3.0)], indirect=True)
async def test_a_slow_server_tool_gets_a_filler(talk: Talk) -> None:
    talk.session.submit_text("What's the weather in Paris?")
    await talk.until(lambda: len(talk.of(ReplyDone)) == 3)
    filler, answer = talk.of(ReplyDone)[1:]
    assert filler.text == FILLERS[None] and answer.text == "Result: sunny, 21 °C."
    assert [t for k, t in talk.session.history.pairs() if k == "assistant"][-1] == answer.text
    assert FILLERS[None] not in [t for _, t in talk.session.history.pairs()]


@pytest.mark.parametrize("talk", [Runner(fail=True)], indirect=True)
async def test_a_failing_server_tool_is_an_apology_not_a_dead_turn(talk: Talk) -> None:
    talk.session.submit_text("What's the weather in Paris?")
    await talk.until(lambda: len(talk.of(ReplyDone)) == 2)
    assert talk.of(ReplyDone)[1].text == APOLOGIES[None]
    (output,) = [t for k, t in talk.session.history.pairs() if k == "output"]
    assert json.loads(output) == {"error": "the weather service is down"}
    talk.session.submit_text("Hello?")  # and the conversation goes on
    await talk.until(lambda: len(talk.of(ReplyDone)) == 3)


@pytest.mark.parametrize("talk", [Runner(delay_s=30.0)], indirect=True)
async def test_speaking_over_a_running_server_tool_cancels_it(talk: Talk) -> None:
    runner = talk.session.engines.tools
    assert isinstance(runner, Runner)
    talk.session.submit_text("What's the weather in Paris?")
    await talk.until(lambda: runner.calls and len(talk.of(ReplyDone)) == 2)  # the filler came
    talk.session.submit_text("Forget it.")
    await talk.until(lambda: len(talk.of(ReplyDone)) == 3)
    assert runner.cancelled == 1
    assert not talk.of(ToolCancelled)  # the client never knew of it
    await asyncio.sleep(40)
    assert len(talk.of(ReplyDone)) == 3  # no late answer


def test_native_wire_forms_of_tools() -> None:
    start = parse_client_message(json.dumps({"type": "session.start", "tools": [
        {"type": "function", "name": "get_time", "description": "now",
         "parameters": {"type": "object", "properties": {}}}]}))
    assert start.tools[0].name == "get_time"  # type: ignore[union-attr]
    result = parse_client_message('{"type": "tool.result", "call_id": "c1", "output": "12:00"}')
    assert (result.call_id, result.output) == ("c1", "12:00")  # type: ignore[union-attr]
    for bad in ('{"type": "tool.result", "call_id": "", "output": "x"}',
                '{"type": "session.start", "tools": [{"name": "has space"}]}'):
        with pytest.raises(ProtocolError):
            parse_client_message(bad)
    assert event_to_json(ToolCallRequested(3, "c1", "get_time", "{}")) == {
        "type": "tool.call", "turn_id": 3, "call_id": "c1", "name": "get_time", "arguments": "{}"}
    assert event_to_json(ToolCancelled(3, "c1")) == {"type": "tool.cancelled", "turn_id": 3,
                                                     "call_id": "c1"}


def test_history_forgets_whole_beginnings_never_a_lone_result() -> None:
    history = History(30, lambda text: len(text) // 4 + 1)
    call = ToolCall("c1", "get_time", "{}")
    for item in [Item("u1", "user", "a" * 40), Item("a1", "assistant", "b" * 20),
                 Item("fc", "call", "", call), Item("fo", "output", "12:00", call),
                 Item("a2", "assistant", "It is noon."), Item("u2", "user", "thanks"),
                 Item("a3", "assistant", "You are welcome.")]:
        history.add(item)
    messages = history.prompt("sys", "and now?")
    roles = [m.role for m in messages]
    assert roles[0] == "system" and roles[1] == "user" and roles[-1] == "user"
    assert "tool" not in roles[:2]
    assert history.items[0].id == "u2"  # the call and its result went together
    history.add(Item("x", "assistant", "inserted"), after="")
    assert history.items[0].id == "x"
    assert history.delete("x") and not history.delete("x")


def test_a_reply_with_no_new_words_keeps_its_question() -> None:
    history = History(10, lambda text: len(text))
    history.add(Item("u1", "user", "a question that is long"))
    messages = history.prompt("s", None)
    assert [m.role for m in messages] == ["system", "user"]
