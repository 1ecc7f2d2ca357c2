"""The transformers vision engine's real code path, on a tiny randomly initialised BLIP built
from a config here (no hub): loading by path, captioning, and a question as the prompt."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from pipelines.compute import Compute, Priority
from pipelines.engines.vlm_transformers import TransformersVlm
from streaming.errors import ModelNotFound
from tests.conftest import TINY_BLIP_WORDS as WORDS


async def test_caption_and_question_through_the_real_code_path(tiny_blip: Path) -> None:
    compute = Compute()
    try:
        vlm = TransformersVlm(str(tiny_blip), compute)
        image = (np.random.default_rng(0).random((48, 64, 3)) * 255).astype(np.uint8)
        caption = await vlm.look(image)
        answer = await vlm.look(image, question="what is this", priority=Priority.LLM)
    finally:
        compute.close()
    assert vlm.name == f"transformers:{tiny_blip}"
    for text in (caption, answer):  # random weights: random words, but from this vocabulary
        assert text and set(text.split()) <= {*WORDS, "[unk]"}, text


def test_a_missing_model_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ModelNotFound, match="could not be loaded"):
        TransformersVlm(str(tmp_path / "nothing-here"), Compute())
