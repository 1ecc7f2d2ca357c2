"""The embedded offline vision engine: an ImageNet classifier, face detection and colour cues,
turned into one short factual description ("likely an Egyptian cat (0.76); 1 face; dim, mostly
brown"). No captioning model ships inside a registry package; this is what runs offline."""

from __future__ import annotations

from collections.abc import Hashable
from pathlib import Path

import cv2
import numpy as np

from pipelines.compute import Compute, Priority
from streaming.errors import EngineError
from streaming.images import Image

MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)
HUES = ((10, "red"), (22, "orange"), (34, "yellow"), (78, "green"), (95, "cyan"),
        (130, "blue"), (150, "purple"), (170, "pink"), (180, "red"))  # OpenCV hue 0–180


class SceneVlm:
    def __init__(self, compute: Compute, weights: Path, labels: list[str], *,
                 threads: int = 1) -> None:
        import torch
        from efficientnet_lite_pytorch import EfficientNet

        torch.set_num_threads(threads)
        self._torch = torch
        self.name = "scene:efficientnet-lite0"
        self._compute = compute
        self._labels = labels
        self._model = EfficientNet.from_pretrained("efficientnet-lite0",
                                                   weights_path=str(weights)).eval()
        cascade = Path(cv2.data.haarcascades) / "haarcascade_frontalface_default.xml"  # type: ignore[attr-defined]
        self._faces = cv2.CascadeClassifier(str(cascade))

    async def look(self, image: Image, *, question: str | None = None,
                   priority: Priority = Priority.VISION, session: str | None = None,
                   key: Hashable | None = None) -> str:
        """Describe the image (the question is not used by this engine). Background work
        on the ``vision`` lane; a newer frame with the same key supersedes a queued one."""
        return await self._compute.call("vision", priority, self.describe, image,
                                        session=session, key=key)

    def warm_up(self) -> None:
        self.describe(np.zeros((224, 224, 3), np.uint8))

    def classify(self, image: Image, top: int = 3) -> list[tuple[str, float]]:
        h, w = image.shape[:2]
        side = min(h, w)
        crop = image[(h - side) // 2:(h + side) // 2, (w - side) // 2:(w + side) // 2]
        x = cv2.resize(crop, (224, 224), interpolation=cv2.INTER_AREA).astype(np.float32) / 255
        x = ((x - MEAN) / STD).transpose(2, 0, 1)[None]
        with self._torch.inference_mode():
            probs = self._torch.softmax(self._model(self._torch.from_numpy(x)), dim=1)[0]
        values, idx = probs.topk(top)
        return [(self._labels[int(i)], float(v)) for v, i in zip(values, idx, strict=True)]

    def count_faces(self, image: Image) -> int:
        grey = cv2.cvtColor(image, cv2.COLOR_RGB2GRAY)
        found = self._faces.detectMultiScale(grey, scaleFactor=1.1, minNeighbors=5,
                                             minSize=(max(24, grey.shape[0] // 12),) * 2)
        return len(found)

    def describe(self, image: Image) -> str:
        try:
            labels = self.classify(image)
            faces = self.count_faces(image)
        except Exception as e:
            raise EngineError(f"scene engine failed: {e}") from e
        (name, p), *rest = labels
        if p >= 0.3:
            what = f"likely {_article(name)} {name} ({p:.2f})"
        else:
            what = "perhaps " + " or ".join(f"{_article(n)} {n} ({q:.2f})"
                                            for n, q in [(name, p), *rest[:1]])
        parts = [what]
        if faces:
            parts.append(f"{faces} face" + ("s" if faces > 1 else ""))
        cues = colour_cues(image)
        if cues:
            parts.append(cues)
        return "; ".join(parts)


def colour_cues(image: Image) -> str:
    """Brightness and the dominant colour in plain words ("dim, mostly brown")."""
    hsv = cv2.cvtColor(image, cv2.COLOR_RGB2HSV)
    value = float(hsv[..., 2].mean()) / 255
    light = "dark" if value < 0.2 else "dim" if value < 0.4 else "bright" if value > 0.75 else ""
    sat = hsv[..., 1].astype(np.float32) / 255
    vivid = hsv[(sat > 0.25) & (hsv[..., 2] > 50)]
    if vivid.shape[0] < 0.15 * hsv.shape[0] * hsv.shape[1]:
        colour = "mostly white" if value > 0.7 else "mostly grey" if value > 0.3 else "mostly black"
    else:
        hue = float(np.median(vivid[:, 0]))
        name = next(n for limit, n in HUES if hue < limit)
        if name in ("orange", "red") and float(np.median(vivid[:, 2])) < 150:
            name = "brown"
        colour = f"mostly {name}"
    return ", ".join(p for p in (light, colour) if p)


def _article(noun: str) -> str:
    return "an" if noun[:1].lower() in "aeiou" else "a"
