"""Camera frames: checked decoding, downscaling, and a cheap change metric (OpenCV)."""

from __future__ import annotations

import base64
import binascii
import struct

import cv2
import numpy as np
import numpy.typing as npt

from streaming.errors import ProtocolError

Image = npt.NDArray[np.uint8]  # H × W × 3, RGB
MAX_PIXELS = 40_000_000  # refuse larger images before decoding them
MAX_BYTES = 12 * 1024 * 1024
KEEP_SIDE = 640  # frames are downscaled to this longest side as they arrive


def image_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) from a PNG or JPEG header without decoding; None if unknown."""
    if data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) >= 24:
        w, h = struct.unpack(">II", data[16:24])
        return int(w), int(h)
    if data[:2] == b"\xff\xd8":
        i = 2
        while i + 9 < len(data):
            if data[i] != 0xFF:
                i += 1
                continue
            marker = data[i + 1]
            if marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7:
                i += 2
                continue
            (length,) = struct.unpack(">H", data[i + 2:i + 4])
            if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
                h, w = struct.unpack(">HH", data[i + 5:i + 9])
                return int(w), int(h)
            i += 2 + length
    return None


def decode_image(data: bytes) -> Image:
    """JPEG/PNG bytes → RGB array, downscaled to ``KEEP_SIDE``; ProtocolError if unusable."""
    if len(data) > MAX_BYTES:
        raise ProtocolError(f"image of {len(data)} bytes exceeds {MAX_BYTES}", code="too_large")
    size = image_size(data)
    if size is None:
        raise ProtocolError("not a JPEG or PNG image", code="bad_image")
    if size[0] * size[1] > MAX_PIXELS:
        raise ProtocolError(f"image of {size[0]}×{size[1]} pixels is larger than "
                            f"{MAX_PIXELS // 1_000_000} MP", code="too_large")
    bgr = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    if bgr is None:
        raise ProtocolError("the image could not be decoded (truncated or corrupt)",
                            code="bad_image")
    return downscale(np.asarray(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB), dtype=np.uint8))


def decode_base64_image(text: str) -> Image:
    """Base64 (or a data: URL) → RGB array."""
    if text.startswith("data:"):
        text = text.partition(",")[2]
    try:
        data = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as e:
        raise ProtocolError(f"image data is not valid base64: {e}", code="bad_image") from e
    return decode_image(data)


def downscale(image: Image, side: int = KEEP_SIDE) -> Image:
    h, w = image.shape[:2]
    scale = side / max(h, w)
    if scale >= 1:
        return image
    # at least 1 pixel: a 2000×1 strip would otherwise become 640×0, which cv2.resize refuses
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    return np.asarray(cv2.resize(image, size,
                                 interpolation=cv2.INTER_AREA), dtype=np.uint8)


def thumbprint(image: Image) -> npt.NDArray[np.float32]:
    """A 32×32 grey thumbnail, normalised: what the change metric compares."""
    grey = cv2.cvtColor(image, cv2.COLOR_RGB2GRAY)
    small = cv2.resize(grey, (32, 32), interpolation=cv2.INTER_AREA).astype(np.float32) / 255
    return np.asarray(small - small.mean(), dtype=np.float32)


def change(a: npt.NDArray[np.float32], b: npt.NDArray[np.float32]) -> float:
    """0 for the same scene, towards 1 for a different one (mean absolute difference)."""
    return float(np.mean(np.abs(a - b)) * 4)


def encode_jpeg(image: Image, quality: int = 85) -> bytes:
    ok, buf = cv2.imencode(".jpg", cv2.cvtColor(image, cv2.COLOR_RGB2BGR),
                           [cv2.IMWRITE_JPEG_QUALITY, quality])
    if not ok:
        raise ValueError("JPEG encoding failed")
    return bytes(buf)
