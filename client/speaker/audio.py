"""The speaker client's sound: the machine's microphone and speaker through sounddevice
(PortAudio callbacks in its own threads), or WAV files in their place (paced in real time, for
tests and demos). Either way reply audio is drained out of the shared ``PlaybackBuffer`` by the
speaker's clock. sounddevice is imported only when a device is opened."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from client.common.playback import PlaybackBuffer
from client.common.wavio import read_wav, write_wav
from streaming.audio import float_to_pcm16, resample
from streaming.channels import Channel, Full

FRAME_MS = 20  # microphone message length
FILE_TAIL_MS = 1500  # silence after the input file: the server's VAD closes the utterance


class AudioIO(Protocol):
    finite: bool  # a file: the client ends once it has been said and answered
    input_done: asyncio.Event

    @property
    def latency_ms(self) -> float:
        """Audio handed to the speaker that has not reached the air yet."""
        ...

    def microphone(self, gate: asyncio.Event) -> AsyncIterator[bytes]:
        """20 ms of s16le mono at the input rate per item. A file waits while ``gate`` is
        clear (not connected), a live microphone does not wait for anyone."""
        ...

    async def speaker(self, playback: PlaybackBuffer) -> None:
        """Drain ``playback`` in real time until cancelled."""
        ...

    async def close(self) -> None: ...


# ---- audio: WAV files ----------------------------------------------------------------------


class FileAudio:
    """A WAV as the microphone (then silence) and a WAV recording the speaker."""

    finite = True
    latency_ms = 0.0

    def __init__(self, input_wav: Path, output_wav: Path | None, input_rate: int,
                 output_rate: int) -> None:
        audio, rate = read_wav(input_wav)
        x = resample(audio, rate, input_rate)
        x = np.concatenate([x, np.zeros(input_rate * FILE_TAIL_MS // 1000, dtype=np.float32)])
        self._pcm = float_to_pcm16(x)
        self.output_wav = output_wav
        self.input_rate, self.output_rate = input_rate, output_rate
        self.input_done = asyncio.Event()
        self.recorded = bytearray()

    async def microphone(self, gate: asyncio.Event) -> AsyncIterator[bytes]:
        step = self.input_rate * FRAME_MS // 1000 * 2
        silence = bytes(step)
        loop = asyncio.get_running_loop()
        due = loop.time()
        pos = 0
        while True:
            await gate.wait()
            chunk = self._pcm[pos:pos + step] or silence
            pos += step
            due = max(due + FRAME_MS / 1000, loop.time() - 0.1)  # no burst after a pause
            await asyncio.sleep(due - loop.time())
            yield chunk
            if pos >= len(self._pcm):
                self.input_done.set()

    async def speaker(self, playback: PlaybackBuffer) -> None:
        step = self.output_rate * FRAME_MS // 1000 * 2
        loop = asyncio.get_running_loop()
        due = loop.time()
        while True:
            due += FRAME_MS / 1000
            await asyncio.sleep(due - loop.time())
            self.recorded += playback.fill(step)

    async def close(self) -> None:
        if self.output_wav is not None:
            await asyncio.to_thread(write_wav, self.output_wav, bytes(self.recorded),
                                    self.output_rate)


# ---- audio: sound devices ------------------------------------------------------------------


def sounddevice() -> Any:
    """The sounddevice module, imported on first use: it needs the PortAudio library."""
    try:
        import sounddevice as sd  # type: ignore[import-untyped]
    except OSError as e:
        raise RuntimeError("sounddevice needs the PortAudio library: on Debian or Raspberry Pi "
                           "OS, sudo apt install libportaudio2") from e
    return sd


class SoundDevices:
    """The machine's microphone and speaker (PortAudio callbacks in its own threads)."""

    finite = False

    def __init__(self, input_rate: int, output_rate: int, *, input_device: str | None = None,
                 output_device: str | None = None) -> None:
        self.input_rate, self.output_rate = input_rate, output_rate
        self.input_device = _device(input_device)
        self.output_device = _device(output_device)
        self.input_done = asyncio.Event()  # never: a microphone does not run out
        self._output: Any = None

    @property
    def latency_ms(self) -> float:
        return float(self._output.latency) * 1000 if self._output is not None else 0.0

    def check(self) -> None:
        """Fail now, in words, if the sound devices cannot be opened as asked."""
        sd = sounddevice()
        try:
            sd.check_input_settings(device=self.input_device, channels=1, dtype="int16",
                                    samplerate=self.input_rate)
            sd.check_output_settings(device=self.output_device, channels=1, dtype="int16",
                                     samplerate=self.output_rate)
        except (sd.PortAudioError, ValueError) as e:
            raise RuntimeError(f"sound device: {e} (see --list-devices; --rate and --output-rate "
                               "choose rates the devices support)") from e

    async def microphone(self, gate: asyncio.Event) -> AsyncIterator[bytes]:
        sd = sounddevice()
        loop = asyncio.get_running_loop()
        frames: Channel[bytes] = Channel(50, Full.DROP_OLDEST)  # the newest second of sound

        def put(data: bytes) -> None:
            if not frames.closed:
                frames.put_nowait(data)

        def captured(indata: Any, n: int, when: Any, status: Any) -> None:
            loop.call_soon_threadsafe(put, bytes(indata))

        stream = await _open(sd, sd.RawInputStream, samplerate=self.input_rate,
                             blocksize=self.input_rate * FRAME_MS // 1000,
                             device=self.input_device, callback=captured)
        try:
            async for data in frames:
                yield data
        finally:
            frames.close()
            await asyncio.to_thread(stream.close)

    async def speaker(self, playback: PlaybackBuffer) -> None:
        sd = sounddevice()

        def play(outdata: Any, n: int, when: Any, status: Any) -> None:
            outdata[:] = playback.fill(len(outdata))

        stream = await _open(sd, sd.RawOutputStream, samplerate=self.output_rate,
                             blocksize=self.output_rate * FRAME_MS // 1000,
                             device=self.output_device, callback=play)
        self._output = stream
        try:
            await asyncio.Event().wait()  # plays until cancelled
        finally:
            self._output = None
            await asyncio.to_thread(stream.close)

    async def close(self) -> None:
        return None


async def _open(sd: Any, kind: Any, **settings: Any) -> Any:
    """A started 16-bit mono PortAudio stream (opening a device can take a while: off the loop)."""
    def start() -> Any:
        stream = kind(channels=1, dtype="int16", **settings)
        stream.start()
        return stream
    try:
        return await asyncio.to_thread(start)
    except (sd.PortAudioError, ValueError) as e:
        raise RuntimeError(f"sound device: {e}") from e


def _device(name: str | None) -> int | str | None:
    return int(name) if name is not None and name.isdigit() else name
