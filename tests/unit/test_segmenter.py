import numpy as np

from pipelines.segmenter import End, Noise, Onset, Pause, Resume, Segmenter, SegmenterConfig, Voice

FRAME = 512
FRAME_MS = 32


def run(seg: Segmenter, probs: list[float], *, voice: bool = False) -> list[tuple[int, object]]:
    """Feed frames whose samples carry their own index; return (frame index, event).
    Voice and Noise (the barge-in hints) only with ``voice``."""
    out = []
    for i, p in enumerate(probs):
        frame = np.full(FRAME, i, dtype=np.float32)
        out.extend((i, ev) for ev in seg.push(frame, p)
                   if voice or not isinstance(ev, Voice | Noise))
    return out


def frames(ms: int) -> int:
    return -(-ms // FRAME_MS)


def test_utterance_onset_pause_end_with_padding() -> None:
    cfg = SegmenterConfig(min_speech_ms=250, silence_ms=500, pad_ms=200)
    seg = Segmenter(cfg)
    probs = [0.0] * 20 + [0.9] * 30 + [0.0] * 20
    events = run(seg, probs)
    kinds = [type(ev).__name__ for _, ev in events]
    assert kinds == ["Onset", "Pause", "End"]
    (i_on, onset), (i_pause, pause), (i_end, end) = events
    assert isinstance(onset, Onset) and onset.t_ms == (20 * 32)
    assert i_on == 20 + frames(250) - 1  # confirmed once 250 ms are voiced
    assert isinstance(pause, Pause) and i_pause == 50  # the first silent frame
    assert isinstance(end, End) and end.t_ms == 50 * 32  # end of the last voiced frame
    assert i_end == 50 + frames(500) - 1
    # audio: 200 ms pre-roll + 30 voiced frames + 200 ms trail, in order, nothing else
    ids = end.audio.reshape(-1, FRAME)[:, 0].astype(int).tolist()
    pad = round(200 / 32)
    assert ids == list(range(20 - pad, 50 + pad))
    assert end.voiced_ms == 30 * 32
    assert not seg.speaking


def test_short_blip_is_not_speech() -> None:
    seg = Segmenter(SegmenterConfig(min_speech_ms=250))
    events = run(seg, [0.0] * 5 + [0.9] * 4 + [0.0] * 40)  # 128 ms click
    assert events == []


def test_resume_before_endpoint_keeps_one_utterance() -> None:
    seg = Segmenter(SegmenterConfig(silence_ms=500))
    probs = [0.9] * 20 + [0.0] * 8 + [0.9] * 20 + [0.0] * 20
    kinds = [type(ev).__name__ for _, ev in run(seg, probs)]
    assert kinds == ["Onset", "Pause", "Resume", "Pause", "End"]


def test_hysteresis_keeps_speech_between_thresholds() -> None:
    seg = Segmenter(SegmenterConfig(threshold=0.5, neg_threshold=0.35))
    probs = [0.9] * 20 + [0.4] * 10 + [0.9] * 5 + [0.0] * 20
    kinds = [type(ev).__name__ for _, ev in run(seg, probs)]
    assert kinds == ["Onset", "Pause", "End"]  # 0.4 frames neither pause nor end it


def test_max_utterance_cuts_long_speech() -> None:
    seg = Segmenter(SegmenterConfig(max_utterance_ms=2000, pad_ms=0))
    events = [ev for _, ev in run(seg, [0.9] * 200)]
    ends = [ev for ev in events if isinstance(ev, End)]
    assert len(ends) >= 2
    assert all(ev.audio.size <= (2000 // 32 + 1) * FRAME for ev in ends)


def test_second_utterance_gets_fresh_state() -> None:
    seg = Segmenter(SegmenterConfig())
    probs = ([0.9] * 15 + [0.0] * 20) * 2
    events = [ev for _, ev in run(seg, probs)]
    assert [type(ev) for ev in events] == [Onset, Pause, End, Onset, Pause, End]
    assert not any(isinstance(ev, Resume) for ev in events)


def test_voice_comes_early_and_noise_when_it_was_not_speech() -> None:
    seg = Segmenter(SegmenterConfig(voice_ms=96, min_speech_ms=250, silence_ms=500))
    events = run(seg, [0.0] * 5 + [0.9] * 4 + [0.0] * 40, voice=True)  # a 128 ms click
    assert [(i, type(ev)) for i, ev in events] == [(5 + 2, Voice), (5 + 3 + frames(500), Noise)]
    assert events[0][1] == Voice(5 * 32) and events[1][1] == Noise(5 * 32)
    speech = run(Segmenter(SegmenterConfig(voice_ms=96)), [0.9] * 12 + [0.0] * 20, voice=True)
    assert [type(ev) for _, ev in speech] == [Voice, Onset, Pause, End]  # no Noise for speech


def test_endpoint_silence_can_change_within_an_utterance() -> None:
    seg = Segmenter(SegmenterConfig(silence_ms=500))
    run(seg, [0.9] * 20)
    seg.silence_ms = 1100  # e.g. the transcript so far trails off with "and"
    events = run(seg, [0.0] * 40)
    (i_end, _), = [(i, ev) for i, ev in events if isinstance(ev, End)]
    assert i_end == frames(1100) - 1
    assert seg.silence_ms == 500  # back to normal for the next utterance
