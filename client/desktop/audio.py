"""The desktop app's sound: the microphone track (a device through sounddevice, or a WAV file
queued on it), and reply audio played out of the shared playback buffer
(client/common/playback.py) by the speaker's callback (PortAudio's thread) or, with
``--record``, by a thread that writes it to a WAV in real time.

sounddevice is imported only when a device is opened: file mode and tests need no PortAudio.
"""

from __future__ import annotations

import asyncio
import importlib
import threading
import time
import wave
from pathlib import Path
from typing import Any

from client.common.playback import PlaybackBuffer
from client.common.rtc_client import RATE, MicrophoneTrack

FRAME_MS = 20
FRAME_BYTES = RATE * FRAME_MS // 1000 * 2  # s16 mono
MIC_BUFFER_MS = 200  # device audio waiting for the track; older audio is dropped beyond this


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
            outdata[:] = buffer.fill(frames * 2)

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
