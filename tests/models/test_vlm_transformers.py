"""The transformers vision engine's real code path, on a tiny randomly initialised BLIP built
from a config here (no hub): loading by path, captioning, and a question as the prompt."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from pipelines.compute import Compute, Priority
from pipelines.engines.vlm_transformers import TransformersVlm
from streaming.errors import ModelNotFound

WORDS = ["a", "cat", "cup", "photo", "of", "the", "what", "is", "this", "dog", "on", "table"]


@pytest.fixture(scope="module")
def tiny_blip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from transformers import (
        BertTokenizerFast,
        BlipConfig,
        BlipForConditionalGeneration,
        BlipImageProcessor,
        BlipProcessor,
    )

    out = tmp_path_factory.mktemp("tiny-blip")
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]", *WORDS]
    tokenizer = BertTokenizerFast(vocab={w: i for i, w in enumerate(vocab)}, do_lower_case=True,
                                  bos_token="[DEC]")
    processor = BlipProcessor(image_processor=BlipImageProcessor(size={"height": 32, "width": 32}),
                              tokenizer=tokenizer)
    small = {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
             "intermediate_size": 37}
    config = BlipConfig(
        text_config={**small, "vocab_size": len(tokenizer), "bos_token_id": 5, "pad_token_id": 0,
                     "sep_token_id": 3, "eos_token_id": 3, "max_position_embeddings": 64},
        vision_config={**small, "image_size": 32, "patch_size": 8}, projection_dim=32)
    torch.manual_seed(0)
    model = BlipForConditionalGeneration(config)
    with torch.no_grad():  # random weights, but an output layer that prefers real words
        head = model.text_decoder.get_output_embeddings()
        head.bias.fill_(-10.0)
        head.bias[6:] = torch.linspace(5.0, 6.0, len(WORDS))
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out


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
