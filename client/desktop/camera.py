"""The desktop app's camera: a capture thread (OpenCV: a device, a video file played in a loop,
or a still image) keeps the newest frame in a ``FrameSlot``; the window's preview and the
WebRTC video track both read that slot. Turning the camera off releases the device, blanks the
preview and pauses the track (the server sees nothing new)."""

from __future__ import annotations

import asyncio
import fractions
import threading
import time
from pathlib import Path
from typing import Any

import av
import cv2
import numpy as np
import numpy.typing as npt
from aiortc.mediastreams import VideoStreamTrack

Frame = npt.NDArray[np.uint8]  # H × W × 3, RGB
STILL_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
MAX_SIDE = 640  # frames are downscaled to this longest side (the server keeps no more)
FIRST_FRAME_S = 5.0  # a device that gives no frame in this long counts as missing


class CameraError(RuntimeError):
    """The camera (or camera file) cannot be opened or read."""


def to_rgb(bgr: npt.NDArray[Any]) -> Frame:
    """An OpenCV BGR frame as RGB, at most ``MAX_SIDE`` pixels on its longest side."""
    h, w = bgr.shape[:2]
    scale = MAX_SIDE / max(h, w)
    if scale < 1:
        bgr = cv2.resize(bgr, (round(w * scale), round(h * scale)), interpolation=cv2.INTER_AREA)
    return np.ascontiguousarray(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB), dtype=np.uint8)


class FrameSlot:
    """The newest frame (thread-safe, keep-latest); ``seq`` tells readers whether it changed."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._frame: Frame | None = None
        self.seq = 0

    def put(self, frame: Frame | None) -> None:
        with self._lock:
            self._frame = frame
            self.seq += 1

    def get(self) -> tuple[int, Frame | None]:
        with self._lock:
            return self.seq, self._frame


class CameraSource:
    """Captures into ``slot`` on a thread of its own. ``source``: a device index, or an image
    or video file. ``start()`` blocks until the first frame (call it off the event loop)."""

    def __init__(self, source: int | Path) -> None:
        self.source = source
        self.slot = FrameSlot()
        self._enabled = threading.Event()
        self._enabled.set()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._cap: cv2.VideoCapture | None = None
        self._still: Frame | None = None

    @property
    def describe(self) -> str:
        return f"camera {self.source}" if isinstance(self.source, int) else str(self.source)

    def _open(self) -> None:
        if isinstance(self.source, Path) and self.source.suffix.lower() in STILL_SUFFIXES:
            bgr = cv2.imread(str(self.source), cv2.IMREAD_COLOR)
            if bgr is None:
                raise CameraError(f"{self.source}: not an image OpenCV can read")
            self._still = to_rgb(bgr)
            return
        cap = cv2.VideoCapture(self.source if isinstance(self.source, int) else str(self.source))
        if not cap.isOpened():
            raise CameraError(f"{self.describe} cannot be opened")
        if isinstance(self.source, int):
            cap.set(cv2.CAP_PROP_FRAME_WIDTH, 640)
            cap.set(cv2.CAP_PROP_FRAME_HEIGHT, 480)
        self._cap = cap

    def _release(self) -> None:
        if self._cap is not None:
            self._cap.release()
            self._cap = None

    def _read(self) -> Frame | None:
        """The next frame; a video file starts over at its end."""
        if self._still is not None:
            return self._still
        assert self._cap is not None
        ok, bgr = self._cap.read()
        if not ok and isinstance(self.source, Path):
            self._cap.set(cv2.CAP_PROP_POS_FRAMES, 0)
            ok, bgr = self._cap.read()
        return to_rgb(bgr) if ok else None

    def start(self) -> None:
        """Open the source and wait for its first frame; CameraError if there is none."""
        self._open()
        first = self._read()
        deadline = time.monotonic() + FIRST_FRAME_S
        while first is None and time.monotonic() < deadline:
            first = self._read()
        if first is None:
            self._release()
            raise CameraError(f"{self.describe} gives no frames")
        self.slot.put(first)
        self._thread = threading.Thread(target=self._capture, name="voxlens-camera", daemon=True)
        self._thread.start()

    def _interval(self) -> float:
        """Seconds between frames: a file's own rate; a device paces itself (0); a still: 1."""
        if self._still is not None:
            return 1.0
        if isinstance(self.source, Path) and self._cap is not None:
            fps = self._cap.get(cv2.CAP_PROP_FPS)
            return 1 / fps if 1 <= fps <= 120 else 1 / 25
        return 0.0

    def _capture(self) -> None:
        next_at = time.monotonic()
        try:
            while not self._stop.is_set():
                if not self._enabled.is_set():
                    self._release()
                    self.slot.put(None)
                    self._enabled.wait(0.5)
                    continue
                if self._cap is None and self._still is None:
                    self._open()  # on again after off
                frame = self._read()
                if frame is not None and self._enabled.is_set():
                    self.slot.put(frame)
                next_at = max(next_at + self._interval(), time.monotonic() - 1)
                self._stop.wait(max(0.0, next_at - time.monotonic()))
        except CameraError:
            self.slot.put(None)
        finally:
            self._release()

    def set_enabled(self, on: bool) -> None:
        if on:
            self._enabled.set()
            if self._still is not None:
                self.slot.put(self._still)
        else:
            self._enabled.clear()
            self.slot.put(None)

    def close(self) -> None:
        """Stop capturing and join the thread (blocks up to one frame read)."""
        self._stop.set()
        self._enabled.set()
        if self._thread is not None:
            self._thread.join()
        self._release()


class CameraTrack(VideoStreamTrack):
    """The camera as a WebRTC video track: the slot's newest frame ``fps`` times a second;
    while the camera is off, no frames at all."""

    def __init__(self, slot: FrameSlot, fps: int = 10) -> None:
        super().__init__()
        self.slot = slot
        self.fps = fps
        self.enabled = asyncio.Event()
        self.enabled.set()
        self._t0: float | None = None
        self._next_at = 0.0
        self._last: Frame | None = None

    def set_enabled(self, on: bool) -> None:
        if on:
            self.enabled.set()
        else:
            self.enabled.clear()
            self._last = None  # never send a frame from before the camera went off

    async def recv(self) -> av.VideoFrame:
        """The next frame, in real time; waits while the camera is off. Cancelling it (the
        peer connection closing) sends nothing."""
        await self.enabled.wait()
        now = time.monotonic()
        if self._t0 is None:
            self._t0 = self._next_at = now
        if self._next_at > now:
            await asyncio.sleep(self._next_at - now)
        self._next_at = max(self._next_at + 1 / self.fps, time.monotonic())
        _, frame = self.slot.get()
        if frame is not None:
            self._last = frame
        image = self._last if self._last is not None else np.zeros((480, 640, 3), np.uint8)
        out = av.VideoFrame.from_ndarray(image, format="rgb24")
        out.pts = round((time.monotonic() - self._t0) * 90_000)
        out.time_base = fractions.Fraction(1, 90_000)
        return out
