"""What the running app holds: settings, engines, the session registry, owned tasks."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import Awaitable, Coroutine
from dataclasses import dataclass, field
from typing import Any, Protocol

from aiohttp import web

from pipelines.compute import Compute
from pipelines.engines.base import ToolRunner
from pipelines.session import Engines, Session, SessionConfig
from server.limits import Busy as Busy  # (refusals live with the limits; re-exported here)
from server.limits import ClientLimits, expire_session
from server.settings import Settings
from streaming.events import SessionClosing

log = logging.getLogger(__name__)


class ManagedTools(ToolRunner, Protocol):
    """Server tools with connections to close (McpTools)."""

    async def aclose(self) -> None: ...


class Supervisor:
    """Owns tasks that outlive the request that started them (WebRTC sessions):
    ``close()`` cancels and awaits every one of them."""

    def __init__(self) -> None:
        self._tasks: set[asyncio.Task[None]] = set()

    def spawn(self, coro: Coroutine[Any, Any, None], name: str) -> None:
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._finished)

    def _finished(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("task %s failed", task.get_name(), exc_info=task.exception())

    def __len__(self) -> int:
        return len(self._tasks)

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


@dataclass
class AppState:
    settings: Settings
    compute: Compute
    config: SessionConfig
    engines: Engines | None = None
    load_error: str | None = None
    sessions: dict[str, Session] = field(default_factory=dict)
    transports: dict[str, str] = field(default_factory=dict)  # id → "ws" | "realtime" | "webrtc" | "mqtt"
    supervisor: Supervisor = field(default_factory=Supervisor)
    clients: dict[str, str] = field(default_factory=dict)  # id → client, per-client sessions
    mcp: ManagedTools | None = None  # the MCP servers' connections (tools.mcp_servers)
    draining: bool = False  # new sessions are refused; running ones end (server.drain_timeout_s)
    _forgotten: asyncio.Event = field(default_factory=asyncio.Event)  # a session ended
    limits: ClientLimits = field(init=False)

    def __post_init__(self) -> None:
        self.limits = ClientLimits(self.settings.limits)

    def open_session(self, transport: str, client: str | None = None) -> Session:
        """A new registered session; raises Busy at the session limit or when the machine is
        saturated (urgent model work already waits too long), and, for a ``client``
        (``server.limits.client_of``; WebSocket and WebRTC name one, MQTT devices do not),
        at that client's connection rate or session limit."""
        if self.engines is None:
            raise Busy("models are still loading", code="not_ready")
        if self.draining:
            raise Busy("this server is shutting down: connect again (to another server)",
                       code="draining")
        if client is not None:
            try:
                self.limits.admit(client)
            except Busy:
                self.compute.metrics.refused.inc()
                raise
        if len(self.sessions) >= self.settings.server.max_sessions:
            self.compute.metrics.refused.inc()
            raise Busy("the server is at its session limit; try again later")
        if self.compute.saturated():
            self.compute.metrics.refused.inc()
            raise Busy("the server is saturated; try again in a moment")
        session = Session(uuid.uuid4().hex[:12], self.engines, self.config)
        session.on_metrics = self.compute.metrics.turn
        self.sessions[session.session_id] = session
        self.transports[session.session_id] = transport
        if client is not None:
            self.clients[session.session_id] = client
            self.limits.opened(client)
        self.compute.metrics.sessions.labels(transport).inc()
        return session

    async def drain(self, timeout_s: float) -> int:
        """Refuse new sessions, let the running ones go on for up to ``timeout_s``, then close
        the rest with ``session.closing`` (reconnect); returns how many were closed so."""
        self.draining = True
        log.info("draining: %d sessions running; new sessions are refused", len(self.sessions))
        await self._until_no_sessions(timeout_s)
        left = list(self.sessions.values())
        for session in left:
            session.close(SessionClosing("draining", "this server is shutting down; connect "
                                         "again to go on"))
        await self._until_no_sessions(5.0)  # their transports send the event and hang up
        log.info("drained: %d sessions closed by the drain", len(left))
        return len(left)

    async def _until_no_sessions(self, timeout_s: float) -> None:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout_s):
                while self.sessions:
                    self._forgotten.clear()
                    await self._forgotten.wait()

    async def serve(self, session: Session, transport: Awaitable[None], *,
                    expire: bool = True) -> None:
        """The life of one open session on its transport, the same for every endpoint: the
        session, its transport's pumps (``transport``: they close the session on their way
        out) and, with ``expire``, its expiry (``limits.max_session_s``, ``idle_timeout_s``)
        in one task group; then the session is forgotten, whatever happened."""
        try:
            async with asyncio.TaskGroup() as tg:
                tg.create_task(session.run())
                expiry = (tg.create_task(expire_session(session, self.settings.limits))
                          if expire else None)
                try:
                    await transport
                finally:
                    if expiry is not None:
                        expiry.cancel()
        finally:
            self.forget(session)
            log.info("session %s closed", session.session_id)

    def forget(self, session: Session) -> None:
        session.close()
        self._forgotten.set()
        if self.sessions.pop(session.session_id, None) is not None:
            self.compute.metrics.sessions.labels(self.transports.pop(session.session_id)).dec()
            client = self.clients.pop(session.session_id, None)
            if client is not None:
                self.limits.closed(client)


STATE = web.AppKey("state", AppState)
