"""The aiohttp application: /ws, /healthz, and the session registry."""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from pipelines.compute import Compute
from pipelines.session import Engines, Session, SessionConfig
from server.engines import build_engines, session_config
from server.settings import Settings
from streaming.protocol import MAX_IMAGE_MESSAGE_BYTES
from streaming.ws import WebSocketAdapter

log = logging.getLogger(__name__)


@dataclass
class AppState:
    settings: Settings
    compute: Compute
    config: SessionConfig
    engines: Engines | None = None
    load_error: str | None = None
    sessions: dict[str, Session] = field(default_factory=dict)
    tasks: set[asyncio.Task[None]] = field(default_factory=set)


STATE = web.AppKey("state", AppState)
EngineFactory = Callable[[Settings, Compute], Engines]


async def healthz(request: web.Request) -> web.Response:
    state = request.app[STATE]
    body: dict[str, Any] = {"ready": state.engines is not None, "sessions": len(state.sessions)}
    if state.engines is not None:
        body["models"] = state.engines.names()
        return web.json_response(body)
    body["error"] = state.load_error or "models are loading"
    return web.json_response(body, status=503)


async def index(request: web.Request) -> web.Response:
    return web.Response(text="voxlens is running.\n\nWebSocket: /ws (protocol: docs/PROTOCOL.md)\n"
                        "Health: /healthz\nTry: voxlens talk --text 'Hello!'\n")


async def websocket(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE]
    if state.engines is None:
        return web.json_response({"error": "not_ready", "message": "models are still loading"},
                                 status=503)
    ws = web.WebSocketResponse(max_msg_size=MAX_IMAGE_MESSAGE_BYTES + 65536, heartbeat=30)
    await ws.prepare(request)
    if len(state.sessions) >= state.settings.server.max_sessions:
        await ws.send_json({"type": "error", "code": "busy", "fatal": True,
                            "message": "the server is at its session limit; try again later"})
        await ws.close(code=1013, message=b"busy")
        return ws
    session = Session(uuid.uuid4().hex[:12], state.engines, state.config)
    state.sessions[session.session_id] = session
    log.info("session %s opened (%s)", session.session_id, request.remote)
    try:
        async with asyncio.TaskGroup() as tg:
            tg.create_task(session.run())
            await WebSocketAdapter(ws, session).run()
    finally:
        session.close()
        del state.sessions[session.session_id]
        await ws.close()
        log.info("session %s closed", session.session_id)
    return ws


async def _load_engines(app: web.Application, factory: EngineFactory) -> None:
    state = app[STATE]
    try:
        state.engines = await asyncio.to_thread(factory, state.settings, state.compute)
        log.info("models loaded; ready")
    except Exception as e:
        state.load_error = f"{type(e).__name__}: {e}"
        log.exception("loading models failed")


def create_app(settings: Settings, engine_factory: EngineFactory = build_engines) -> web.Application:
    """The HTTP app. Models load in a worker thread after start-up; /healthz says when ready."""
    app = web.Application(client_max_size=1024 * 1024)
    app[STATE] = AppState(settings, Compute(), session_config(settings))

    async def lifecycle(app: web.Application) -> AsyncIterator[None]:
        loader = asyncio.create_task(_load_engines(app, engine_factory))
        yield
        loader.cancel()
        app[STATE].compute.close()

    app.cleanup_ctx.append(lifecycle)
    app.router.add_get("/", index)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/ws", websocket)
    return app
