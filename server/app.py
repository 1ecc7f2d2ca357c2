"""The aiohttp application: /, /ws, /v1/realtime, /offer, /healthz, /v1/tokens, the model API
(server/model_api.py), and the session registry.

Every request passes ``server.auth.guard`` first (origin check, then access key or token)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

from aiohttp import WSCloseCode, web
from prometheus_client import CONTENT_TYPE_LATEST

from pipelines.compute import Compute, Priority
from pipelines.session import Engines, Session
from server.auth import AUTH, CREDENTIAL, Auth, guard, tokens
from server.engines import build_engines, session_config
from server.limits import client_of
from server.model_api import setup_model_api
from server.mqtt import MQTT, setup_mqtt
from server.rtc import offer, setup_webrtc, webrtc_config
from server.settings import Settings
from server.state import STATE, AppState, Busy
from server.vision_api import vision_ask
from streaming.events import Error
from streaming.protocol import MAX_IMAGE_MESSAGE_BYTES, event_to_json
from streaming.realtime import RealtimeAdapter
from streaming.realtime_wire import MAX_EVENT_BYTES
from streaming.ws import WebSocketAdapter

log = logging.getLogger(__name__)
WEB_DIR = Path(__file__).resolve().parents[1] / "client" / "web"
WS_TRY_AGAIN_LATER = 1013  # the close code after a refusal (busy, rate_limited, not_ready)


EngineFactory = Callable[[Settings, Compute], Engines]


async def index(request: web.Request) -> web.FileResponse:
    return web.FileResponse(WEB_DIR / "index.html")


async def metrics(request: web.Request) -> web.Response:
    """Prometheus text format: lanes (queue wait, run time, batch size, stale and cancelled
    work), turn stage latencies, sessions."""
    body = request.app[STATE].compute.metrics.render()
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


async def healthz(request: web.Request) -> web.Response:
    state = request.app[STATE]
    body: dict[str, Any] = {"ready": state.engines is not None and not state.draining,
                            "sessions": len(state.sessions), "tasks": len(asyncio.all_tasks())}
    if state.draining:  # a balancer's health check moves new sessions to other nodes
        body["draining"] = True
        return web.json_response(body, status=503)
    if MQTT in request.app:
        body["mqtt"] = request.app[MQTT].health()
    if state.engines is not None:
        body["models"] = state.engines.names()
        return web.json_response(body)
    body["error"] = state.load_error or "models are loading"
    return web.json_response(body, status=503)


Adapter = Callable[[web.WebSocketResponse, Session], Awaitable[None]]
Refusal = Callable[[web.WebSocketResponse, Error], Awaitable[None]]


async def _socket_session(request: web.Request, transport: str, max_msg_size: int,
                          adapter: Adapter, tell: Refusal) -> web.StreamResponse:
    """The life of one WebSocket session, for every WebSocket protocol: upgrade, open a
    registered session (or refuse it), run it and its adapter in one task group with the
    session's expiry, then forget it. ``tell`` sends an error in the protocol's shape."""
    state = request.app[STATE]
    if state.engines is None:
        return web.json_response({"error": "not_ready", "message": "models are still loading"},
                                 status=503)
    ws = web.WebSocketResponse(max_msg_size=max_msg_size, heartbeat=30)
    await ws.prepare(request)
    # refusals come after the upgrade, as a fatal `error` event: a browser cannot read the
    # status or body of a refused handshake, so this is the only way its page learns why
    client = client_of(request)
    try:
        session = state.open_session(transport, client)
    except Busy as e:
        if e.status == 429:
            log.info("refused a %s session of %s: %s", transport, client, e.code)
        await tell(ws, Error(e.code, e.message, True, e.retry_after))
        await ws.close(code=WS_TRY_AGAIN_LATER, message=e.code.encode())
        return ws
    log.info("session %s opened over %s (%s)", session.session_id, transport, request.remote)
    try:
        await state.serve(session, adapter(ws, session))
    except Exception:  # a bug in this transport: this client alone is told, and closed
        log.exception("session %s: the %s transport failed", session.session_id, transport)
        with contextlib.suppress(Exception):
            await tell(ws, Error("internal", "the session failed and was closed", True))
        await ws.close(code=WSCloseCode.INTERNAL_ERROR, message=b"internal")
    finally:
        await ws.close()
    return ws


async def websocket(request: web.Request) -> web.StreamResponse:
    """``/ws``: the native protocol (docs/PROTOCOL.md)."""
    state = request.app[STATE]
    b = state.settings.bargein

    async def run(ws: web.WebSocketResponse, session: Session) -> None:
        await WebSocketAdapter(ws, session, lead_ms=b.lead_ms,
                               limits=state.limits.message_limits()).run()

    async def tell(ws: web.WebSocketResponse, error: Error) -> None:
        await ws.send_json(event_to_json(error))

    return await _socket_session(request, "ws", MAX_IMAGE_MESSAGE_BYTES + 65536, run, tell)


async def realtime(request: web.Request) -> web.StreamResponse:
    """``/v1/realtime``: the OpenAI Realtime protocol (docs/REALTIME.md)."""
    state = request.app[STATE]
    b = state.settings.bargein
    model = request.query.get("model", "voxlens")[:64]
    beta = "realtime=v1" in request.headers.get("OpenAI-Beta", "")

    async def run(ws: web.WebSocketResponse, session: Session) -> None:
        await RealtimeAdapter(ws, session, model=model, beta=beta, lead_ms=b.lead_ms,
                              limits=state.limits.message_limits()).run()

    async def tell(ws: web.WebSocketResponse, error: Error) -> None:
        await ws.send_json({"type": "error", "event_id": "event_refused", "error": {
            "type": "server_error" if error.code == "internal" else "invalid_request_error",
            "code": error.code, "message": error.message, "param": None, "event_id": None}})

    return await _socket_session(request, "realtime", MAX_EVENT_BYTES + 65536, run, tell)


DRAINED: web.AppKey[Callable[[], None]] = web.AppKey("drained")  # ends the process after a drain


def start_drain(app: web.Application) -> bool:
    """Begin draining (once): refuse new sessions now, end the running ones within
    ``server.drain_timeout_s``, then call the app's ``DRAINED`` (``voxlens serve``: exit)."""
    state = app[STATE]
    if state.draining:
        return False

    async def drain() -> None:
        await state.drain(state.settings.server.drain_timeout_s)
        if DRAINED in app:
            app[DRAINED]()

    state.draining = True
    state.supervisor.spawn(drain(), "drain")
    return True


async def admin_drain(request: web.Request) -> web.Response:
    """``POST /admin/drain``: what SIGTERM does (a rolling deploy without signals). On a
    server with keys it takes an access key, not a token."""
    credential = request.get(CREDENTIAL)
    if credential is not None and not credential.key:
        return web.json_response({"error": "forbidden", "message": "draining takes an access "
                                  "key, not a token"}, status=403)
    state = request.app[STATE]
    started = start_drain(request.app)
    return web.json_response({"draining": True, "started": started,
                              "sessions": len(state.sessions),
                              "timeout_s": state.settings.server.drain_timeout_s}, status=202)


async def _load_engines(app: web.Application, factory: EngineFactory) -> None:
    state = app[STATE]
    try:
        engines = await asyncio.to_thread(factory, state.settings, state.compute)
        if state.settings.tools.mcp_servers:
            from pipelines.engines.tools_mcp import McpTools  # the mcp SDK takes ~0.7 s to import

            state.mcp = McpTools(state.settings.tools.mcp_servers)
            await state.mcp.start()
            engines = replace(engines, tools=state.mcp)
            log.info("server tools ready: %s", ", ".join(t.name for t in state.mcp.specs()))
        state.engines = engines
        log.info("models loaded; ready")
    except Exception as e:
        state.load_error = f"{type(e).__name__}: {e}"
        log.exception("loading models failed")


def _on_signal(sig: signal.Signals, callback: Callable[[], object]) -> bool:
    """Run ``callback`` on ``sig`` (SIGHUP: re-read the keys file; SIGTERM: drain); False
    where that is impossible (no such signal, not the main thread)."""
    with contextlib.suppress(AttributeError, NotImplementedError, RuntimeError, ValueError):
        asyncio.get_running_loop().add_signal_handler(sig, callback)
        return True
    return False


def create_app(settings: Settings, engine_factory: EngineFactory = build_engines) -> web.Application:
    """The HTTP app. Models load in a worker thread after start-up; /healthz says when ready."""
    auth = Auth(settings.auth)  # keys, token secret: read now, so a bad file stops start-up
    app = web.Application(client_max_size=MAX_IMAGE_MESSAGE_BYTES,  # /v1/vision/ask: images
                          middlewares=[guard(auth, settings.server)])
    app[AUTH] = auth
    sched = settings.scheduler
    compute = Compute(max_batch=sched.max_batch, gather_ms=sched.gather_ms,
                      admission_wait_ms=sched.admission_wait_ms, fifo=sched.fifo,
                      order=[Priority[name.upper()] for name in sched.order])
    app[STATE] = AppState(settings, compute, session_config(settings))
    setup_webrtc(settings)

    async def lifecycle(app: web.Application) -> AsyncIterator[None]:
        state = app[STATE]
        state.supervisor.spawn(_load_engines(app, engine_factory), "load-engines")
        hangup = settings.auth.api_keys_file is not None and _on_signal(
            signal.SIGHUP, lambda: state.supervisor.spawn(auth.reload(), "reload-keys"))
        # SIGTERM drains (a rolling deploy, Kubernetes' preStop); SIGINT still stops at once
        term = DRAINED in app and _on_signal(signal.SIGTERM, lambda: start_drain(app))
        yield
        for sig, held in ((signal.SIGHUP, hangup), (signal.SIGTERM, term)):
            if held:
                asyncio.get_running_loop().remove_signal_handler(sig)
        await state.supervisor.close()
        if state.mcp is not None:
            await state.mcp.aclose()
        state.compute.close()

    app.cleanup_ctx.append(lifecycle)
    setup_mqtt(app)
    app.router.add_get("/", index)
    app.router.add_static("/static", WEB_DIR)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/ws", websocket)
    app.router.add_get("/v1/realtime", realtime)
    app.router.add_post("/offer", offer)
    app.router.add_get("/webrtc/config", webrtc_config)
    app.router.add_post("/v1/vision/ask", vision_ask)
    app.router.add_post("/v1/tokens", tokens)
    app.router.add_post("/admin/drain", admin_drain)
    setup_model_api(app)
    return app
