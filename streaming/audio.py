"""PCM conversion, channel downmixing and resampling (soxr)."""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
import soxr

from streaming.errors import ProtocolError

Float32Array = npt.NDArray[np.float32]
Int16Array = npt.NDArray[np.int16]

MODEL_RATE = 16_000  # every model-side audio path runs at 16 kHz mono float32
SUPPORTED_RATES = (8_000, 11_025, 12_000, 16_000, 22_050, 24_000, 32_000, 44_100, 48_000)


def check_rate(rate: int) -> int:
    if rate not in SUPPORTED_RATES:
        raise ProtocolError(
            f"unsupported sample rate {rate}; use one of {', '.join(map(str, SUPPORTED_RATES))}",
            code="unsupported",
        )
    return rate


def pcm16_to_float(data: bytes, channels: int = 1) -> Float32Array:
    """Interleaved s16le PCM → mono float32 in [-1, 1] (channels averaged)."""
    x = np.frombuffer(data, dtype="<i2").astype(np.float32) / 32768.0
    if channels > 1:
        x = x.reshape(-1, channels).mean(axis=1, dtype=np.float32)
    return x


def float_to_pcm16(x: npt.NDArray[np.floating]) -> bytes:
    """Mono float in [-1, 1] → s16le bytes (clipped)."""
    pcm: bytes = (np.clip(x, -1.0, 1.0) * 32767.0).astype("<i2").tobytes()
    return pcm


def int16_to_float(x: Int16Array) -> Float32Array:
    return x.astype(np.float32) / 32768.0


def resample(x: Float32Array, src_rate: int, dst_rate: int) -> Float32Array:
    """One-shot resampling of a whole mono buffer."""
    if src_rate == dst_rate or x.size == 0:
        return x.astype(np.float32, copy=False)
    return np.asarray(soxr.resample(x, src_rate, dst_rate, quality="HQ"), dtype=np.float32)


class InputConverter:
    """Turns a client's raw PCM stream (declared rate and channels) into 16 kHz mono float32.

    Keeps resampler state across messages so chunk boundaries leave no clicks.
    """

    def __init__(self, sample_rate: int, channels: int) -> None:
        self.sample_rate = check_rate(sample_rate)
        if channels not in (1, 2):
            raise ProtocolError(f"unsupported channel count {channels}; use 1 or 2", code="unsupported")
        self.channels = channels
        self.frame_bytes = 2 * channels
        self._stream = (
            None
            if sample_rate == MODEL_RATE
            else soxr.ResampleStream(sample_rate, MODEL_RATE, 1, dtype="float32", quality="HQ")
        )

    def convert(self, data: bytes) -> Float32Array:
        if len(data) % self.frame_bytes:
            raise ProtocolError(
                f"audio message of {len(data)} bytes is not a whole number of "
                f"{self.frame_bytes}-byte frames (s16le, {self.channels} channel(s))",
                code="bad_audio",
            )
        x = pcm16_to_float(data, self.channels)
        if self._stream is None:
            return x
        return np.asarray(self._stream.resample_chunk(x), dtype=np.float32)
