"""WebRTC signalling: ``POST /offer`` → answer; one RTCPeerConnection = one Session."""

from __future__ import annotations

import contextlib
import logging

from aiohttp import web
from aiortc import RTCConfiguration, RTCIceServer, RTCPeerConnection, RTCSessionDescription

from server.auth import AUTH
from server.limits import client_of, refusal
from server.settings import Settings
from server.state import STATE, Busy
from streaming.errors import ProtocolError
from streaming.protocol import MAX_OFFER_BYTES, parse_offer
from streaming.webrtc import OUT_RATE, WebRtcAdapter, restrict_host_candidates

log = logging.getLogger(__name__)


def setup_webrtc(settings: Settings) -> None:
    if settings.webrtc.host_addresses:
        restrict_host_candidates(settings.webrtc.host_addresses)


def _configuration(settings: Settings) -> RTCConfiguration:
    return RTCConfiguration(iceServers=[
        RTCIceServer(urls=s.urls, username=s.username, credential=s.credential)
        for s in settings.webrtc.ice_servers])  # empty: no STUN server, ever, by default


async def webrtc_config(request: web.Request) -> web.Response:
    """The ICE servers browsers should use (the same list the server uses). The path is open
    (the page reads it), so on a server with access keys the servers that carry credentials
    (TURN) are listed only for a request with a valid credential: the page sends the token it
    connects with."""
    servers = request.app[STATE].settings.webrtc.ice_servers
    auth = request.app[AUTH]
    if auth.enabled and auth.authenticate(request) is None:
        servers = [s for s in servers if s.username is None and s.credential is None]
    return web.json_response({"iceServers": [s.model_dump(exclude_none=True) for s in servers]})


def _error(status: int, code: str, message: str) -> web.Response:
    return web.json_response({"error": code, "message": message}, status=status)


async def offer(request: web.Request) -> web.Response:
    state = request.app[STATE]
    if (request.content_length or 0) > MAX_OFFER_BYTES:
        return _error(413, "too_large", f"offer of {request.content_length} bytes exceeds the "
                      f"{MAX_OFFER_BYTES}-byte limit")
    try:
        req = parse_offer(await request.read())  # aiohttp caps bodies at client_max_size
    except ProtocolError as e:
        return _error(413 if e.code == "too_large" else 400, e.code, e.message)
    try:
        session = state.open_session("webrtc", client_of(request))
    except Busy as e:
        return refusal(e)  # 429 busy|rate_limited: this client's limits; 503: the server's
    session.configure(input_rate=16_000, input_channels=1, output_rate=OUT_RATE,
                      language=req.language, instructions=req.instructions)
    pc = RTCPeerConnection(_configuration(state.settings))
    adapter = WebRtcAdapter(pc, session, client_aec=req.echo_cancellation,
                            limits=state.limits.message_limits())
    try:
        await pc.setRemoteDescription(RTCSessionDescription(sdp=req.sdp, type="offer"))
        if not any(t.kind == "audio" for t in adapter.remote_tracks):
            raise ProtocolError("the offer has no audio track (add a microphone, sendrecv)")
        pc.addTrack(adapter.reply)
        await pc.setLocalDescription(await pc.createAnswer())
    except Exception as e:  # garbage SDP surfaces as many exception types inside aiortc
        state.forget(session)
        await _close_refused(pc)
        message = e.message if isinstance(e, ProtocolError) else f"cannot use this offer: {e}"
        log.info("offer refused: %s", message)
        return _error(400, "bad_offer", message)
    state.supervisor.spawn(state.serve(session, adapter.run()), f"webrtc-{session.session_id}")
    log.info("session %s opened over WebRTC (%s)", session.session_id, request.remote)
    return web.json_response({"sdp": pc.localDescription.sdp, "type": pc.localDescription.type,
                              "session_id": session.session_id})


async def _close_refused(pc: RTCPeerConnection) -> None:
    """Close the peer connection of a refused offer. On a half-built one aiortc's close() can
    itself fail (an SCTP transport that never got its DTLS transport, after an offer whose
    BUNDLE group names an unknown mid): then stop the transports it left running."""
    try:
        await pc.close()
    except Exception as e:
        log.info("closing a refused peer connection: %r", e)
        for transceiver in pc.getTransceivers():
            with contextlib.suppress(Exception):
                await transceiver.receiver.transport.stop()
            with contextlib.suppress(Exception):
                await transceiver.receiver.transport.transport.stop()


