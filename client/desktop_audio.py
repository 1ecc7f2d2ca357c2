"""The desktop app's sound: the microphone track (a device through sounddevice, or a WAV file
queued on it), and reply audio played out of a thread-safe buffer by the speaker's callback
(PortAudio's thread) or, with ``--record``, by a thread that writes it to a WAV in real time.

sounddevice is imported only when a device is opened: file mode and tests need no PortAudio.
"""

from __future__ import annotations

import asyncio
import collections
import importlib
import threading
import time
import wave
from pathlib import Path
from typing import Any

from client.rtc_client import RATE, MicrophoneTrack

FRAME_MS = 20
FRAME_BYTES = RATE * FRAME_MS // 1000 * 2  # s16 mono
MIC_BUFFER_MS = 200  # device audio waiting for the track; older audio is dropped beyond this
KEEP_TURNS = 8  # played_ms is remembered for this many recent replies


class AudioDeviceError(RuntimeError):
    """No PortAudio, no such device, or the device refused the format."""


def sounddevice() -> Any:
    """The sounddevice module (imported on first use; it needs the PortAudio library)."""
    try:
        return importlib.import_module("sounddevice")
    except OSError as e:  # raised at import when libportaudio is missing
        raise AudioDeviceError(f"{e} (Debian/Ubuntu: apt install libportaudio2)") from e


class DesktopMicrophone(MicrophoneTrack):
    """The microphone track: fed by a device (``feed``) or with a WAV (``say``, paced in real
    time by the track); sends silence while muted (what is said then is lost, not delayed)."""

    def __init__(self) -> None:
        super().__init__()
        self.muted = False

    def feed(self, pcm: bytes) -> None:
        """Device audio, s16le mono at 48 kHz (on the loop thread); keeps the newest 200 ms."""
        self._buf.extend(pcm)
        excess = len(self._buf) - RATE * 2 * MIC_BUFFER_MS // 1000
        if excess > 0:
            del self._buf[:excess]

    def _take(self, n: int) -> bytes:
        chunk = super()._take(n)
        return b"" if self.muted else chunk


class MicrophoneDevice:
    """The default input device at 48 kHz mono, handed to a ``DesktopMicrophone`` on the loop."""

    def __init__(self, mic: DesktopMicrophone, loop: asyncio.AbstractEventLoop) -> None:
        sd = sounddevice()

        def captured(indata: Any, frames: int, t: Any, status: Any) -> None:
            try:
                loop.call_soon_threadsafe(mic.feed, bytes(indata))
            except RuntimeError:  # the loop closed while the device was stopping
                pass

        try:
            self._stream = sd.RawInputStream(samplerate=RATE, channels=1, dtype="int16",
                                             blocksize=RATE * FRAME_MS // 1000, callback=captured)
            self._stream.start()
        except Exception as e:  # PortAudioError, or ValueError for an unknown device
            raise AudioDeviceError(f"no microphone: {e}") from e

    def close(self) -> None:
        self._stream.stop()
        self._stream.close()


class PlaybackBuffer:
    """Reply audio waiting to be played: written on the loop, read by the output's thread.

    Counts what was played of each reply, drops a reply's unplayed audio when it is cut
    (``reply.interrupted``), and holds at most ``max_ms`` (the oldest audio goes first: the
    reply track is real time, so only a stalled output fills it).
    """

    def __init__(self, rate: int = RATE, max_ms: int = 3000) -> None:
        self.rate = rate
        self._max_bytes = rate * 2 * max_ms // 1000
        self._lock = threading.Lock()
        self._queue: collections.deque[tuple[int, bytearray]] = collections.deque()
        self._queued = 0
        self._played: dict[int, int] = {}  # turn → bytes played

    def _ms(self, n: int) -> float:
        return n / 2 * 1000 / self.rate

    def write(self, turn_id: int, pcm: bytes) -> None:
        with self._lock:
            if self._queue and self._queue[-1][0] == turn_id:
                self._queue[-1][1].extend(pcm)
            else:
                self._queue.append((turn_id, bytearray(pcm)))
            self._queued += len(pcm)
            while self._queued > self._max_bytes:
                _, seg = self._queue[0]
                drop = min(len(seg), self._queued - self._max_bytes)
                del seg[:drop]
                self._queued -= drop
                if not seg:
                    self._queue.popleft()

    def read(self, max_bytes: int) -> bytes:
        """Up to ``max_bytes`` to play now, all of one reply (b"" when nothing is queued)."""
        with self._lock:
            if not self._queue:
                return b""
            turn_id, seg = self._queue[0]
            chunk = bytes(seg[:max_bytes])
            del seg[:max_bytes]
            if not seg:
                self._queue.popleft()
            self._queued -= len(chunk)
            if turn_id not in self._played:
                self._played[turn_id] = 0
                while len(self._played) > KEEP_TURNS:
                    del self._played[next(iter(self._played))]
            self._played[turn_id] += len(chunk)
            return chunk

    def cut(self, turn_id: int) -> None:
        """Drop the reply's audio not played yet."""
        with self._lock:
            for seg in [s for s in self._queue if s[0] == turn_id]:
                self._queue.remove(seg)
                self._queued -= len(seg[1])

    def played_ms(self, turn_id: int) -> float:
        with self._lock:
            return self._ms(self._played.get(turn_id, 0))

    def queued_ms(self, turn_id: int) -> float:
        with self._lock:
            return self._ms(sum(len(s) for t, s in self._queue if t == turn_id))


class Output:
    """Where played reply audio goes; ``close`` stops it and joins its thread."""

    def close(self) -> None:
        raise NotImplementedError


class PacedOutput(Output):
    """Plays the buffer in real time on a thread of its own, 20 ms at a time, into a WAV file
    (``--record``: only reply audio, no silence between replies) or nowhere (no speaker)."""

    def __init__(self, buffer: PlaybackBuffer, path: Path | None) -> None:
        self.buffer = buffer
        self.path = path
        self._stop = threading.Event()
        self._wav: wave.Wave_write | None = None
        if path is not None:
            self._wav = wave.open(str(path), "wb")  # closed by the thread
            self._wav.setnchannels(1)
            self._wav.setsampwidth(2)
            self._wav.setframerate(buffer.rate)
        self._thread = threading.Thread(target=self._play, name="voxlens-playout", daemon=True)
        self._thread.start()

    def _play(self) -> None:
        tick = FRAME_MS / 1000
        size = self.buffer.rate * FRAME_MS // 1000 * 2
        next_at = time.monotonic()
        try:
            while not self._stop.wait(max(0.0, next_at - time.monotonic())):
                next_at = max(next_at + tick, time.monotonic() - tick)  # no burst after a stall
                chunk = self.buffer.read(size)
                if chunk and self._wav is not None:
                    self._wav.writeframes(chunk)
        finally:
            if self._wav is not None:
                self._wav.close()

    def close(self) -> None:
        self._stop.set()
        self._thread.join()


class SpeakerOutput(Output):
    """The default output device at 48 kHz mono; PortAudio's callback reads the buffer."""

    def __init__(self, buffer: PlaybackBuffer) -> None:
        sd = sounddevice()

        def play(outdata: Any, frames: int, t: Any, status: Any) -> None:
            chunk = buffer.read(frames * 2)
            outdata[:len(chunk)] = chunk
            outdata[len(chunk):] = bytes(frames * 2 - len(chunk))

        try:
            self._stream = sd.RawOutputStream(samplerate=buffer.rate, channels=1, dtype="int16",
                                              blocksize=buffer.rate * FRAME_MS // 1000,
                                              latency="high", callback=play)
            self._stream.start()
        except Exception as e:  # PortAudioError, or ValueError for an unknown device
            raise AudioDeviceError(f"no speaker: {e}") from e

    def close(self) -> None:
        self._stream.stop()
        self._stream.close()
