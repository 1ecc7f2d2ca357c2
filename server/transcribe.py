"""`voxlens transcribe`: audio and video files → text, subtitles (SRT, WebVTT) or JSON.

Any file FFmpeg (PyAV) can read is decoded to 16 kHz mono float32 here; the
model side is ``pipelines/transcription.py``. One file prints to stdout; several
files, or ``--output DIR``, are written as DIR/<name>.<format>.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
from datetime import timedelta
from pathlib import Path

import av
import numpy as np

from pipelines.transcription import Progress, Task, Transcriber, Transcript, load_model
from streaming.audio import MODEL_RATE, Float32Array
from streaming.errors import VoxlensError


class MediaError(VoxlensError):
    """A file that cannot be read as audio."""

    code = "bad_media"


# ---- decoding ------------------------------------------------------------------------------

def _mono(frame: av.AudioFrame) -> Float32Array:
    return np.asarray(frame.to_ndarray(), dtype=np.float32).reshape(-1)


def decode_audio(source: Path | bytes, progress: Progress | None = None) -> Float32Array:
    """The first audio stream of any container FFmpeg reads (a file, or a whole upload in
    memory), as 16 kHz mono float32 (held whole: 230 MB an hour). ``progress`` is told the
    seconds decoded (of the container's duration, when it has one)."""
    name = str(source) if isinstance(source, Path) else "the upload"
    if isinstance(source, Path) and not source.is_file():
        raise MediaError(f"{name}: no such file")
    chunks: list[Float32Array] = []
    try:
        with av.open(str(source) if isinstance(source, Path) else io.BytesIO(source),
                     mode="r") as container:
            if not container.streams.audio:
                raise MediaError(f"{name}: has no audio stream")
            stream = container.streams.audio[0]
            total = container.duration / 1_000_000 if container.duration else 0.0
            # FFmpeg's resampler: any layout and sample format → mono float at 16 kHz
            resampler = av.AudioResampler(format="flt", layout="mono", rate=MODEL_RATE)
            for frame in container.decode(stream):
                chunks.extend(_mono(f) for f in resampler.resample(frame))
                if progress and total and frame.time is not None:
                    progress(min(float(frame.time), total), total)
            chunks.extend(_mono(f) for f in resampler.resample(None))
    except av.FFmpegError as e:
        raise MediaError(f"{name}: cannot be decoded as audio ({e.strerror or e})") from e
    if progress and total:
        progress(total, total)
    if not chunks or sum(c.size for c in chunks) == 0:
        raise MediaError(f"{name}: the audio stream is empty")
    return np.concatenate(chunks).astype(np.float32, copy=False)


# ---- output formats ------------------------------------------------------------------------

def _vtt_time(seconds: float) -> str:
    ms = round(seconds * 1000)
    return f"{ms // 3_600_000:02d}:{ms // 60_000 % 60:02d}:{ms // 1000 % 60:02d}.{ms % 1000:03d}"


def to_txt(t: Transcript) -> str:
    return "".join(f"{s.text}\n" for s in t.segments)


def to_srt(t: Transcript) -> str:
    import srt

    subs = [srt.Subtitle(i, timedelta(seconds=s.start), timedelta(seconds=s.end), s.text)
            for i, s in enumerate(t.segments, 1)]
    return str(srt.compose(subs))


def to_vtt(t: Transcript) -> str:
    import webvtt

    captions = [webvtt.Caption(_vtt_time(s.start), _vtt_time(s.end), s.text) for s in t.segments]
    return str(webvtt.WebVTT(captions=captions).content).rstrip("\n") + "\n"


def to_json(t: Transcript, source: Path) -> str:
    doc = {"file": str(source), "language": t.language,
           "language_probability": round(t.language_probability, 3),
           "duration": round(t.duration, 3), "task": t.task, "text": t.text,
           "segments": [{"start": s.start, "end": s.end, "text": s.text} for s in t.segments]}
    return json.dumps(doc, ensure_ascii=False, indent=2) + "\n"


def render(t: Transcript, fmt: str, source: Path) -> str:
    if fmt == "srt":
        return to_srt(t)
    if fmt == "vtt":
        return to_vtt(t)
    if fmt == "json":
        return to_json(t, source)
    return to_txt(t)


# ---- progress on stderr --------------------------------------------------------------------

def _clock(seconds: float) -> str:
    s = int(seconds)
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


def progress_printer(label: str) -> Progress:
    """Percent of the audio done: live on a terminal, a line per quarter in a log."""
    tty = sys.stderr.isatty()
    step = 1 if tty else 25
    shown = -1

    def show(done: float, total: float) -> None:
        nonlocal shown
        pct = min(100, int(100 * done / total)) if total > 0 else 100
        if pct // step == shown or (pct == 0 and not tty):
            return
        shown = pct // step
        start, end = ("\r", "\n" if pct >= 100 else "") if tty else ("", "\n")
        sys.stderr.write(f"{start}  {label}: {pct:3d}% ({_clock(done)} / {_clock(total)}){end}")
        sys.stderr.flush()
    return show


# ---- the command ---------------------------------------------------------------------------

def _outputs(files: list[Path], fmt: str, output: Path | None) -> list[Path | None]:
    """Where each file's result goes: None for stdout (one file, no --output)."""
    if output is None and len(files) == 1:
        return [None]
    folder = output or Path(".")
    targets = [folder / f"{f.stem}.{fmt}" for f in files]
    seen: dict[Path, Path] = {}
    for f, target in zip(files, targets, strict=True):
        if target in seen:
            raise MediaError(f"{seen[target]} and {f} would both be written to {target}; "
                             "transcribe them separately (or rename one)")
        seen[target] = f
    return list(targets)


def _one(transcriber: Transcriber, source: Path, language: str | None, task: Task) -> Transcript:
    # decoding is fast: live on a terminal only, not worth lines in a log
    audio = decode_audio(source, progress_printer(f"{source.name} decoding")
                         if sys.stderr.isatty() else None)
    return transcriber.transcribe(audio, language=language, task=task,
                                  progress=progress_printer(source.name))


def run(args: argparse.Namespace) -> int:
    """The ``transcribe`` subcommand; returns the exit status (1 if any file failed)."""
    from pipelines import models
    from server.settings import load_settings

    settings = load_settings(args.config)
    files: list[Path] = list(args.files)
    missing = [f for f in files if not f.is_file()]
    if missing:
        raise MediaError(", ".join(str(f) for f in missing) + ": no such file")
    targets = _outputs(files, args.format, args.output)
    language = settings.asr.language if args.language is None else args.language
    language = None if language in (None, "auto") else language

    cache = settings.models.cache_dir or models.default_cache_dir()
    model = load_model(models.whisper_model(settings.asr.whisper, cache), device=settings.asr.device,
                       compute_type=settings.asr.compute_type, threads=settings.asr.threads)
    transcriber = Transcriber(model, beam_size=settings.asr.beam_size, vad_filter=args.vad,
                              zh_script=settings.asr.zh_script)
    task: Task = "translate" if args.translate else "transcribe"
    transcriber.check(language, task)
    if args.output is not None:
        args.output.mkdir(parents=True, exist_ok=True)

    status = 0
    for source, target in zip(files, targets, strict=True):
        try:
            transcript = _one(transcriber, source, language, task)
        except VoxlensError as e:
            print(f"error: {e.message}", file=sys.stderr, flush=True)
            status = 1
            continue
        except KeyboardInterrupt:
            print(f"\n{source.name}: interrupted", file=sys.stderr, flush=True)
            return 130
        text = render(transcript, args.format, source)
        if target is None:
            sys.stdout.write(text)
            sys.stdout.flush()
        else:
            target.write_text(text, encoding="utf-8")
        print(f"{source.name}: {transcript.language}, {_clock(transcript.duration)}, "
              f"{len(transcript.segments)} segment(s)" + (f" → {target}" if target else ""),
              file=sys.stderr, flush=True)
    return status

