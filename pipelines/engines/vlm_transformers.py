"""Any Hugging Face image-to-text model by name or path: captioning (BLIP), VQA-style prompting,
and chat VLMs with a chat template (SmolVLM, LLaVA-style, Florence-2 with its own code).

Loaded with ``AutoProcessor`` + ``AutoModelForImageTextToText``; a processor with a chat
template gets the question as a chat turn with the image, one without gets the question as a
text prompt (BLIP continues it). Runs on the ``vision`` lane.
"""

from __future__ import annotations

from collections.abc import Hashable
from typing import Any

from pipelines.compute import Compute, Priority
from streaming.errors import EngineError, ModelNotFound
from streaming.images import Image

DESCRIBE = "Describe this image in one short sentence."


class TransformersVlm:
    def __init__(self, model: str, compute: Compute, *, device: str = "cpu", threads: int = 1,
                 max_new_tokens: int = 40, trust_remote_code: bool = False) -> None:
        import torch
        from transformers import AutoModelForImageTextToText, AutoProcessor

        torch.set_num_threads(threads)
        self._torch = torch
        self.name = f"transformers:{model}"
        self._compute = compute
        self._device = device
        self._max_new_tokens = max_new_tokens
        try:
            self._processor: Any = AutoProcessor.from_pretrained(  # type: ignore[no-untyped-call]
                model, trust_remote_code=trust_remote_code)
            loaded: Any = AutoModelForImageTextToText.from_pretrained(
                model, trust_remote_code=trust_remote_code)
            self._model: Any = loaded.eval().to(device)
        except (OSError, ValueError) as e:
            raise ModelNotFound(f"vision model {model!r} could not be loaded: {e}") from e
        self._chat = bool(getattr(self._processor, "chat_template", None))

    async def look(self, image: Image, *, question: str | None = None,
                   priority: Priority = Priority.VISION, session: str | None = None,
                   key: Hashable | None = None) -> str:
        return await self._compute.call("vision", priority, self._run, image, question,
                                        session=session, key=key)

    def _run(self, image: Image, question: str | None) -> str:
        try:
            text = self._generate(image, question)
        except Exception as e:
            raise EngineError(f"vision model failed: {e}") from e
        if not text:
            raise EngineError("the vision model said nothing about this image")
        return text

    def _generate(self, image: Image, question: str | None) -> str:
        p = self._processor
        if self._chat:
            messages = [{"role": "user", "content": [
                {"type": "image"}, {"type": "text", "text": question or DESCRIBE}]}]
            prompt = p.apply_chat_template(messages, add_generation_prompt=True)
            inputs = p(images=[image], text=prompt, return_tensors="pt")
        else:
            inputs = p(images=image, text=question, return_tensors="pt")
        inputs = inputs.to(self._device)
        with self._torch.inference_mode():
            ids = self._model.generate(**inputs, max_new_tokens=self._max_new_tokens,
                                       min_new_tokens=2)
        if self._chat:  # chat models echo the prompt: keep what they added
            ids = ids[:, inputs["input_ids"].shape[1]:]
        return str(p.batch_decode(ids, skip_special_tokens=True)[0]).strip()
