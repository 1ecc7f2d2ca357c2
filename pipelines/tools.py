"""The tool calls of one session: which tools the LLM is offered, the calls waiting for a result
(the client's, or the server's own tools running), and voiding them when the person speaks."""

from __future__ import annotations

import asyncio
import json
import logging
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from pipelines.engines.base import ToolCall, ToolRunner
from streaming.conversation import ToolSpec
from streaming.errors import ProtocolError, VoxlensError

log = logging.getLogger(__name__)

# What the server says itself while a tool of its own runs long, or when one failed; by the
# reply's language (None: any other).
FILLERS = {"zh": "稍等一下。", None: "Let me check."}
APOLOGIES = {"zh": "抱歉，我没能查到。", None: "Sorry, I couldn't get that."}
CANCELLED = json.dumps({"error": "cancelled: the person spoke before the result came"})


@dataclass(frozen=True, slots=True)
class ToolsConfig:
    timeout_s: float = 10.0  # a server tool's longest run
    filler_after_s: float | None = 1.0  # say a filler while a server tool runs longer (None: never)


@dataclass(slots=True)
class _Pending:
    turn_id: int
    call: ToolCall
    task: asyncio.Task[None] | None = None  # a server tool running; None: the client's call


class ToolCalls:
    """Owns the session's pending calls. The session reacts through three callbacks:
    ``on_output(call, text)`` (the result joins the history), ``on_settled(turn_id, failed)``
    (every call of that reply has its result: go on) and ``on_filler()`` (a server tool runs
    long: say something)."""

    def __init__(self, runner: ToolRunner | None, config: ToolsConfig, *,
                 on_output: Callable[[ToolCall, str], None],
                 on_settled: Callable[[int, bool], None],
                 on_filler: Callable[[], None]) -> None:
        self.runner = runner
        self.config = config
        self.client: tuple[ToolSpec, ...] = ()  # the tools the client declared
        self._on_output = on_output
        self._on_settled = on_settled
        self._on_filler = on_filler
        self._pending: dict[str, _Pending] = {}
        self._failed: set[int] = set()  # turns with a server tool that failed
        self._void: deque[str] = deque(maxlen=64)  # recently voided call ids (clear errors)

    def offered(self) -> list[ToolSpec]:
        """The client's tools, then the server's (a client tool shadows a server one)."""
        names = {t.name for t in self.client}
        server = [] if self.runner is None else [t for t in self.runner.specs() if t.name not in names]
        return [*self.client, *server]

    def server_names(self) -> frozenset[str]:
        if self.runner is None:
            return frozenset()
        client = {t.name for t in self.client}
        return frozenset(t.name for t in self.runner.specs() if t.name not in client)

    def pending(self) -> bool:
        return bool(self._pending)

    def start(self, turn_id: int, calls: Sequence[ToolCall], tg: asyncio.TaskGroup | None) -> None:
        """A reply called these tools: the server's start now in ``tg`` (None: they are about
        to be voided), the client's wait for its results."""
        server = self.server_names()
        for call in calls:
            pending = _Pending(turn_id, call)
            self._pending[call.call_id] = pending
            if call.name in server and tg is not None:
                pending.task = tg.create_task(self._run(pending, tg))

    def result(self, call_id: str, output: str) -> int | None:
        """The client's result of a call; returns the reply's turn id when it was the last of
        that reply's calls (the conversation goes on), else None."""
        pending = self._pending.get(call_id)
        if pending is None or pending.task is not None:
            if call_id in self._void:
                raise ProtocolError(f"tool call {call_id!r} was cancelled (the person spoke); its "
                                    "result is not used", code="tool_call_cancelled")
            raise ProtocolError(f"no tool call {call_id!r} is waiting for a result",
                                code="unknown_call")
        return self._settle(pending, output)

    def void(self) -> list[tuple[int, ToolCall]]:
        """Cancel every pending call (the person spoke, or the reply was cut): each gets a
        'cancelled' result, so the history never holds a call without one. Returns the
        client's calls voided (the client is told)."""
        told = []
        for pending in list(self._pending.values()):
            del self._pending[pending.call.call_id]
            self._void.append(pending.call.call_id)
            if pending.task is not None:
                pending.task.cancel()
            else:
                told.append((pending.turn_id, pending.call))
            self._on_output(pending.call, CANCELLED)
            self._failed.discard(pending.turn_id)
        return told

    def _settle(self, pending: _Pending, output: str) -> int | None:
        del self._pending[pending.call.call_id]
        self._on_output(pending.call, output)
        turn_id = pending.turn_id
        if any(p.turn_id == turn_id for p in self._pending.values()):
            return None
        return turn_id

    async def _run(self, pending: _Pending, tg: asyncio.TaskGroup) -> None:
        assert self.runner is not None
        call = pending.call
        filler = (None if self.config.filler_after_s is None else
                  tg.create_task(self._filler(self.config.filler_after_s)))
        try:
            output = await self.runner.call(call.name, call.arguments, timeout_s=self.config.timeout_s)
            failed = False
        except VoxlensError as e:
            # the message may quote the tool's output: only at DEBUG (privacy)
            log.warning("tool %s failed (%s); log_level=DEBUG says why", call.name, e.code)
            log.debug("tool %s failed: %s", call.name, e.message)
            output, failed = json.dumps({"error": e.message}), True
        finally:
            if filler is not None:
                filler.cancel()
        if failed:
            self._failed.add(pending.turn_id)
        pending.task = None  # done: settling it cancels nothing
        turn_id = self._settle(pending, output)
        if turn_id is not None:
            was_failed = turn_id in self._failed
            self._failed.discard(turn_id)
            self._on_settled(turn_id, was_failed)

    async def _filler(self, after_s: float) -> None:
        await asyncio.sleep(after_s)
        self._on_filler()
