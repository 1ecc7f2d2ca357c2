"""Whisper ASR in PyTorch (transformers): the GPU path where CTranslate2 cannot run.

faster-whisper's CTranslate2 4.x needs CUDA 12's cuBLAS and cuDNN; on a CUDA-13 host it
finds the GPU and fails at the first decode. This engine runs any Whisper checkpoint
(``WhisperForConditionalGeneration`` with its processor, by hub name or local path) in
PyTorch instead: fp16 on CUDA, fp32 on CPU. It owns the model, its processor and the
decoding loop; scheduling is the ``asr`` lane's, exactly as for ``WhisperAsr``.

Utterances of several sessions that wait on the lane together run as one batch: their
log-mel features are padded to Whisper's 30 s window (transformers' encoder takes no
shorter one, so there is no short-window trick here) and encoded in one pass, then
decoded greedily together, without timestamps, with the KV cache. Utterances whose
prompts differ in length (Mandarin is prompted with a sentence in ``zh_script``, as in
``WhisperAsr``) are decoded in groups of equal length over the same encoder output.
With no language given, it is detected from the decoder's language-token logits after
the start token, one decoder step on the same encoder output.

torch and transformers are imported here only: they are optional at runtime.
"""

from __future__ import annotations

import inspect
from collections.abc import Hashable, Sequence
from typing import Any

import numpy as np

from pipelines.compute import Compute, Priority
from pipelines.engines.base import AsrResult
from pipelines.text import ZH_PROMPT, ZhScript, zh_script
from streaming.audio import MODEL_RATE, Float32Array
from streaming.errors import EngineError, ModelNotFound


class TransformersWhisperAsr:
    """A Whisper checkpoint in PyTorch, transcribing batches on the ``asr`` lane."""

    def __init__(self, model: str, compute: Compute, *, device: str = "cpu", threads: int = 2,
                 zh_script: ZhScript = "simplified", name: str | None = None) -> None:
        import torch
        from transformers import WhisperForConditionalGeneration, WhisperProcessor

        if device == "cpu":
            torch.set_num_threads(threads)
        self._torch = torch
        self.name = name or f"transformers-whisper:{model}"
        self._compute = compute
        self._device = device
        self._dtype = torch.float16 if device.startswith("cuda") else torch.float32
        self.zh_script: ZhScript = zh_script
        try:
            self._processor: Any = WhisperProcessor.from_pretrained(model)
            loaded: Any = WhisperForConditionalGeneration.from_pretrained(model)
        except (OSError, ValueError) as e:
            raise ModelNotFound(f"Whisper model {model!r} could not be loaded: {e}") from e
        self._model: Any = loaded.eval().to(device=device, dtype=self._dtype)
        self._setup_tokens()
        # the encoder's fixed input: max_source_positions after two strided convolutions
        config = self._model.config
        self._frames = config.max_source_positions * 2
        self._samples = self._frames * self._processor.feature_extractor.hop_length
        self._max_tokens = config.max_target_positions
        decoder_args = inspect.signature(self._model.model.decoder.forward).parameters
        self._cache_arg = "cache" if "cache" in decoder_args else "past_key_values"  # 5.x : 4.x

    def _setup_tokens(self) -> None:
        """Special token ids, the language tokens and the suppression masks."""
        from transformers.models.whisper.tokenization_whisper import LANGUAGES

        tokenizer = self._processor.tokenizer
        vocab: dict[str, int] = tokenizer.get_vocab()
        self.eot: int = vocab["<|endoftext|>"]
        self._sot: int = vocab["<|startoftranscript|>"]
        self._prev: int | None = vocab.get("<|startofprev|>")
        self._no_speech = vocab.get("<|nospeech|>", vocab.get("<|nocaptions|>"))
        self._no_timestamps: int | None = vocab.get("<|notimestamps|>")
        self._transcribe: int | None = vocab.get("<|transcribe|>")
        self.languages = {code: vocab[f"<|{code}|>"] for code in LANGUAGES if f"<|{code}|>" in vocab}
        torch, size = self._torch, self._model.config.vocab_size
        self.multilingual = size >= 51865 and bool(self.languages)  # as openai-whisper tells
        generation = self._model.generation_config
        # every special token after <|endoftext|> (start, languages, timestamps …) and the
        # checkpoint's non-speech symbols are never generated
        self._suppress = torch.zeros(size, dtype=torch.bool)
        self._suppress[self.eot + 1:] = True
        self._suppress[list(getattr(generation, "suppress_tokens", None) or [])] = True
        # nor a blank or the end as the first token
        begin = getattr(generation, "begin_suppress_tokens", None) or [
            *tokenizer.encode(" ", add_special_tokens=False), self.eot]
        self._begin = torch.zeros(size, dtype=torch.bool)
        self._begin[list(begin)] = True
        self._no_end = self._suppress.clone()  # before min_new tokens
        self._no_end[self.eot] = True
        self._suppress, self._begin, self._no_end = (
            m.to(self._device) for m in (self._suppress, self._begin, self._no_end))
        self._language_ids = torch.tensor(list(self.languages.values()), device=self._device)

    async def transcribe(
        self, audio: Float32Array, *, language: str | None, priority: Priority,
        session: str | None = None, key: Hashable | None = None,
    ) -> AsrResult:
        """Transcribe on the ``asr`` lane, batched with other sessions' utterances queued at
        the same priority (one window: all of them). Cancelling drops queued work."""
        return await self._compute.call_batch(
            "asr", priority, (audio, language), self._run, batch_key=("transformers-whisper",),
            session=session, key=key)

    def warm_up(self) -> None:
        """One decode, so the first user does not pay for lazy initialisation."""
        self._run([(np.zeros(MODEL_RATE, dtype=np.float32), "en")])

    def _run(self, items: list[tuple[Float32Array, str | None]]) -> list[AsrResult]:
        try:
            return self._decode(items)
        except Exception as e:
            raise EngineError(f"whisper failed: {e}") from e

    def _decode(self, items: list[tuple[Float32Array, str | None]]) -> list[AsrResult]:
        """One encoder pass for the batch, then greedy decoding of each prompt length."""
        encoded = self.encode([audio for audio, _ in items])
        given = [lang if self.multilingual else "en" for _, lang in items]
        unknown = [i for i, lang in enumerate(given) if lang is None]
        detected = iter(self.detect(encoded[unknown]) if unknown else [])
        languages = [lang if lang is not None else next(detected) for lang in given]
        prompts = [self._prompt(lang) for lang in languages]
        out: list[AsrResult | None] = [None] * len(items)
        for length in sorted({len(p) for p in prompts}):
            group = [i for i, p in enumerate(prompts) if len(p) == length]
            seconds = [items[i][0].size / MODEL_RATE for i in group]
            limits = [min(int(12 * s) + 16, self._max_tokens - length)  # WhisperAsr's cap
                      for s in seconds]
            decoded = self.greedy(encoded[group], [prompts[i] for i in group], limits)
            for i, (tokens, logprob, no_speech) in zip(group, decoded, strict=True):
                out[i] = self._result(tokens, logprob, no_speech, languages[i])
        return [r for r in out if r is not None]

    def encode(self, audios: Sequence[Float32Array]) -> Any:
        """The encoder's output for a batch of 16 kHz utterances (each cut to 30 s)."""
        with self._torch.inference_mode():
            return self._encode(audios)

    def _encode(self, audios: Sequence[Float32Array]) -> Any:
        features = self._processor.feature_extractor(
            [a[: self._samples] for a in audios], sampling_rate=MODEL_RATE, return_tensors="pt",
            padding="max_length", max_length=self._samples, truncation=True,
            device=self._device).input_features
        return self._model.model.encoder(features.to(self._device, self._dtype))[0]

    def detect(self, encoded: Any) -> list[str]:
        """The most likely language of each utterance: the language token the decoder
        prefers after the start token."""
        with self._torch.inference_mode():
            return self._detect(encoded)

    def _detect(self, encoded: Any) -> list[str]:
        start = self._torch.full((encoded.shape[0], 1), self._sot, device=self._device)
        hidden = self._decoder(start, encoded, None)
        logits = self._model.proj_out(hidden[:, -1])[:, self._language_ids]
        codes = list(self.languages)
        return [codes[i] for i in logits.argmax(-1).tolist()]

    def greedy(self, encoded: Any, prompts: list[list[int]], max_new: list[int],
               min_new: int = 0) -> list[tuple[list[int], float, float]]:
        """Greedy decoding of equal-length prompts, each for at most its ``max_new`` tokens
        (so an utterance decodes in a batch as it does alone): per utterance its tokens
        (without the end), their summed log-probability (with the end's) and the no-speech
        probability. The end is not chosen before ``min_new`` tokens (benchmarks time a
        fixed length)."""
        with self._torch.inference_mode():
            return self._greedy(encoded, prompts, max_new, min_new)

    def _greedy(self, encoded: Any, prompts: list[list[int]], max_new: list[int],
                min_new: int) -> list[tuple[list[int], float, float]]:
        from transformers.cache_utils import DynamicCache, EncoderDecoderCache

        torch = self._torch
        cache = EncoderDecoderCache(DynamicCache(), DynamicCache())
        hidden = self._decoder(torch.tensor(prompts, device=self._device), encoded, cache)
        at = prompts[0].index(self._sot)  # no-speech is read at the start token
        first = self._model.proj_out(hidden[:, [at, -1]]).float()
        n = len(prompts)
        if self._no_speech is not None:
            no_speech = first[:, 0].softmax(-1)[:, self._no_speech].tolist()
        else:
            no_speech = [0.0] * n
        logits = first[:, 1].masked_fill(self._begin, -torch.inf)
        limits = torch.tensor(max_new, device=self._device)
        done = limits <= 0
        total = torch.zeros(n, device=self._device)
        steps = []
        for step in range(max(max_new)):
            mask = self._no_end if step < min_new else self._suppress
            logp = logits.masked_fill(mask, -torch.inf).log_softmax(-1)
            token = logp.argmax(-1).masked_fill(done, self.eot)
            total += logp.gather(1, token[:, None])[:, 0].masked_fill(done, 0.0)
            steps.append(token)
            done |= (token == self.eot) | (limits <= step + 1)
            if bool(done.all()):
                break
            hidden = self._decoder(token[:, None], encoded, cache)
            logits = self._model.proj_out(hidden[:, -1]).float()
        ids = torch.stack(steps, 1).tolist() if steps else [[] for _ in range(n)]
        tokens = [row[: row.index(self.eot)] if self.eot in row else row[:limit]
                  for row, limit in zip(ids, max_new, strict=True)]
        return list(zip(tokens, total.tolist(), no_speech, strict=True))

    def _decoder(self, ids: Any, encoded: Any, cache: Any) -> Any:
        """The decoder's last hidden states for new token ids (extending ``cache``)."""
        return self._model.model.decoder(input_ids=ids, encoder_hidden_states=encoded,
                                         use_cache=cache is not None,
                                         **{self._cache_arg: cache})[0]

    def _prompt(self, language: str) -> list[int]:
        """Start, language, task and no-timestamps tokens; for Mandarin, a sentence in the
        wanted script before them (Whisper follows the script of its context)."""
        prompt: list[int] = []
        if language == "zh" and self._prev is not None:
            text = self._processor.tokenizer.encode(ZH_PROMPT[self.zh_script],
                                                    add_special_tokens=False)
            prompt = [self._prev, *text]
        prompt.append(self._sot)
        if self.multilingual:
            prompt += [self.languages[language], *([self._transcribe] if self._transcribe else [])]
        if self._no_timestamps is not None:
            prompt.append(self._no_timestamps)
        return prompt

    def _result(self, tokens: list[int], logprob: float, no_speech: float,
                language: str) -> AsrResult:
        text = str(self._processor.tokenizer.decode(tokens, skip_special_tokens=True)).strip()
        if language == "zh":  # Whisper writes Mandarin in either script, mostly traditional
            text = zh_script(text, self.zh_script)
        avg = logprob / (len(tokens) + 1) if tokens else -10.0
        return AsrResult(text, language, float(no_speech), float(avg))
