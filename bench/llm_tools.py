"""Tool calling with the packaged LLM: how often it calls a tool when one is needed, and not otherwise.

    .venv/bin/python -m bench.llm_tools [--temperatures 0.3,0] [--limit 8] [--repeat 1] [--show]

The llama.cpp engine (Qwen2.5 0.5B Instruct Q4_K_M, 2 threads) is offered two tools,
``get_time()`` and ``get_weather(city)``, under voxlens's default system prompt, and asked
questions one at a time (a fresh history each): some clearly need the time, some the weather in
a named city, some no tool at all. Per temperature it prints, of the questions that need a
tool, the share where a call was made, to the right tool, with good arguments (an object;
for get_weather with the right city), with clean arguments (no keys the parameters do not
declare: get_time has none), calls that came with spoken words, and replies that came out
empty (all markup, dropped); of the others, the share with a call (false) and the empty ones;
and the median time from asking to the end of the reply (when the calls are known).

After each good call the tool's made-up result goes into the history and the model is asked
again, with tool_choice "none" (no tools offered) and "auto": how often the answer says the
result, and how often "auto" calls a tool again instead. ``--show`` prints every reply.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from pipelines import models
from pipelines.compute import Compute
from pipelines.engines.base import ChatMessage, Sampling, ToolCall, ToolSpec
from pipelines.engines.llm_llama import LlamaLlm
from pipelines.prompt import DEFAULT_SYSTEM_PROMPT

TOOLS = [
    ToolSpec("get_time", "Get the current local time."),
    ToolSpec("get_weather", "Get the current weather in a city.",
             {"type": "object", "properties": {"city": {"type": "string", "description": "The city"}},
              "required": ["city"]}),
]
TIME = ["What time is it?", "What's the time right now?", "Can you tell me the time?",
        "Do you know what time it is?", "What time is it now, please?",
        "Could you check the current time for me?", "Is it already past noon?", "How late is it?"]
WEATHER = [("How's the weather in Tokyo?", "Tokyo"), ("Is it raining in Berlin right now?", "Berlin"),
           ("What's the temperature in New York today?", "New York"),
           ("What's the weather like in Paris?", "Paris"),
           ("Do I need an umbrella in London today?", "London"), ("Is it sunny in Madrid?", "Madrid"),
           ("How cold is it in Oslo right now?", "Oslo"),
           ("Tell me the weather forecast for Sydney.", "Sydney")]
NO_TOOL = ["What is the capital of France?", "Who wrote Hamlet?", "How many legs does a spider have?",
           "Tell me a fun fact about cats.", "Hello!", "What's two plus two?",
           "Can you recommend a good book?", "How do I boil an egg?", "What does photosynthesis mean?",
           "Thank you, that's all.", "What's the largest planet in the solar system?",
           "Translate 'good morning' into Spanish."]


RESULTS = {"get_time": ("14:37", "14:37"), "get_weather": ("Light rain, 18 °C", "18")}  # result, expected


@dataclass
class Reply:
    words: str
    calls: list[ToolCall]
    seconds: float


async def ask(llm: LlamaLlm, messages: list[ChatMessage], temperature: float,
              choice: str = "auto") -> Reply:
    start = time.perf_counter()
    words, calls = [], []
    async for part in llm.stream(messages, max_tokens=160, tools=TOOLS,
                                 sampling=Sampling(temperature=temperature, tool_choice=choice)):
        if isinstance(part, ToolCall):
            calls.append(part)
        else:
            words.append(part)
    return Reply("".join(words).strip(), calls, time.perf_counter() - start)


def arguments(call: ToolCall) -> dict[str, object] | None:
    try:
        value = json.loads(call.arguments)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def share(n: int, of: int) -> str:
    return f"{n}/{of} {100 * n / of:3.0f}%" if of else "-"


def median(seconds: list[float]) -> str:
    return f"{statistics.median(seconds):.2f}" if seconds else "-"


@dataclass
class Tally:
    """Counts of one temperature's run."""

    asked: int = 0
    called: int = 0
    right: int = 0
    ok: int = 0
    clean: int = 0
    spoke: int = 0
    empty: int = 0
    plain: int = 0
    false: int = 0
    plain_empty: int = 0
    followed: int = 0
    answered: int = 0  # tool_choice "none" after the result: the result in the words
    again: int = 0  # tool_choice "auto" after the result: another call
    answered_auto: int = 0
    tool_s: list[float] = field(default_factory=list)
    plain_s: list[float] = field(default_factory=list)
    answer_s: list[float] = field(default_factory=list)


async def needed(llm: LlamaLlm, system: str, question: str, tool: str, city: str | None,
                 temperature: float, t: Tally, show: bool) -> None:
    """A question that needs ``tool``; after the right call, its result and the answer."""
    history = [ChatMessage("system", system), ChatMessage("user", question)]
    reply = await ask(llm, history, temperature)
    t.asked += 1
    t.tool_s.append(reply.seconds)
    if show:
        print(f"  {temperature} {question!r}: {reply.words!r} {reply.calls}")
    t.empty += not reply.calls and not reply.words
    if not reply.calls:
        return
    t.called += 1
    t.spoke += bool(reply.words)
    call = reply.calls[0]
    args = arguments(call)
    if call.name != tool:
        return
    t.right += 1
    if args is None:
        return
    declared = set(next(s for s in TOOLS if s.name == tool).parameters["properties"])
    t.clean += set(args) <= declared
    good = tool == "get_time" or str(args.get("city", "")).lower() == str(city).lower()
    t.ok += good
    if not good:
        return
    result, expected = RESULTS[tool]
    history += [ChatMessage("assistant", reply.words, tool_calls=(call,)),
                ChatMessage("tool", result, tool_call_id=call.call_id)]
    answer = await ask(llm, history, temperature, "none")
    t.followed += 1
    t.answer_s.append(answer.seconds)
    t.answered += expected in answer.words
    auto = await ask(llm, history, temperature)
    t.again += bool(auto.calls)
    t.answered_auto += expected in auto.words
    if show:
        print(f"    after {result!r}: none {answer.words!r}; auto {auto.words!r} {auto.calls}")


async def run(temperatures: Sequence[float], limit: int, repeat: int, system: str, show: bool) -> None:
    compute = Compute()
    try:
        llm = LlamaLlm(models.llm_model("qwen2.5-0.5b", models.default_cache_dir()), compute, threads=2)
        llm.warm_up(system, tools=TOOLS)
        questions = [(q, "get_time", None) for q in TIME[:limit]] + [(q, "get_weather", c)
                                                                      for q, c in WEATHER[:limit]]
        plain = NO_TOOL[:limit + limit // 2]
        print(f"{platform.node()}: Qwen2.5 0.5B Q4_K_M, 2 threads; {len(questions)} questions that need "
              f"a tool ({min(limit, len(TIME))} time, {min(limit, len(WEATHER))} weather), "
              f"{len(plain)} that need none, each asked {repeat}x at a temperature above 0")
        if system != DEFAULT_SYSTEM_PROMPT:
            print(f"system prompt: {system!r}")
        tallies = {}
        for temperature in temperatures:
            t = tallies[temperature] = Tally()
            times = repeat if temperature > 0 else 1  # greedy decoding says the same again
            for question, tool, city in questions * times:
                await needed(llm, system, question, tool, city, temperature, t, show)
            for question in plain * times:
                reply = await ask(llm, [ChatMessage("system", system), ChatMessage("user", question)],
                                  temperature)
                t.plain += 1
                t.plain_s.append(reply.seconds)
                if show:
                    print(f"  {temperature} {question!r}: {reply.words!r} {reply.calls}")
                t.false += bool(reply.calls)
                t.plain_empty += not reply.calls and not reply.words
        print("\nthe first reply: to questions that need a tool | that need none | median seconds")
        print(f"{'temp':>5s} {'called':>10s} {'right tool':>11s} {'args ok':>11s} {'args clean':>11s} "
              f"{'+ words':>9s} {'empty':>9s} | {'false calls':>11s} {'empty':>9s} | "
              f"{'tool':>5s} {'no tool':>8s}")
        for temperature, t in tallies.items():
            n = t.asked
            print(f"{temperature:5.1f} {share(t.called, n):>10s} {share(t.right, n):>11s} "
                  f"{share(t.ok, n):>11s} {share(t.clean, n):>11s} {share(t.spoke, t.called):>9s} "
                  f"{share(t.empty, n):>9s} | {share(t.false, t.plain):>11s} "
                  f"{share(t.plain_empty, t.plain):>9s} | {median(t.tool_s):>5s} {median(t.plain_s):>8s}")
        print("\nafter a good call, its result in the history (14:37; light rain, 18 °C):")
        print(f"{'temp':>5s} {'none: says it':>14s} {'median s':>9s} | {'auto: calls again':>18s} "
              f"{'says it':>10s}")
        for temperature, t in tallies.items():
            print(f"{temperature:5.1f} {share(t.answered, t.followed):>14s} {median(t.answer_s):>9s} | "
                  f"{share(t.again, t.followed):>18s} {share(t.answered_auto, t.followed):>10s}")
    finally:
        compute.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--temperatures", default="0.3,0", help="comma-separated")
    parser.add_argument("--limit", type=int, default=8,
                        help="questions of each kind (time, weather; 1.5 times as many without a tool)")
    parser.add_argument("--repeat", type=int, default=1, help="asks of each question above temperature 0")
    parser.add_argument("--system", default=DEFAULT_SYSTEM_PROMPT, help="the system prompt")
    parser.add_argument("--show", action="store_true", help="print every reply")
    args = parser.parse_args()
    t0 = time.monotonic()
    asyncio.run(run([float(t) for t in args.temperatures.split(",")], args.limit, args.repeat,
                    args.system, args.show))
    print(f"\n(took {time.monotonic() - t0:.0f} s)")


if __name__ == "__main__":
    main()
