import base64
import struct
import zlib

import cv2
import numpy as np
import pytest

from streaming.errors import ProtocolError
from streaming.images import change, decode_base64_image, decode_image, encode_jpeg, thumbprint


def picture(w: int = 320, h: int = 240, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return cv2.resize(rng.integers(0, 255, (8, 8, 3), np.uint8), (w, h))


def png_header(w: int, h: int) -> bytes:
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    chunk = b"IHDR" + ihdr
    return (b"\x89PNG\r\n\x1a\n" + struct.pack(">I", len(ihdr)) + chunk
            + struct.pack(">I", zlib.crc32(chunk)))


def test_jpeg_and_png_decode_to_rgb_and_large_ones_are_downscaled() -> None:
    img = picture(1920, 1080)
    out = decode_image(encode_jpeg(img))
    assert out.dtype == np.uint8 and out.shape == (360, 640, 3)
    ok, png = cv2.imencode(".png", cv2.cvtColor(picture(), cv2.COLOR_RGB2BGR))
    assert ok and decode_image(bytes(png)).shape == (240, 320, 3)
    data_url = "data:image/jpeg;base64," + base64.b64encode(encode_jpeg(picture())).decode()
    assert decode_base64_image(data_url).shape == (240, 320, 3)


@pytest.mark.parametrize(("data", "code"), [
    (b"hello, not an image", "bad_image"),
    (encode_jpeg(picture())[:400], "bad_image"),  # truncated JPEG
    (png_header(8000, 7000), "too_large"),  # 56 MP: refused from its header, never decoded
])
def test_bad_images_are_refused_clearly(data: bytes, code: str) -> None:
    with pytest.raises(ProtocolError) as err:
        decode_image(data)
    assert err.value.code == code


def test_wrong_base64_is_refused() -> None:
    with pytest.raises(ProtocolError) as err:
        decode_base64_image("not*base64*at*all")
    assert err.value.code == "bad_image"


def test_change_metric_separates_same_from_different_scenes() -> None:
    a, b = picture(seed=1), picture(seed=2)
    noisy = np.clip(a.astype(int) + np.random.default_rng(3).integers(-4, 5, a.shape), 0, 255)
    assert change(thumbprint(a), thumbprint(a)) == 0
    assert change(thumbprint(a), thumbprint(noisy.astype(np.uint8))) < 0.04  # sensor noise
    assert change(thumbprint(a), thumbprint(b)) > 0.12  # another scene
