"""voxlens's model legs on a CUDA GPU, with no model hub: random weights, timing only.

    .venv/bin/python -m bench.gpu [--device cuda|cpu] [--quick] [--seconds 15]

Without a CUDA GPU (``--device cuda``, the default) it prints "no CUDA GPU: skipped" and
exits 0. Every model is built from its published configuration with random weights (no
model files travel with the repo), so the figures are timings, never transcripts:

1. ASR: ``TransformersWhisperAsr`` (``asr.engine=transformers``; fp16 on CUDA, fp32 on the
   CPU) loading checkpoints written here from the configs of whisper-base and
   whisper-large-v3-turbo: one final = log-mel features + the encoder's 30 s window, then
   12 greedy decoder tokens (a short question), at batch 1, 8 and 32.
2. The scheduler (``pipelines.compute.Compute``, max_batch 16, gather 5 ms as README's
   one-GPU advice): N simulated sessions each send a final (1.5–4 s of audio) about every
   3 s to the large-v3-turbo engine; p50/p95 of queue wait, run time and batch size per lane,
   and of the final's latency, for N = 1, 8, 32. Decoding is held at 12 tokens per
   utterance (random weights never say the end).
3. TTS: the packaged piper voice on onnxruntime's CUDA provider when onnxruntime-gpu
   provides one (else "TTS: CPU only here").
4. LLM: a Qwen2-style causal LM (the configs of Qwen2.5-0.5B and Qwen2.5-7B, bf16) in
   transformers: prefill of 400 tokens, then per-token decode at batch 1 and 64. In
   production the LLM runs in vLLM behind ``llm.engine=openai``; this is the model's cost
   on the card, not vLLM's.

``--device cpu`` runs the same measurements on the CPU; ``--quick`` uses tiny models, batch
1/2 and N 1/2, so the script can be checked anywhere.
"""

from __future__ import annotations

import argparse
import asyncio
import inspect
import json
import statistics
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from pipelines.compute import Compute, Priority
from pipelines.metrics import ComputeMetrics
from pipelines.scheduling import Priority as Work

TOKENS = 12  # decoder tokens of one final (a short question)
ENCODER = 30  # seconds: transformers' Whisper encoder takes its full window

# published sizes (Hugging Face config.json of each checkpoint)
WHISPER: dict[str, dict[str, Any]] = {
    "whisper-base": dict(d_model=512, encoder_layers=6, decoder_layers=6,
                         encoder_attention_heads=8, decoder_attention_heads=8,
                         encoder_ffn_dim=2048, decoder_ffn_dim=2048, vocab_size=51865,
                         num_mel_bins=80),
    "whisper-large-v3-turbo": dict(d_model=1280, encoder_layers=32, decoder_layers=4,
                                   encoder_attention_heads=20, decoder_attention_heads=20,
                                   encoder_ffn_dim=5120, decoder_ffn_dim=5120,
                                   vocab_size=51866, num_mel_bins=128),
}
TINY_WHISPER: dict[str, dict[str, Any]] = {
    "tiny-whisper": dict(d_model=64, encoder_layers=2, decoder_layers=2,
                         encoder_attention_heads=4, decoder_attention_heads=4,
                         encoder_ffn_dim=128, decoder_ffn_dim=128, vocab_size=51865,
                         num_mel_bins=80),
}
QWEN: dict[str, dict[str, Any]] = {
    "qwen2.5-0.5b": dict(hidden_size=896, num_hidden_layers=24, num_attention_heads=14,
                         num_key_value_heads=2, intermediate_size=4864, vocab_size=151936,
                         tie_word_embeddings=True),
    "qwen2.5-7b": dict(hidden_size=3584, num_hidden_layers=28, num_attention_heads=28,
                       num_key_value_heads=4, intermediate_size=18944, vocab_size=152064,
                       tie_word_embeddings=False),
}
TINY_QWEN: dict[str, dict[str, Any]] = {
    "tiny-qwen2": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, intermediate_size=128, vocab_size=1000,
                       tie_word_embeddings=True),
}


def pct(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


class Clock:
    """Wall time of GPU work: waits for the device before reading the clock."""

    def __init__(self, device: str) -> None:
        import torch

        self._sync: Callable[[], None] = (torch.cuda.synchronize if device == "cuda"
                                          else lambda: None)

    def __call__(self) -> float:
        self._sync()
        return time.perf_counter()


def noise(seconds: float, rng: np.random.Generator) -> np.ndarray:
    return (rng.standard_normal(int(16000 * seconds)) * 0.05).astype(np.float32)


# ---- ASR ------------------------------------------------------------------------------------

def whisper_checkpoint(out: Path, sizes: dict[str, Any], device: str) -> Path:
    """A Whisper checkpoint directory with random weights of these sizes, a feature
    extractor for its mel bins, and a placeholder tokenizer: filler tokens, then Whisper's
    special tokens at their real ids (enough to prompt and decode ids; no real text)."""
    import torch
    import transformers
    from tokenizers import Tokenizer, decoders, pre_tokenizers
    from tokenizers.models import WordLevel
    from transformers import (
        WhisperConfig,
        WhisperFeatureExtractor,
        WhisperForConditionalGeneration,
        WhisperProcessor,
    )
    from transformers.models.whisper.tokenization_whisper import LANGUAGES

    eot = 50257
    vocab = {"[UNK]": 0, **{f"t{i}": i for i in range(1, eot)}}
    tokenizer = Tokenizer(WordLevel(vocab, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.decoder = decoders.WordPiece()
    languages = list(LANGUAGES)[: 99 + (sizes["vocab_size"] - 51865)]  # large-v3: + yue
    special = ["<|endoftext|>", "<|startoftranscript|>", *(f"<|{c}|>" for c in languages),
               "<|translate|>", "<|transcribe|>", "<|startoflm|>", "<|startofprev|>",
               "<|nospeech|>", "<|notimestamps|>"]
    tokenizer.add_special_tokens(special)
    tokenizer.save(str(out / "tokenizer.json"))
    fast = transformers.WhisperTokenizerFast(  # type: ignore[attr-defined]
        tokenizer_file=str(out / "tokenizer.json"), unk_token="<|endoftext|>",
        bos_token="<|endoftext|>", eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    assert fast.convert_tokens_to_ids("<|startoftranscript|>") == eot + 1
    extractor = WhisperFeatureExtractor(  # type: ignore[no-untyped-call]
        feature_size=sizes["num_mel_bins"])
    WhisperProcessor(extractor, fast).save_pretrained(out)  # type: ignore[no-untyped-call]
    dtype = torch.float16 if device == "cuda" else torch.float32
    torch.manual_seed(0)
    with torch.device(device):
        model: Any = WhisperForConditionalGeneration(WhisperConfig(**sizes))
    model.to(dtype)
    model.save_pretrained(out)
    return out


def fixed_length(engine: Any, tokens: int) -> None:
    """Hold every utterance's decoding at ``tokens`` tokens (random weights never end)."""
    greedy = engine.greedy

    def exact(encoded: Any, prompts: list[list[int]], max_new: list[int],
              min_new: int = 0) -> Any:
        return greedy(encoded, prompts, [tokens] * len(prompts), min_new=tokens)

    engine.greedy = exact


def time_finals(engine: Any, batches: list[int], clock: Clock, repeats: int) -> None:
    rng = np.random.default_rng(0)
    print(f"{'batch':>7} {'features+encoder ms':>20} {f'{TOKENS} tokens ms':>13} "
          f"{'final ms':>9} {'per utterance ms':>17}")
    for batch in batches:
        audios = [noise(rng.uniform(1.5, 4.0), rng) for _ in range(batch)]
        prompt = engine._prompt("en")
        encoder, decoder = [], []
        for i in range(repeats + 1):  # the first is a warm-up
            t0 = clock()
            encoded = engine.encode(audios)
            t1 = clock()
            engine.greedy(encoded, [prompt] * batch, [TOKENS] * batch, min_new=TOKENS)
            t2 = clock()
            if i:
                encoder.append((t1 - t0) * 1000)
                decoder.append((t2 - t1) * 1000)
        enc, dec = statistics.median(encoder), statistics.median(decoder)
        print(f"{batch:>7} {enc:>20.1f} {dec:>13.1f} {enc + dec:>9.1f} "
              f"{(enc + dec) / batch:>17.1f}")


class Recorder(ComputeMetrics):
    """The lanes' metrics, with every sample kept (for exact percentiles)."""

    def __init__(self) -> None:
        super().__init__()
        self.samples: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))

    def waited(self, lane: str, work: Work, seconds: float) -> None:
        super().waited(lane, work, seconds)
        self.samples[lane]["wait"].append(seconds * 1000)

    def ran(self, lane: str, work: Work, seconds: float, batch: int) -> None:
        super().ran(lane, work, seconds, batch)
        self.samples[lane]["run"].append(seconds * 1000)
        self.samples[lane]["batch"].append(batch)


async def sessions(engine: Any, n: int, seconds: float, period: float) -> list[float]:
    """``n`` sessions, staggered, each sending a final about every ``period`` seconds;
    the finals' latencies (ms)."""
    end = time.monotonic() + seconds
    latencies: list[float] = []

    async def session(i: int) -> None:
        rng = np.random.default_rng(100 + i)
        await asyncio.sleep(period * i / n)
        while time.monotonic() < end:
            audio = noise(rng.uniform(1.5, 4.0), rng)
            start = time.monotonic()
            await engine.transcribe(audio, language="en", priority=Priority.ASR_FINAL,
                                    session=f"s{i}")
            latencies.append((time.monotonic() - start) * 1000)
            await asyncio.sleep(max(0.0, period * rng.uniform(0.8, 1.2)
                                    - (time.monotonic() - start)))

    await asyncio.gather(*(session(i) for i in range(n)))
    return latencies


def scheduler(engine: Any, recorder: Recorder, counts: list[int], seconds: float,
              period: float) -> None:
    fixed_length(engine, TOKENS)
    print(f"{'N':>4} {'finals':>7} {'lane':>5} {'wait p50/p95 ms':>16} {'run p50/p95 ms':>16} "
          f"{'batch p50/max':>14} {'final p50/p95 ms':>17}")
    for n in counts:
        recorder.samples.clear()
        latencies = asyncio.run(sessions(engine, n, seconds, period))
        for lane, s in sorted(recorder.samples.items()):
            print(f"{n:>4} {len(latencies):>7} {lane:>5} {p50_95(s['wait']):>16} "
                  f"{p50_95(s['run']):>16} {pct(s['batch'], 50):>7.0f}/{max(s['batch']):<6.0f} "
                  f"{p50_95(latencies):>17}")


def p50_95(values: list[float]) -> str:
    return f"{pct(values, 50):.1f}/{pct(values, 95):.1f}"


def asr_leg(device: str, quick: bool, seconds: float, clock: Clock) -> None:
    from pipelines.engines.asr_transformers import TransformersWhisperAsr

    configs = TINY_WHISPER if quick else WHISPER
    batches = [1, 2] if quick else [1, 8, 32]
    recorder = Recorder()
    compute = Compute(max_batch=16, gather_ms=5.0, metrics=recorder)
    precision = "fp16" if device == "cuda" else "fp32"
    try:
        with tempfile.TemporaryDirectory() as tmp:
            engine = None
            for name, sizes in configs.items():
                folder = Path(tmp) / name
                folder.mkdir()
                engine = None
                engine = TransformersWhisperAsr(
                    str(whisper_checkpoint(folder, sizes, device)), compute, device=device)
                print(f"\nASR final: TransformersWhisperAsr {name} ({precision}, random weights, "
                      f"timing only; {ENCODER} s encoder window)")
                time_finals(engine, batches, clock, repeats=3 if quick else 10)
            assert engine is not None
            period = 1.0 if quick else 3.0
            print(f"\nScheduler: N sessions, a final every ~{period:.0f} s each, {name}, "
                  f"{seconds:.0f} s per N (Compute max_batch 16, gather 5 ms; {TOKENS} tokens "
                  "per final)")
            scheduler(engine, recorder, [1, 2] if quick else [1, 8, 32], seconds, period)
    finally:
        compute.close()


# ---- TTS ------------------------------------------------------------------------------------

def tts_leg(device: str) -> None:
    try:
        import onnxruntime as ort
    except ImportError:
        print("\nTTS: CPU only here (no onnxruntime)")
        return
    if device != "cuda" or "CUDAExecutionProvider" not in ort.get_available_providers():
        print("\nTTS: CPU only here (onnxruntime has no CUDAExecutionProvider)")
        return
    try:
        from piper import PiperVoice
        from piper.config import PiperConfig

        from pipelines import models

        model, config = models.piper_voice("joe")
        session = ort.InferenceSession(str(model), providers=["CUDAExecutionProvider"])
        voice = PiperVoice(session=session, use_tashkeel=False,
                           config=PiperConfig.from_dict(json.loads(config.read_text("utf-8"))))
    except Exception as e:  # no packaged voice on this machine
        print(f"\nTTS: skipped, the packaged piper voice could not be loaded ({e})")
        return
    text = "The capital of France is Paris, a city on the Seine."
    times, samples = [], 0
    for i in range(6):
        start = time.perf_counter()
        samples = sum(c.audio_float_array.size for c in voice.synthesize(text))
        if i:
            times.append((time.perf_counter() - start) * 1000)
    audio_ms = samples / voice.config.sample_rate * 1000
    print(f"\nTTS: piper joe on CUDA: {statistics.median(times):.1f} ms for {audio_ms:.0f} ms of "
          f"audio (real-time factor {statistics.median(times) / audio_ms:.3f})")


# ---- LLM ------------------------------------------------------------------------------------

def llm_leg(device: str, quick: bool, clock: Clock) -> None:
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM
    from transformers.cache_utils import DynamicCache

    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    prompt, steps = 400, 8 if quick else 32
    batches = [1, 2] if quick else [1, 64]
    print(f"\nLLM: Qwen2-style causal LM in transformers ({str(dtype)[6:]}, random weights, "
          "timing only); in production the LLM runs in vLLM behind llm.engine=openai")
    print(f"{'model':>14} {'batch':>6} {f'prefill {prompt} ms':>12} {'decode ms/token':>16}")
    for name, sizes in (TINY_QWEN if quick else QWEN).items():
        torch.manual_seed(0)
        with torch.device(device):
            model: Any = Qwen2ForCausalLM(Qwen2Config(**sizes))
        model.to(dtype).eval()
        # the KV cache argument: ``cache`` in transformers 5, ``past_key_values`` before
        kv = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
        for batch in batches:
            ids = torch.randint(0, sizes["vocab_size"], (batch, prompt), device=device)
            prefill, decode = [], []
            for i in range(3):  # the first is a warm-up
                with torch.inference_mode():
                    cache = DynamicCache()
                    t0 = clock()
                    out = model(input_ids=ids, use_cache=True, logits_to_keep=1, **{kv: cache})
                    t1 = clock()
                    token = out.logits[:, -1].argmax(-1, keepdim=True)
                    for _ in range(steps):
                        out = model(input_ids=token, use_cache=True, **{kv: cache})
                        token = out.logits[:, -1].argmax(-1, keepdim=True)
                    t2 = clock()
                if i:
                    prefill.append((t1 - t0) * 1000)
                    decode.append((t2 - t1) * 1000 / steps)
            print(f"{name:>14} {batch:>6} {statistics.median(prefill):>12.1f} "
                  f"{statistics.median(decode):>16.1f}")
        del model
        if device == "cuda":
            torch.cuda.empty_cache()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--quick", action="store_true", help="tiny models, batch 1/2, N 1/2")
    parser.add_argument("--seconds", type=float, default=None,
                        help="scheduler run per N (default 15, --quick 3)")
    args = parser.parse_args()
    try:
        import torch
        import transformers
    except ImportError as e:
        if args.device == "cuda":
            print(f"no CUDA GPU: skipped (no PyTorch/transformers: {e})")
            return 0
        raise
    if args.device == "cuda" and not torch.cuda.is_available():
        print("no CUDA GPU: skipped")
        return 0

    torch.set_num_threads(2 if args.device == "cpu" else torch.get_num_threads())
    seconds = args.seconds or (3.0 if args.quick else 15.0)
    where = (f"{torch.cuda.get_device_name()} (CUDA {torch.version.cuda})"
             if args.device == "cuda" else "CPU")
    print(f"bench/gpu.py on {where}; torch {torch.__version__}, transformers "
          f"{transformers.__version__}{'; --quick: tiny models' if args.quick else ''}")
    clock = Clock(args.device)
    asr_leg(args.device, args.quick, seconds, clock)
    tts_leg(args.device)
    llm_leg(args.device, args.quick, clock)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
