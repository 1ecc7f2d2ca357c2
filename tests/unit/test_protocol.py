import json

import pytest

from streaming.audio import InputConverter
from streaming.errors import ProtocolError
from streaming.events import Error, Metrics, Transcript
from streaming.protocol import (
    MAX_TEXT_MESSAGE_BYTES,
    SessionStart,
    TextTurn,
    encode_event,
    parse_client_message,
)


def test_valid_messages_parse() -> None:
    m = parse_client_message('{"type": "session.start", "audio": {"sample_rate": 48000, '
                             '"channels": 2}, "output_audio": {"sample_rate": 16000}, '
                             '"language": "en"}')
    assert isinstance(m, SessionStart)
    assert (m.audio.sample_rate, m.audio.channels, m.output_audio.sample_rate) == (48000, 2, 16000)
    assert parse_client_message('{"type": "session.start"}') == SessionStart(type="session.start")
    assert parse_client_message('{"type": "text", "text": "hi"}') == TextTurn(type="text", text="hi")
    assert parse_client_message('{"type": "playback", "played_ms": 120}').type == "playback"


@pytest.mark.parametrize(("raw", "code", "fragment"), [
    ("not json", "bad_message", "not valid JSON"),
    ("[1, 2]", "bad_message", "JSON object"),
    ('{"type": "dance"}', "unknown_type", "unknown message type 'dance'"),
    ('{"text": "no type"}', "unknown_type", "unknown message type None"),
    ('{"type": "text"}', "bad_message", "text"),
    ('{"type": "text", "text": ""}', "bad_message", "text"),
    ('{"type": "text", "text": "hi", "extra": 1}', "bad_message", "extra"),
    ('{"type": "session.start", "audio": {"sample_rate": 12345}}', "unsupported", "12345"),
    ('{"type": "session.start", "audio": {"channels": 3}}', "bad_message", "channels"),
    ('{"type": "session.start", "audio": {"format": "opus"}}', "bad_message", "format"),
    ('{"type": "playback", "played_ms": -5}', "bad_message", "played_ms"),
])
def test_bad_messages_get_clear_errors(raw: str, code: str, fragment: str) -> None:
    with pytest.raises(ProtocolError) as err:
        parse_client_message(raw)
    assert err.value.code == code
    assert fragment in err.value.message


def test_oversized_text_message_rejected() -> None:
    raw = json.dumps({"type": "text", "text": "a" * MAX_TEXT_MESSAGE_BYTES})
    with pytest.raises(ProtocolError) as err:
        parse_client_message(raw)
    assert err.value.code == "too_large"


def test_events_encode() -> None:
    assert json.loads(encode_event(Transcript(3, "hello", True, "en"))) == {
        "type": "transcript", "turn_id": 3, "text": "hello", "final": True, "language": "en"}
    assert json.loads(encode_event(Error("busy", "full", True)))["fatal"] is True
    assert json.loads(encode_event(Metrics(1, {"first_audio_sent": 123.456})))["stages"] == {
        "first_audio_sent": 123.5}


def test_input_converter_downmixes_and_resamples() -> None:
    import numpy as np
    conv = InputConverter(48000, 2)
    t = np.arange(48000) / 48000
    left = (0.5 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)
    stereo = np.stack([left, np.zeros_like(left)], axis=1).reshape(-1)
    pcm = (stereo * 32767).astype("<i2").tobytes()
    out = np.concatenate([conv.convert(pcm[i:i + 3840]) for i in range(0, len(pcm), 3840)])
    assert 15500 < out.size <= 16000  # one second at 16 kHz, less the streaming resampler's delay
    assert 0.15 < float(np.max(np.abs(out[2000:]))) < 0.3  # averaged with a silent channel
    with pytest.raises(ProtocolError) as err:
        conv.convert(b"\x00\x01\x02")
    assert err.value.code == "bad_audio"
