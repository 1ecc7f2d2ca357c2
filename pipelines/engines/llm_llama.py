"""A GGUF chat model through llama-cpp-python, generating on the ``llm`` lane."""

from __future__ import annotations

import contextlib
import json
import logging
import re
import uuid
from collections.abc import AsyncIterator, Generator, Iterator, Sequence
from pathlib import Path
from typing import Any

from llama_cpp import Llama
from llama_cpp.llama_grammar import LlamaGrammar

from pipelines.compute import Compute, Priority
from pipelines.engines.base import DEFAULT_SAMPLING, ChatMessage, Sampling, ToolCall, ToolSpec
from streaming.errors import EngineError

log = logging.getLogger(__name__)


class LlamaLlm:
    """Owns one llama.cpp context (one prompt's KV cache at a time) and the GGUF's own chat
    template, which renders tools, tool calls and tool results (Qwen2.5: the Hermes format)."""

    def __init__(
        self,
        model_path: Path,
        compute: Compute,
        *,
        n_ctx: int = 2048,
        threads: int = 2,
        temperature: float = 0.3,
        name: str | None = None,
    ) -> None:
        self.name = name or f"llama.cpp:{model_path.name}"
        self._compute = compute
        self._temperature = temperature
        self._llama = Llama(model_path=str(model_path), n_ctx=n_ctx, n_threads=threads,
                            n_threads_batch=threads, verbose=False)

    def warm_up(self, system_prompt: str, *, tools: Sequence[ToolSpec] = ()) -> None:
        """One tiny completion: pays lazy initialisation and leaves the system prompt in the
        KV cache, which llama.cpp reuses for every prompt that starts with it."""
        self._evaluate(_payload([ChatMessage("system", system_prompt), ChatMessage("user", "Hi")]),
                       _tools(tools))

    async def prefill(self, messages: Sequence[ChatMessage], *, session: str | None = None,
                      tools: Sequence[ToolSpec] = ()) -> None:
        """Evaluate a prompt ahead of time at background priority. llama.cpp keeps the
        evaluated tokens, so the real prompt pays only for the tokens that differ. One context
        holds one prompt, so a newer prefill (of any session) supersedes a queued one.

        The template writes the tools into the system prompt: a prefill without the tools the
        reply will be offered shares only the system prompt's own text with it, and the reply
        pays for the tool descriptions and the whole history again (Llm.prefill has no tools;
        with two small tools that cost 0.7 s before the first token on 2 cores)."""
        await self._compute.call("llm", Priority.ASR_PARTIAL, self._evaluate, _payload(messages),
                                 _tools(tools), session=session, key="prefill")

    def _evaluate(self, payload: Any, tools: Any) -> None:
        self._llama.create_chat_completion(payload, tools=tools, max_tokens=1)

    def count_tokens(self, text: str) -> int:
        return len(self._llama.tokenize(text.encode("utf-8"), add_bos=False, special=False))

    def stream(self, messages: Sequence[ChatMessage], *, max_tokens: int,
               session: str | None = None, tools: Sequence[ToolSpec] = (),
               sampling: Sampling = DEFAULT_SAMPLING,
               ) -> AsyncIterator[str | ToolCall]:
        """Reply deltas, then the tool calls (see ToolCallParser). Closing the iterator stops
        llama.cpp before its next token.

        Tools are not offered with tool_choice "none"; "required" or a tool's name holds the
        reply to one call by a grammar. With "auto" the model decides; a reply that begins
        with a call (markup or JSON before any words) is generated once more, from the same
        cached prompt, held by the grammar to a call of an offered tool with arguments that fit
        its parameters: the small model means a call there, but often misnames the tool or
        writes arguments that are not JSON, or a copy of the parameters' schema.

        With no tools offered but tool calls in the history, the small model tends to answer a
        tool's result with another call in JSON; such a reply is generated once more, held by
        a grammar to begin with a word (bench/llm_tools.py; the grammar halves the speed, so
        it is only used then)."""
        choice = sampling.tool_choice
        if choice == "auto" and messages and messages[-1].role == "tool":
            # the packaged 0.5B model calls the same tool again after its result, every time
            # (bench/llm_tools.py: 46 of 46); a reply to a result answers with words
            choice = "none"
        offered = tools if choice != "none" else ()
        payload = _payload(messages)
        temperature = self._temperature if sampling.temperature is None else sampling.temperature

        def deltas(grammar: LlamaGrammar | None) -> Generator[str]:
            chunks: Any = self._llama.create_chat_completion(
                payload, tools=_tools(offered), grammar=grammar, stream=True,
                max_tokens=max_tokens, temperature=temperature)
            with contextlib.closing(chunks):
                for chunk in chunks:
                    if delta := chunk["choices"][0]["delta"].get("content"):
                        yield delta

        def generate() -> Iterator[str | ToolCall]:
            try:
                if not offered and not any(m.role == "tool" or m.tool_calls for m in messages):
                    yield from deltas(None)
                    return
                if offered and choice != "auto":
                    yield from ToolCallParser().read(deltas(_call_grammar(offered, choice)))
                    return
                parser = ToolCallParser(calls=bool(offered))
                yield from parser.read(deltas(None), until_call=True)
                if parser.call_first:
                    again = _call_grammar(offered, "required") if offered else SPEECH
                    yield from ToolCallParser(calls=bool(offered)).read(deltas(again))
            except EngineError:
                raise
            except Exception as e:
                raise EngineError(f"llama.cpp failed: {e}") from e

        return self._compute.iterate("llm", Priority.LLM, generate, session=session)


TOOL_CALL, TOOL_CALL_END = "<tool_call>", "</tool_call>"
# A reply that starts with one of these is markup or JSON, never words to speak.
NOT_SPEECH = tuple("{[<`")
# A reply that begins with a word (or anything else that is not markup or JSON).
SPEECH = LlamaGrammar.from_string(r"root ::= [^{[<`\x00-\x20] .*", verbose=False)
# What may stand between calls: Qwen's tags, a ```json fence, a list's brackets and commas.
_BETWEEN_CALLS = re.compile(r"</?tool_call>|```\w*")


class ToolCallParser:
    """Splits a streamed reply into the words to speak and the tool calls the model wrote.

    Qwen2.5's template asks for ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``;
    the packaged 0.5B model mostly writes the bare JSON object instead, sometimes in a ```json
    fence, and now and then copies its tool descriptions. So a reply that starts with markup or
    JSON is never spoken: each complete JSON object in it of the shape {"name", "arguments"}
    is a call, and anything else there is dropped (logged at DEBUG), as is everything from the
    first object that is not a call on. Words before a ``<tool_call>`` are spoken; a possible
    start of that tag (and trailing whitespace) is held back until the next delta decides.
    Words after a call end the reply: ``done`` asks the caller to stop generating.
    ``calls=False``: no tools were offered, and calls are dropped too.
    """

    def __init__(self, *, calls: bool = True) -> None:
        self._accept = calls
        self._held = ""  # words not yet passed on: whitespace, or a possible start of <tool_call>
        self._spoke = False
        self._raw: str | None = None  # the reply from its markup on, once there is markup
        self._scanned = 0  # in _raw, up to the end of the last call
        self._calls = 0
        self.done = False

    def read(self, deltas: Generator[str], *, until_call: bool = False) -> Iterator[str | ToolCall]:
        """Words and calls from a whole reply, closing ``deltas`` when the reply ends early.
        ``until_call``: stop, with nothing passed on, when the reply begins with a call."""
        with contextlib.closing(deltas):
            for delta in deltas:
                out = self.feed(delta)
                if until_call and self.call_first:
                    return
                yield from out
                if self.done:
                    return
        yield from self.finish()

    @property
    def call_first(self) -> bool:
        """Whether the reply began with markup or JSON (a call, meant or made) and no words."""
        return self._raw is not None and not self._spoke

    def feed(self, delta: str) -> list[str | ToolCall]:
        """What ``delta`` completes: words to speak and tool calls, in the reply's order."""
        if self.done:
            return []
        if self._raw is not None:
            self._raw += delta
            return self._scan()
        text = self._held + delta
        start = text.find(TOOL_CALL)
        if not self._spoke and text.lstrip().startswith(NOT_SPEECH):
            start = len(text) - len(text.lstrip())
        if start >= 0:
            self._held, self._raw = "", text[start:]
            words = text[:start].rstrip()
            if not words:
                return self._scan()
            self._spoke = True
            return [words, *self._scan()]
        tag = _tag_start(text)
        words = text[:len(text) - tag].rstrip()
        self._held = text[len(words):]
        if not words:
            return []
        self._spoke = True
        return [words]

    def finish(self) -> list[str | ToolCall]:
        """The end of the reply: what was held back is dropped (a tag cut short or trailing
        whitespace), as is an unfinished or malformed call."""
        calls = self._scan() if self._raw is not None and not self.done else []
        rest = self._held if self._raw is None else _BETWEEN_CALLS.sub("", self._raw[self._scanned:])
        if rest.strip() and not self.done:
            log.debug("dropped the end of a reply with tools: %r", rest[:300])
        self.done = True
        return calls

    def _scan(self) -> list[str | ToolCall]:
        assert self._raw is not None
        found: list[str | ToolCall] = []
        while not self.done:
            start = self._raw.find("{", self._scanned)
            gap = self._raw[self._scanned:start if start >= 0 else len(self._raw)]
            if self._calls and _has_words(gap):
                self._stop("words after a tool call", self._raw[self._scanned:])
                break
            end = _object_end(self._raw, start) if start >= 0 else None
            if start < 0 or end is None:
                break  # no object yet, or not a whole one
            call = _call(self._raw[start:end])
            if call is None:
                self._stop("not a tool call", self._raw[self._scanned:])
                break
            if self._accept:
                found.append(call)
            else:
                log.debug("dropped a call to %s: no tools were offered", call.name)
            self._calls += 1
            self._scanned = end
        return found

    def _stop(self, why: str, text: str) -> None:
        log.debug("reply with tools ends, %s: %r", why, text[:300])
        self.done = True


def _tag_start(text: str) -> int:
    """The length of the longest end of ``text`` that could begin a ``<tool_call>`` tag."""
    for n in range(min(len(text), len(TOOL_CALL) - 1), 0, -1):
        if TOOL_CALL.startswith(text[-n:]):
            return n
    return 0


def _has_words(gap: str) -> bool:
    """Whether text between calls says something: more than tags, fences and punctuation
    (a tag still arriving at its end included)."""
    rest = _BETWEEN_CALLS.sub("", gap)
    cut = rest.rfind("<")
    if cut >= 0 and any(tag.startswith(rest[cut:]) for tag in (TOOL_CALL, TOOL_CALL_END)):
        rest = rest[:cut]
    return any(c.isalnum() for c in rest)


def _object_end(text: str, start: int) -> int | None:
    """The index just past the JSON object (or array) that opens at ``start``; None while it
    is unfinished. Brackets inside strings do not count."""
    depth, in_string, escaped = 0, False, False
    for i in range(start, len(text)):
        c = text[i]
        if in_string:
            if escaped:
                escaped = False
            elif c == "\\":
                escaped = True
            elif c == '"':
                in_string = False
        elif c == '"':
            in_string = True
        elif c in "{[":
            depth += 1
        elif c in "}]":
            depth -= 1
            if depth == 0:
                return i + 1
    return None


def _call(text: str) -> ToolCall | None:
    """A ToolCall from ``{"name": ..., "arguments": {...}}`` (arguments also as JSON text);
    None for anything else, e.g. a copy of a tool's description."""
    try:
        obj = json.loads(text)
    except ValueError:
        return None
    if not isinstance(obj, dict) or not set(obj) <= {"name", "arguments"}:
        return None
    name, arguments = obj.get("name"), obj.get("arguments", {})
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except ValueError:
            return None
    if not isinstance(name, str) or not name or not isinstance(arguments, dict):
        return None
    return ToolCall("call_" + uuid.uuid4().hex, name, json.dumps(arguments, ensure_ascii=False))


def _call_grammar(tools: Sequence[ToolSpec], choice: str) -> LlamaGrammar:
    """A grammar that admits exactly one call, to any of the tools ("required") or to the one
    named, with arguments that fit its parameters (and nothing else)."""
    chosen = [t for t in tools if choice == "required" or t.name == choice]
    if not chosen:
        raise EngineError(f"tool_choice {choice!r} names no offered tool")
    return LlamaGrammar.from_json_schema(json.dumps({"oneOf": [_call_shape(t) for t in chosen]}),
                                         verbose=False)


def _call_shape(tool: ToolSpec) -> dict[str, Any]:
    """The JSON Schema of a call to ``tool``. Parameters that llama-cpp-python's grammar
    converter does not understand (a ``$ref`` to the schema's own ``$defs``, an unknown type)
    let the arguments be any object."""

    def shape(arguments: dict[str, Any]) -> dict[str, Any]:
        return {"type": "object", "properties": {"name": {"const": tool.name}, "arguments": arguments},
                "required": ["name", "arguments"], "additionalProperties": False}

    exact = shape({"additionalProperties": False, **tool.parameters})
    try:
        LlamaGrammar.from_json_schema(json.dumps(exact), verbose=False)
    except Exception as e:
        log.debug("the arguments of %s are not held to its parameters: %s", tool.name, e)
        return shape({"type": "object"})
    return exact


def _tools(tools: Sequence[ToolSpec]) -> Any:
    """The tools in the OpenAI shape the chat template writes into the system prompt."""
    return [{"type": "function", "function": {"name": t.name, "description": t.description,
                                              "parameters": dict(t.parameters)}}
            for t in tools] or None


def _payload(messages: Sequence[ChatMessage]) -> Any:
    """llama-cpp-python's message dicts (typed there as TypedDicts, hence Any). The template
    renders an assistant's tool calls as <tool_call> blocks (their arguments as an object) and
    tool results as <tool_response> blocks in a user turn."""
    return [_message(m) for m in messages]


def _message(m: ChatMessage) -> dict[str, Any]:
    if m.role == "tool":
        return {"role": "tool", "content": m.content, "tool_call_id": m.tool_call_id}
    if m.role == "assistant" and m.tool_calls:
        return {"role": "assistant", "content": m.content,
                "tool_calls": [{"id": c.call_id, "type": "function",
                                "function": {"name": c.name, "arguments": _arguments(c.arguments)}}
                               for c in m.tool_calls]}
    return {"role": m.role, "content": m.content}


def _arguments(text: str) -> Any:
    """Arguments as the template wants them: an object (text that is not JSON stays text)."""
    try:
        return json.loads(text)
    except ValueError:
        return text
